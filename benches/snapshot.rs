//! Snapshot create / restore benchmark (harness = false; runs only under `cargo bench`).
//!
//! 1. Host limits, measured by this program: memcpy, BLAKE3 (one thread, all cores),
//!    zstd level 1, write + fsync to the bench directory.
//! 2. Full snapshots of a real VM (built with `build_for_boot` from a 3-instruction ELF
//!    kernel) whose memory is filled with a synthetic pattern (see [`Pattern`]), at
//!    256 MiB, 1 GiB and 4 GiB (`SNAPSHOT_BENCH_SIZES`, MiB, comma-separated): create,
//!    in-process restore (`build_from_snapshot` → VM ready and paused; warm and with the
//!    page cache dropped), memory-only restore through the library, and process-level
//!    restore (`vmm restore DIR --paused`: spawn → the `restored … in X ms` log line, and
//!    spawn → the API socket answering `GET /vm`).
//! 3. Incremental: a second, third … snapshot into a shared store after dirtying 0, 0.1,
//!    1 and 10 % of the pages (`SNAPSHOT_BENCH_INCR_MIB`, default 1024).
//! 4. The real Linux guest (256 MiB, idle) booted, snapshotted through the CLI and
//!    restored, if the guest artifacts exist (`SNAPSHOT_BENCH_LINUX=0` skips it).
//!
//! Results are printed and appended to `target/bench/{host,snapshot,restore,incremental}.csv`.

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vmm::builder::{BootOptions, Console, build_for_boot};
use vmm::builder_restore::{RestoreOptions, build_from_snapshot, snapshot_files};
use vmm::config::{KernelConfig, VmConfig};
use vmm::snapshot::manifest::{MemoryManifest, SaveStats, ZeroChunks, restore_memory};
use vmm::store::local::{LocalStore, LocalStoreOptions};
use vmm::vmm::{SnapshotReport, Vmm, create_snapshot};
use vmm::vstate::dirty::LogState;
use vmm::vstate::memory::{GuestMemory, create_anonymous, memory_slices};

const PAGE: usize = 4096;
const CHUNK: usize = vmm::snapshot::manifest::DEFAULT_CHUNK_SIZE;
const PAGES_PER_CHUNK: usize = CHUNK / PAGE;
/// Guest memory below this is left as loaded (kernel ELF, boot params, page tables).
const KEEP_LOW: usize = 2 << 20;

// ------------------------------------------------------------------------------------
// Small utilities

/// xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn fill(&mut self, buf: &mut [u8]) {
        let mut it = buf.chunks_exact_mut(8);
        for w in &mut it {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
        let rem = it.into_remainder();
        let v = self.next().to_le_bytes();
        let n = rem.len();
        rem.copy_from_slice(&v[..n]);
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Mutable host views of guest memory.
///
/// # Safety
/// Nothing else may access guest memory while the slices live (vCPUs paused).
#[allow(clippy::mut_from_ref)] // guest memory is mapped memory, not owned by `mem`'s borrow
unsafe fn regions_mut(mem: &GuestMemory) -> Vec<(u64, &mut [u8])> {
    // SAFETY: forwarded to the caller.
    unsafe { memory_slices(mem) }
        .into_iter()
        .map(|(a, s)| {
            // SAFETY: disjoint regions of a mapping we own; caller guarantees exclusivity.
            (a, unsafe {
                std::slice::from_raw_parts_mut(s.as_ptr() as *mut u8, s.len())
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------
// The guest memory pattern

/// Synthetic guest memory, generated in runs of 1–64 pages (4 KiB), each run one class:
///
/// | class | share of runs | content |
/// |---|---|---|
/// | zero | 85 % | untouched (never faulted in on the host) |
/// | text | 5.25 % | "code/text": a page from a 512-page pool of word soup, first 16 bytes unique |
/// | random | 3.75 % | incompressible (compressed file data, crypto keys, …) |
/// | sparse | 3 % | zero page with 48 random qwords (slab objects, page tables) |
/// | dup | 3 % | 1–4 whole 64 KiB chunks copied from earlier non-zero chunks (dedup-able) |
///
/// About 15 % of the pages end up non-zero; the first 2 MiB (the loaded kernel) is kept.
struct Pattern {
    rng: Rng,
    pool: Vec<u8>,
}

/// What a memory image contains.
#[derive(Clone, Copy, Debug, Default)]
struct Content {
    pages: u64,
    nonzero_pages: u64,
    chunks: u64,
    nonzero_chunks: u64,
    /// BLAKE3 over (chunk index, chunk hash) of the non-zero chunks.
    digest: [u8; 32],
}

const WORDS: &[&str] = &[
    "the", "kernel", "page", "0x7f3a", "struct", "return", "if", "else", "mov", "rax", "=", ";",
    "{", "}", "int", "for", "while", "1024", "NULL", "buffer", "size", "len", "error", "\n",
    "ffff8880", "call", "push", "rbp", "lock", "spin", "irq", "task", "0", "1", "-1", "&&",
];

impl Pattern {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut pool = vec![0u8; 512 * PAGE];
        let mut i = 0;
        while i < pool.len() {
            let w = WORDS[rng.below(WORDS.len())].as_bytes();
            for &b in w.iter().chain(b" ") {
                if i < pool.len() {
                    pool[i] = b;
                    i += 1;
                }
            }
        }
        Pattern { rng, pool }
    }

    fn text_page(&mut self, page: &mut [u8], stamp: u64) {
        let src = self.rng.below(512) * PAGE;
        page.copy_from_slice(&self.pool[src..src + PAGE]);
        page[..8].copy_from_slice(&stamp.to_le_bytes());
        page[8..16].copy_from_slice(&self.rng.next().to_le_bytes());
    }

    fn sparse_page(&mut self, page: &mut [u8]) {
        for _ in 0..48 {
            let off = self.rng.below(PAGE / 8) * 8;
            let v = match self.rng.next() % 3 {
                0 => 0xffff_8880_0000_0000 | (self.rng.next() & 0x0fff_ffff_f000),
                1 => self.rng.next() & 0xffff,
                _ => self.rng.next(),
            };
            page[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Fills one region (pages from `first_page` on).
    fn fill_region(&mut self, buf: &mut [u8], first_page: usize, stamp_base: u64) {
        let pages = buf.len() / PAGE;
        let mut p = first_page;
        // Chunks made entirely of non-zero pages: sources for the dup class.
        let mut full_chunks: Vec<usize> = Vec::new();
        while p < pages {
            let r = self.rng.next();
            let len = 1 + (r % 64) as usize;
            let class = (r >> 8) % 10_000;
            let end = (p + len).min(pages);
            match class {
                0..8500 => {
                    p = end;
                    continue;
                }
                8500..9025 => {
                    for q in p..end {
                        self.text_page(&mut buf[q * PAGE..(q + 1) * PAGE], stamp_base + q as u64);
                    }
                }
                9025..9400 => self.rng.fill(&mut buf[p * PAGE..end * PAGE]),
                9400..9700 => {
                    for q in p..end {
                        self.sparse_page(&mut buf[q * PAGE..(q + 1) * PAGE]);
                    }
                }
                _ => {
                    let c0 = p.div_ceil(PAGES_PER_CHUNK);
                    let n = len.div_ceil(PAGES_PER_CHUNK);
                    let last = (c0 + n).min(pages / PAGES_PER_CHUNK);
                    for c in c0..last {
                        if full_chunks.is_empty() {
                            self.rng.fill(&mut buf[c * CHUNK..(c + 1) * CHUNK]);
                        } else {
                            let s = full_chunks[self.rng.below(full_chunks.len())];
                            buf.copy_within(s * CHUNK..(s + 1) * CHUNK, c * CHUNK);
                        }
                    }
                    p = (last * PAGES_PER_CHUNK).max(end);
                    continue;
                }
            }
            for c in p.div_ceil(PAGES_PER_CHUNK)..end / PAGES_PER_CHUNK {
                full_chunks.push(c);
            }
            p = end;
        }
    }

    fn fill(&mut self, mem: &GuestMemory) {
        // SAFETY: the VM is paused; only this thread touches its memory.
        let mut regions = unsafe { regions_mut(mem) };
        for (i, (gpa, buf)) in regions.iter_mut().enumerate() {
            let first = if i == 0 { KEEP_LOW / PAGE } else { 0 };
            self.fill_region(buf, first, *gpa / PAGE as u64);
        }
    }

    /// Dirties `n` random pages (uniform over all guest pages above 2 MiB, with
    /// replacement): 256 random bytes at a random offset of each, written through
    /// vm-memory, whose write bitmap (read with the KVM log by incremental snapshots)
    /// records them. Returns the number of distinct 64 KiB chunks touched.
    fn dirty_tracked(&mut self, mem: &GuestMemory, n: usize) -> usize {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};
        let regions: Vec<(u64, usize)> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.len() as usize))
            .collect();
        let total: usize = regions.iter().map(|(_, l)| l / PAGE).sum();
        let mut touched = HashSet::new();
        let mut bytes = [0u8; 256];
        for _ in 0..n {
            let mut pg = KEEP_LOW / PAGE + self.rng.below(total - KEEP_LOW / PAGE);
            for (ri, &(gpa, len)) in regions.iter().enumerate() {
                let np = len / PAGE;
                if pg < np {
                    let off = pg * PAGE + self.rng.below(PAGE / 256) * 256;
                    self.rng.fill(&mut bytes);
                    mem.write_slice(&bytes, GuestAddress(gpa + off as u64))
                        .expect("write guest memory");
                    touched.insert((ri, pg / PAGES_PER_CHUNK));
                    break;
                }
                pg -= np;
            }
        }
        touched.len()
    }
}

/// Scans guest memory (in parallel): non-zero pages and chunks, and a digest of the
/// non-zero chunks (to check a restore).
fn scan(mem: &GuestMemory) -> Content {
    // SAFETY: nothing writes guest memory during the scan (VM paused or never started).
    let regions = unsafe { memory_slices(mem) };
    let mut items: Vec<(u64, &[u8])> = Vec::new();
    for (gpa, buf) in &regions {
        for (c, data) in buf.chunks(CHUNK).enumerate() {
            items.push((gpa + (c * CHUNK) as u64, data));
        }
    }
    let n = cores();
    let per = items.len().div_ceil(n);
    // Per thread: non-zero pages, non-zero chunks, (address, hash) of each non-zero chunk.
    type Part = (u64, u64, Vec<(u64, [u8; 32])>);
    let parts: Vec<Part> = std::thread::scope(|s| {
        let hs: Vec<_> = items
            .chunks(per.max(1))
            .map(|part| {
                s.spawn(move || {
                    let (mut nzp, mut nzc, mut ids) = (0u64, 0u64, Vec::new());
                    for &(addr, data) in part {
                        let z = data.chunks(PAGE).filter(|p| !is_zero(p)).count() as u64;
                        if z > 0 {
                            nzp += z;
                            nzc += 1;
                            ids.push((addr, *blake3::hash(data).as_bytes()));
                        }
                    }
                    (nzp, nzc, ids)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut c = Content {
        pages: regions.iter().map(|(_, b)| (b.len() / PAGE) as u64).sum(),
        chunks: items.len() as u64,
        ..Default::default()
    };
    let mut h = blake3::Hasher::new();
    for (nzp, nzc, ids) in parts {
        c.nonzero_pages += nzp;
        c.nonzero_chunks += nzc;
        for (addr, id) in ids {
            h.update(&addr.to_le_bytes());
            h.update(&id);
        }
    }
    c.digest = *h.finalize().as_bytes();
    c
}

// ------------------------------------------------------------------------------------
// Host limits

struct Limits {
    /// Sequential write + fsync bandwidth to the bench directory, bytes/s.
    fsync_bw: f64,
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn best<F: FnMut() -> Duration>(n: usize, mut f: F) -> Duration {
    (0..n).map(|_| f()).min().unwrap()
}

/// An anonymous private mapping of `len` bytes, untouched.
struct Mapping(*mut u8, usize);

impl Mapping {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {len} bytes");
        Mapping(p as *mut u8, len)
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: we own the mapping of that length.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

fn write_fsync_file(path: &Path, data: &[u8]) -> Duration {
    let t = Instant::now();
    let mut f = fs::File::create(path).expect("create bench file");
    for b in data.chunks(1 << 20) {
        f.write_all(b).expect("write bench file");
    }
    f.sync_all().expect("fsync bench file");
    let d = t.elapsed();
    drop(f);
    let _ = fs::remove_file(path);
    d
}

/// `n` files of `CHUNK` bytes written like the chunk store does (create, write, fsync,
/// rename) by `threads` threads, then the directory fsynced.
fn chunk_files(dir: &Path, data: &[u8], threads: usize) -> Duration {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let per = chunks.len().div_ceil(threads);
    let t = Instant::now();
    std::thread::scope(|s| {
        for (ti, part) in chunks.chunks(per).enumerate() {
            s.spawn(move || {
                for (i, c) in part.iter().enumerate() {
                    let tmp = dir.join(format!(".t{ti}-{i}"));
                    let mut f = fs::File::create(&tmp).unwrap();
                    f.write_all(c).unwrap();
                    f.sync_all().unwrap();
                    fs::rename(&tmp, dir.join(format!("c{ti}-{i}"))).unwrap();
                }
            });
        }
    });
    fs::File::open(dir).unwrap().sync_all().unwrap();
    let d = t.elapsed();
    let _ = fs::remove_dir_all(dir);
    d
}

/// Median latencies (ms) of a new 4 KiB file's fsync and of a directory fsync.
fn fsync_latency(dir: &Path) -> (f64, f64) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let page = [0x5au8; PAGE];
    for i in 0..64 {
        let t = Instant::now();
        let mut f = fs::File::create(dir.join(format!("f{i}"))).unwrap();
        f.write_all(&page).unwrap();
        f.sync_all().unwrap();
        files.push(ms(t.elapsed()));
        let t = Instant::now();
        fs::File::open(dir).unwrap().sync_all().unwrap();
        dirs.push(ms(t.elapsed()));
    }
    let _ = fs::remove_dir_all(dir);
    (min_median(&files).1, min_median(&dirs).1)
}

fn host_limits(run: u64, dir: &Path) -> Limits {
    let csv = Csv::new("host", "run,metric,value,unit,detail,load1");
    let row = |metric: &str, value: f64, unit: &str, detail: &str| {
        println!("  {metric:<34} {value:>10.3} {unit:<6} {detail}");
        csv.row(&[
            run.to_string(),
            metric.into(),
            f(value),
            unit.into(),
            detail.into(),
            f(load1()),
        ]);
    };
    println!(
        "host limits (bench dir {} on {}):",
        dir.display(),
        fs_type(dir)
    );
    const N: usize = 256 << 20;
    let mut src = vec![0u8; N];
    Rng::new(7).fill(&mut src);
    let mut dst = vec![1u8; N];
    let d = best(5, || {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        t.elapsed()
    });
    row(
        "memcpy_warm",
        gbps(N, d),
        "GB/s",
        "256 MiB into touched memory, best of 5",
    );
    let d = best(3, || {
        let mut m = Mapping::new(N);
        let t = Instant::now();
        m.slice().copy_from_slice(&src);
        std::hint::black_box(m.slice());
        t.elapsed()
    });
    row(
        "memcpy_first_touch",
        gbps(N, d),
        "GB/s",
        "256 MiB into a fresh anonymous mapping (page faults included), best of 3",
    );
    drop(dst);

    let d = best(3, || {
        let t = Instant::now();
        for c in src.chunks(CHUNK) {
            std::hint::black_box(blake3::hash(c));
        }
        t.elapsed()
    });
    row(
        "blake3_1thread",
        gbps(N, d),
        "GB/s",
        "64 KiB chunks, one thread",
    );
    let n = cores();
    let d = best(3, || {
        let per = N / n;
        let t = Instant::now();
        std::thread::scope(|s| {
            for part in src.chunks(per) {
                s.spawn(move || {
                    for c in part.chunks(CHUNK) {
                        std::hint::black_box(blake3::hash(c));
                    }
                });
            }
        });
        t.elapsed()
    });
    row(
        "blake3_all_cores",
        gbps(N, d),
        "GB/s",
        &format!("64 KiB chunks, {n} threads"),
    );

    // zstd level 1 on the pattern's text pages and on random data.
    let mut text = vec![0u8; 64 << 20];
    let mut pat = Pattern::new(11);
    for (i, p) in text.chunks_mut(PAGE).enumerate() {
        pat.text_page(p, i as u64);
    }
    for (name, data) in [("text", &text[..]), ("random", &src[..64 << 20])] {
        let t = Instant::now();
        let comp: Vec<Vec<u8>> = data
            .chunks(CHUNK)
            .map(|c| zstd::bulk::compress(c, 1).unwrap())
            .collect();
        let dc = t.elapsed();
        let clen: usize = comp.iter().map(Vec::len).sum();
        let mut out = vec![0u8; CHUNK];
        let t = Instant::now();
        for c in &comp {
            let k = zstd::bulk::decompress_to_buffer(c, &mut out[..]).unwrap();
            std::hint::black_box(k);
        }
        let dd = t.elapsed();
        let ratio = data.len() as f64 / clen as f64;
        row(
            &format!("zstd1_compress_{name}"),
            gbps(data.len(), dc),
            "GB/s",
            &format!("64 KiB chunks one thread; ratio {ratio:.2}"),
        );
        row(
            &format!("zstd1_decompress_{name}"),
            gbps(data.len(), dd),
            "GB/s",
            "64 KiB chunks one thread",
        );
    }
    drop(text);

    // write + fsync
    let mut fsync_bw = f64::NAN;
    let mut dirs = vec![(dir.to_path_buf(), "bench_dir")];
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && fs_type(shm) == "tmpfs" {
        let d = shm.join(format!("vmm-bench-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        dirs.push((d, "dev_shm"));
    }
    for (d, tag) in &dirs {
        let fst = fs_type(d);
        let file = d.join("fsync-test.bin");
        let t = write_fsync_file(&file, &src);
        let bw = N as f64 / t.as_secs_f64();
        if *tag == "bench_dir" {
            fsync_bw = bw;
        }
        row(
            &format!("write_fsync_seq_{tag}"),
            bw / 1e9,
            "GB/s",
            &format!("{fst}: one new 256 MiB file in 1 MiB writes then fsync"),
        );
        let t = chunk_files(&d.join("chunks-test"), &src[..128 << 20], 8);
        row(
            &format!("write_fsync_chunks_{tag}"),
            gbps(128 << 20, t),
            "GB/s",
            &format!("{fst}: 2048 new 64 KiB files each fsynced+renamed by 8 threads"),
        );
        let (f_ms, d_ms) = fsync_latency(&d.join("latency-test"));
        row(
            &format!("fsync_4k_file_{tag}"),
            f_ms,
            "ms",
            &format!("{fst}: create + write 4 KiB + fsync of a new file, median of 64"),
        );
        row(
            &format!("fsync_dir_{tag}"),
            d_ms,
            "ms",
            &format!("{fst}: fsync of a directory with one new entry, median of 64"),
        );
        if *tag == "dev_shm" {
            let _ = fs::remove_dir_all(d);
        }
    }
    Limits { fsync_bw }
}

// ------------------------------------------------------------------------------------
// VMs

/// A 3-instruction ELF kernel at 1 MiB: `hlt; jmp .-3`.
fn tiny_kernel(dir: &Path) -> PathBuf {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // version
    let put16 = |e: &mut Vec<u8>, o: usize, v: u16| e[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |e: &mut Vec<u8>, o: usize, v: u32| e[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |e: &mut Vec<u8>, o: usize, v: u64| e[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut e, 0x10, 2); // ET_EXEC
    put16(&mut e, 0x12, 62); // x86_64
    put32(&mut e, 0x14, 1);
    put64(&mut e, 0x18, 0x10_0000); // entry
    put64(&mut e, 0x20, 64); // phoff
    put16(&mut e, 0x34, 64); // ehsize
    put16(&mut e, 0x36, 56); // phentsize
    put16(&mut e, 0x38, 1); // phnum
    put16(&mut e, 0x3a, 64); // shentsize
    put32(&mut e, 64, 1); // PT_LOAD
    put32(&mut e, 68, 5); // R+X
    put64(&mut e, 72, 0x1000); // offset
    put64(&mut e, 80, 0x10_0000); // vaddr
    put64(&mut e, 88, 0x10_0000); // paddr
    put64(&mut e, 96, 3); // filesz
    put64(&mut e, 104, 3); // memsz
    put64(&mut e, 112, 0x1000); // align
    e.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp .-3
    let p = dir.join("hlt-kernel.elf");
    fs::write(&p, e).unwrap();
    p
}

/// Boots the tiny kernel with `mem_mib`, lets it run (it halts), pauses it.
fn boot_tiny(kernel: &Path, mem_mib: u64) -> Vmm {
    let cfg = VmConfig {
        kernel: KernelConfig {
            path: kernel.to_path_buf(),
            cmdline: String::new(),
        },
        initrd: None,
        mem_mib,
        vcpus: 1,
        blocks: Vec::new(),
        host_quirks: false,
        cpu_template: Default::default(),
    };
    let opts = BootOptions {
        console: Console::Writer(Box::new(std::io::sink())),
        extra_pio: Vec::new(),
        extra_mmio: Vec::new(),
        start_paused: false,
    };
    let mut vmm = build_for_boot(&cfg, opts).expect("build_for_boot (tiny kernel)");
    std::thread::sleep(Duration::from_millis(20));
    vmm.pause().expect("pause");
    vmm
}

/// `build_from_snapshot` (paused): time to the VM being ready and, for a lazy restore,
/// to the background fill having placed every stored chunk.
fn restore_in_process(dir: &Path, eager: bool) -> (Duration, Option<Duration>, Vmm) {
    let (state, memory) = snapshot_files(dir);
    let opts = RestoreOptions {
        console: Console::Writer(Box::new(std::io::sink())),
        blocks: None,
        force: false,
        start_paused: true,
        eager_memory: eager,
        clock: Default::default(),
    };
    let t = Instant::now();
    let vmm = build_from_snapshot(&state, &memory, opts).expect("build_from_snapshot");
    let ready = t.elapsed();
    let filled = vmm.lazy.as_ref().map(|l| {
        assert!(
            l.wait_complete(Duration::from_secs(300)),
            "lazy memory fill did not complete"
        );
        t.elapsed()
    });
    (ready, filled, vmm)
}

/// Memory only, through the library: manifest read + store open + fresh mapping +
/// `restore_memory` (what `build_from_snapshot` does for memory).
fn restore_memory_only(dir: &Path, store_dir: &Path) -> Duration {
    let (_, memory) = snapshot_files(dir);
    let t = Instant::now();
    let manifest = MemoryManifest::read_from(&memory).expect("read manifest");
    let store = LocalStore::open(store_dir, LocalStoreOptions::default()).expect("open store");
    let regions: Vec<(vm_memory::GuestAddress, usize)> = manifest
        .regions
        .iter()
        .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = create_anonymous(&regions).expect("map memory");
    // SAFETY: a fresh mapping nobody else sees.
    let mut views = unsafe { regions_mut(&mem) };
    restore_memory(&manifest, &mut views, &store, ZeroChunks::AlreadyZero).expect("restore");
    let d = t.elapsed();
    drop(views);
    drop(mem);
    d
}

struct ProcRestore {
    log_ms: f64,
    api_ms: f64,
    reported_ms: f64,
    reported_mem_ms: f64,
}

/// `vmm restore DIR --paused --api-sock S`: spawn → log line, spawn → `GET /vm` answered.
fn restore_process(dir: &Path, sock: &Path, eager: bool) -> Result<ProcRestore, String> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(dir)
        .arg("--paused")
        .arg("--api-sock")
        .arg(sock)
        .env("RUST_LOG", "info");
    if eager {
        cmd.arg("--eager-memory");
    }
    let mut p = Proc::spawn(&mut cmd).map_err(|e| format!("spawn vmm: {e}"))?;
    let target = vmm::api::ApiTarget::Unix(sock.to_path_buf());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut api_ms = None;
    let mut log = None;
    while api_ms.is_none() || log.is_none() {
        if Instant::now() > deadline {
            return Err(format!("restore timed out\n{}", p.output()));
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            p.drain();
            return Err(format!("vmm restore exited: {st}\n{}", p.output()));
        }
        if api_ms.is_none()
            && sock.exists()
            && let Ok((200, _)) =
                vmm::api::request_with_timeout(&target, "GET", "/vm", None, Duration::from_secs(5))
        {
            api_ms = Some(ms(p.started.elapsed()));
        }
        p.drain();
        if log.is_none()
            && let Some(l) = p.log.iter().find(|l| l.text.contains("restored "))
        {
            log = Some((ms(l.at - p.started), l.text.clone()));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    p.kill();
    let (log_ms, text) = log.unwrap();
    // "… restored PATH in X ms (memory Y ms)"
    let num_after = |pat: &str| -> f64 {
        text.rfind(pat)
            .and_then(|i| {
                text[i + pat.len()..]
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    Ok(ProcRestore {
        log_ms,
        api_ms: api_ms.unwrap(),
        reported_ms: num_after(" in "),
        reported_mem_ms: num_after("(memory "),
    })
}

struct Restores {
    run: u64,
    csv: Csv,
}

impl Restores {
    fn row(&self, guest: &str, mem_mib: u64, method: &str, i: usize, v: f64, extra: (f64, f64)) {
        self.csv.row(&[
            self.run.to_string(),
            guest.into(),
            mem_mib.to_string(),
            method.into(),
            i.to_string(),
            f(v),
            f(extra.0),
            f(extra.1),
            f(load1()),
        ]);
    }

    /// All restore measurements of the snapshot in `dir`; checks the restored memory.
    fn measure(&self, guest: &str, mem_mib: u64, dir: &Path, store: &Path, want: &Content) {
        let reps = env_or("SNAPSHOT_BENCH_REPS", 3usize);
        let nan = (f64::NAN, f64::NAN);
        let mut summary = Vec::new();
        for (eager, mode) in [(false, "lazy"), (true, "eager")] {
            let (mut ready, mut filled) = (Vec::new(), Vec::new());
            for i in 0..=reps {
                let (d, fill, vm) = restore_in_process(dir, eager);
                if i == 0 {
                    // First run: page-cache warm-up, and the correctness check (a lazy
                    // restore's memory is read through its fault handler).
                    let got = scan(&vm.mem);
                    assert_eq!(
                        (got.nonzero_chunks, got.digest),
                        (want.nonzero_chunks, want.digest),
                        "{mode} restore: memory differs from the snapshotted memory"
                    );
                    continue;
                }
                drop(vm);
                ready.push(ms(d));
                self.row(
                    guest,
                    mem_mib,
                    &format!("in_process_{mode}_warm"),
                    i,
                    ms(d),
                    nan,
                );
                if let Some(fd) = fill {
                    filled.push(ms(fd));
                    let m = format!("in_process_{mode}_warm_filled");
                    self.row(guest, mem_mib, &m, i, ms(fd), nan);
                }
            }
            let (rmin, rmed) = min_median(&ready);
            let mut line =
                format!("in-process {mode} warm: ready min {rmin:.1} / median {rmed:.1} ms");
            if !filled.is_empty() {
                let (fmin, fmed) = min_median(&filled);
                line += &format!(", memory filled min {fmin:.1} / median {fmed:.1} ms");
            }
            if std::env::var("SNAPSHOT_BENCH_DROP_CACHES").as_deref() != Ok("0") && drop_caches() {
                let (d, fill, vm) = restore_in_process(dir, eager);
                drop(vm);
                self.row(
                    guest,
                    mem_mib,
                    &format!("in_process_{mode}_cold"),
                    1,
                    ms(d),
                    nan,
                );
                line += &format!("; cold: ready {:.1} ms", ms(d));
                if let Some(fd) = fill {
                    let m = format!("in_process_{mode}_cold_filled");
                    self.row(guest, mem_mib, &m, 1, ms(fd), nan);
                    line += &format!(", filled {:.1} ms", ms(fd));
                }
            }
            summary.push(line);
        }
        let mut mem_only = Vec::new();
        for i in 1..=reps {
            let d = ms(restore_memory_only(dir, store));
            mem_only.push(d);
            self.row(guest, mem_mib, "memory_only_warm", i, d, nan);
        }
        let (mmin, mmed) = min_median(&mem_only);
        summary.push(format!(
            "memory only (library, eager): min {mmin:.1} / median {mmed:.1} ms"
        ));
        let sock = dir.with_extension("sock");
        for (eager, mode) in [(false, "lazy"), (true, "eager")] {
            let (mut logs, mut apis) = (Vec::new(), Vec::new());
            let mut reported = nan;
            for i in 1..=reps {
                match restore_process(dir, &sock, eager) {
                    Ok(r) => {
                        logs.push(r.log_ms);
                        apis.push(r.api_ms);
                        reported = (r.reported_ms, r.reported_mem_ms);
                        let m = format!("process_{mode}_log");
                        self.row(guest, mem_mib, &m, i, r.log_ms, reported);
                        let m = format!("process_{mode}_api");
                        self.row(guest, mem_mib, &m, i, r.api_ms, reported);
                    }
                    Err(e) => eprintln!("process restore ({mode}) failed: {e}"),
                }
            }
            let (lmin, lmed) = min_median(&logs);
            let (amin, amed) = min_median(&apis);
            summary.push(format!(
                "`vmm restore --paused`{}: spawn → log line min {lmin:.1} / median {lmed:.1} ms \
                 (vmm says {:.1} ms, memory {:.1} ms), spawn → GET /vm min {amin:.1} / median \
                 {amed:.1} ms",
                if eager { " --eager-memory" } else { "" },
                reported.0,
                reported.1
            ));
        }
        let _ = fs::remove_file(&sock);
        println!("  restore {guest} {mem_mib} MiB:");
        for l in summary {
            println!("    {l}");
        }
    }
}

struct Creates {
    run: u64,
    csv: Csv,
    fsync_bw: f64,
}

impl Creates {
    fn row(&self, guest: &str, mem_mib: u64, c: &Content, r: &SnapshotReport, dir_b: u64) {
        let nz_bytes = c.nonzero_pages * PAGE as u64;
        let target_ms = 1.2 * nz_bytes as f64 / self.fsync_bw * 1e3;
        let m = &r.memory;
        println!(
            "  create {guest} {mem_mib} MiB: {:.1} ms (state {:.1}, memory {:.1}); non-zero pages \
             {:.1} % ({} MiB), non-zero chunks {:.1} %; chunks {} total / {} zero / {} new / {} \
             deduped; {} MiB raw new, {:.1} MiB stored, dir {:.1} MiB; target (1.2 × non-zero ÷ \
             fsync bw) {target_ms:.1} ms",
            r.total_ms,
            r.state_ms,
            r.memory_ms,
            100.0 * c.nonzero_pages as f64 / c.pages as f64,
            nz_bytes >> 20,
            100.0 * c.nonzero_chunks as f64 / c.chunks as f64,
            m.chunks_total,
            m.chunks_zero,
            m.chunks_new,
            m.chunks_deduped,
            m.bytes_new >> 20,
            m.bytes_written as f64 / 1048576.0,
            dir_b as f64 / 1048576.0,
        );
        self.csv.row(&[
            self.run.to_string(),
            guest.into(),
            mem_mib.to_string(),
            c.nonzero_pages.to_string(),
            c.pages.to_string(),
            c.nonzero_chunks.to_string(),
            m.chunks_total.to_string(),
            m.chunks_zero.to_string(),
            m.chunks_new.to_string(),
            m.chunks_deduped.to_string(),
            m.bytes_new.to_string(),
            m.bytes_written.to_string(),
            dir_b.to_string(),
            f(r.total_ms),
            f(r.state_ms),
            f(r.memory_ms),
            f(target_ms),
            f(self.fsync_bw / 1e9),
            f(load1()),
        ]);
    }
}

const CREATE_HEADER: &str = "run,guest,mem_mib,nonzero_pages,pages,nonzero_chunks,chunks_total,\
chunks_zero,chunks_new,chunks_deduped,bytes_new,bytes_written,dir_bytes,create_ms,state_ms,\
memory_ms,target_ms,fsync_gbps,load1";

fn full_snapshots(root: &Path, kernel: &Path, creates: &Creates, restores: &Restores) {
    let sizes: Vec<u64> = std::env::var("SNAPSHOT_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for mib in sizes {
        let dir = root.join(format!("full-{mib}"));
        let t = Instant::now();
        let mut vm = boot_tiny(kernel, mib);
        let boot_ms = ms(t.elapsed());
        let t = Instant::now();
        Pattern::new(0x5eed ^ mib).fill(&vm.mem);
        let fill_ms = ms(t.elapsed());
        let content = scan(&vm.mem);
        println!(
            "full snapshot, {mib} MiB (VM built in {boot_ms:.1} ms, filled in {fill_ms:.0} ms):"
        );
        let rep = create_snapshot(&mut vm, &dir, None).expect("create_snapshot");
        drop(vm);
        // SNAPSHOT_BENCH_TAG labels a variant (e.g. "tmpfs" for BENCH_DIR=/dev/shm).
        let guest = match std::env::var("SNAPSHOT_BENCH_TAG") {
            Ok(t) if !t.is_empty() => format!("synthetic-{t}"),
            _ => "synthetic".to_string(),
        };
        creates.row(&guest, mib, &content, &rep, dir_bytes(&dir));
        restores.measure(&guest, mib, &dir, &dir, &content);
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Incremental snapshots of a 1 GiB tiny guest filled with [`Pattern`], after dirtying
/// 0 %, 0.1 %, 1 %, 10 % and 100 % of its pages (through vm-memory, so the VMM's write
/// bitmap sees them: the KVM log path sees what a guest's writes would show), with each
/// dirty-tracking method: `kvm-log` (only chunks with a dirty page are re-read) and
/// `rehash` (every chunk re-hashed; only changed ones stored). Then storage for ten
/// snapshots of the same guest left running idle between them.
fn incremental(run: u64, root: &Path, kernel: &Path) {
    let mib: u64 = env_or("SNAPSHOT_BENCH_INCR_MIB", 1024);
    let csv = Csv::new(
        "incremental",
        "run,mem_mib,method,dirty_pct,pages_dirtied,chunks_touched,create_ms,memory_ms,\
         chunks_reused,chunks_new,bytes_new,bytes_written,store_bytes,load1",
    );
    // Both methods, in the order given (SNAPSHOT_BENCH_INCR_METHODS, default
    // "kvm-log,rehash"): run them both ways round to see what order costs.
    let methods =
        std::env::var("SNAPSHOT_BENCH_INCR_METHODS").unwrap_or_else(|_| "kvm-log,rehash".into());
    for method in methods
        .split(',')
        .filter(|m| matches!(*m, "kvm-log" | "rehash"))
    {
        let store = root.join(format!("store-{method}"));
        let mut vm = boot_tiny(kernel, mib);
        let mut pat = Pattern::new(0x5eed_0abc);
        pat.fill(&vm.mem);
        let content = scan(&vm.mem);
        println!(
            "incremental ({method}), {mib} MiB, shared store ({:.1} % pages non-zero):",
            100.0 * content.nonzero_pages as f64 / content.pages as f64
        );
        let pages = content.pages as usize;
        let mut prev_store = 0;
        for (i, pct) in [f64::NAN, 0.0, 0.1, 1.0, 10.0, 100.0]
            .into_iter()
            .enumerate()
        {
            let (n, touched) = if pct.is_nan() {
                (0, 0)
            } else {
                let n = (pages as f64 * pct / 100.0).round() as usize;
                (n, pat.dirty_tracked(&vm.mem, n))
            };
            let dir = root.join(format!("incr-{method}-{i}"));
            let r = create_snapshot(&mut vm, &dir, Some(&store)).expect("create_snapshot");
            if pct.is_nan() {
                // The pattern was written behind the logs' back, so the base snapshot's
                // check distrusts the log; pick the method under test explicitly.
                vm.dirty_log = if method == "kvm-log" {
                    LogState::Trusted
                } else {
                    LogState::Broken
                };
            }
            let sb = dir_bytes(&store);
            let label = if pct.is_nan() {
                "base".to_string()
            } else {
                format!("{pct} %")
            };
            println!(
                "  {label:>7} dirty ({n} pages, {touched} chunks touched): {:.1} ms (memory {:.1}), \
                 {} reused, {} new chunks, +{:.2} MiB stored (store grew {:.2} MiB)",
                r.total_ms,
                r.memory_ms,
                r.memory.chunks_reused,
                r.memory.chunks_new,
                r.memory.bytes_written as f64 / 1048576.0,
                (sb - prev_store) as f64 / 1048576.0
            );
            prev_store = sb;
            csv.row(&[
                run.to_string(),
                mib.to_string(),
                method.to_string(),
                if pct.is_nan() {
                    "base".into()
                } else {
                    pct.to_string()
                },
                n.to_string(),
                touched.to_string(),
                f(r.total_ms),
                f(r.memory_ms),
                r.memory.chunks_reused.to_string(),
                r.memory.chunks_new.to_string(),
                r.memory.bytes_new.to_string(),
                r.memory.bytes_written.to_string(),
                sb.to_string(),
                f(load1()),
            ]);
        }
        drop(vm);
        let _ = fs::remove_dir_all(&store);
    }
    idle_series(run, root, kernel, mib);
}

/// Columns of `idle_series.csv`.
const IDLE_HEADER: &str =
    "run,guest,mem_mib,snapshot,create_ms,bytes_written,store_bytes,ratio_to_first";

/// Ten snapshots of the tiny guest (filled with [`Pattern`]) resumed for 200 ms between
/// them, into one store: total storage against the first snapshot alone.
fn idle_series(run: u64, root: &Path, kernel: &Path, mib: u64) {
    let csv = Csv::new("idle_series", IDLE_HEADER);
    let store = root.join("store-idle");
    let mut vm = boot_tiny(kernel, mib);
    Pattern::new(0x1d1e).fill(&vm.mem);
    let mut first = 0u64;
    println!("idle series, {mib} MiB, 10 snapshots into one store:");
    for i in 1..=10 {
        if i > 1 {
            vm.resume().expect("resume");
            std::thread::sleep(Duration::from_millis(200));
            vm.pause().expect("pause");
        }
        let dir = root.join(format!("idle-{i}"));
        let r = create_snapshot(&mut vm, &dir, Some(&store)).expect("create_snapshot");
        let sb = dir_bytes(&store);
        if i == 1 {
            first = sb;
        }
        let ratio = sb as f64 / first as f64;
        println!(
            "  snapshot {i:>2}: {:.1} ms, +{} bytes, store {:.2} MiB ({ratio:.4}x the first)",
            r.total_ms,
            r.memory.bytes_written,
            sb as f64 / 1048576.0
        );
        csv.row(&[
            run.to_string(),
            "tiny".into(),
            mib.to_string(),
            i.to_string(),
            f(r.total_ms),
            r.memory.bytes_written.to_string(),
            sb.to_string(),
            format!("{ratio:.4}"),
        ]);
    }
    drop(vm);
    let _ = fs::remove_dir_all(&store);
}

/// Starts the project's Linux guest (idle, `vmmtest.info`) on a copy of its root
/// filesystem, with the API on `ROOT/NAME.sock`.
fn spawn_linux(art: &Path, root: &Path, name: &str, mib: u64) -> (Proc, PathBuf) {
    let rootfs = root.join(format!("{name}-rootfs.ext4"));
    fs::copy(art.join("rootfs.ext4"), &rootfs).expect("copy rootfs");
    let sock = root.join(format!("{name}.sock"));
    let cmdline = format!("{BASE_CMDLINE} init=/idle vmmtest.info");
    let p = Proc::spawn(
        Command::new(vmm_bin())
            .arg("--kernel")
            .arg(format!(
                "path={},cmdline=\"{cmdline}\"",
                art.join("vmlinux").display()
            ))
            .arg("--memory")
            .arg(format!("size_mib={mib}"))
            .arg("--block")
            .arg(format!("path={},root=true", rootfs.display()))
            .arg("--api-sock")
            .arg(&sock),
    )
    .expect("spawn vmm");
    (p, sock)
}

/// The project's Linux guest, idle at 1 GiB: ten `vmm snapshot create --store` 2 s apart
/// into one store (the VM runs on between them); storage against the first snapshot.
fn linux_idle_series(run: u64, root: &Path) {
    let Some(art) = artifacts() else {
        println!("linux idle series: skipped (no guest artifacts)");
        return;
    };
    let mib: u64 = env_or("SNAPSHOT_BENCH_LINUX_IDLE_MIB", 1024);
    let store = root.join("idle-linux-store");
    let (mut p, sock) = spawn_linux(&art, root, "idle", mib);
    if p.wait_for("vmmtest: info", Duration::from_secs(420))
        .is_none()
    {
        println!(
            "linux idle series: no `vmmtest: info` line; skipped\n{}",
            p.output()
        );
        return;
    }
    let csv = Csv::new("idle_series", IDLE_HEADER);
    println!("linux idle series, {mib} MiB, 10 snapshots 2 s apart into one store:");
    let mut first = 0u64;
    for i in 1..=10 {
        std::thread::sleep(Duration::from_secs(2));
        let out = Command::new(vmm_bin())
            .args(["snapshot", "create", "--api-sock"])
            .arg(&sock)
            .arg("--store")
            .arg(&store)
            .arg(root.join(format!("idle-linux-{i}")))
            .output()
            .expect("vmm snapshot create");
        if !out.status.success() {
            println!(
                "  snapshot {i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        let sb = dir_bytes(&store);
        if i == 1 {
            first = sb;
        }
        let ratio = sb as f64 / first as f64;
        println!(
            "  snapshot {i:>2}: {:.1} ms ({}), +{} bytes, store {:.2} MiB ({ratio:.4}x the first)",
            rep["total_ms"].as_f64().unwrap_or(f64::NAN),
            rep["dirty_method"].as_str().unwrap_or("?"),
            rep["memory"]["bytes_written"],
            sb as f64 / 1048576.0
        );
        csv.row(&[
            run.to_string(),
            "linux".into(),
            mib.to_string(),
            i.to_string(),
            f(rep["total_ms"].as_f64().unwrap_or(f64::NAN)),
            rep["memory"]["bytes_written"]
                .as_u64()
                .unwrap_or(0)
                .to_string(),
            sb.to_string(),
            format!("{ratio:.4}"),
        ]);
    }
    p.kill();
    let _ = fs::remove_dir_all(&store);
}

/// The project's Linux guest, idle at 256 MiB: boot, `vmm snapshot create` through the
/// API socket, then the same restore measurements.
fn linux_guest(root: &Path, creates: &Creates, restores: &Restores) {
    let Some(art) = artifacts() else {
        println!("linux guest: skipped (no guest artifacts; run resources/build-guest.sh)");
        return;
    };
    let mib = 256;
    let snap = root.join("linux-snap");
    let (mut p, sock) = spawn_linux(&art, root, "linux", mib);
    let Some(i) = p.wait_for("vmmtest: info", Duration::from_secs(420)) else {
        println!(
            "linux guest: no `vmmtest: info` line; skipped\n{}",
            p.output()
        );
        return;
    };
    println!(
        "linux guest, {mib} MiB, idle (booted to `vmmtest: info` in {:.1} s):",
        p.secs_to(i)
    );
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let out = Command::new(vmm_bin())
        .args(["snapshot", "create", "--leave-paused", "--api-sock"])
        .arg(&sock)
        .arg(&snap)
        .output()
        .expect("vmm snapshot create");
    let cli_ms = ms(t.elapsed());
    p.kill();
    if !out.status.success() {
        println!(
            "linux guest: snapshot create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let rep: SnapshotReport = SnapshotReport {
        path: snap.clone(),
        store: snap.clone(),
        state_ms: rep["state_ms"].as_f64().unwrap_or(f64::NAN),
        memory_ms: rep["memory_ms"].as_f64().unwrap_or(f64::NAN),
        total_ms: rep["total_ms"].as_f64().unwrap_or(f64::NAN),
        memory: {
            let m = &rep["memory"];
            let g = |k: &str| m[k].as_u64().unwrap_or(0);
            SaveStats {
                chunks_total: g("chunks_total"),
                chunks_zero: g("chunks_zero"),
                chunks_reused: g("chunks_reused"),
                chunks_new: g("chunks_new"),
                chunks_deduped: g("chunks_deduped"),
                bytes_new: g("bytes_new"),
                bytes_written: g("bytes_written"),
            }
        },
        dirty_method: if rep["dirty_method"] == "kvm-log" {
            vmm::vstate::dirty::DirtyMethod::KvmLog
        } else {
            vmm::vstate::dirty::DirtyMethod::Rehash
        },
        incremental: rep["incremental"].as_bool().unwrap_or(false),
        overlays: Vec::new(),
    };
    // What the guest's memory holds: restore it once and scan.
    let (_, _, vm) = restore_in_process(&snap, true);
    let content = scan(&vm.mem);
    drop(vm);
    println!("  `vmm snapshot create` CLI wall time {cli_ms:.1} ms");
    creates.row("linux", mib, &content, &rep, dir_bytes(&snap));
    restores.measure("linux", mib, &snap, &snap, &content);
}

fn main() {
    if !bench_mode("snapshot") {
        return;
    }
    if !have_kvm() {
        println!("snapshot bench: /dev/kvm unavailable; skipped");
        return;
    }
    let run = run_id();
    print_host("snapshot");
    let t0 = Instant::now();
    let root = scratch("snapshot");
    let kernel = tiny_kernel(&root);
    let limits = if std::env::var("SNAPSHOT_BENCH_TAG").is_ok_and(|t| !t.is_empty()) {
        // A variant run: only the write + fsync bandwidth the target needs.
        let src = vec![0x5au8; 256 << 20];
        let t = write_fsync_file(&root.join("fsync-test.bin"), &src);
        let bw = src.len() as f64 / t.as_secs_f64();
        println!(
            "write + fsync to {} ({}): {:.3} GB/s",
            root.display(),
            fs_type(&root),
            bw / 1e9
        );
        Limits { fsync_bw: bw }
    } else {
        host_limits(run, &root)
    };
    let creates = Creates {
        run,
        csv: Csv::new("snapshot", CREATE_HEADER),
        fsync_bw: limits.fsync_bw,
    };
    let restores = Restores {
        run,
        csv: Csv::new(
            "restore",
            "run,guest,mem_mib,method,iter,ms,vmm_reported_ms,vmm_reported_memory_ms,load1",
        ),
    };
    if std::env::var("SNAPSHOT_BENCH_FULL").as_deref() != Ok("0") {
        full_snapshots(&root, &kernel, &creates, &restores);
    }
    if env_or("SNAPSHOT_BENCH_INCR_MIB", 1024u64) > 0 {
        incremental(run, &root, &kernel);
    }
    if std::env::var("SNAPSHOT_BENCH_LINUX").as_deref() != Ok("0") {
        linux_guest(&root, &creates, &restores);
        linux_idle_series(run, &root);
    }
    let _ = fs::remove_dir_all(&root);
    println!(
        "snapshot bench done in {:.0} s; loadavg {}; CSV in {}",
        t0.elapsed().as_secs_f64(),
        loadavg(),
        out_dir().display()
    );
}
