//! The virtio-mmio transport, version 2 ("modern", virtio 1.x §4.2.2).

use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    GuestMem, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioError,
    VirtioInterrupt,
};
use crate::devices::IrqLine;
use crate::util::lock;
use crate::vstate::bus::BusDevice;

mod persist;

pub use persist::{MmioRestoreArgs, MmioTransportState, QueueSnapshot};

/// Size of a virtio-mmio device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM registers the queue ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2 (virtio 1.x).
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest.
const VENDOR_ID: u32 = 0;

/// The kernel command-line argument that makes Linux probe a virtio-mmio device.
pub fn kernel_cmdline_arg(base: u64, gsi: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{gsi}")
}

/// Errors of the virtio-mmio transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Duplicating the device's queue eventfds failed.
    #[error("virtio-mmio: duplicating queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Saved state has a different number of queues than the device.
    #[error("virtio-mmio: saved state has {saved} queues, device has {device}")]
    QueueCount {
        /// Queues in the saved state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A saved queue is inconsistent with the device or itself.
    #[error("virtio-mmio: saved queue {index} is invalid: {source}")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// What virtio-queue rejected.
        #[source]
        source: virtio_queue::Error,
    },
    /// The restored device could not be activated.
    #[error("virtio-mmio: activating restored device: {0}")]
    Activate(#[source] VirtioError),
}

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    /// Duplicates of the device's queue eventfds, for QueueNotify writes that reach the bus.
    notify_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    /// The driver's queue configuration (copied to the device on activation).
    queues: Vec<Queue>,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the line (an irqfd) the transport raises for it.
    pub fn new(
        mem: GuestMem,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: IrqLine,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, queues, notify_evts) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .filter_map(|&max| match Queue::new(max) {
                    Ok(q) => Some(q),
                    Err(e) => {
                        warn!("virtio-mmio: device queue size {max} invalid: {e}");
                        None
                    }
                })
                .collect();
            let evts = d
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(MmioError::EventFd)?;
            (d.device_type(), d.features(), queues, evts)
        };
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            notify_evts,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            activated: false,
        })
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Device status register, including DEVICE_NEEDS_RESET.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the driver finished initialization and the device is running.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Applies a queue configuration write if the queue may still be configured.
    fn configure_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if self.activated {
            debug!("virtio-mmio: queue config write after DRIVER_OK ignored");
            return;
        }
        match self.selected_queue() {
            Some(q) if !q.ready() => f(q),
            Some(_) => debug!("virtio-mmio: config write to a ready queue ignored"),
            None => debug!("virtio-mmio: config write to absent queue ignored"),
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            debug!("virtio-mmio: status {v:#x} clears bits of {old:#x}; ignored");
            return;
        }
        let added = v & !old;
        let mut new = v & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && (old & VIRTIO_CONFIG_S_DRIVER == 0 || !self.features_acceptable())
        {
            warn!(
                "virtio-mmio: rejecting features {:#x} (device offers {:#x})",
                self.driver_features, self.device_features
            );
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                debug!("virtio-mmio: DRIVER_OK without FEATURES_OK ignored");
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                warn!("virtio-mmio: activation failed: {e}");
                self.interrupt.set_needs_reset();
            }
        }
        self.status = new;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        if self.activated {
            return Ok(());
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut dev_queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if !q.is_valid(&self.mem) {
                return Err(VirtioError::InvalidQueue { index });
            }
            dev_queues
                .push(Queue::try_from(q.state()).map_err(|_| VirtioError::InvalidQueue { index })?);
        }
        let mut dev = lock(&self.device);
        dev.ack_features(self.driver_features);
        dev.activate(self.mem.clone(), dev_queues, self.interrupt.clone())?;
        drop(dev);
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
    }

    fn notify(&self, index: u32) {
        match self.notify_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: queue {index} notify: {e}");
                }
            }
            None => debug!("virtio-mmio: notify of absent queue {index}"),
        }
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().is_some_and(|q| q.ready()).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: a length of all ones says so.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => {
                debug!("virtio-mmio: read of register {reg:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, reg: u32, v: u32) {
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_DRIVER == 0
                    || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
                {
                    debug!(
                        "virtio-mmio: driver features write in status {:#x} ignored",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    s => debug!("virtio-mmio: driver features word {s} ignored"),
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(v) {
                Ok(n) => self.configure_queue(|q| q.set_size(n)),
                Err(_) => debug!("virtio-mmio: queue size {v} ignored"),
            },
            VIRTIO_MMIO_QUEUE_READY => {
                if self.activated {
                    debug!("virtio-mmio: QueueReady write after DRIVER_OK ignored");
                } else if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.configure_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.configure_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.configure_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.configure_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.configure_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.configure_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => debug!("virtio-mmio: write of {v:#x} to register {reg:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        // offset < 0x100 here.
        let v = self.read_reg(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            debug!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
