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

/// Saved state of a UART: every register and the receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received from the host and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Errors restoring a UART.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved FIFO does not fit or the interrupt could not be re-raised.
    #[error("serial: cannot restore state: {0}")]
    Restore(String),
}

/// What restoring a UART needs besides its state.
pub struct SerialRestoreArgs {
    /// Interrupt eventfd (registered as irqfd).
    pub irq_evt: EventFd,
    /// Console output.
    pub out: Box<dyn Write + Send>,
}

impl crate::formats::Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args = SerialRestoreArgs;
    type Error = SerialError;

    fn save(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(args: SerialRestoreArgs, s: &SerialDeviceState) -> Result<Self, SerialError> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = vm_superio::Serial::from_state(
            &state,
            EventFdTrigger(args.irq_evt),
            NoEvents,
            args.out,
        )
        .map_err(|e| SerialError::Restore(e.to_string()))?;
        Ok(Self { serial })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::Persist;

    #[test]
    fn state_round_trip() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = SerialDevice::new(evt, Box::new(std::io::sink()));
        d.write(3, &[0x83]); // DLAB on
        d.write(0, &[0x0c]); // divisor low
        d.write(3, &[0x03]); // 8N1, DLAB off
        d.write(1, &[0x01]); // enable RX interrupt
        d.write(7, &[0x5a]); // scratch
        assert_eq!(d.enqueue_input(b"hi"), 2);
        let s = d.save();
        let bytes = bincode::serialize(&s).unwrap();
        let s2: SerialDeviceState = bincode::deserialize(&bytes).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialDevice::restore(
            SerialRestoreArgs {
                irq_evt: evt,
                out: Box::new(std::io::sink()),
            },
            &s2,
        )
        .unwrap();
        assert_eq!(r.save(), s);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.read(0, &mut b);
        assert_eq!(b[0], b'h');
        let mut bad = s.clone();
        bad.in_buffer = vec![0; 1 << 20];
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let args = SerialRestoreArgs {
            irq_evt: evt,
            out: Box::new(std::io::sink()),
        };
        assert!(SerialDevice::restore(args, &bad).is_err());
    }
}
