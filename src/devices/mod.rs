//! Emulated devices: legacy PC devices and virtio, on the buses vCPU exits are dispatched
//! on ([`crate::vstate::bus`]).

pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line into the in-kernel irqchip: an eventfd registered with KVM as an irqfd
/// for one GSI. Writing to it raises the (edge-triggered) interrupt.
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
    gsi: u32,
}

impl IrqLine {
    /// Wraps an eventfd already registered as irqfd for `gsi`.
    pub fn new(evt: EventFd, gsi: u32) -> Self {
        Self { evt, gsi }
    }

    /// The GSI this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The underlying eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}
