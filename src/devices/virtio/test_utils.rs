//! Driver-side helpers for virtio unit tests: guest memory, rings and requests.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMem;

/// Guest memory size of the tests.
pub const MEM_SIZE: usize = 0x100_0000;
/// Flags of a device-readable descriptor.
pub const R: u16 = 0;
/// Flags of a device-writable descriptor.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Where tests put request headers.
pub const HDR: u64 = 0x10_0000;
/// Where tests put data buffers.
pub const DATA: u64 = 0x20_0000;
/// Where tests put status bytes.
pub const STATUS: u64 = 0x80_0000;

/// 16 MiB of guest memory at 0.
pub fn guest_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Writes a virtio-blk request header.
pub fn write_header(mem: &GuestMem, addr: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// The driver side of one split virtqueue.
///
/// The descriptor table and available ring are driven through virtio-queue's
/// `MockSplitQueue`; the used ring is laid out here, because the mock places it too early
/// for queues of more than a few entries (its avail-ring end counts elements, not bytes).
pub struct Driver<'a> {
    /// Descriptor table and available ring.
    pub vq: MockSplitQueue<'a, GuestMem>,
    mem: &'a GuestMem,
    avail: u16,
    size: u16,
    used: u64,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries with its rings from `base`.
    pub fn new(mem: &'a GuestMem, base: u64, size: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), size);
        let used = (vq.avail_addr().0 + 6 + 2 * u64::from(size) + 3) & !3;
        mem.write_slice(&[0; 4], GuestAddress(used)).unwrap();
        Self {
            vq,
            mem,
            avail: 0,
            size,
            used,
        }
    }

    /// Descriptor table address.
    pub fn desc_addr(&self) -> u64 {
        self.vq.desc_table_addr().0
    }

    /// Available ring address.
    pub fn avail_addr(&self) -> u64 {
        self.vq.avail_addr().0
    }

    /// Used ring address.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// A ready device-side queue over these rings.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc_addr()))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Writes one raw descriptor.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.vq.desc_table().store(index, d).unwrap();
    }

    /// Writes `descs` as a chain at table indices `at..`, linked in order; returns the head.
    pub fn write_chain(&self, at: u16, descs: &[(u64, u32, u16)]) -> u16 {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = at + i as u16;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT as u16, idx + 1)
            } else {
                (flags, 0)
            };
            self.write_desc(idx, addr, len, flags, next);
        }
        at
    }

    /// Makes the chain at `head` available.
    pub fn publish(&mut self, head: u16) {
        let pos = self.avail % self.size;
        self.vq
            .avail()
            .ring()
            .ref_at(pos.into())
            .unwrap()
            .store(head);
        self.avail = self.avail.wrapping_add(1);
        self.vq.avail().idx().store(self.avail);
    }

    /// Sets the avail index directly (for hostile-ring tests).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail = idx;
        self.vq.avail().idx().store(idx);
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring element `i`: (descriptor head, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}
