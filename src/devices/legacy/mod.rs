//! Legacy PC devices: the 8250 UART (via vm-superio), the i8042 reset line and a pvpanic port;
//! how they are saved and rebuilt is in `persist`.

mod i8042;
mod persist;
mod serial;

pub use i8042::{ExitTrigger, I8042, I8042_LEN, I8042_PORT, PVPANIC_PORT, PvPanic};
pub use persist::{
    I8042RestoreArgs, I8042State, SerialDeviceState, SerialError, SerialRestoreArgs,
};
pub use serial::{EventFdTrigger, FlushingStdout, SERIAL_PORTS, Serial, SerialDevice};
