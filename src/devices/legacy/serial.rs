//! The 8250 UART on 0x3f8 / IRQ 4, built on vm-superio, plus inert ports for COM2..COM4.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::bus::BusDevice;

/// (port base, IRQ) of COM1..COM4. Only COM1 is wired to the console; the others exist so
/// the guest's 8250 probe finds well-behaved silent UARTs.
pub const SERIAL_PORTS: [(u64, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];

/// An eventfd registered as irqfd, as a vm-superio `Trigger`.
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The vm-superio serial type used here.
pub type Serial = vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// A serial port on the I/O bus.
pub struct SerialDevice {
    /// The emulated UART.
    pub serial: Serial,
}

impl SerialDevice {
    /// A UART raising `irq_evt` and writing guest output to `out`.
    pub fn new(irq_evt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: vm_superio::Serial::new(EventFdTrigger(irq_evt), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: input dropped: {e}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && offset < 8
            && let Err(e) = self.serial.write(offset as u8, data[0])
        {
            log::debug!("serial: write error: {e}");
        }
    }
}

/// A sink that flushes after every write, so the console log is complete when the VM stops.
pub struct FlushingStdout;

impl Write for FlushingStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}
