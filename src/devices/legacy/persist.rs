//! [`Persist`] for the legacy devices: COM1's registers and FIFO (the `serial` of the state
//! file), and the i8042, which has no state of its own (it is rebuilt from its exit latch).

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vmm_sys_util::eventfd::EventFd;

use super::i8042::{ExitTrigger, I8042};
use super::serial::{EventFdTrigger, SerialDevice};
use crate::formats::Persist;
use crate::vstate::exit::{ExitReason, ExitSignal};

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

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args = SerialRestoreArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialDeviceState, SerialError> {
        let s = self.serial.state();
        Ok(SerialDeviceState {
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
        })
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

/// Saved state of the i8042: none (vm-superio's controller keeps no register state); it is
/// not part of the state file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

/// What rebuilding the i8042 needs: the exit latch its reset line ends the VM through.
pub struct I8042RestoreArgs {
    /// The VM's exit latch.
    pub signal: Arc<ExitSignal>,
}

impl Persist for I8042 {
    type State = I8042State;
    type Args = I8042RestoreArgs;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {})
    }

    fn restore(args: I8042RestoreArgs, _state: &I8042State) -> Result<Self, Self::Error> {
        Ok(Self {
            dev: vm_superio::I8042Device::new(ExitTrigger::new(args.signal, ExitReason::Reset)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::bus::BusDevice;

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
        let s = d.save().unwrap();
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
        assert_eq!(r.save().unwrap(), s);
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

    #[test]
    fn i8042_round_trip_keeps_reset_line() {
        let signal = Arc::new(ExitSignal::new().unwrap());
        let d = I8042::new(signal.clone());
        let s = d.save().unwrap();
        let mut r = I8042::restore(
            I8042RestoreArgs {
                signal: signal.clone(),
            },
            &s,
        )
        .unwrap();
        assert_eq!(r.save().unwrap(), s);
        assert!(signal.reason().is_none());
        r.write(4, &[0xfe]);
        assert_eq!(signal.reason(), Some(ExitReason::Reset));
    }
}
