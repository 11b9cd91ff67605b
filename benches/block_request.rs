//! Benchmarks of the virtio-blk request processor: 4 KiB and 128 KiB reads from an
//! in-memory disk, each request popped from a (mock) split virtqueue.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::block::{RequestScratch, RequestStatus, process_request};
use vmm::disk::MemBackend;

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

fn reads(c: &mut Criterion) {
    bench_read(c, 4 << 10);
    bench_read(c, 128 << 10);
}

criterion_group!(benches, reads);
criterion_main!(benches);
