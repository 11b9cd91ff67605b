//! The request engine of a virtio-blk device and the I/O worker thread that runs it.
//!
//! One worker thread per device waits on the queue eventfd (the ioeventfd KVM signals on
//! QueueNotify) and processes requests in order: pop a chain, run it against the backend,
//! publish it in the used ring, signal the guest. The event loop never touches the queue,
//! so a backend call that takes seconds (a remote disk retrying, a slow local disk) stalls
//! only this device's guest requests, never the control API, the console or other devices.
//!
//! In-order processing means at most one popped request is unpublished at any time. The
//! queue state a snapshot saves has `next_avail` rewound over it ([`Engine::queue_state`]),
//! so a restore processes it again; guest memory is only written through the device's
//! [`IoGate`], which pausing the VM holds (module `gate`).

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::gate::{ActivationGate, IoGate, WriteGate};
use super::request::{DISK_ID_LEN, QUEUE_SIZE, RequestScratch, process_request_gated};
use crate::devices::virtio::{GuestMem, VirtioInterrupt};
use crate::disk::BlockBackend;
use crate::util::lock;

/// Requests handled per queue event before the worker checks for a stop (and re-kicks).
pub const MAX_REQUESTS_PER_EVENT: usize = 4 * QUEUE_SIZE as usize;
/// How long dropping a device waits for its worker to leave a backend call.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// The queue of an activation and what the worker knows about it.
struct Ring {
    queue: Queue,
    /// Chains popped but not yet in the used ring (0 or 1: requests run in order).
    in_flight: u16,
    /// A ring error was found; the device needs a reset.
    broken: bool,
}

/// One activation of the device: from DRIVER_OK to reset.
pub(super) struct Activation {
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    ring: Mutex<Ring>,
    /// Set by [`IoGate::stop`] when the activation ends.
    stopped: AtomicBool,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drained {
    /// The available ring is empty and notifications are enabled again.
    Empty,
    /// The per-event budget is spent; more may be available.
    Budget,
    /// The activation was stopped or is broken.
    Stopped,
}

/// What the device and its worker share.
pub(super) struct Engine {
    pub(super) backend: Arc<dyn BlockBackend>,
    pub(super) disk_id: [u8; DISK_ID_LEN],
    pub(super) gate: Arc<IoGate>,
    /// A duplicate of the queue eventfd, to re-kick after the per-event budget.
    kick: EventFd,
    current: Mutex<Option<Arc<Activation>>>,
    /// One request processor at a time; holds its reusable buffers.
    processor: Mutex<RequestScratch>,
}

impl Engine {
    pub(super) fn new(
        backend: Arc<dyn BlockBackend>,
        disk_id: [u8; DISK_ID_LEN],
        queue_evt: &EventFd,
    ) -> std::io::Result<Self> {
        Ok(Self {
            backend,
            disk_id,
            gate: Arc::new(IoGate::new()),
            kick: queue_evt.try_clone()?,
            current: Mutex::new(None),
            processor: Mutex::new(RequestScratch::default()),
        })
    }

    /// Starts serving `queue`.
    pub(super) fn activate(&self, mem: GuestMem, queue: Queue, interrupt: Arc<VirtioInterrupt>) {
        let act = Arc::new(Activation {
            mem,
            interrupt,
            ring: Mutex::new(Ring {
                queue,
                in_flight: 0,
                broken: false,
            }),
            stopped: AtomicBool::new(false),
        });
        let old = lock(&self.current).replace(act);
        if let Some(old) = old {
            self.gate.stop(&old.stopped);
        }
    }

    /// Ends the current activation, if any: no write of it reaches guest memory after this
    /// returns (a request still in a backend call is abandoned when the call returns).
    pub(super) fn deactivate(&self) {
        let old = lock(&self.current).take();
        if let Some(act) = old {
            self.gate.stop(&act.stopped);
        }
    }

    pub(super) fn is_active(&self) -> bool {
        lock(&self.current).is_some()
    }

    fn current(&self) -> Option<Arc<Activation>> {
        lock(&self.current).clone()
    }

    /// The queue as a snapshot records it: `next_avail` rewound over the request in flight,
    /// if any, so that a restore processes it again; `next_used` as published.
    pub(super) fn queue_state(&self) -> Option<QueueState> {
        let act = self.current()?;
        let ring = lock(&act.ring);
        let mut state = ring.queue.state();
        state.next_avail = state.next_avail.wrapping_sub(ring.in_flight);
        Some(state)
    }

    /// Processes available requests (at most [`MAX_REQUESTS_PER_EVENT`], then re-kicks),
    /// completes them and interrupts the guest as the driver asked.
    pub(super) fn process_queue(&self) {
        let Some(act) = self.current() else {
            debug!("virtio-blk: queue event before activation ignored");
            return;
        };
        let mut scratch = lock(&self.processor);
        let gate = ActivationGate {
            gate: &self.gate,
            stopped: &act.stopped,
        };
        let (unsignalled, result) = self.drain(&act, &gate, &mut scratch);
        let Some(_busy) = gate.enter() else {
            return;
        };
        let mut ring = lock(&act.ring);
        match result {
            Ok(Drained::Budget) => {
                if let Err(e) = self.kick.write(1) {
                    error!("virtio-blk: re-kicking queue: {e}");
                }
            }
            Ok(Drained::Empty | Drained::Stopped) => {}
            Err(e) => {
                error!("virtio-blk: queue error, device needs reset: {e}");
                ring.broken = true;
                act.interrupt.set_needs_reset();
            }
        }
        if unsignalled && ring.queue.needs_notification(&act.mem).unwrap_or(true) {
            act.interrupt.signal_used_queue();
        }
    }

    /// Runs requests until the ring is empty, the budget is spent or the activation ends.
    /// Returns whether completions were published without signalling the guest yet (without
    /// EVENT_IDX, one interrupt covers a whole drain, as it always did), and how it ended.
    fn drain(
        &self,
        act: &Activation,
        gate: &ActivationGate<'_>,
        scratch: &mut RequestScratch,
    ) -> (bool, Result<Drained, virtio_queue::Error>) {
        let mut unsignalled = false;
        let mut seen = 0usize;
        let result = (|| -> Result<Drained, virtio_queue::Error> {
            loop {
                {
                    let Some(_busy) = gate.enter() else {
                        return Ok(Drained::Stopped);
                    };
                    let mut ring = lock(&act.ring);
                    if ring.broken {
                        return Ok(Drained::Stopped);
                    }
                    ring.queue.disable_notification(&act.mem)?;
                }
                loop {
                    let chain = match pop(act, gate)? {
                        Popped::Chain(c) => c,
                        Popped::Empty => break,
                        Popped::Stopped => return Ok(Drained::Stopped),
                    };
                    let head = chain.head_index();
                    let Some(c) = process_request_gated(
                        &act.mem,
                        chain,
                        &*self.backend,
                        &self.disk_id,
                        scratch,
                        gate,
                    ) else {
                        return Ok(Drained::Stopped);
                    };
                    if !publish(act, gate, head, c.used_len, &mut unsignalled)? {
                        return Ok(Drained::Stopped);
                    }
                    seen += 1;
                    if seen >= MAX_REQUESTS_PER_EVENT {
                        return Ok(Drained::Budget);
                    }
                }
                let Some(_busy) = gate.enter() else {
                    return Ok(Drained::Stopped);
                };
                if !lock(&act.ring).queue.enable_notification(&act.mem)? {
                    return Ok(Drained::Empty);
                }
            }
        })();
        (unsignalled, result)
    }
}

/// What [`pop`] found.
enum Popped<'a> {
    /// The next request, now counted in flight.
    Chain(DescriptorChain<&'a GuestMem>),
    /// The available ring is empty.
    Empty,
    /// The activation was stopped.
    Stopped,
}

/// Takes the next available chain of `act`.
fn pop<'a>(
    act: &'a Activation,
    gate: &ActivationGate<'_>,
) -> Result<Popped<'a>, virtio_queue::Error> {
    let Some(_busy) = gate.enter() else {
        return Ok(Popped::Stopped);
    };
    let mut ring = lock(&act.ring);
    Ok(match ring.queue.iter(&act.mem)?.next() {
        Some(chain) => {
            ring.in_flight += 1;
            Popped::Chain(chain)
        }
        None => Popped::Empty,
    })
}

/// Puts the completed request `head` in the used ring. With EVENT_IDX the driver says when
/// it wants an interrupt, so it is asked after every completion: one finished request never
/// waits for a slow next one. Returns false when the activation was stopped.
fn publish(
    act: &Activation,
    gate: &ActivationGate<'_>,
    head: u16,
    used_len: u32,
    unsignalled: &mut bool,
) -> Result<bool, virtio_queue::Error> {
    let Some(_busy) = gate.enter() else {
        return Ok(false);
    };
    let mut ring = lock(&act.ring);
    ring.in_flight -= 1;
    match ring.queue.add_used(&act.mem, head, used_len) {
        Ok(()) => *unsignalled = true,
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {
            debug!("virtio-blk: available ring names descriptor {head}; skipped");
        }
        Err(e) => return Err(e),
    }
    if *unsignalled
        && ring.queue.event_idx_enabled()
        && ring.queue.needs_notification(&act.mem).unwrap_or(true)
    {
        act.interrupt.signal_used_queue();
        *unsignalled = false;
    }
    Ok(true)
}

/// The I/O worker thread of a device.
pub(super) struct Worker {
    name: String,
    stop: EventFd,
    exited: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

const QUEUE_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;

impl Worker {
    /// Starts thread `name` serving `engine` on notifications of `queue_evt`.
    pub(super) fn spawn(
        name: String,
        engine: Arc<Engine>,
        queue_evt: &EventFd,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let queue_evt = queue_evt.try_clone()?;
        for (fd, token) in [(&queue_evt, QUEUE_TOKEN), (&stop, STOP_TOKEN)] {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(fd),
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let (exited_tx, exited) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                serve(&epoll, &queue_evt, &engine);
                let _ = exited_tx.send(());
            })?;
        Ok(Self {
            name,
            stop,
            exited,
            thread: Some(thread),
        })
    }

    /// Asks the thread to end (its activation must already be stopped, so that it does not
    /// wait at the gate) and joins it if it ends within [`WORKER_STOP_TIMEOUT`]. Returns
    /// false when it did not: it is stuck in a backend call and is left detached.
    pub(super) fn stop(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        if let Err(e) = self.stop.write(1) {
            error!("{}: cannot signal the I/O worker to stop: {e}", self.name);
        }
        match self.exited.recv_timeout(WORKER_STOP_TIMEOUT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    error!("{}: the I/O worker panicked", self.name);
                }
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!(
                    "{}: the I/O worker is still in a backend call after {:?}; left detached",
                    self.name, WORKER_STOP_TIMEOUT
                );
                false
            }
        }
    }
}

/// The worker's loop: wait for a notification (or the stop), process the queue.
fn serve(epoll: &Epoll, queue_evt: &EventFd, engine: &Engine) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-blk: I/O worker cannot wait for events: {e}");
                return;
            }
        };
        let mut kicked = false;
        for ev in &events[..n] {
            match ev.data() {
                STOP_TOKEN => return,
                _ => kicked = true,
            }
        }
        if kicked {
            if let Err(e) = queue_evt.read()
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                warn!("virtio-blk: reading queue eventfd: {e}");
            }
            engine.process_queue();
        }
    }
}
