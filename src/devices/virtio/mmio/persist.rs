//! [`Persist`] for the virtio-mmio transport: its registers, interrupt status and the
//! queues' configuration and positions. Restoring builds the transport around a device
//! already rebuilt from its own state, then re-activates a running device.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_NEEDS_RESET};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{MmioError, MmioTransport};
use crate::devices::IrqLine;
use crate::devices::virtio::{GuestMem, VirtioDevice};
use crate::formats::Persist;
use crate::util::lock;

/// Serializable state of one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size selected by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table guest address.
    pub desc_table: u64,
    /// Available ring guest address.
    pub avail_ring: u64,
    /// Used ring guest address.
    pub used_ring: u64,
    /// Next available-ring entry the device will consume.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// Serializable state of a [`MmioTransport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Device status, including DEVICE_NEEDS_RESET.
    pub status: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Per-queue state.
    pub queues: Vec<QueueSnapshot>,
}

/// What rebuilding a transport needs besides its state.
pub struct MmioRestoreArgs {
    /// Guest memory.
    pub mem: GuestMem,
    /// The device, already rebuilt from its state.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The interrupt line (an irqfd) the transport raises.
    pub irq: IrqLine,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type Args = MmioRestoreArgs;
    type Error = MmioError;

    /// Captures the transport state (and the queue positions of an active device, with any
    /// request it has not completed yet counted as not consumed).
    fn save(&self) -> Result<MmioTransportState, MmioError> {
        let queues = {
            let active = lock(&self.device).queue_states();
            if self.activated && active.len() == self.queues.len() {
                active.into_iter().map(QueueSnapshot::from).collect()
            } else {
                self.queues.iter().map(|q| q.state().into()).collect()
            }
        };
        Ok(MmioTransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.driver_features,
            status: self.status(),
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues,
        })
    }

    /// Builds a transport for `args.device` (whose own state is already restored) and gives
    /// it the saved state. A device that was running is activated again and its queues are
    /// kicked, so requests the driver queued before the save get processed.
    fn restore(args: MmioRestoreArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let mut t = MmioTransport::new(args.mem, args.device, args.irq)?;
        t.apply_saved(state)?;
        Ok(t)
    }
}

impl MmioTransport {
    /// Gives this freshly created transport the saved state (see `restore`).
    fn apply_saved(&mut self, state: &MmioTransportState) -> Result<(), MmioError> {
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                device: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (snap, cur)) in state.queues.iter().zip(&self.queues).enumerate() {
            if snap.max_size != cur.max_size() {
                return Err(MmioError::InvalidQueue {
                    index,
                    source: virtio_queue::Error::InvalidMaxSize,
                });
            }
            let q = Queue::try_from(QueueState::from(*snap))
                .map_err(|source| MmioError::InvalidQueue { index, source })?;
            queues.push(q);
        }
        self.reset();
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.status = state.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let needs_reset = state.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !needs_reset {
            self.activate().map_err(MmioError::Activate)?;
            for i in 0..self.notify_evts.len() {
                self.notify(i as u32);
            }
        }
        self.interrupt.restore(state.interrupt_status, needs_reset);
        Ok(())
    }
}
