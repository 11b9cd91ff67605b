//! Tests of lazy memory restore. They need userfaultfd, not KVM.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;
use crate::store::codec::Compression;
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::store::{ChunkId, ChunkRead, ChunkWrite};
use crate::util::testutil::{Mapping, Rng, TempDir};

const CHUNK: usize = 64 << 10;

/// Copies `len` bytes at host address `addr` (faulting them in).
fn read_at(addr: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: the tests only pass ranges inside a live mapping; reading through a
    // raw pointer creates no reference to memory that the kernel fills in.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), len) };
    out
}

/// Writes `data` at host address `addr`.
fn write_at(addr: usize, data: &[u8]) {
    // SAFETY: as for `read_at`; no other thread accesses these bytes meanwhile.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
}

/// Source memory with zero, random, duplicate, half-zero and compressible chunks.
fn source(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut src = vec![0u8; len];
    let mut prev: Option<Vec<u8>> = None;
    for (i, c) in src.chunks_mut(CHUNK).enumerate() {
        match i % 6 {
            0 | 5 => {}
            1 => rng.fill(c),
            2 => match &prev {
                Some(p) if p.len() == c.len() => c.copy_from_slice(p),
                _ => rng.fill(c),
            },
            3 => {
                let half = c.len() / 2;
                rng.fill(&mut c[..half]);
            }
            _ => compressible(c, &mut rng),
        }
        if i % 6 == 1 {
            prev = Some(c.to_vec());
        }
    }
    src
}

/// Text-like bytes that zstd compresses about 3:1.
fn compressible(buf: &mut [u8], rng: &mut Rng) {
    const WORDS: [&[u8]; 8] = [
        b"guest ", b"memory ", b"chunk ", b"page ", b"fault ", b"kernel ", b"lazy ", b"\n",
    ];
    let mut i = 0;
    while i < buf.len() {
        let r = rng.next();
        let w = if r.is_multiple_of(4) {
            &r.to_le_bytes()[..3]
        } else {
            WORDS[(r >> 8) as usize % WORDS.len()]
        };
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

/// Guest memory cut into chunks, as a snapshot's memory manifest records it (built here:
/// `snapshot::manifest` is a layer above this module).
struct Chunked {
    regions: Vec<RegionManifest>,
}

/// Cuts `regions` (guest address, bytes) into `CHUNK`-byte chunks: all-zero ones are
/// `ChunkEntry::Zero`, the others are put in `store`.
fn chunk_memory(regions: &[(u64, &[u8])], store: &dyn ChunkWrite) -> Chunked {
    let regions = regions
        .iter()
        .map(|&(guest_addr, bytes)| RegionManifest {
            guest_addr,
            size: bytes.len() as u64,
            chunks: bytes
                .chunks(CHUNK)
                .map(|c| {
                    if c.iter().all(|&b| b == 0) {
                        ChunkEntry::Zero
                    } else {
                        ChunkEntry::Chunk(store.put(c).unwrap())
                    }
                })
                .collect(),
        })
        .collect();
    Chunked { regions }
}

/// A store in a temp dir holding the chunks of `src`, cut into regions of `sizes`.
struct Fixture {
    _dir: TempDir,
    store: Arc<LocalStore>,
    src: Vec<u8>,
    manifest: Chunked,
}

/// An empty store with `compression` in a fresh temp dir named after `tag`.
fn temp_store(tag: &str, compression: Compression) -> (TempDir, Arc<LocalStore>) {
    let dir = TempDir::new(tag);
    let store = LocalStore::open(
        dir.path(),
        LocalStoreOptions {
            compression,
            ..Default::default()
        },
    )
    .unwrap();
    (dir, Arc::new(store))
}

fn fixture(sizes: &[usize], compression: Compression, seed: u64) -> Fixture {
    let (dir, store) = temp_store("uffd", compression);
    let src = source(sizes.iter().sum(), seed);
    let mut regions = Vec::new();
    let mut off = 0;
    for (i, &size) in sizes.iter().enumerate() {
        regions.push(((i as u64) << 32, &src[off..off + size]));
        off += size;
    }
    let manifest = chunk_memory(&regions, &*store);
    Fixture {
        _dir: dir,
        store,
        src,
        manifest,
    }
}

/// Maps one fresh region per manifest region and starts serving them.
fn start(f: &Fixture, options: LazyOptions) -> (Vec<Mapping>, LazyMemory) {
    let maps: Vec<Mapping> = f
        .manifest
        .regions
        .iter()
        .map(|r| Mapping::new(r.size as usize))
        .collect();
    let regions = maps
        .iter()
        .zip(&f.manifest.regions)
        .map(|(m, r)| (m.addr(), m.len(), r.clone()))
        .collect();
    // SAFETY: fresh private anonymous mappings owned by the test, alive until the
    // LazyMemory is stopped, accessed only through raw pointers.
    let lazy = unsafe { LazyMemory::start_with_options(regions, CHUNK, f.store.clone(), options) }
        .expect("start lazy memory");
    (maps, lazy)
}

/// (host address, source offset, length) of every region.
fn layout(maps: &[Mapping]) -> Vec<(usize, usize, usize)> {
    let mut off = 0;
    maps.iter()
        .map(|m| {
            off += m.len();
            (m.addr(), off - m.len(), m.len())
        })
        .collect()
}

fn count_entries(m: &Chunked, zero: bool) -> u64 {
    let n = m
        .regions
        .iter()
        .flat_map(|r| &r.chunks)
        .filter(|c| matches!(c, ChunkEntry::Zero) == zero)
        .count();
    n as u64
}

#[test]
fn concurrent_random_reads_match_source() {
    // The second region ends with a short (12 KiB) chunk.
    let f = fixture(
        &[6 << 20, (2 << 20) + (12 << 10)],
        Compression::Zstd { level: 1 },
        7,
    );
    let (maps, lazy) = start(&f, LazyOptions::default());
    let regions = layout(&maps);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (src, regions) = (&f.src, &regions);
            s.spawn(move || {
                let mut rng = Rng::new(100 + t);
                for _ in 0..300 {
                    let &(addr, src_off, len) = &regions[rng.next() as usize % regions.len()];
                    let n = 1 + rng.next() as usize % (3 * PAGE_SIZE);
                    let off = rng.next() as usize % (len - n);
                    let got = read_at(addr + off, n);
                    assert!(
                        got == src[src_off + off..src_off + off + n],
                        "at {off:#x}+{n}"
                    );
                }
            });
        }
    });
    for &(addr, src_off, len) in &regions {
        assert!(read_at(addr, len) == f.src[src_off..src_off + len]);
    }
    let st = lazy.stop();
    let data = count_entries(&f.manifest, false);
    assert_eq!(st.data_chunks_total, data);
    assert_eq!(st.data_chunks_remaining, 0);
    assert_eq!(st.chunks_fetched, data, "{st:?}");
    assert_eq!(st.chunks_zero, count_entries(&f.manifest, true));
    assert_eq!(st.errors, 0);
    assert!(st.faults >= st.chunks_fetched + st.chunks_zero);
    let data_bytes: u64 = f
        .manifest
        .regions
        .iter()
        .flat_map(|r| {
            r.chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, ChunkEntry::Chunk(_)))
                .map(move |(i, _)| CHUNK.min(r.size as usize - i * CHUNK))
        })
        .sum::<usize>() as u64;
    assert_eq!(st.bytes_copied, data_bytes);
}

#[test]
fn only_touched_chunks_are_fetched() {
    let f = fixture(&[4 << 20], Compression::Zstd { level: 1 }, 11);
    let (maps, lazy) = start(&f, LazyOptions::default());
    let base = maps[0].addr();
    let chunks = &f.manifest.regions[0].chunks;
    assert_eq!(chunks[0], ChunkEntry::Zero);
    assert!(matches!(chunks[1], ChunkEntry::Chunk(_)));
    assert!(matches!(chunks[7], ChunkEntry::Chunk(_)));
    // One byte of chunk 0 (zero), the last page of chunk 1, twice, and chunk 7.
    for off in [100, 2 * CHUNK - 1, 2 * CHUNK - 10, 7 * CHUNK + 5000] {
        assert_eq!(read_at(base + off, 1)[0], f.src[off]);
    }
    let st = lazy.stats();
    assert_eq!(st.chunks_fetched, 2, "{st:?}");
    assert_eq!(st.chunks_zero, 1);
    assert_eq!(st.bytes_copied, 2 * CHUNK as u64);
    assert_eq!(st.data_chunks_remaining, st.data_chunks_total - 2);
    assert_eq!(st.faults, 3, "a placed chunk does not fault again");
    assert!(!lazy.is_complete());
    lazy.stop();
}

#[test]
fn kernel_mode_accesses_are_served() {
    // A write(2) from registered memory makes the kernel read it (as KVM does for
    // the guest); a read(2) into it makes the kernel write a missing page.
    let f = fixture(&[2 << 20], Compression::None, 13);
    let (maps, lazy) = start(&f, LazyOptions::default());
    let base = maps[0].addr();
    let dir = TempDir::new("uffd-kernel");
    let path = dir.path().join("out");
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        // SAFETY: the whole mapping is live; the kernel reads it via copy_from_user.
        let mem = unsafe { std::slice::from_raw_parts(base as *const u8, 2 << 20) };
        std::fs::write(&p, mem).unwrap();
        let mut file = std::fs::File::open(&p).unwrap();
        // SAFETY: chunk 1 (stored, never touched) is only written by the kernel here.
        let dst = unsafe { std::slice::from_raw_parts_mut((base + CHUNK + 4096) as *mut u8, 100) };
        std::io::Read::read_exact(&mut file, dst).unwrap();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("kernel-mode accesses were served");
    assert!(std::fs::read(&path).unwrap() == f.src);
    let mut expected = f.src[CHUNK..2 * CHUNK].to_vec();
    expected[4096..4196].copy_from_slice(&f.src[..100]);
    assert!(read_at(base + CHUNK, CHUNK) == expected);
    assert_eq!(lazy.stop().errors, 0);
}

#[test]
fn writes_to_lazy_memory_stick() {
    let f = fixture(&[1 << 20], Compression::Zstd { level: 1 }, 17);
    let (maps, lazy) = start(&f, LazyOptions::default());
    let base = maps[0].addr();
    // First access is a write, into a zero chunk (6) and a stored chunk (1).
    std::thread::spawn(move || {
        write_at(base + 6 * CHUNK + 10, b"hello");
        write_at(base + CHUNK + 20, b"world");
    })
    .join()
    .unwrap();
    let mut expected = f.src.clone();
    expected[6 * CHUNK + 10..6 * CHUNK + 15].copy_from_slice(b"hello");
    expected[CHUNK + 20..CHUNK + 25].copy_from_slice(b"world");
    assert!(read_at(base, 1 << 20) == expected);
    lazy.stop();
}

#[test]
fn background_fill_places_every_chunk() {
    let f = fixture(&[3 << 20, 1 << 20], Compression::Zstd { level: 1 }, 19);
    let (maps, lazy) = start(&f, LazyOptions::default());
    let base = maps[0].addr();
    assert_eq!(read_at(base + CHUNK, 8), f.src[CHUNK..CHUNK + 8]);
    lazy.fill_in_background();
    assert!(lazy.wait_complete(Duration::from_secs(20)));
    let st = lazy.stop();
    assert_eq!(st.chunks_fetched, st.data_chunks_total);
    assert_eq!(st.chunks_prefetched, st.data_chunks_total - 1);
    assert_eq!(st.data_chunks_remaining, 0);
    // The handler is gone: what is in memory now is all there is.
    for (addr, src_off, len) in layout(&maps) {
        assert!(read_at(addr, len) == f.src[src_off..src_off + len]);
    }
}

/// Damages the first stored chunk, reads it from a detached thread and checks that a
/// fatal error naming it is raised while other chunks are still served.
fn check_unfetchable_chunk(damage: impl FnOnce(&std::path::Path), expect: &str) {
    let f = fixture(&[1 << 20], Compression::Zstd { level: 1 }, 23);
    let ChunkEntry::Chunk(id) = f.manifest.regions[0].chunks[1] else {
        panic!("chunk 1 is stored");
    };
    damage(&f.store.chunk_path(&id));
    let options = LazyOptions {
        fetch_attempts: 3,
        retry_backoff: Duration::from_millis(5),
        ..Default::default()
    };
    let (maps, lazy) = start(&f, options);
    let base = maps[0].addr();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_at(base + CHUNK + 100, 1));
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let msg = loop {
        if let Some(msg) = lazy.fatal_error() {
            break msg;
        }
        assert!(Instant::now() < deadline, "no fatal error");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(msg.contains(&id.to_string()), "{msg}");
    assert!(msg.contains("guest address 0x10000"), "{msg}");
    assert!(msg.contains(expect), "{msg}");
    assert_eq!(lazy.fatal_event().read().unwrap(), 1);
    // The faulting reader stays blocked rather than seeing wrong bytes.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    // Other chunks are still served (read from a thread, so a hang cannot block).
    let (tx2, rx2) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx2.send(read_at(base + 4 * CHUNK, 16));
    });
    let got = rx2
        .recv_timeout(Duration::from_secs(5))
        .expect("chunk 4 served");
    assert_eq!(got, f.src[4 * CHUNK..4 * CHUNK + 16]);
    let st = lazy.stop();
    assert_eq!(st.errors, 3, "{st:?}");
    assert!(rx.try_recv().is_err());
    // The blocked reader still refers to the mapping.
    for m in maps {
        m.leak();
    }
}

#[test]
fn missing_chunk_is_a_fatal_error() {
    check_unfetchable_chunk(|p| std::fs::remove_file(p).unwrap(), "missing");
}

#[test]
fn corrupt_chunk_is_a_fatal_error() {
    check_unfetchable_chunk(
        |p| {
            let mut data = std::fs::read(p).unwrap();
            let last = data.len() - 1;
            data[last] ^= 1;
            std::fs::write(p, data).unwrap();
        },
        "corrupt",
    );
}

#[test]
fn stop_without_faults_and_drop_join() {
    let f = fixture(&[256 << 10], Compression::None, 29);
    let (_maps, lazy) = start(&f, LazyOptions::default());
    assert_eq!(lazy.stop().faults, 0);
    let (_maps, lazy) = start(&f, LazyOptions::default());
    drop(lazy);
}

#[test]
fn invalid_arguments_are_rejected() {
    let region = |size: u64, n: usize| RegionManifest {
        guest_addr: 0,
        size,
        chunks: vec![ChunkEntry::Zero; n],
    };
    let err = |r: Vec<(usize, usize, RegionManifest)>, cs| validate(r, cs).err().unwrap();
    assert!(matches!(
        err(vec![], 1000),
        UffdError::InvalidChunkSize { size: 1000 }
    ));
    assert!(matches!(
        err(vec![], 32 << 20),
        UffdError::InvalidChunkSize { .. }
    ));
    let bad = [
        vec![(0x1001, CHUNK, region(CHUNK as u64, 1))],
        vec![(0x1000, 100, region(100, 1))],
        vec![(0x1000, CHUNK, region(2 * CHUNK as u64, 1))],
        vec![(0x1000, 2 * CHUNK, region(2 * CHUNK as u64, 1))],
        vec![
            (0x10_0000, CHUNK, region(CHUNK as u64, 1)),
            (0x10_0000 + CHUNK - 4096, CHUNK, region(CHUNK as u64, 1)),
        ],
    ];
    for regions in bad {
        let e = err(regions, CHUNK);
        assert!(matches!(e, UffdError::InvalidRegion { .. }), "{e}");
    }
    assert!(
        validate(
            vec![(0x1000, CHUNK + 4096, region(CHUNK as u64 + 4096, 2))],
            CHUNK
        )
        .is_ok()
    );
}

/// A manifest of `size` bytes of zero chunks, but for one stored chunk at 1 MiB.
fn sparse_region(size: usize, stored: ChunkId) -> RegionManifest {
    let mut chunks = vec![ChunkEntry::Zero; size / CHUNK];
    chunks[(1 << 20) / CHUNK] = ChunkEntry::Chunk(stored);
    RegionManifest {
        guest_addr: 0,
        size: size as u64,
        chunks,
    }
}

/// Time of `f` run on a new thread (so the fault is not the test thread's own).
fn timed_on_thread(f: impl FnOnce() + Send + 'static) -> Duration {
    std::thread::spawn(move || {
        let t = Instant::now();
        f();
        t.elapsed()
    })
    .join()
    .unwrap()
}

#[test]
fn start_time_does_not_depend_on_memory_size() {
    let dir = TempDir::new("uffd-size");
    let store = Arc::new(LocalStore::open(dir.path(), LocalStoreOptions::default()).unwrap());
    let mut chunk = vec![0u8; CHUNK];
    Rng::new(31).fill(&mut chunk);
    let id = store.put(&chunk).unwrap();
    for size in [64usize << 20, 256 << 20, 1 << 30, 4 << 30] {
        let map = Mapping::new(size);
        let regions = vec![(map.addr(), size, sparse_region(size, id))];
        let t = Instant::now();
        // SAFETY: a fresh private anonymous mapping owned by this test, alive until
        // `stop`, accessed only through raw pointers.
        let lazy = unsafe { LazyMemory::start(regions, CHUNK, store.clone()) }.unwrap();
        let started = t.elapsed();
        let addr = map.addr();
        let head: [u8; 8] = chunk[..8].try_into().unwrap();
        let data = timed_on_thread(move || assert_eq!(read_at(addr + (1 << 20), 8), head));
        let zero = timed_on_thread(move || assert_eq!(read_at(addr + size - 8, 8), [0; 8]));
        let t = Instant::now();
        let st = lazy.stop();
        eprintln!(
            "lazy memory {:>5} MiB: start {:>7.1?}, first touch stored chunk {:>7.1?}, \
             zero chunk {:>7.1?}, stop {:>6.1?} ({} faults)",
            size >> 20,
            started,
            data,
            zero,
            t.elapsed(),
            st.faults
        );
        assert_eq!((st.chunks_fetched, st.chunks_zero), (1, 1));
    }
}

#[test]
fn fault_latency_raw_and_zstd() {
    let size = 8 << 20;
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        let (_dir, store) = temp_store("uffd-lat", compression);
        let mut src = vec![0u8; size];
        let mut rng = Rng::new(37);
        compressible(&mut src, &mut rng);
        let manifest = chunk_memory(&[(0, &src[..])], &*store);
        let ratio = store.stats().raw_bytes_written as f64 / store.stats().bytes_written as f64;
        let map = Mapping::new(size);
        let regions = vec![(map.addr(), size, manifest.regions[0].clone())];
        // SAFETY: as in `start_time_does_not_depend_on_memory_size`.
        let lazy = unsafe { LazyMemory::start(regions, CHUNK, store.clone()) }.unwrap();
        let addr = map.addr();
        let mut lat = std::thread::spawn(move || {
            (0..size / CHUNK)
                .map(|c| {
                    let t = Instant::now();
                    read_at(addr + c * CHUNK, 1);
                    t.elapsed()
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        let st = lazy.stop();
        lat.sort();
        let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
        eprintln!(
            "fault latency, 64 KiB chunks, {compression:?} (ratio {ratio:.2}): median {:.1?}, \
             p90 {:.1?}, mean {mean:.1?}, handler {:.1?}/fault over {} faults",
            lat[lat.len() / 2],
            lat[lat.len() * 9 / 10],
            Duration::from_nanos(st.fault_service_ns / st.faults.max(1)),
            st.faults
        );
        assert_eq!(st.chunks_fetched, (size / CHUNK) as u64);
        assert!(read_at(addr, size) == src);
    }
}

/// A store whose reads wait until `want` of them are in progress at once (or 2 s
/// pass), recording the most seen together.
struct GateStore {
    inner: Arc<LocalStore>,
    want: usize,
    now: std::sync::Mutex<usize>,
    cv: std::sync::Condvar,
    max: std::sync::atomic::AtomicUsize,
}

impl ChunkRead for GateStore {
    fn get(&self, id: &crate::store::ChunkId) -> crate::store::Result<Vec<u8>> {
        {
            let mut n = self.now.lock().unwrap();
            *n += 1;
            self.max.fetch_max(*n, Ordering::SeqCst);
            self.cv.notify_all();
            let deadline = Instant::now() + Duration::from_secs(2);
            while *n < self.want && Instant::now() < deadline {
                n = self
                    .cv
                    .wait_timeout(n, Duration::from_millis(10))
                    .unwrap()
                    .0;
            }
        }
        let r = self.inner.get(id);
        *self.now.lock().unwrap() -= 1;
        r
    }

    fn contains(&self, id: &crate::store::ChunkId) -> crate::store::Result<bool> {
        self.inner.contains(id)
    }
}

#[test]
fn faults_on_different_chunks_are_fetched_at_once() {
    let f = fixture(&[1 << 20], Compression::None, 31);
    let gate = Arc::new(GateStore {
        inner: f.store.clone(),
        want: 3,
        now: std::sync::Mutex::new(0),
        cv: std::sync::Condvar::new(),
        max: std::sync::atomic::AtomicUsize::new(0),
    });
    let map = Mapping::new(1 << 20);
    let regions = vec![(map.addr(), map.len(), f.manifest.regions[0].clone())];
    // SAFETY: a fresh private anonymous mapping owned by the test, alive until the
    // LazyMemory is stopped, accessed only through raw pointers.
    let lazy = unsafe {
        LazyMemory::start_with_options(regions, CHUNK, gate.clone(), LazyOptions::default())
    }
    .expect("start lazy memory");
    let stored: Vec<usize> = f.manifest.regions[0]
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, ChunkEntry::Chunk(_)))
        .map(|(i, _)| i)
        .take(3)
        .collect();
    assert_eq!(stored.len(), 3, "the fixture has stored chunks");
    let readers: Vec<_> = stored
        .iter()
        .map(|&c| {
            let addr = map.addr() + c * CHUNK;
            std::thread::spawn(move || (c, read_at(addr, CHUNK)))
        })
        .collect();
    for t in readers {
        let (c, got) = t.join().unwrap();
        assert_eq!(got, f.src[c * CHUNK..(c + 1) * CHUNK], "chunk {c}");
    }
    let stats = lazy.stop();
    assert_eq!(stats.chunks_fetched, 3);
    assert!(
        gate.max.load(Ordering::SeqCst) >= 3,
        "three faults on three chunks were fetched one after another (at most {} at once)",
        gate.max.load(Ordering::SeqCst)
    );
}
