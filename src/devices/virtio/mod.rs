//! virtio devices over the virtio-mmio transport.
//!
//! A device model implements [`VirtioDevice`]; the [`MmioTransport`] wraps it, sits on the
//! MMIO bus, runs the driver's status/feature/queue negotiation and, on `DRIVER_OK`, hands
//! the configured queues to the device with [`VirtioDevice::activate`]. The device then
//! processes its queues (on its own I/O worker thread, woken by its queue eventfds) and
//! signals completions through the shared [`VirtioInterrupt`].
//!
//! Attaching a block device, as the VMM does it:
//!
//! ```ignore
//! let backend: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(path, read_only, false)?);
//! let mut device = BlockDevice::new(backend, BlockConfig::default())?;
//! device.start_worker("virtio-blk0")?;
//! let block = Arc::new(Mutex::new(device));
//! let irq_evt = EventFd::new(EFD_NONBLOCK)?;
//! vm_fd.register_irqfd(&irq_evt, gsi)?;
//! let transport = MmioTransport::new(mem.clone(), block.clone(), IrqLine::new(irq_evt, gsi))?;
//! for (i, evt) in lock(&block).queue_events().iter().enumerate() {
//!     vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)?;
//! }
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
//! cmdline.push(kernel_cmdline_arg(base, gsi));
//! ```

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod test_utils;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;

pub use block::{BlockConfig, BlockDevice, BlockDeviceState, BlockRestoreArgs, IoGate};
pub use mmio::{
    MMIO_WINDOW_SIZE, MmioRestoreArgs, MmioTransport, MmioTransportState, NOTIFY_REG_OFFSET,
    QueueSnapshot, kernel_cmdline_arg,
};

/// Guest memory as the virtio devices see it.
pub type GuestMem = crate::vstate::memory::GuestMemory;

/// Feature bit: the device conforms to virtio 1.x (mandatory for virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: used/available event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Errors of virtio device activation.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A queue is not ready or its rings are not inside guest memory.
    #[error("virtqueue {index} is not ready or lies outside guest memory")]
    InvalidQueue {
        /// Index of the queue.
        index: usize,
    },
    /// An eventfd could not be created or duplicated.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (e.g. 2 for block).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Reads device configuration space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The features the driver acknowledged, told before [`activate`](Self::activate)
    /// (a device that configures its backend from them, e.g. tap offloads, keeps them).
    fn ack_features(&mut self, _features: u64) {}
    /// Starts the device with the queues the driver configured.
    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioError>;
    /// The state of each active queue as a snapshot must record it (empty when the device
    /// is not activated). A device that completes requests asynchronously reports
    /// `next_avail` rewound to its oldest request not yet in the used ring, so a restore
    /// processes that request and the ones after it again.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Stops the device and drops its queues; it may be activated again afterwards.
    fn reset(&mut self);
}

/// Copies `config[offset..]` into `data`, zero-filling whatever lies beyond `config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Interrupt state shared by a transport and its device: the InterruptStatus register,
/// the DEVICE_NEEDS_RESET condition, and the interrupt line into the guest.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: IrqLine,
}

impl VirtioInterrupt {
    /// Wraps the device's interrupt line.
    pub fn new(irq: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// Signals that buffers were added to a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Signals that the configuration space (or device status) changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// Marks the device as needing a reset (a driver error was detected) and tells the driver.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    /// Whether the device needs a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged InterruptStatus bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The interrupt line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// Clears all interrupt state (device reset).
    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Restores saved state; re-raises the line if an interrupt was pending.
    fn restore(&self, status: u32, needs_reset: bool) {
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            self.trigger();
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.trigger();
    }

    fn trigger(&self) {
        if let Err(e) = self.irq.trigger() {
            log::error!("virtio: failed to raise GSI {}: {e}", self.irq.gsi());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_zero_fill() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_bits() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = VirtioInterrupt::new(IrqLine::new(evt.try_clone().unwrap(), 5));
        i.signal_used_queue();
        i.signal_config_change();
        assert_eq!(i.status(), 3);
        assert_eq!(evt.read().unwrap(), 2);
        i.ack(1);
        assert_eq!(i.status(), 2);
        i.set_needs_reset();
        assert!(i.needs_reset());
        i.reset();
        assert_eq!((i.status(), i.needs_reset()), (0, false));
    }
}
