//! The synthetic guest memory the snapshot bench snapshots ([`Pattern`]) and the scan that
//! checks a restore ([`scan`]).

use std::collections::HashSet;

use vmm::vstate::memory::GuestMemory;
use vmm::vstate::memory::memory_slices;

use crate::support::rng::Rng;

/// Guest page size.
pub const PAGE: usize = 4096;
/// The snapshot chunk size (64 KiB).
pub const CHUNK: usize = vmm::snapshot::manifest::DEFAULT_CHUNK_SIZE;
/// Pages per chunk.
pub const PAGES_PER_CHUNK: usize = CHUNK / PAGE;
/// Guest memory below this is left as loaded (kernel ELF, boot params, page tables).
pub const KEEP_LOW: usize = 2 << 20;

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

/// The number of CPUs this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Mutable host views of guest memory.
///
/// # Safety
/// Nothing else may access guest memory while the slices live (vCPUs paused).
#[allow(clippy::mut_from_ref)] // guest memory is mapped memory, not owned by `mem`'s borrow
pub unsafe fn regions_mut(mem: &GuestMemory) -> Vec<(u64, &mut [u8])> {
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
pub struct Pattern {
    rng: Rng,
    pool: Vec<u8>,
}

/// What a memory image contains.
#[derive(Clone, Copy, Debug, Default)]
pub struct Content {
    /// Guest pages.
    pub pages: u64,
    /// Pages with a non-zero byte.
    pub nonzero_pages: u64,
    /// Chunks.
    pub chunks: u64,
    /// Chunks with a non-zero byte.
    pub nonzero_chunks: u64,
    /// BLAKE3 over (chunk index, chunk hash) of the non-zero chunks.
    pub digest: [u8; 32],
}

const WORDS: &[&str] = &[
    "the", "kernel", "page", "0x7f3a", "struct", "return", "if", "else", "mov", "rax", "=", ";",
    "{", "}", "int", "for", "while", "1024", "NULL", "buffer", "size", "len", "error", "\n",
    "ffff8880", "call", "push", "rbp", "lock", "spin", "irq", "task", "0", "1", "-1", "&&",
];

impl Pattern {
    /// A pattern generator: the text pool and the run sequence follow from `seed`.
    pub fn new(seed: u64) -> Self {
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

    /// A page of word soup from the pool, its first 16 bytes made unique with `stamp`.
    pub fn text_page(&mut self, page: &mut [u8], stamp: u64) {
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

    /// Fills all guest memory above [`KEEP_LOW`] (the VM must be paused).
    pub fn fill(&mut self, mem: &GuestMemory) {
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
    pub fn dirty_tracked(&mut self, mem: &GuestMemory, n: usize) -> usize {
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
pub fn scan(mem: &GuestMemory) -> Content {
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
