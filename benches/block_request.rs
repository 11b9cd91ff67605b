//! Benchmarks of the virtio-blk request processor: 4 KiB and 128 KiB reads from an
//! in-memory disk, each request popped from a (mock) split virtqueue; and of the device's
//! whole queue path (batches of 4 KiB reads, used ring, interrupt).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::IrqLine;
use vmm::devices::virtio::block::{RequestScratch, RequestStatus, process_request};
use vmm::devices::virtio::{BlockConfig, BlockDevice, VirtioDevice, VirtioInterrupt};
use vmm::disk::MemBackend;
use vmm::vstate::memory::GuestMemory as GuestMem;
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x80_0000;
const PAGE: u32 = 4096;

fn bench_read(c: &mut Criterion, len: u32) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let disk = MemBackend::from_vec((0..64usize << 20).map(|i| i as u8).collect());
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let mut queue: Queue = vq.create_queue().unwrap();

    // Header, one descriptor per 4 KiB page (as Linux builds them), status.
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let pages = len.div_ceil(PAGE) as u16;
    let mut descs = vec![(HDR, 16, 0)];
    descs.extend((0..pages).map(|p| (DATA + u64::from(p) * 8192, PAGE, VRING_DESC_F_WRITE)));
    descs.push((STATUS, 1, VRING_DESC_F_WRITE));
    for (i, &(addr, dlen, flags)) in descs.iter().enumerate() {
        let i = i as u16;
        let last = usize::from(i) + 1 == descs.len();
        let flags = if last {
            flags
        } else {
            flags | VRING_DESC_F_NEXT
        } as u16;
        let d = Descriptor::new(addr, dlen, flags, if last { 0 } else { i + 1 });
        vq.desc_table().store(i, RawDescriptor::from(d)).unwrap();
    }

    let id = *b"bench-disk-000000000";
    let mut scratch = RequestScratch::default();
    let mut avail = 0u16;
    let mut group = c.benchmark_group("process_request");
    group.throughput(Throughput::Bytes(len.into()));
    group.bench_function(format!("read_{}k", len / 1024), |b| {
        b.iter(|| {
            vq.avail()
                .ring()
                .ref_at((avail % QSIZE).into())
                .unwrap()
                .store(0);
            avail = avail.wrapping_add(1);
            vq.avail().idx().store(avail);
            let chain = queue.pop_descriptor_chain(&mem).unwrap();
            let done = process_request(&mem, chain, &disk, &id, &mut scratch);
            assert_eq!(done.status, RequestStatus::Ok);
            black_box(done)
        })
    });
    group.finish();
}

/// A virtio-blk device over an in-memory disk and a split queue laid out as a driver would
/// (the mock's own used ring would overlap its avail ring at this size).
struct DeviceRig {
    mem: GuestMem,
    dev: BlockDevice,
    irq: EventFd,
    avail_addr: u64,
    used_addr: u64,
    avail: u16,
}

/// Chains per batch in the device benchmarks: what one notification makes available.
const BATCH: u16 = 32;

impl DeviceRig {
    fn new() -> Self {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let disk = MemBackend::from_vec((0..64usize << 20).map(|i| i as u8).collect());
        let (desc_addr, avail_addr) = {
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
            // BATCH chains of header, one 4 KiB page, status.
            for i in 0..BATCH {
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
                h[8..].copy_from_slice(&(8 * u64::from(i)).to_le_bytes());
                let hdr = HDR + 16 * u64::from(i);
                mem.write_slice(&h, GuestAddress(hdr)).unwrap();
                let chain = [
                    (hdr, 16, VRING_DESC_F_NEXT),
                    (
                        DATA + u64::from(i) * 4096,
                        PAGE,
                        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                    ),
                    (STATUS + u64::from(i), 1, VRING_DESC_F_WRITE),
                ];
                for (j, &(addr, len, flags)) in chain.iter().enumerate() {
                    let idx = 3 * i + j as u16;
                    let d = Descriptor::new(addr, len, flags as u16, idx + 1);
                    vq.desc_table().store(idx, RawDescriptor::from(d)).unwrap();
                }
            }
            (vq.desc_table_addr().0, vq.avail_addr().0)
        };
        let used_addr = (avail_addr + 6 + 2 * u64::from(QSIZE) + 3) & !3;
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(desc_addr))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail_addr))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(used_addr))
            .unwrap();
        q.set_ready(true);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let line = IrqLine::new(irq.try_clone().unwrap(), 5);
        let mut dev = BlockDevice::new(Arc::new(disk), BlockConfig::default()).unwrap();
        dev.activate(mem.clone(), vec![q], Arc::new(VirtioInterrupt::new(line)))
            .unwrap();
        Self {
            mem,
            dev,
            irq,
            avail_addr,
            used_addr,
            avail: 0,
        }
    }

    /// Makes the BATCH chains available.
    fn publish(&mut self) {
        for i in 0..BATCH {
            let slot = self.avail_addr + 4 + 2 * u64::from(self.avail % QSIZE);
            self.mem.write_obj(3 * i, GuestAddress(slot)).unwrap();
            self.avail = self.avail.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail, GuestAddress(self.avail_addr + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap()
    }
}

/// The device's request path, on the calling thread: a batch of 4 KiB reads made available,
/// the queue processed as one notification is (pop, read, used ring, interrupt).
fn bench_device(c: &mut Criterion) {
    let mut rig = DeviceRig::new();
    let mut group = c.benchmark_group("device_queue");
    group.throughput(Throughput::Bytes(u64::from(BATCH) * u64::from(PAGE)));
    group.bench_function(format!("read_4k_x{BATCH}"), |b| {
        b.iter(|| {
            rig.publish();
            rig.dev.handle_queue_event();
            assert_eq!(rig.used_idx(), rig.avail);
            black_box(rig.irq.read().unwrap())
        })
    });
    group.finish();
}

/// The same batches served by the device's I/O worker thread: notification through the
/// queue eventfd (as KVM's ioeventfd delivers it), completion seen in the used ring.
fn bench_worker(c: &mut Criterion) {
    let mut rig = DeviceRig::new();
    rig.dev.start_worker("bench-blk").unwrap();
    let mut group = c.benchmark_group("device_queue");
    group.throughput(Throughput::Bytes(u64::from(BATCH) * u64::from(PAGE)));
    group.bench_function(format!("worker_read_4k_x{BATCH}"), |b| {
        b.iter(|| {
            rig.publish();
            rig.dev.queue_events()[0].write(1).unwrap();
            while rig.used_idx() != rig.avail {
                std::hint::spin_loop();
            }
            // The interrupt follows the used ring.
            loop {
                if let Ok(n) = rig.irq.read() {
                    break black_box(n);
                }
                std::hint::spin_loop();
            }
        })
    });
    group.finish();
}

fn reads(c: &mut Criterion) {
    bench_read(c, 4 << 10);
    bench_read(c, 128 << 10);
    bench_device(c);
    bench_worker(c);
}

criterion_group!(benches, reads);
criterion_main!(benches);
