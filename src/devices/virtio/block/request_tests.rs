//! Tests of the virtio-blk request processor against a mock split queue.

use super::*;
use crate::devices::virtio::GuestMem;
use crate::devices::virtio::test_utils::*;
use crate::disk::{BackendIdentity, MemBackend};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 256;
const SECTORS: u64 = 64;
const ID: &[u8; DISK_ID_LEN] = b"test-disk-serial-001";
const SENTINEL: u8 = 0xee;
const INDIRECT_TABLE: u64 = 0x40_0000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8).collect()
}

fn disk() -> MemBackend {
    MemBackend::from_vec(pattern(SECTORS as usize * 512))
}

struct Rig<'a> {
    mem: &'a GuestMem,
    d: Driver<'a>,
    q: Queue,
    scratch: RequestScratch,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMem) -> Self {
        let d = Driver::new(mem, 0, QSIZE);
        let q = d.create_queue();
        Self {
            mem,
            d,
            q,
            scratch: RequestScratch::default(),
        }
    }

    /// Publishes `head` and processes the chain popped from the queue.
    fn run(&mut self, head: u16, backend: &dyn BlockBackend) -> Completion {
        self.mem.write_obj(SENTINEL, GuestAddress(STATUS)).unwrap();
        self.d.publish(head);
        let chain = self.q.pop_descriptor_chain(self.mem).expect("chain");
        process_request(self.mem, chain, backend, ID, &mut self.scratch)
    }

    fn submit(&mut self, descs: &[(u64, u32, u16)], backend: &dyn BlockBackend) -> Completion {
        let head = self.d.write_chain(0, descs);
        self.run(head, backend)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A plain 1 KiB read of sectors 3..5 that must succeed.
    fn check_valid_read(&mut self, backend: &MemBackend) {
        write_header(self.mem, HDR, VIRTIO_BLK_T_IN, 3);
        let c = self.submit(&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)], backend);
        assert_eq!(
            c,
            Completion {
                used_len: 1025,
                status: RequestStatus::Ok
            }
        );
        assert_eq!(self.status(), 0);
        assert_eq!(self.read(DATA, 1024), backend.contents()[1536..2560]);
    }
}

fn ok(used_len: u32) -> Completion {
    Completion {
        used_len,
        status: RequestStatus::Ok,
    }
}

#[test]
fn in_scatters_into_segments() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk();
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let c = rig.submit(
        &[
            (HDR, 16, R),
            (DATA, 512, W),
            (DATA + 0x1000, 1024, W),
            (STATUS, 1, W),
        ],
        &disk,
    );
    assert_eq!(c, ok(1537));
    assert_eq!(rig.status(), 0);
    let want = disk.contents();
    assert_eq!(rig.read(DATA, 512), want[1024..1536]);
    assert_eq!(rig.read(DATA + 0x1000, 1024), want[1536..2560]);
}

#[test]
fn out_gathers_from_segments() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk();
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xbb; 1024], GuestAddress(DATA + 0x1000))
        .unwrap();
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
    let c = rig.submit(
        &[
            (HDR, 16, R),
            (DATA, 512, R),
            (DATA + 0x1000, 1024, R),
            (STATUS, 1, W),
        ],
        &disk,
    );
    assert_eq!(c, ok(1));
    let got = disk.contents();
    assert!(got[5120..5632].iter().all(|&b| b == 0xaa));
    assert!(got[5632..6656].iter().all(|&b| b == 0xbb));
    assert_eq!(got[..5120], pattern(5120)[..], "nothing else written");
    // Last sector of the disk is writable; whole-disk read round-trips.
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, SECTORS - 1);
    assert_eq!(
        rig.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], &disk),
        ok(1)
    );
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let all = SECTORS as u32 * 512;
    assert_eq!(
        rig.submit(&[(HDR, 16, R), (DATA, all, W), (STATUS, 1, W)], &disk),
        ok(all + 1)
    );
    assert_eq!(rig.read(DATA, all as usize), disk.contents());
}

#[test]
fn flush_and_get_id() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk();
    write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[(HDR, 16, R), (STATUS, 1, W)], &disk), ok(1));
    assert_eq!(rig.status(), 0);

    write_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let c = rig.submit(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)], &disk);
    assert_eq!(c, ok(21));
    assert_eq!(rig.read(DATA, 20), ID);
    // A short buffer gets a prefix; a long one only the 20 bytes.
    mem.write_slice(&[0; 64], GuestAddress(DATA)).unwrap();
    let c = rig.submit(&[(HDR, 16, R), (DATA, 8, W), (STATUS, 1, W)], &disk);
    assert_eq!((c, rig.read(DATA, 9)), (ok(9), [&ID[..8], &[0]].concat()));
    let c = rig.submit(&[(HDR, 16, R), (DATA, 64, W), (STATUS, 1, W)], &disk);
    assert_eq!(c, ok(21));
}

#[test]
fn framing_does_not_matter() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk();
    // OUT: header and data in one descriptor.
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&[0x5a; 512], GuestAddress(HDR + 16))
        .unwrap();
    assert_eq!(rig.submit(&[(HDR, 528, R), (STATUS, 1, W)], &disk), ok(1));
    assert!(disk.contents()[512..1024].iter().all(|&b| b == 0x5a));
    // IN: header split in two, data and status in one descriptor.
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let c = rig.submit(
        &[(HDR, 4, R), (HDR + 4, 12, R), (STATUS - 512, 513, W)],
        &disk,
    );
    assert_eq!(c, ok(513));
    assert_eq!(rig.status(), 0);
    assert_eq!(rig.read(STATUS - 512, 512), vec![0x5a; 512]);
}

#[test]
fn indirect_chain() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk();
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
    let table = Driver::new(&mem, INDIRECT_TABLE, 4);
    table.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    rig.d.write_desc(0, INDIRECT_TABLE, 3 * 16, INDIRECT, 0);
    assert_eq!(rig.run(0, &disk), ok(513));
    assert_eq!(rig.read(DATA, 512), disk.contents()[2048..2560]);
}

#[test]
fn read_only_disk() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk().with_read_only(true);
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let c = rig.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)], &disk);
    assert_eq!(
        (c.used_len, c.status, rig.status()),
        (1, RequestStatus::IoErr, 1)
    );
    assert_eq!(disk.contents(), pattern(SECTORS as usize * 512));
    write_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[(HDR, 16, R), (STATUS, 1, W)], &disk), ok(1));
    rig.check_valid_read(&disk);
}

/// A backend whose every access fails.
struct Broken;

impl BlockBackend for Broken {
    fn size(&self) -> u64 {
        SECTORS * 512
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> crate::disk::Result<()> {
        Err(DiskError::Io {
            op: "read",
            source: std::io::Error::other("boom"),
        })
    }
    fn write_at(&self, _: &[u8], _: u64) -> crate::disk::Result<()> {
        Err(DiskError::ReadOnly)
    }
    fn flush(&self) -> crate::disk::Result<()> {
        Err(DiskError::ReadOnly)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn identity(&self) -> BackendIdentity {
        MemBackend::new(0).identity()
    }
}

#[test]
fn backend_errors_are_ioerr() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    for (t, descs) in [
        (
            VIRTIO_BLK_T_IN,
            [(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)].as_slice(),
        ),
        (
            VIRTIO_BLK_T_OUT,
            &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)],
        ),
        (VIRTIO_BLK_T_FLUSH, &[(HDR, 16, R), (STATUS, 1, W)]),
    ] {
        write_header(&mem, HDR, t, 0);
        let c = rig.submit(descs, &Broken);
        assert_eq!(
            (c.used_len, c.status, rig.status()),
            (1, RequestStatus::IoErr, 1),
            "type {t}"
        );
    }
    rig.check_valid_read(&disk());
}

/// A hostile request: sets up descriptors (and headers) and returns the head to publish.
type Setup = fn(&GuestMem, &Driver) -> u16;

fn hostile_cases() -> Vec<(&'static str, Setup, Option<RequestStatus>)> {
    use RequestStatus::{IoErr, Unsupported};
    fn hdr(mem: &GuestMem, t: u32, sector: u64) {
        write_header(mem, HDR, t, sector);
    }
    vec![
        (
            "short header",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_chain(0, &[(HDR, 8, R), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "no status descriptor",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_chain(0, &[(HDR, 16, R)])
            },
            None,
        ),
        (
            "readable status",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_chain(0, &[(HDR, 16, R), (STATUS, 1, R)])
            },
            None,
        ),
        (
            "zero-length status",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_chain(0, &[(HDR, 16, R), (STATUS, 0, W)])
            },
            None,
        ),
        (
            "status outside memory",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_chain(0, &[(HDR, 16, R), (MEM_SIZE as u64, 1, W)])
            },
            None,
        ),
        (
            "status address wraps",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_chain(0, &[(HDR, 16, R), (u64::MAX, 2, W)])
            },
            None,
        ),
        (
            "OUT with device-writable data",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_OUT, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "IN with device-readable data",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "FLUSH with data",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "readable after writable",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_chain(
                    0,
                    &[
                        (HDR, 16, R),
                        (DATA, 512, W),
                        (DATA + 512, 512, R),
                        (STATUS, 1, W),
                    ],
                )
            },
            Some(IoErr),
        ),
        (
            "sector at capacity",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, SECTORS);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "sector + length past the end",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_OUT, SECTORS - 1);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "sector * 512 overflows",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, u64::MAX / 256);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "sector u64::MAX",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_OUT, u64::MAX);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "length not a multiple of 512",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "OUT of 513 bytes",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_OUT, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 513, R), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "data outside guest memory",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_chain(
                    0,
                    &[
                        (HDR, 16, R),
                        (MEM_SIZE as u64 - 256, 512, W),
                        (STATUS, 1, W),
                    ],
                )
            },
            Some(IoErr),
        ),
        (
            "data address wraps",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_OUT, 0);
                d.write_chain(0, &[(HDR, 16, R), (u64::MAX - 100, 512, R), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "header outside guest memory",
            |_, d| d.write_chain(0, &[(MEM_SIZE as u64, 16, R), (STATUS, 1, W)]),
            Some(IoErr),
        ),
        (
            "descriptor over size_max",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 2 << 20, W), (STATUS, 1, W)])
            },
            Some(IoErr),
        ),
        (
            "unsupported type",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_DISCARD, 0);
                d.write_chain(0, &[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)])
            },
            Some(Unsupported),
        ),
        (
            "descriptor loop",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                d.write_desc(0, HDR, 16, NEXT, 1);
                d.write_desc(1, DATA, 512, W | NEXT, 0);
                0
            },
            None,
        ),
        (
            "next index past the table",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                d.write_desc(0, HDR, 16, NEXT, QSIZE + 10);
                0
            },
            None,
        ),
        (
            "chain longer than seg_max",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_IN, 0);
                let mut descs = vec![(HDR, 16, R)];
                descs.extend((0..200u64).map(|i| (DATA + i * 512, 512, W)));
                descs.push((STATUS, 1, W));
                d.write_chain(0, &descs)
            },
            None,
        ),
        ("head index past the table", |_, _| QSIZE + 44, None),
        (
            "nested indirect table",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                let t = Driver::new(m, INDIRECT_TABLE, 4);
                t.write_desc(0, INDIRECT_TABLE, 16, INDIRECT, 0);
                d.write_desc(0, INDIRECT_TABLE, 16, INDIRECT, 0);
                0
            },
            None,
        ),
        (
            "loop in indirect table",
            |m, d| {
                hdr(m, VIRTIO_BLK_T_FLUSH, 0);
                let t = Driver::new(m, INDIRECT_TABLE, 4);
                t.write_desc(0, HDR, 16, NEXT, 1);
                t.write_desc(1, STATUS, 1, W | NEXT, 0);
                d.write_desc(0, INDIRECT_TABLE, 2 * 16, INDIRECT, 0);
                0
            },
            None,
        ),
        (
            "indirect table outside memory",
            |_, d| {
                d.write_desc(0, MEM_SIZE as u64, 3 * 16, INDIRECT, 0);
                0
            },
            None,
        ),
    ]
}

#[test]
fn hostile_requests_fail_cleanly_and_device_keeps_working() {
    let mem = guest_mem();
    let mut rig = Rig::new(&mem);
    let disk = disk();
    let pristine = disk.contents();
    for (name, setup, want) in hostile_cases() {
        let head = setup(&mem, &rig.d);
        let c = rig.run(head, &disk);
        match want {
            Some(status) => {
                assert_eq!(
                    c,
                    Completion {
                        used_len: 1,
                        status
                    },
                    "{name}"
                );
                assert_eq!(rig.status(), status as u8, "{name}");
            }
            None => {
                assert_eq!(c.used_len, 0, "{name}");
                assert_eq!(rig.status(), SENTINEL, "{name}: status untouched");
            }
        }
        assert!(disk.contents() == pristine, "{name}: disk unchanged");
        rig.check_valid_read(&disk);
    }
}

#[test]
fn large_request_uses_bounded_chunks() {
    // 128 segments of 1 MiB would need 128 MiB of guest memory; 8 x 1 MiB exercises the
    // chunking (one backend access per MiB) and the scratch buffer bound.
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
    let mut rig = Rig::new(&mem);
    let size = 8usize << 20;
    let disk = MemBackend::from_vec(pattern(size + 4096));
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..8u64).map(|i| (0x100_0000 + (i << 20), 1 << 20, W)));
    descs.push((STATUS, 1, W));
    let c = rig.submit(&descs, &disk);
    assert_eq!(c, ok(size as u32 + 1));
    assert_eq!(rig.read(0x100_0000, size), disk.contents()[512..512 + size]);
    assert!(rig.scratch.buf.len() <= CHUNK_BYTES);
}
