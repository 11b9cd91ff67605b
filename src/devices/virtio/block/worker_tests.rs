//! Tests of the I/O worker thread, the gate and the snapshot rewind, with a backend whose
//! reads stall until the test lets them go (as a remote disk's do while its server is down).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::IrqLine;
use crate::devices::virtio::test_utils::*;
use crate::disk::MemBackend;

/// Generous ceiling for anything the worker thread must do.
const PATIENCE: Duration = Duration::from_secs(30);
const SENTINEL: u8 = 0xee;

/// A disk whose every read waits for one message on `release` (after announcing itself on
/// `entered`); flushes are counted.
struct Stalling {
    inner: MemBackend,
    entered: Mutex<Sender<u64>>,
    release: Mutex<Receiver<()>>,
    flushes: AtomicU32,
}

/// The test's side of a [`Stalling`] disk.
struct Valve {
    entered: Receiver<u64>,
    release: Sender<()>,
}

fn stalling(data: Vec<u8>) -> (Arc<Stalling>, Valve) {
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    let disk = Stalling {
        inner: MemBackend::from_vec(data),
        entered: Mutex::new(etx),
        release: Mutex::new(rrx),
        flushes: AtomicU32::new(0),
    };
    let valve = Valve {
        entered: erx,
        release: rtx,
    };
    (Arc::new(disk), valve)
}

impl Valve {
    /// Waits until a read is stuck in the backend; returns its offset.
    fn wait_entered(&self) -> u64 {
        self.entered
            .recv_timeout(PATIENCE)
            .expect("the worker did not reach the backend")
    }

    fn open(&self) {
        self.release.send(()).expect("backend gone");
    }
}

impl BlockBackend for Stalling {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::disk::Result<()> {
        let _ = self.entered.lock().unwrap().send(offset);
        // A test that ends without releasing leaves the worker here until it times out.
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(120));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::disk::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> crate::disk::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn identity(&self) -> crate::disk::BackendIdentity {
        self.inner.identity()
    }
}

fn disk_data() -> Vec<u8> {
    (0..32 * 512).map(|i| (i / 512) as u8).collect()
}

/// A device over `backend`, activated on a fresh driver queue, its worker started.
struct Rig<'a> {
    mem: &'a GuestMem,
    d: Driver<'a>,
    dev: BlockDevice,
    irq: EventFd,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMem, backend: Arc<dyn BlockBackend>) -> Self {
        let d = Driver::new(mem, 0, 16);
        let mut dev = BlockDevice::new(backend, BlockConfig::default()).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(
            evt.try_clone().unwrap(),
            5,
        )));
        dev.activate(mem.clone(), vec![d.create_queue()], irq)
            .unwrap();
        dev.start_worker("test-blk").unwrap();
        Self {
            mem,
            d,
            dev,
            irq: evt,
        }
    }

    /// Queues a 512-byte read of `sector` and notifies the queue, as the guest's QueueNotify
    /// write does through the ioeventfd.
    fn read(&mut self, sector: u64) {
        write_header(self.mem, HDR, VIRTIO_BLK_T_IN, sector);
        self.mem.write_obj(SENTINEL, GuestAddress(STATUS)).unwrap();
        self.mem
            .write_slice(&[SENTINEL; 512], GuestAddress(DATA))
            .unwrap();
        let head = self
            .d
            .write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        self.d.publish(head);
        self.dev.queue_events()[0].write(1).unwrap();
    }

    fn wait_used(&self, idx: u16) {
        let end = Instant::now() + PATIENCE;
        while self.d.used_idx() != idx {
            assert!(
                Instant::now() < end,
                "used index stays {}",
                self.d.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_gate_waiters(&self, n: u32) {
        let end = Instant::now() + PATIENCE;
        while self.dev.io_gate().waiting() != n {
            assert!(Instant::now() < end, "no request waits at the gate");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_irq(&self) -> u64 {
        let end = Instant::now() + PATIENCE;
        loop {
            if let Ok(n) = self.irq.read() {
                return n;
            }
            assert!(Instant::now() < end, "no interrupt");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn data(&self) -> Vec<u8> {
        let mut v = vec![0; 512];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    fn saved_queue(&self) -> virtio_queue::QueueState {
        let states = self.dev.queue_states();
        assert_eq!(states.len(), 1);
        states[0]
    }
}

#[test]
fn worker_serves_notifications_in_order() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem, Arc::new(MemBackend::from_vec(disk_data())));
    for (i, sector) in [3u64, 5, 9].into_iter().enumerate() {
        rig.read(sector);
        rig.wait_used(i as u16 + 1);
        assert_eq!(rig.wait_irq(), 1);
        assert_eq!(rig.d.used_elem(i as u16), (0, 513));
        assert_eq!((rig.status(), rig.data()), (0, vec![sector as u8; 512]));
    }
    let s = rig.saved_queue();
    assert_eq!((s.next_avail, s.next_used), (3, 3));
}

/// Pausing while a request is stuck in the backend answers at once; the request's result
/// is held (nothing is written to guest memory) until the gate is released, and the queue
/// a snapshot would save has the request as not yet consumed.
#[test]
fn held_gate_defers_completion_and_snapshot_rewinds() {
    let mem = guest_mem();
    let (disk, valve) = stalling(disk_data());
    let mut rig = Rig::new(&mem, disk);
    rig.read(4);
    assert_eq!(valve.wait_entered(), 4 * 512);
    let s = rig.saved_queue();
    assert_eq!(
        (s.next_avail, s.next_used),
        (0, 0),
        "in flight = not consumed"
    );

    // The pause does not wait for the stuck read.
    let gate = rig.dev.io_gate().clone();
    let (tx, rx) = mpsc::channel();
    let pauser = std::thread::spawn(move || {
        gate.hold();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(PATIENCE)
        .expect("pause waited for the backend");
    pauser.join().unwrap();

    // The read finishes while paused: its data waits at the gate.
    valve.open();
    rig.wait_gate_waiters(1);
    assert_eq!(rig.d.used_idx(), 0);
    assert_eq!(rig.status(), SENTINEL);
    assert_eq!(
        rig.data(),
        vec![SENTINEL; 512],
        "guest memory written while paused"
    );
    assert!(rig.irq.read().is_err(), "interrupt while paused");
    let s = rig.saved_queue();
    assert_eq!((s.next_avail, s.next_used), (0, 0));

    rig.dev.io_gate().release();
    rig.wait_used(1);
    assert_eq!(rig.wait_irq(), 1);
    assert_eq!((rig.status(), rig.data()), (0, vec![4; 512]));
    let s = rig.saved_queue();
    assert_eq!((s.next_avail, s.next_used), (1, 1));
}

/// The queue saved while a request was in flight, restored onto a new device (a restore
/// of the snapshot), processes that request again.
#[test]
fn rewound_queue_replays_the_request_in_flight() {
    let mem = guest_mem();
    let (disk, valve) = stalling(disk_data());
    let mut rig = Rig::new(&mem, disk);
    rig.read(6);
    valve.wait_entered();
    rig.dev.io_gate().hold();
    valve.open();
    rig.wait_gate_waiters(1);
    let saved = rig.saved_queue();
    let d = rig.d;
    // The old VMM goes away; its held read is abandoned.
    drop(rig.dev);
    assert_eq!(d.used_idx(), 0);

    let mut dev = BlockDevice::new(
        Arc::new(MemBackend::from_vec(disk_data())),
        BlockConfig::default(),
    )
    .unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(
        evt.try_clone().unwrap(),
        5,
    )));
    let q = Queue::try_from(saved).unwrap();
    dev.activate(mem.clone(), vec![q], irq).unwrap();
    dev.handle_queue_event();
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used_elem(0), (0, 513));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let mut v = vec![0; 512];
    mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
    assert_eq!(v, vec![6; 512]);
    assert_eq!(evt.read().unwrap(), 1);
}

/// A device reset while a read is stuck returns at once; the read, when it returns, writes
/// nothing, and the device serves the next activation.
#[test]
fn reset_abandons_a_stuck_request() {
    let mem = guest_mem();
    let (disk, valve) = stalling(disk_data());
    let mut rig = Rig::new(&mem, disk);
    rig.read(2);
    valve.wait_entered();
    rig.dev.reset();
    assert!(!rig.dev.is_activated());
    valve.open();

    // Re-activated on a fresh queue; the next read needs the worker, so the abandoned one
    // has finished by the time it completes.
    let d2 = Driver::new(&mem, 0x8000, 16);
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(
        evt.try_clone().unwrap(),
        5,
    )));
    rig.dev
        .activate(mem.clone(), vec![d2.create_queue()], irq)
        .unwrap();
    assert_eq!(rig.status(), SENTINEL, "abandoned request wrote its status");
    assert_eq!(rig.data(), vec![SENTINEL; 512]);
    assert_eq!(rig.d.used_idx(), 0);

    let mut d2 = d2;
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
    let head = d2.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    d2.publish(head);
    rig.dev.queue_events()[0].write(1).unwrap();
    assert_eq!(valve.wait_entered(), 7 * 512);
    valve.open();
    let end = Instant::now() + PATIENCE;
    while d2.used_idx() != 1 {
        assert!(Instant::now() < end, "second activation not served");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rig.status(), 0);
    assert_eq!(rig.data(), vec![7; 512]);
    assert_eq!(rig.d.used_idx(), 0, "old ring untouched");
}

/// Dropping a device whose worker is stuck in a backend call does not hang: the worker is
/// left detached after the timeout, and the disk is flushed.
#[test]
fn drop_detaches_a_stuck_worker() {
    let mem = guest_mem();
    let (disk, valve) = stalling(disk_data());
    let mut rig = Rig::new(&mem, disk.clone());
    rig.read(1);
    valve.wait_entered();
    let t = Instant::now();
    drop(rig.dev);
    assert!(
        t.elapsed() >= WORKER_STOP_TIMEOUT,
        "did not wait for the worker"
    );
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    valve.open();
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, SENTINEL, "a stopped device wrote guest memory");

    // A worker that is idle stops at once and the disk is left to its owner.
    let (disk, _valve) = stalling(disk_data());
    let rig = Rig::new(&mem, disk.clone());
    drop(rig.dev);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 0);
}
