//! The I/O gate of a block device: where its worker may touch guest memory.
//!
//! The worker writes guest memory (request data, status bytes, the used ring and, with
//! EVENT_IDX, the avail event) and raises interrupts only inside short *busy* sections,
//! each entered through the gate. Holding the gate (the VM is paused) closes it:
//! [`IoGate::hold`] waits for the current busy section, if any, to end (a memory copy, never
//! a backend call) and from then on no busy section starts until every hold is released.
//! A request whose backend call finishes meanwhile waits at the gate with its result; the
//! snapshot records it as not yet done (see `Engine::queue_state`).
//!
//! A device reset or shutdown *stops* an activation ([`IoGate::stop`]): busy sections of
//! that activation never start again, so a worker still stuck in a backend call abandons
//! its request instead of writing into rings the driver may already have freed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct GateState {
    /// Holds taken (paused VM, tests); the gate is open when 0.
    holds: u32,
    /// Busy sections in progress.
    busy: u32,
    /// Callers waiting for the gate to open.
    waiting: u32,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct IoGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

/// A busy section: guest memory may be written while it lives.
#[must_use = "the busy section ends when the guard is dropped"]
#[derive(Debug)]
pub struct GateGuard<'a>(Option<&'a IoGate>);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            let mut s = g.lock();
            s.busy -= 1;
            drop(s);
            g.cv.notify_all();
        }
    }
}

/// What a request asks before each write to guest memory.
pub trait WriteGate {
    /// Waits until guest memory may be written and returns the busy section to write in;
    /// `None` when the request must be abandoned (its device was reset or shut down).
    fn enter(&self) -> Option<GateGuard<'_>>;
}

/// No gate: every write proceeds at once (a caller that owns the device outright).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ungated;

impl WriteGate for Ungated {
    fn enter(&self) -> Option<GateGuard<'_>> {
        Some(GateGuard(None))
    }
}

/// The gate as seen by one activation of the device: `stopped` ends it for good.
#[derive(Clone, Copy, Debug)]
pub struct ActivationGate<'a> {
    /// The device's gate.
    pub gate: &'a IoGate,
    /// Set (under the gate's lock, by [`IoGate::stop`]) when the activation ends.
    pub stopped: &'a AtomicBool,
}

impl WriteGate for ActivationGate<'_> {
    fn enter(&self) -> Option<GateGuard<'_>> {
        let mut s = self.gate.lock();
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return None;
            }
            if s.holds == 0 {
                s.busy += 1;
                return Some(GateGuard(Some(self.gate)));
            }
            s.waiting += 1;
            s = self.gate.wait(s);
            s.waiting -= 1;
        }
    }
}

impl IoGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    fn wait_idle<'a>(&self, mut g: MutexGuard<'a, GateState>) -> MutexGuard<'a, GateState> {
        while g.busy > 0 {
            g = self.wait(g);
        }
        g
    }

    /// Closes the gate (holds nest) and waits for the busy section in progress, if any:
    /// when this returns, the device writes no guest memory and raises no interrupt until
    /// the hold is [released](Self::release).
    pub fn hold(&self) {
        let mut s = self.lock();
        s.holds += 1;
        drop(self.wait_idle(s));
    }

    /// Releases one [`hold`](Self::hold); the gate opens when none is left.
    pub fn release(&self) {
        let mut s = self.lock();
        if s.holds == 0 {
            log::warn!("virtio-blk: I/O gate released more often than held");
            return;
        }
        s.holds -= 1;
        let open = s.holds == 0;
        drop(s);
        if open {
            self.cv.notify_all();
        }
    }

    /// Whether no hold is taken.
    pub fn is_open(&self) -> bool {
        self.lock().holds == 0
    }

    /// How many writers wait for the gate to open (a request whose result is held).
    pub fn waiting(&self) -> u32 {
        self.lock().waiting
    }

    /// Ends an activation: sets `stopped` and waits for its busy section in progress, if
    /// any. Afterwards no write of that activation reaches guest memory; a worker waiting at
    /// the gate for it wakes up and abandons its request.
    pub fn stop(&self, stopped: &AtomicBool) {
        let s = self.lock();
        stopped.store(true, Ordering::Release);
        drop(self.wait_idle(s));
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// Enters `gate` on another thread; reports each entry on the channel.
    fn enter_in_thread(
        gate: Arc<IoGate>,
        stopped: Arc<AtomicBool>,
    ) -> (mpsc::Receiver<bool>, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let g = ActivationGate {
                gate: &gate,
                stopped: &stopped,
            };
            let entered = g.enter();
            let _ = tx.send(entered.is_some());
        });
        (rx, h)
    }

    #[test]
    fn holds_nest_and_block_entry() {
        let gate = Arc::new(IoGate::new());
        let stopped = Arc::new(AtomicBool::new(false));
        assert!(gate.is_open());
        gate.hold();
        gate.hold();
        let (rx, h) = enter_in_thread(gate.clone(), stopped);
        while gate.waiting() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(rx.try_recv().is_err());
        gate.release();
        assert!(!gate.is_open());
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        gate.release();
        assert!(rx.recv_timeout(Duration::from_secs(30)).unwrap());
        h.join().unwrap();
        gate.release();
        assert!(gate.is_open(), "an extra release is ignored");
    }

    #[test]
    fn hold_waits_for_the_busy_section() {
        let gate = Arc::new(IoGate::new());
        let stopped = AtomicBool::new(false);
        let g = ActivationGate {
            gate: &gate,
            stopped: &stopped,
        };
        let busy = g.enter().expect("open gate");
        let (tx, rx) = mpsc::channel();
        let holder = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.hold();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(busy);
        rx.recv_timeout(Duration::from_secs(30)).unwrap();
        holder.join().unwrap();
        assert!(!gate.is_open());
    }

    #[test]
    fn stop_releases_a_waiting_worker_and_refuses_entry() {
        let gate = Arc::new(IoGate::new());
        let stopped = Arc::new(AtomicBool::new(false));
        gate.hold();
        let (rx, h) = enter_in_thread(gate.clone(), stopped.clone());
        while gate.waiting() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.stop(&stopped);
        assert!(!rx.recv_timeout(Duration::from_secs(30)).unwrap());
        h.join().unwrap();
        gate.release();
        let g = ActivationGate {
            gate: &gate,
            stopped: &stopped,
        };
        assert!(g.enter().is_none(), "a stopped activation stays stopped");
        assert!(Ungated.enter().is_some());
    }
}
