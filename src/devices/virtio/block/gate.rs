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

//!
//! The fast path (entering and leaving an open gate) is two atomic operations on one word
//! holding both counts, so that gating every write costs next to nothing; waiting uses a
//! mutex and condition variable, and wakes only when someone waits.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};

/// One unit of the hold count in [`IoGate::state`] (busy sections count in the low half).
const HOLD: u64 = 1 << 32;
const BUSY_MASK: u64 = HOLD - 1;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct IoGate {
    /// Holds taken (paused VM, tests) in the high 32 bits, busy sections in progress in the
    /// low 32 bits. The gate is open when the holds are 0.
    state: AtomicU64,
    /// Callers waiting for the gate to open.
    waiting: AtomicU32,
    /// Callers of `hold` or `stop` waiting for the busy sections to end.
    draining: AtomicU32,
    /// Protects the waits and wake-ups (the counts themselves are atomic).
    lock: Mutex<()>,
    cv: Condvar,
}

/// A busy section: guest memory may be written while it lives.
#[must_use = "the busy section ends when the guard is dropped"]
#[derive(Debug)]
pub struct GateGuard<'a>(Option<&'a IoGate>);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            g.leave();
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
    /// Set by [`IoGate::stop`] when the activation ends.
    pub stopped: &'a AtomicBool,
}

impl WriteGate for ActivationGate<'_> {
    fn enter(&self) -> Option<GateGuard<'_>> {
        let gate = self.gate;
        loop {
            if self.stopped.load(SeqCst) {
                return None;
            }
            let cur = gate.state.load(SeqCst);
            if cur < HOLD {
                if gate
                    .state
                    .compare_exchange_weak(cur, cur + 1, SeqCst, SeqCst)
                    .is_err()
                {
                    continue;
                }
                // `stop` sets the flag, then waits for the busy count to drain: either it
                // sees this section, or this sees its flag.
                if self.stopped.load(SeqCst) {
                    gate.leave();
                    return None;
                }
                return Some(GateGuard(Some(gate)));
            }
            // Held: wait for the release (or the stop), then try again.
            let mut g = gate.lock();
            gate.waiting.fetch_add(1, SeqCst);
            while gate.state.load(SeqCst) >= HOLD && !self.stopped.load(SeqCst) {
                g = gate.wait(g);
            }
            gate.waiting.fetch_sub(1, SeqCst);
        }
    }
}

impl IoGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, ()>) -> MutexGuard<'a, ()> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every waiter (under the lock, so that none is between its check and its wait).
    fn wake(&self) {
        let _g = self.lock();
        self.cv.notify_all();
    }

    /// Ends a busy section.
    fn leave(&self) {
        let busy = (self.state.fetch_sub(1, SeqCst) - 1) & BUSY_MASK;
        // Waking costs a system call: only when someone waits for the gate to drain.
        if busy == 0 && self.draining.load(SeqCst) > 0 {
            self.wake();
        }
    }

    /// Waits until no busy section is in progress.
    fn drain(&self) {
        if self.state.load(SeqCst) & BUSY_MASK == 0 {
            return;
        }
        let mut g = self.lock();
        self.draining.fetch_add(1, SeqCst);
        while self.state.load(SeqCst) & BUSY_MASK != 0 {
            g = self.wait(g);
        }
        self.draining.fetch_sub(1, SeqCst);
    }

    /// Closes the gate (holds nest) and waits for the busy section in progress, if any:
    /// when this returns, the device writes no guest memory and raises no interrupt until
    /// the hold is [released](Self::release).
    pub fn hold(&self) {
        self.state.fetch_add(HOLD, SeqCst);
        self.drain();
    }

    /// Releases one [`hold`](Self::hold); the gate opens when none is left.
    pub fn release(&self) {
        let prev = self
            .state
            .fetch_update(SeqCst, SeqCst, |s| (s >= HOLD).then(|| s - HOLD));
        match prev {
            Err(_) => log::warn!("virtio-blk: I/O gate released more often than held"),
            Ok(s) if s < 2 * HOLD && self.waiting.load(SeqCst) > 0 => self.wake(),
            Ok(_) => {}
        }
    }

    /// Whether no hold is taken.
    pub fn is_open(&self) -> bool {
        self.state.load(SeqCst) < HOLD
    }

    /// How many writers wait for the gate to open (a request whose result is held).
    pub fn waiting(&self) -> u32 {
        self.waiting.load(SeqCst)
    }

    /// Ends an activation: sets `stopped` and waits for its busy section in progress, if
    /// any. Afterwards no write of that activation reaches guest memory; a worker waiting at
    /// the gate for it wakes up and abandons its request.
    pub fn stop(&self, stopped: &AtomicBool) {
        stopped.store(true, SeqCst);
        self.drain();
        if self.waiting.load(SeqCst) > 0 {
            self.wake();
        }
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

    /// Many short busy sections on one thread while another holds and releases the gate:
    /// no busy section ever overlaps a hold, and nobody hangs.
    #[test]
    fn busy_sections_never_overlap_a_hold() {
        use std::sync::atomic::AtomicUsize;
        let gate = Arc::new(IoGate::new());
        let held = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let entries = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (gate, held, done, entries) =
                (gate.clone(), held.clone(), done.clone(), entries.clone());
            std::thread::spawn(move || {
                let stopped = AtomicBool::new(false);
                let g = ActivationGate {
                    gate: &gate,
                    stopped: &stopped,
                };
                while !done.load(SeqCst) {
                    let busy = g.enter().expect("not stopped");
                    assert!(!held.load(SeqCst), "busy section inside a hold");
                    entries.fetch_add(1, SeqCst);
                    drop(busy);
                }
            })
        };
        for _ in 0..300 {
            // The writer gets in between two holds (it may be waiting at the gate).
            let seen = entries.load(SeqCst);
            while entries.load(SeqCst) == seen {
                std::thread::yield_now();
            }
            gate.hold();
            held.store(true, SeqCst);
            std::thread::yield_now();
            held.store(false, SeqCst);
            gate.release();
        }
        done.store(true, SeqCst);
        writer.join().expect("writer thread");
        assert!(gate.is_open());
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
