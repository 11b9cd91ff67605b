//! The i8042 controller (only its CPU-reset line matters) and a pvpanic-compatible port.

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::vstate::bus::BusDevice;
use crate::vstate::exit::{ExitReason, ExitSignal};

/// Port of the i8042 data register; the device covers 0x60..=0x64.
pub const I8042_PORT: u64 = 0x60;
/// Length of the i8042 window.
pub const I8042_LEN: u64 = 5;
/// Port of the pvpanic-compatible "guest panicked" register.
pub const PVPANIC_PORT: u64 = 0x505;

/// A `Trigger` that records a VMM exit reason.
#[derive(Clone)]
pub struct ExitTrigger {
    signal: Arc<ExitSignal>,
    reason: ExitReason,
}

impl ExitTrigger {
    /// Triggers `reason` on `signal`.
    pub fn new(signal: Arc<ExitSignal>, reason: ExitReason) -> Self {
        Self { signal, reason }
    }
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.signal.exit(self.reason.clone());
        Ok(())
    }
}

/// The i8042 controller, of which only the CPU-reset command (0xFE on port 0x64) matters:
/// it ends the VM cleanly (what `reboot=k` and the test agent's poweroff use).
pub struct I8042 {
    pub(super) dev: I8042Device<ExitTrigger>,
}

impl I8042 {
    /// A controller whose reset ends the VM through `signal`.
    pub fn new(signal: Arc<ExitSignal>) -> Self {
        Self {
            dev: I8042Device::new(ExitTrigger::new(signal, ExitReason::Reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.dev.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && let Err(e) = self.dev.write(offset as u8, data[0])
        {
            log::warn!("i8042: reset signal failed: {e}");
        }
    }
}

/// A pvpanic-compatible port: the guest writes bit 0 when it panics (the project's guest
/// kernel does this from a panic notifier); the VMM then exits non-zero.
pub struct PvPanic {
    signal: Arc<ExitSignal>,
}

impl PvPanic {
    /// A port that reports a guest panic through `signal`.
    pub fn new(signal: Arc<ExitSignal>) -> Self {
        Self { signal }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Bit 0: the device supports PANICKED notifications.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = 1;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|b| b & 1 != 0) {
            self.signal.exit(ExitReason::GuestPanic);
        }
    }
}
