//! virtio-net over a tap device: one RX and one TX queue, served by a device thread
//! (`virtio-net<i>`) that waits on the tap and both queue eventfds.
//!
//! * `queue` — the pure queue work (gather a TX frame, scatter an RX frame), unit-tested
//!   with hostile chains;
//! * `tap` — opening an existing tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), offloads;
//! * `worker` — the device thread;
//! * `persist` — [`Persist`](crate::formats::Persist) for the device.
//!
//! Guest memory is only written inside busy sections of the device's [`IoGate`] (the one
//! the block devices use): pausing the VM holds it, so nothing reaches guest memory or the
//! interrupt line while a snapshot is taken, and a frame read from the tap meanwhile waits
//! at the gate. A TX chain is popped, written to the tap and returned inside one busy
//! section, so no chain is ever half done at a snapshot. docs/NETWORK.md.

mod persist;
pub mod queue;
mod shared;
pub mod tap;
mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

pub use persist::{NetDeviceState, NetRestoreArgs};
use shared::{Activation, Shared};
pub use tap::{Tap, TapError};

use super::block::gate::IoGate;
use super::{
    GuestMem, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioError,
    VirtioInterrupt, read_config_bytes,
};
use crate::util::lock;

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Errors of the virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd could not be created.
    #[error("virtio-net: creating an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device thread could not be started.
    #[error("virtio-net: starting the device thread")]
    Worker(#[source] std::io::Error),
    /// Saved state differs from this device in a guest-visible way.
    #[error("virtio-net: saved {0} differs from the device's")]
    StateMismatch(&'static str),
}

/// A virtio-net device on a tap.
pub struct NetDevice {
    shared: Arc<Shared>,
    id: String,
    features: u64,
    acked: u64,
    config: [u8; 8],
    queue_evts: [EventFd; 2],
    worker: Option<worker::Worker>,
}

/// The MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl NetDevice {
    /// A device `id` with MAC `mac` on the opened `tap`.
    pub fn new(id: &str, tap: Tap, mac: [u8; 6]) -> Result<Self, NetError> {
        let features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6;
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            shared: Arc::new(Shared {
                tap,
                gate: Arc::new(IoGate::new()),
                current: Mutex::new(None),
                wake: evt()?,
                mac,
                guest_ipv4: Mutex::new(None),
            }),
            id: id.to_string(),
            features,
            acked: 0,
            config,
            queue_evts: [evt()?, evt()?],
            worker: None,
        })
    }

    /// The interface id (`net0`, …).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.shared.tap.name()
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.shared.mac
    }

    /// Starts the device thread, named `name`. Starting it twice does nothing.
    pub fn start_worker(&mut self, name: &str) -> Result<(), NetError> {
        if self.worker.is_none() {
            let w = worker::Worker::spawn(
                name.to_string(),
                self.id.clone(),
                self.shared.clone(),
                &self.queue_evts,
            )
            .map_err(NetError::Worker)?;
            self.worker = Some(w);
        }
        Ok(())
    }

    /// The gate through which the device writes guest memory (held while the VM is paused).
    pub fn io_gate(&self) -> &Arc<IoGate> {
        &self.shared.gate
    }

    /// Tells peers and bridges where the guest is now: a gratuitous ARP for the address the
    /// guest last sent from, written to the tap (after a restore). Nothing when the guest
    /// has not sent an IPv4 packet yet.
    pub fn announce(&self) {
        let Some(ip) = *lock(&self.shared.guest_ipv4) else {
            debug!(
                "virtio-net {}: no guest address known; no announcement",
                self.id
            );
            return;
        };
        let frame = shared::gratuitous_arp(self.shared.mac, ip);
        match self.shared.tap.write_frame(&frame) {
            Ok(_) => log::info!(
                "virtio-net {}: announced {}.{}.{}.{} at {} on {}",
                self.id,
                ip[0],
                ip[1],
                ip[2],
                ip[3],
                format_mac(&self.shared.mac),
                self.tap_name()
            ),
            Err(e) => warn!(
                "virtio-net {}: gratuitous ARP on {}: {e}",
                self.id,
                self.tap_name()
            ),
        }
    }

    fn stop_activation(&self) {
        let old = lock(&self.shared.current).take();
        if let Some(act) = old {
            self.shared.gate.stop(&act.stopped);
        }
        let _ = self.shared.wake.write(1);
    }

    /// The tap offloads matching what the driver accepts.
    fn tap_offload(acked: u64) -> u32 {
        let has = |bit: u32| acked & (1 << bit) != 0;
        let mut f = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            f |= tap::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                f |= tap::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                f |= tap::TUN_F_TSO6;
            }
        }
        f
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.stop_activation();
        if let Some(w) = self.worker.take() {
            w.stop(&self.shared.wake);
        }
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-net: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioError> {
        if queues.len() != 2 {
            return Err(VirtioError::QueueCount {
                expected: 2,
                got: queues.len(),
            });
        }
        if let Err(e) = self.shared.tap.set_offload(Self::tap_offload(self.acked)) {
            warn!("virtio-net {}: {}", self.id, crate::util::error_chain(&e));
        }
        let tx = queues.pop().expect("two queues");
        let rx = queues.pop().expect("two queues");
        let act = Arc::new(Activation {
            mem,
            interrupt,
            rx: Mutex::new(rx),
            tx: Mutex::new(tx),
            stopped: AtomicBool::new(false),
            mergeable: self.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        });
        let old = lock(&self.shared.current).replace(act);
        if let Some(old) = old {
            self.shared.gate.stop(&old.stopped);
        }
        let _ = self.shared.wake.write(1);
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        match self.shared.current() {
            Some(act) => vec![lock(&act.rx).state(), lock(&act.tx).state()],
            None => Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.stop_activation();
        self.acked = 0;
        for e in &self.queue_evts {
            let _ = e.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_driver() {
        assert_eq!(NetDevice::tap_offload(0), 0);
        let csum = 1 << VIRTIO_NET_F_GUEST_CSUM;
        let tso = 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6;
        assert_eq!(NetDevice::tap_offload(tso), 0, "TSO needs checksum offload");
        assert_eq!(
            NetDevice::tap_offload(csum | tso),
            tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6
        );
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&[2, 0, 0, 0xab, 0, 1]), "02:00:00:ab:00:01");
    }
}
