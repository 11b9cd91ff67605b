//! Why a VM stopped, recorded once by whichever thread sees it first and signalled to the
//! event loop through an eventfd.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The reason the VMM stops running the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 controller (`reboot=k`): a clean stop.
    Reset,
    /// The guest signalled a kernel panic on the pvpanic port.
    GuestPanic,
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// A vCPU stopped with an error the VMM cannot handle.
    VcpuError {
        /// The vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
    },
    /// Shutdown requested through the control API or a signal.
    Shutdown,
    /// Lazily restored guest memory could not be fetched (missing or corrupt chunk).
    MemoryUnavailable {
        /// What failed.
        message: String,
    },
}

impl ExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Reset | ExitReason::Shutdown => 0,
            ExitReason::GuestPanic => 3,
            ExitReason::TripleFault { .. } => 4,
            ExitReason::VcpuError { .. } => 5,
            ExitReason::MemoryUnavailable { .. } => 6,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "guest reset the machine (clean exit)"),
            ExitReason::GuestPanic => write!(f, "guest kernel panicked (pvpanic)"),
            ExitReason::TripleFault { vcpu } => write!(f, "vcpu{vcpu}: triple fault"),
            ExitReason::VcpuError { vcpu, message } => write!(f, "vcpu{vcpu}: {message}"),
            ExitReason::Shutdown => write!(f, "shutdown requested"),
            ExitReason::MemoryUnavailable { message } => {
                write!(f, "guest memory could not be restored: {message}")
            }
        }
    }
}

/// A one-shot exit latch: the first reason wins, the eventfd wakes the event loop.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A new, untriggered signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn exit(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::info!("exit: {reason}");
            *r = Some(reason);
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            log::error!("exit signal: eventfd write failed: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable on exit.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.exit(ExitReason::GuestPanic);
        s.exit(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::GuestPanic));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        assert_ne!(ExitReason::GuestPanic.exit_code(), 0);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
    }
}
