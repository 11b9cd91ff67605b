//! Chunk size measurement (ignored test; included from `manifest.rs`).
//!
//! Run with optimizations, otherwise the numbers mean nothing:
//!
//! ```text
//! cargo test --release --lib chunk_size_bench -- --ignored --nocapture
//! ```
//!
//! Set `VMM_BENCH_MIB` to change the memory size (default 256).

use std::time::Instant;

use super::*;
use crate::store::codec::Compression;
use crate::store::{LocalStore, LocalStoreOptions};
use crate::util::testutil::{Rng, TempDir};

const PAGE: usize = 4096;

const WORDS: &[&str] = &[
    "the", "kernel", "page", "0x7f3a", "struct", "return", "if", "else", "mov", "rax", "=", ";",
    "{", "}", "int", "for", "while", "1024", "NULL", "buffer", "size", "len", "error", "\n",
];

/// Fills `page` with word soup, a stand-in for code, text and structured data.
fn text_page(rng: &mut Rng, page: &mut [u8]) {
    let mut i = 0;
    while i < page.len() {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
        for &b in w.iter().chain(b" ") {
            if i < page.len() {
                page[i] = b;
                i += 1;
            }
        }
    }
}

/// Builds guest-memory-like data from runs of 4 KiB pages: ~50% zero,
/// ~20% incompressible, ~20% compressible (with scattered zero pages), ~10% copies
/// of earlier runs.
fn realistic_memory(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut mem = vec![0u8; size];
    let pages = size / PAGE;
    let mut p = 0;
    while p < pages {
        let r = rng.next();
        let len = match r % 8 {
            0 => 1 + (r >> 8) % 256,
            1..=3 => 1 + (r >> 8) % 32,
            _ => 1 + (r >> 8) % 8,
        } as usize;
        let end = (p + len).min(pages);
        let area = &mut mem[p * PAGE..end * PAGE];
        match (r >> 32) % 10 {
            0..=4 => {} // zero
            5 | 6 => rng.fill(area),
            7 | 8 => {
                for page in area.chunks_mut(PAGE) {
                    if !rng.next().is_multiple_of(10) {
                        text_page(&mut rng, page);
                    }
                }
            }
            _ if p > len => {
                let from = (rng.next() as usize % (p - len + 1)) * PAGE;
                mem.copy_within(from..from + (end - p) * PAGE, p * PAGE);
            }
            _ => rng.fill(area),
        }
        p = end;
    }
    mem
}

/// Simulates a guest running for a while: 0.5% of pages get an 8-byte write at a
/// random place, and one 1 MiB area is rewritten.
fn mutate(mem: &mut [u8], seed: u64) {
    let mut rng = Rng::new(seed);
    let pages = mem.len() / PAGE;
    for _ in 0..pages / 200 {
        let at = (rng.next() as usize % pages) * PAGE + (rng.next() as usize % (PAGE - 8));
        mem[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
    }
    let start = (rng.next() as usize % (pages - 256)) * PAGE;
    rng.fill(&mut mem[start..start + (1 << 20)]);
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn chunk_size_bench() {
    let size = std::env::var("VMM_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(256)
        << 20;
    let original = realistic_memory(size, 1);
    let mut changed = original.clone();
    mutate(&mut changed, 2);
    let t = Instant::now();
    let _ = blake3::hash(&original);
    let hash_s = t.elapsed().as_secs_f64();
    println!(
        "memory {} MiB; single-thread BLAKE3 of all of it: {:.3} s ({:.0} MiB/s)",
        size >> 20,
        hash_s,
        mib(size as u64) / hash_s
    );
    println!(
        "{:>6} {:>5} | {:>8} {:>7} {:>7} {:>7} {:>9} {:>9} {:>8} | {:>9} | {:>6} {:>8} {:>9}",
        "chunk",
        "zstd",
        "save s",
        "zero %",
        "new",
        "dedup",
        "uniq MiB",
        "disk MiB",
        "mf KiB",
        "restore s",
        "incr s",
        "incr new",
        "incr MiB"
    );
    for compression in [Compression::Zstd { level: 1 }, Compression::None] {
        for chunk_size in [4 << 10, 16 << 10, 64 << 10, 256 << 10] {
            bench_one(&original, &changed, compression, chunk_size);
        }
    }
}

/// One row of `chunk_size_bench`: saves `original`, restores it, saves `changed` on top,
/// with `compression` and `chunk_size`.
fn bench_one(original: &[u8], changed: &[u8], compression: Compression, chunk_size: usize) {
    let dir = TempDir::new("chunk-bench");
    let store = LocalStore::open(
        dir.path(),
        LocalStoreOptions {
            compression,
            ..Default::default()
        },
    )
    .unwrap();
    let (m, st, save_s, restore_s) = save_and_restore(original, chunk_size, &store);

    let t = Instant::now();
    let (_, st2) = save_memory(&[(0, changed)], chunk_size, &store).unwrap();
    store.sync().unwrap();
    let incr_s = t.elapsed().as_secs_f64();
    let manifest_len = file::encode(&crate::formats::MANIFEST_KIND, &m)
        .unwrap()
        .len();
    println!(
        "{:>5}K {:>5} | {:>8.2} {:>7.1} {:>7} {:>7} {:>9.1} {:>9.1} {:>8} | {:>9.3} | {:>6.2} {:>8} {:>9.2}",
        chunk_size >> 10,
        if compression == Compression::None {
            "no"
        } else {
            "1"
        },
        save_s,
        100.0 * st.chunks_zero as f64 / st.chunks_total as f64,
        st.chunks_new,
        st.chunks_deduped,
        mib(st.bytes_new),
        mib(st.bytes_written),
        manifest_len >> 10,
        restore_s,
        incr_s,
        st2.chunks_new,
        mib(st2.bytes_written),
    );
}

/// Saves `original` into `store` in chunks of `chunk_size`, then restores it and checks
/// the copy; returns the manifest, the save's figures and both times in seconds.
fn save_and_restore(
    original: &[u8],
    chunk_size: usize,
    store: &LocalStore,
) -> (MemoryManifest, SaveStats, f64, f64) {
    let t = Instant::now();
    let (m, st) = save_memory(&[(0, original)], chunk_size, store).unwrap();
    store.sync().unwrap();
    let save_s = t.elapsed().as_secs_f64();
    let mut dest = vec![0u8; original.len()];
    let t = Instant::now();
    restore_memory(
        &m,
        &mut [(0, &mut dest[..])],
        store,
        ZeroChunks::AlreadyZero,
    )
    .unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    assert!(dest == original);
    (m, st, save_s, restore_s)
}

#[test]
#[ignore = "measurement; run with --release --ignored --nocapture"]
fn worker_count_bench() {
    use std::sync::atomic::Ordering;
    let original = realistic_memory(128 << 20, 1);
    let chunk_size = std::env::var("VMM_BENCH_CHUNK_KIB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(64)
        << 10;
    for round in 0..3 {
        for workers in [1, 2, 4, 8, 16] {
            super::WORKERS_OVERRIDE.store(workers, Ordering::Relaxed);
            let dir = TempDir::new("worker-bench");
            let store = LocalStore::open(dir.path(), LocalStoreOptions::default()).unwrap();
            let (_, _, save_s, restore_s) = save_and_restore(&original, chunk_size, &store);
            println!(
                "round {round} chunk {}K workers {workers:>2}: save {save_s:.2} s, restore {restore_s:.3} s",
                chunk_size >> 10
            );
        }
    }
    super::WORKERS_OVERRIDE.store(0, Ordering::Relaxed);
}
