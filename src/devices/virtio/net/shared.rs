//! What the device and its thread share: the activation (queues, memory, interrupt) and
//! the tap, gate and learnt guest address; and the gratuitous ARP frame.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::queue::VNET_HDR_LEN;
use super::tap::Tap;
use crate::devices::virtio::block::gate::IoGate;
use crate::devices::virtio::{GuestMem, VirtioInterrupt};
use crate::util::lock;

/// One activation of the device: from DRIVER_OK to reset.
pub(super) struct Activation {
    pub(super) mem: GuestMem,
    pub(super) interrupt: Arc<VirtioInterrupt>,
    pub(super) rx: Mutex<Queue>,
    pub(super) tx: Mutex<Queue>,
    /// Set by [`IoGate::stop`] when the activation ends.
    pub(super) stopped: AtomicBool,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub(super) mergeable: bool,
}

/// What the device and its thread share.
pub(super) struct Shared {
    pub(super) tap: Tap,
    pub(super) gate: Arc<IoGate>,
    pub(super) current: Mutex<Option<Arc<Activation>>>,
    /// Wakes the device thread (activation changed, stop).
    pub(super) wake: EventFd,
    pub(super) mac: [u8; 6],
    /// The IPv4 address the guest last sent from (ARP or IPv4), for a gratuitous ARP
    /// after a restore.
    pub(super) guest_ipv4: Mutex<Option<[u8; 4]>>,
}

impl Shared {
    pub(super) fn current(&self) -> Option<Arc<Activation>> {
        lock(&self.current).clone()
    }
}

/// Whether the activation was stopped (for the device thread).
pub(super) fn stopped(act: &Activation) -> bool {
    act.stopped.load(Ordering::SeqCst)
}

/// A gratuitous ARP request (vnet header first) announcing `ip` at `mac`.
pub(super) fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(VNET_HDR_LEN + 60, 0); // minimum Ethernet frame
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 7], [10, 0, 0, 2]);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[12..14], &[8, 6]);
        assert_eq!(&e[28..32], &[10, 0, 0, 2]);
        assert_eq!(&e[38..42], &[10, 0, 0, 2]);
    }
}
