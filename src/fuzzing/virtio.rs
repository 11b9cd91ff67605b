//! Harnesses of the virtio-blk request path and the virtio-mmio register interface.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::Input;
use crate::devices::IrqLine;
use crate::devices::virtio::block::QUEUE_SIZE;
use crate::devices::virtio::{
    BlockConfig, BlockDevice, GuestMem, MmioRestoreArgs, MmioTransport, VIRTIO_F_VERSION_1,
    VirtioDevice, VirtioInterrupt,
};
use crate::disk::{BlockBackend, MemBackend};
use crate::formats::Persist;
use crate::vstate::bus::BusDevice;

/// Guest memory of the virtio harnesses: two regions with a hole between them, so that
/// buffers can straddle a hole or run past the end.
const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x8000)];
/// Descriptor addresses are taken modulo this (unless their top bit is set), so that
/// most of them land in or near guest memory.
const ADDR_SPAN: u64 = 0x3_0000;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x1400;
/// Where the rest of a virtio_blk input is copied (request headers, data).
const PAYLOAD: u64 = 0x2000;

fn guest_mem() -> GuestMem {
    let regions: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    crate::vstate::memory::create_anonymous(&regions).expect("fuzz guest memory maps")
}

/// All guest memory, region after region.
fn snapshot(mem: &GuestMem) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, l) in &REGIONS {
        let mut buf = vec![0u8; l];
        mem.read_slice(&mut buf, GuestAddress(a))
            .expect("region reads");
        out.extend_from_slice(&buf);
    }
    out
}

/// Guest address of byte `i` of a [`snapshot`].
fn gpa_of(mut i: usize) -> u64 {
    for &(a, l) in &REGIONS {
        if i < l {
            return a + i as u64;
        }
        i -= l;
    }
    unreachable!("index beyond the snapshot")
}

fn irq_line() -> IrqLine {
    IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"), 5)
}

/// Byte `gpa` of guest memory as held in a [`snapshot`].
fn snapshot_index(gpa: u64) -> Option<usize> {
    let mut base = 0usize;
    for &(a, l) in &REGIONS {
        if gpa >= a && gpa - a < l as u64 {
            return Some(base + (gpa - a) as usize);
        }
        base += l;
    }
    None
}

/// The descriptor at `gpa` in guest memory `snap`: (addr, len, flags).
fn read_desc(snap: &[u8], gpa: u64) -> Option<(u64, u32, u16)> {
    let i = snapshot_index(gpa)?;
    let j = snapshot_index(gpa.checked_add(15)?)?;
    let d = snap.get(i..i + 16).filter(|_| j == i + 15)?;
    let addr = u64::from_le_bytes(d[..8].try_into().ok()?);
    let len = u32::from_le_bytes(d[8..12].try_into().ok()?);
    Some((addr, len, u16::from_le_bytes([d[12], d[13]])))
}

/// Descriptor flags the harness looks at.
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// What a descriptor table offers the device: its device-writable ranges, their total
/// length, and the ranges holding descriptors (the table and its indirect tables).
#[derive(Default)]
struct Offered {
    writable: Vec<(u64, u64)>,
    total: u64,
    tables: Vec<(u64, u64)>,
}

/// What descriptor table `table` of `size` entries offers as `snap` holds it — with
/// `indirect`, the indirect tables it points to included.
fn writable_ranges(snap: &[u8], table: u64, size: u16, indirect: bool) -> Offered {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut tables = vec![(table, table + 16 * u64::from(size))];
    let mut add = |(addr, len, flags): (u64, u32, u16)| {
        if flags & F_WRITE != 0 {
            out.push((addr, addr.saturating_add(len.into())));
            total += u64::from(len);
        }
    };
    for i in 0..u64::from(size) {
        let Some(d) = read_desc(snap, table + 16 * i) else {
            continue;
        };
        add(d);
        if indirect && d.2 & F_INDIRECT != 0 {
            tables.push((d.0, d.0.saturating_add(d.1.into())));
            for j in 0..u64::from(d.1 / 16) {
                match read_desc(snap, d.0.wrapping_add(16 * j)) {
                    Some(e) => add(e),
                    None => break,
                }
            }
        }
    }
    Offered {
        writable: out,
        total,
        tables,
    }
}

/// A block device over a small in-memory disk of `sectors` sectors.
fn block_device(sectors: u8, read_only: bool) -> (Arc<MemBackend>, Arc<Mutex<BlockDevice>>) {
    let size = usize::from(sectors % 65) * 512;
    let disk = Arc::new(MemBackend::new(size).with_read_only(read_only));
    let config = BlockConfig {
        id: Some("fuzz-disk".into()),
    };
    let dev = BlockDevice::new(disk.clone(), config).expect("block device");
    (disk, Arc::new(Mutex::new(dev)))
}

/// virtio-blk request path: the input lays out a split virtqueue (size, ring addresses,
/// descriptor table, available ring) and the request headers and data in guest memory,
/// then the device — activated as the transport activates it — processes the queue on
/// the calling thread (the worker's code path, `BlockDevice::process_queue`).
///
/// Properties: no panic on any ring or chain; the device changes guest memory only in
/// buffers some descriptor made device-writable and in the used ring; it completes no
/// more requests than were made available, each with a valid head index and a length
/// within the writable bytes offered; a read-only disk is never changed.
pub fn virtio_blk(data: &[u8]) {
    let mut inp = Input::new(data);
    let size = 1u16 << (inp.u8() % 9);
    let flags = inp.u8();
    let (disk, dev) = block_device(inp.u8(), flags & 2 != 0);
    let rings = if flags & 4 != 0 {
        [inp.u64(), inp.u64(), inp.u64()]
    } else {
        [DESC_TABLE, AVAIL_RING, USED_RING]
    };
    let mem = guest_mem();
    let (avail_idx, avail_flags, used_event) = (inp.u16(), inp.u16(), inp.u16());
    for i in 0..u64::from(size) {
        let mut d: [u8; 16] = inp.bytes(16).try_into().unwrap_or([0; 16]);
        let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
        let addr = if addr >> 63 == 0 {
            addr % ADDR_SPAN
        } else {
            addr
        };
        d[..8].copy_from_slice(&addr.to_le_bytes());
        let _ = mem.write_slice(&d, GuestAddress(rings[0].wrapping_add(16 * i)));
    }
    let mut avail = avail_flags.to_le_bytes().to_vec();
    avail.extend_from_slice(&avail_idx.to_le_bytes());
    avail.extend_from_slice(inp.bytes(2 * usize::from(size)));
    avail.resize(4 + 2 * usize::from(size), 0);
    avail.extend_from_slice(&used_event.to_le_bytes());
    let _ = mem.write_slice(&avail, GuestAddress(rings[1]));
    let rest = inp.rest();
    let rest = &rest[..rest.len().min(REGIONS[0].1 - PAYLOAD as usize)];
    mem.write_slice(rest, GuestAddress(PAYLOAD))
        .expect("payload fits");

    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(rings[0] as u32), Some((rings[0] >> 32) as u32));
    q.set_avail_ring_address(Some(rings[1] as u32), Some((rings[1] >> 32) as u32));
    q.set_used_ring_address(Some(rings[2] as u32), Some((rings[2] >> 32) as u32));
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    // The transport activates only queues that are valid (`MmioTransport::activate`).
    if !q.is_valid(&mem) {
        return;
    }
    let rings = [q.desc_table(), q.avail_ring(), q.used_ring()];
    // A driver starts with an empty used ring (the device never reads it).
    let used_len = 6 + 8 * usize::from(size);
    let _ = mem.write_slice(&vec![0u8; used_len], GuestAddress(rings[2]));
    let before = snapshot(&mem);
    let disk_before = disk.contents();
    let interrupt = Arc::new(VirtioInterrupt::new(irq_line()));
    let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
    d.activate(mem.clone(), vec![q], interrupt)
        .expect("a valid queue activates");
    d.process_queue();
    d.reset();
    drop(d);
    let after = snapshot(&mem);
    check_blk_writes(&mem, &before, &after, rings, size, avail_idx);
    if disk.read_only() {
        assert!(
            disk.contents() == disk_before,
            "a read-only disk was written"
        );
    }
}

/// Checks that the device wrote guest memory only inside the buffers the driver offered
/// as writable (and the used ring), and that its completions are plausible.
fn check_blk_writes(
    mem: &GuestMem,
    before: &[u8],
    after: &[u8],
    [desc, avail, used]: [u64; 3],
    size: u16,
    avail_idx: u16,
) {
    let used_end = used + 6 + 8 * u64::from(size);
    let changed = changed_gpas(before, after);
    let w = check_changes_writable(&changed, before, after, desc, size, (used, used_end));
    // Completions are checked only when no data buffer nor other ring overlaps the used
    // ring (hostile layouts may make the device's own writes overwrite each other).
    let rings = [
        (desc, desc + 16 * u64::from(size)),
        (avail, avail + 6 + 2 * u64::from(size)),
    ];
    if (w.allowed[1..].iter().chain(&rings)).any(|&(s, e)| s < used_end && used < e)
        || overlap(&w.allowed[1..], &w.tables)
    {
        return;
    }
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
    assert!(
        used_idx <= avail_idx && used_idx <= size,
        "more completions than requests offered"
    );
    for i in 0..u64::from(used_idx) {
        let at = used + 4 + 8 * i;
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used elem");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used elem");
        assert!(id < u32::from(size), "used element names descriptor {id}");
        let with_indirect = || {
            [before, after]
                .iter()
                .map(|snap| writable_ranges(snap, desc, size, true).total)
                .max()
                .unwrap_or(0)
        };
        assert!(
            u64::from(len) <= w.total || u64::from(len) <= with_indirect(),
            "used length {len} beyond the writable bytes offered"
        );
    }
}

/// The guest addresses whose byte differs between `before` and `after`.
fn changed_gpas(before: &[u8], after: &[u8]) -> Vec<u64> {
    // Block by block (memcmp), so the per-byte loop runs only where something changed.
    let mut changed = Vec::new();
    for (k, (b, a)) in before.chunks(256).zip(after.chunks(256)).enumerate() {
        if b != a {
            let diff = b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y);
            changed.extend(diff.map(|(i, _)| gpa_of(k * 256 + i)));
        }
    }
    changed
}

/// Whether a range of `a` overlaps a range of `b`.
fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter()
        .any(|&(s, e)| b.iter().any(|&(s2, e2)| s < e2 && s2 < e))
}

/// What the driver offered the device to write.
struct Writable {
    /// The used ring first, then the writable buffers.
    allowed: Vec<(u64, u64)>,
    /// The descriptor tables read.
    tables: Vec<(u64, u64)>,
    /// The most writable bytes offered.
    total: u64,
}

/// Asserts that every changed byte was writable as offered before processing, or (a
/// guest buffer may overlap a descriptor table) as the tables read afterwards; indirect
/// tables are looked at only when needed (slow).
fn check_changes_writable(
    changed: &[u64],
    before: &[u8],
    after: &[u8],
    desc: u64,
    size: u16,
    used_ring: (u64, u64),
) -> Writable {
    let mut w = Writable {
        allowed: vec![used_ring],
        tables: Vec::new(),
        total: 0,
    };
    for indirect in [false, true] {
        for snap in [before, after] {
            let o = writable_ranges(snap, desc, size, indirect);
            w.allowed.extend(o.writable);
            w.tables.extend(o.tables);
            w.total = w.total.max(o.total);
        }
        let covered = |g: &u64| w.allowed.iter().any(|&(s, e)| s <= *g && *g < e);
        if changed.iter().all(covered) {
            break;
        }
        // A driver whose buffers overlap its own descriptor tables changes the chains
        // while the device runs: what was writable in between is not known here.
        let self_modifying = overlap(&w.allowed, &w.tables);
        if let Some(gpa) = changed.iter().find(|g| !covered(g)) {
            assert!(
                !indirect || self_modifying,
                "device wrote guest byte {gpa:#x} outside every writable buffer"
            );
        }
    }
    w
}

/// Registers whose writes the virtio_mmio harness picks by index.
const MMIO_REGS: [u32; 19] = [
    0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
    0x0a0, 0x0a4, 0x0fc, 0x100, 0x108, 0x070,
];

/// A virtio-blk device behind a virtio-mmio transport, as the VMM attaches it.
struct MmioVm {
    mem: GuestMem,
    disk: Arc<MemBackend>,
    dev: Arc<Mutex<BlockDevice>>,
    t: MmioTransport,
}

impl MmioVm {
    fn new(mem: GuestMem, disk: Arc<MemBackend>) -> Self {
        let config = BlockConfig {
            id: Some("fuzz-disk".into()),
        };
        let dev = Arc::new(Mutex::new(
            BlockDevice::new(disk.clone(), config).expect("block device"),
        ));
        let t = MmioTransport::new(mem.clone(), dev.clone(), irq_line()).expect("transport");
        Self { mem, disk, dev, t }
    }

    fn process(&self) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_queue();
    }
}

/// virtio-mmio register interface: the input is a sequence of guest actions — register
/// and config-space writes (any offset, width and value), reads, writes of guest memory
/// (rings and requests), queue notifications processed by the device, and save/restore
/// of the transport — played against a virtio-blk device.
///
/// Properties: identification registers read their fixed values; misaligned or
/// non-32-bit register reads read zero; FEATURES_OK is only kept for features the device
/// offers (with VERSION_1); DRIVER_OK without NEEDS_RESET means the device is running;
/// a state the transport saves restores into a fresh transport, which saves it back the
/// same.
pub fn virtio_mmio(data: &[u8]) {
    let disk = Arc::new(MemBackend::new(16 * 512));
    let mut vm = MmioVm::new(guest_mem(), disk);
    let mut inp = Input::new(data);
    for _ in 0..256 {
        if inp.is_empty() {
            break;
        }
        mmio_op(&mut vm, &mut inp);
        check_mmio(&vm);
    }
}

fn mmio_op(vm: &mut MmioVm, inp: &mut Input<'_>) {
    match inp.u8() % 8 {
        0 | 1 => {
            let off = u64::from(inp.u8()) * 4;
            vm.t.write(off, &inp.u32().to_le_bytes());
        }
        2 => {
            let reg = MMIO_REGS[usize::from(inp.u8()) % MMIO_REGS.len()];
            vm.t.write(reg.into(), &inp.u32().to_le_bytes());
        }
        3 => {
            let off = u64::from(inp.u16() % 0x200);
            let mut buf = vec![0xa5u8; [1, 2, 4, 8][usize::from(inp.u8() % 4)]];
            vm.t.read(off, &mut buf);
            check_read(vm, off, &buf);
        }
        4 => {
            let at = u64::from(inp.u16());
            let n = inp.u8();
            let _ = vm.mem.write_slice(inp.bytes(n.into()), GuestAddress(at));
        }
        5 => vm.process(),
        6 => save_restore(vm),
        _ => {
            let off = u64::from(inp.u16() % 0x200);
            let n = [1, 2, 3, 8][usize::from(inp.u8() % 4)];
            vm.t.write(off, inp.bytes(n));
        }
    }
}

fn check_read(vm: &MmioVm, off: u64, buf: &[u8]) {
    if off >= 0x100 {
        return;
    }
    if buf.len() != 4 || !off.is_multiple_of(4) {
        assert!(buf.iter().all(|&b| b == 0), "odd register read not zero");
        return;
    }
    let v = u32::from_le_bytes(buf.try_into().expect("4 bytes"));
    match off {
        0x000 => assert_eq!(v, 0x7472_6976),
        0x004 => assert_eq!(v, 2),
        0x008 => assert_eq!(
            v,
            vm.dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_type()
        ),
        0x060 => assert_eq!(v & !3, 0, "interrupt status has unknown bits"),
        0x070 => assert_eq!(v, vm.t.status()),
        _ => {}
    }
}

fn check_mmio(vm: &MmioVm) {
    let s = vm.t.save().expect("transport state");
    let offered = vm.dev.lock().unwrap_or_else(|e| e.into_inner()).features();
    if s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
        assert_eq!(
            s.acked_features & !offered,
            0,
            "features not offered accepted"
        );
        assert_ne!(s.acked_features & VIRTIO_F_VERSION_1, 0);
    }
    let running =
        s.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && s.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
    if running {
        assert!(
            vm.t.is_activated(),
            "DRIVER_OK but the device is not running"
        );
    }
    if vm.t.is_activated() {
        assert_ne!(s.status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    }
}

/// Saves the transport, restores the state into a fresh transport and device over the
/// same memory and disk, checks it saves back the same, and carries on with it.
fn save_restore(vm: &mut MmioVm) {
    let saved = vm.t.save().expect("transport state");
    let mut fresh = MmioVm::new(vm.mem.clone(), vm.disk.clone());
    // The old device stops before the new one starts, as on a restore.
    vm.dev.lock().unwrap_or_else(|e| e.into_inner()).reset();
    let args = MmioRestoreArgs {
        mem: fresh.mem.clone(),
        device: fresh.dev.clone(),
        irq: irq_line(),
    };
    fresh.t = MmioTransport::restore(args, &saved).expect("a saved transport state restores");
    assert_eq!(
        fresh.t.save().expect("transport state"),
        saved,
        "restore did not give the saved state"
    );
    *vm = fresh;
}
