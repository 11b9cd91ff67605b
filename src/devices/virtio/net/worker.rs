//! The device thread of a virtio-net device: waits on the tap (edge-triggered), both queue
//! eventfds and a wake eventfd; moves frames TX queue → tap and tap → RX queue.
//!
//! A full RX queue only stops reading the tap (the kernel queues, then drops, frames for
//! it); the thread waits for the driver's next RX notification. A tap that fails (deleted
//! while the guest runs) is logged once and no longer watched: the guest's link carries on
//! with nothing arriving and its frames dropped, and the VMM and its API keep running.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use log::{debug, error, warn};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{self, Delivered, MAX_FRAME, VNET_HDR_LEN};
use super::shared::{Activation, Shared, stopped};
use crate::devices::virtio::block::gate::{ActivationGate, WriteGate};
use crate::util::lock;

const TOKEN_TAP: u64 = 0;
const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_WAKE: u64 = 3;

/// The device thread.
pub(super) struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread `name` serving device `id`.
    pub(super) fn spawn(
        name: String,
        id: String,
        shared: Arc<Shared>,
        queue_evts: &[EventFd; 2],
    ) -> std::io::Result<Self> {
        let rx_evt = queue_evts[0].try_clone()?;
        let tx_evt = queue_evts[1].try_clone()?;
        let wake = shared.wake.try_clone()?;
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64, set: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
        };
        add(
            shared.tap.as_raw_fd(),
            TOKEN_TAP,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        add(rx_evt.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        add(tx_evt.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        add(wake.as_raw_fd(), TOKEN_WAKE, EventSet::IN)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = Loop {
            id,
            shared,
            epoll,
            evts: [rx_evt, tx_evt, wake],
            stop: stop.clone(),
            frame: vec![0; MAX_FRAME],
            pending: None,
            tap_readable: true,
            tap_dead: false,
            tx_buf: Vec::new(),
            tx_errors: 0,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || state.run())?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and joins it (it never blocks but at the gate, which a stopped
    /// activation opens).
    pub(super) fn stop(mut self, wake: &EventFd) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = wake.write(1);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("virtio-net: device thread panicked");
        }
    }
}

struct Loop {
    id: String,
    shared: Arc<Shared>,
    epoll: Epoll,
    /// RX queue, TX queue, wake.
    evts: [EventFd; 3],
    stop: Arc<AtomicBool>,
    frame: Vec<u8>,
    /// Length of a frame read from the tap and not yet delivered (waiting for buffers).
    pending: Option<usize>,
    tap_readable: bool,
    tap_dead: bool,
    tx_buf: Vec<u8>,
    tx_errors: u64,
}

impl Loop {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        while !self.stop.load(Ordering::SeqCst) {
            let n = match self.epoll.wait(1000, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("virtio-net {}: epoll: {e}; device thread ends", self.id);
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_TAP => self.tap_readable = true,
                    t => {
                        let _ = self.evts[(t - 1) as usize].read();
                    }
                }
            }
            if let Some(act) = self.shared.current() {
                self.process_tx(&act);
                self.process_rx(&act);
            } else if self.pending.take().is_some() {
                debug!("virtio-net {}: frame dropped (device not active)", self.id);
            }
        }
    }

    /// Sends every available TX chain to the tap; one busy section per chain.
    fn process_tx(&mut self, act: &Activation) {
        let mut done = 0u32;
        loop {
            let gate = ActivationGate {
                gate: &self.shared.gate,
                stopped: &act.stopped,
            };
            let Some(_busy) = gate.enter() else {
                return;
            };
            let mut q = lock(&act.tx);
            let tx = match queue::pop_tx(&act.mem, &mut q, &mut self.tx_buf) {
                Ok(Some(tx)) => tx,
                Ok(None) => break,
                Err(e) => {
                    warn!("virtio-net {}: TX ring: {e}; device needs reset", self.id);
                    act.interrupt.set_needs_reset();
                    return;
                }
            };
            match tx.result {
                Ok(len) => {
                    let frame = &self.tx_buf[..len];
                    learn_ipv4(&self.shared, frame);
                    if let Err(e) = self.shared.tap.write_frame(frame) {
                        self.tx_errors += 1;
                        if self.tx_errors == 1 || e.kind() != ErrorKind::WouldBlock {
                            warn_tap(
                                &self.id,
                                self.shared.tap.name(),
                                "write",
                                &e,
                                self.tx_errors,
                            );
                        }
                    }
                }
                Err(e) => debug!("virtio-net {}: TX chain dropped: {e}", self.id),
            }
            if let Err(e) = queue::complete(&act.mem, &mut q, tx.head, 0) {
                warn!(
                    "virtio-net {}: TX used ring: {e}; device needs reset",
                    self.id
                );
                act.interrupt.set_needs_reset();
                return;
            }
            done += 1;
        }
        if done > 0 {
            let mut q = lock(&act.tx);
            if q.needs_notification(&act.mem).unwrap_or(true) {
                act.interrupt.signal_used_queue();
            }
        }
    }

    /// Moves frames from the tap into the RX queue until the tap is empty or the queue full.
    fn process_rx(&mut self, act: &Activation) {
        let mut delivered = false;
        loop {
            if self.pending.is_none() {
                if !self.tap_readable || self.tap_dead {
                    break;
                }
                match self.shared.tap.read_frame(&mut self.frame) {
                    Ok(n) if n >= VNET_HDR_LEN => self.pending = Some(n),
                    Ok(n) => debug!("virtio-net {}: {n}-byte read from the tap ignored", self.id),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.tap_failed(&e);
                        break;
                    }
                }
                continue;
            }
            let len = self.pending.expect("pending frame");
            let gate = ActivationGate {
                gate: &self.shared.gate,
                stopped: &act.stopped,
            };
            let Some(_busy) = gate.enter() else {
                self.pending = None;
                return;
            };
            let mut q = lock(&act.rx);
            match queue::deliver_rx(&act.mem, &mut q, &mut self.frame[..len], act.mergeable) {
                Ok(Delivered::Chains(_)) => {
                    self.pending = None;
                    delivered = true;
                }
                Ok(Delivered::NoBuffers) => break,
                Ok(Delivered::Dropped(e)) => {
                    debug!("virtio-net {}: RX frame dropped: {e}", self.id);
                    self.pending = None;
                    delivered = true;
                }
                Err(e) => {
                    warn!("virtio-net {}: RX ring: {e}; device needs reset", self.id);
                    act.interrupt.set_needs_reset();
                    self.pending = None;
                    return;
                }
            }
        }
        if delivered && !stopped(act) {
            let gate = ActivationGate {
                gate: &self.shared.gate,
                stopped: &act.stopped,
            };
            let Some(_busy) = gate.enter() else {
                return;
            };
            if lock(&act.rx).needs_notification(&act.mem).unwrap_or(true) {
                act.interrupt.signal_used_queue();
            }
        }
    }

    /// The tap failed (e.g. it was deleted): log, stop watching it, keep running.
    fn tap_failed(&mut self, e: &std::io::Error) {
        error!(
            "virtio-net {}: tap {}: read: {e}; no more frames reach the guest (the VM keeps running)",
            self.id,
            self.shared.tap.name()
        );
        self.tap_dead = true;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.shared.tap.as_raw_fd(),
            EpollEvent::default(),
        );
    }
}

fn warn_tap(id: &str, tap: &str, op: &str, e: &std::io::Error, count: u64) {
    if count == 1 || count.is_power_of_two() {
        warn!("virtio-net {id}: tap {tap}: {op}: {e} ({count} frames dropped so far)");
    }
}

/// Records the guest's IPv4 address from a frame it sent (vnet header first): the sender
/// of an ARP packet, or the source of an IPv4 packet.
fn learn_ipv4(shared: &Shared, frame: &[u8]) {
    let eth = &frame[VNET_HDR_LEN.min(frame.len())..];
    if eth.len() < 14 || eth[6..12] != shared.mac {
        return;
    }
    let ip = match u16::from_be_bytes([eth[12], eth[13]]) {
        0x0806 if eth.len() >= 14 + 18 => [eth[28], eth[29], eth[30], eth[31]],
        0x0800 if eth.len() >= 14 + 20 => [eth[26], eth[27], eth[28], eth[29]],
        _ => return,
    };
    if ip != [0; 4] {
        *lock(&shared.guest_ipv4) = Some(ip);
    }
}
