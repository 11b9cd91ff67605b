//! Tests of the memory manifest (included from `manifest.rs`).

use super::*;
use crate::store::codec::{Compression, HEADER_LEN};
use crate::store::{LocalStore, LocalStoreOptions, StoreStats};
use crate::util::testutil::{Rng, TempDir};

const CS: usize = 16 << 10;

fn store(dir: &TempDir, name: &str, compression: Compression) -> LocalStore {
    LocalStore::open(
        dir.path().join(name),
        LocalStoreOptions {
            compression,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Two regions: 8 chunks of mixed content, and 2.25 chunks (short tail).
fn memory() -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng::new(42);
    let mut a = vec![0u8; 8 * CS];
    rng.fill(&mut a[0..CS]); // random
    // chunk 1: zero
    for (i, b) in a[2 * CS..3 * CS].iter_mut().enumerate() {
        *b = b"compressible text "[i % 18]; // compressible
    }
    let (head, tail) = a.split_at_mut(3 * CS);
    tail[..CS].copy_from_slice(&head[..CS]); // chunk 3 repeats chunk 0
    rng.fill(&mut a[5 * CS..6 * CS]); // chunks 4, 6, 7 zero; 5 random
    a[7 * CS + 100] = 1; // chunk 7 nearly zero
    let mut b = vec![0u8; 2 * CS + 4096];
    rng.fill(&mut b[CS..]);
    vec![(0, a), (0x1_0000_0000, b)]
}

fn views(mem: &[(u64, Vec<u8>)]) -> Vec<(u64, &[u8])> {
    mem.iter().map(|(g, m)| (*g, m.as_slice())).collect()
}

fn blank(mem: &[(u64, Vec<u8>)], fill: u8) -> Vec<(u64, Vec<u8>)> {
    mem.iter().map(|(g, m)| (*g, vec![fill; m.len()])).collect()
}

fn restore_into(
    manifest: &MemoryManifest,
    dest: &mut [(u64, Vec<u8>)],
    store: &dyn ChunkRead,
    zero: ZeroChunks,
) -> Result<RestoreStats> {
    let mut views: Vec<(u64, &mut [u8])> = dest
        .iter_mut()
        .map(|(g, m)| (*g, m.as_mut_slice()))
        .collect();
    restore_memory(manifest, &mut views, store, zero)
}

#[test]
fn save_restore_round_trip_compressed_and_raw() {
    let dir = TempDir::new("mf-rt");
    let mem = memory();
    for compression in [Compression::None, Compression::Zstd { level: 3 }] {
        let s = store(&dir, &format!("{compression:?}"), compression);
        let (m, st) = save_memory(&views(&mem), CS, &s).unwrap();
        m.validate().unwrap();
        assert_eq!(m.regions.len(), 2);
        assert_eq!(m.regions[1].chunks.len(), 3);
        assert_eq!(m.regions[1].size, (2 * CS + 4096) as u64);
        assert_eq!(m.memory_size(), (10 * CS + 4096) as u64);
        // Region 0: random, zero, text, repeat, zero, random, zero, nearly zero.
        // Region 1: zero, random, random tail.
        assert_eq!(st.chunks_total, 11);
        assert_eq!(st.chunks_zero, 4);
        assert_eq!(st.chunks_deduped, 1);
        assert_eq!(st.chunks_new, 6);
        assert_eq!(st.bytes_new, (5 * CS + 4096) as u64);
        assert_eq!(st.bytes_written, s.stats().bytes_written);
        assert_eq!(m.regions[0].chunks[1], ChunkEntry::Zero);
        assert_eq!(m.regions[0].chunks[0], m.regions[0].chunks[3]);
        if compression == Compression::None {
            assert_eq!(st.bytes_written, st.bytes_new + 6 * 8);
        } else {
            assert!(st.bytes_written < st.bytes_new - CS as u64 / 2, "{st:?}");
        }
        s.sync().unwrap();

        // Fresh zeroed memory: zero chunks can be skipped.
        let mut dest = blank(&mem, 0);
        let rs = restore_into(&m, &mut dest, &s, ZeroChunks::AlreadyZero).unwrap();
        assert_eq!(dest, mem);
        assert_eq!(rs.chunks_total, 11);
        assert_eq!(rs.chunks_zero, 4);
        assert_eq!(rs.chunks_fetched, 7);
        assert_eq!(rs.bytes_fetched, (6 * CS + 4096) as u64);
        // Dirty memory: zero chunks must be written.
        let mut dest = blank(&mem, 0xEE);
        restore_into(&m, &mut dest, &s, ZeroChunks::Write).unwrap();
        assert_eq!(dest, mem);
    }
}

#[test]
fn second_identical_save_writes_nothing_and_small_change_adds_one_chunk() {
    let dir = TempDir::new("mf-dedup");
    let s = store(&dir, "s", Compression::Zstd { level: 1 });
    let mut mem = memory();
    let (m1, st1) = save_memory(&views(&mem), CS, &s).unwrap();
    let before = s.stats();
    let (m2, st2) = save_memory(&views(&mem), CS, &s).unwrap();
    assert_eq!(m1, m2);
    assert_eq!(st2.chunks_new, 0);
    assert_eq!(st2.bytes_written, 0);
    assert_eq!(st2.chunks_deduped, st1.chunks_new + st1.chunks_deduped);
    assert_eq!(s.stats().bytes_written, before.bytes_written);
    assert_eq!(s.stats().chunks_written, before.chunks_written);

    // One byte changed in one chunk: exactly that chunk is added.
    mem[0].1[5 * CS + 7] ^= 0xFF;
    let (m3, st3) = save_memory(&views(&mem), CS, &s).unwrap();
    assert_eq!(st3.chunks_new, 1);
    assert_eq!(st3.bytes_new, CS as u64);
    assert_eq!(s.stats().chunks_written, before.chunks_written + 1);
    let diff: Vec<_> = m1.regions[0]
        .chunks
        .iter()
        .zip(&m3.regions[0].chunks)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(diff, vec![5]);

    // Two chunks changed (one of them a zero chunk): two added.
    mem[0].1[CS] = 3;
    mem[1].1[2 * CS] = 4;
    let (_, st4) = save_memory(&views(&mem), CS, &s).unwrap();
    assert_eq!(st4.chunks_new, 2);
    assert_eq!(st4.bytes_new, (CS + 4096) as u64);
}

#[test]
fn zero_memory_costs_nothing() {
    let dir = TempDir::new("mf-zero");
    let s = store(&dir, "s", Compression::None);
    let mem = vec![(0u64, vec![0u8; 64 * CS])];
    let (m, st) = save_memory(&views(&mem), CS, &s).unwrap();
    assert_eq!(st.chunks_zero, 64);
    assert_eq!(st.chunks_total, 64);
    assert_eq!(s.stats(), StoreStats::default());
    assert_eq!(
        std::fs::read_dir(dir.path().join("s/chunks"))
            .unwrap()
            .count(),
        0
    );
    assert!(m.chunk_ids().next().is_none());
    let mut dest = blank(&mem, 9);
    restore_into(&m, &mut dest, &s, ZeroChunks::Write).unwrap();
    assert_eq!(dest, mem);
}

#[test]
fn repeats_within_one_save_are_stored_once() {
    let dir = TempDir::new("mf-repeat");
    let s = store(&dir, "s", Compression::None);
    let mut page = vec![0u8; CS];
    Rng::new(5).fill(&mut page);
    let mem = vec![(0u64, page.repeat(40))];
    let (m, st) = save_memory(&views(&mem), CS, &s).unwrap();
    assert_eq!(st.chunks_new, 1);
    assert_eq!(st.chunks_deduped, 39);
    assert_eq!(s.stats().chunks_written, 1);
    assert_eq!(m.chunk_ids().count(), 40);
}

#[test]
fn incremental_save_reuses_clean_chunks() {
    let dir = TempDir::new("mf-incr");
    let s = store(&dir, "s", Compression::Zstd { level: 1 });
    let mut mem = memory();
    let (parent, _) = save_memory(&views(&mem), CS, &s).unwrap();
    mem[0].1[2 * CS + 1] = b'!';
    mem[1].1[0] = 1;
    let dirty = |r: usize, c: usize| (r, c) == (0, 2) || (r, c) == (1, 0);
    let (child, st) = save_memory_incremental(&views(&mem), &s, &parent, &dirty).unwrap();
    assert_eq!(st.chunks_reused, 9);
    assert_eq!(st.chunks_new, 2);
    assert_eq!(st.chunks_total, 11);
    let (full, _) = save_memory(&views(&mem), CS, &s).unwrap();
    assert_eq!(child, full);
    let mut dest = blank(&mem, 0);
    restore_into(&child, &mut dest, &s, ZeroChunks::AlreadyZero).unwrap();
    assert_eq!(dest, mem);

    // A parent with another layout is refused.
    let other = vec![(0u64, vec![0u8; CS])];
    let e = save_memory_incremental(&views(&other), &s, &parent, &|_, _| true).unwrap_err();
    assert!(matches!(e, ManifestError::LayoutMismatch { .. }), "{e}");
}

/// Memory of two chunks: a raw (random) one and a zstd (text) one.
fn two_chunk_memory() -> Vec<(u64, Vec<u8>)> {
    let mut m = vec![0u8; 2 * 4096];
    Rng::new(9).fill(&mut m[..4096]);
    for (i, b) in m[4096..].iter_mut().enumerate() {
        *b = b"abcdefghij"[i % 10];
    }
    vec![(0x8000, m)]
}

/// Restores `m` and expects either an error naming chunk `n` (`id`), or, only when
/// `may_be_harmless`, an exact restore. Returns whether it failed.
fn restore_fails_on_chunk(
    m: &MemoryManifest,
    mem: &[(u64, Vec<u8>)],
    s: &dyn ChunkRead,
    n: usize,
    id: &ChunkId,
    may_be_harmless: bool,
    what: &str,
) -> bool {
    let mut failed = false;
    for zero in [ZeroChunks::AlreadyZero, ZeroChunks::Write] {
        let mut dest = blank(mem, 0);
        match restore_into(m, &mut dest, s, zero) {
            Ok(_) => {
                assert!(may_be_harmless, "{what}: restore succeeded");
                assert!(dest == mem, "{what}: restore succeeded with wrong data");
            }
            Err(e) => {
                let ManifestError::Chunk { id: bad, gpa, .. } = &e else {
                    panic!("{what}: unexpected error {e:?}")
                };
                assert_eq!(bad, id, "{what}");
                assert_eq!(*gpa, 0x8000 + 4096 * n as u64);
                assert!(e.to_string().contains(&id.to_hex()), "{what}: {e}");
                failed = true;
            }
        }
    }
    failed
}

#[test]
fn every_corruption_of_a_chunk_file_fails_restore_naming_the_chunk() {
    let dir = TempDir::new("mf-corrupt");
    let s = store(&dir, "s", Compression::Zstd { level: 3 });
    let mem = two_chunk_memory();
    let (m, _) = save_memory(&views(&mem), 4096, &s).unwrap();
    let ids: Vec<ChunkId> = m.chunk_ids().copied().collect();
    assert_eq!(ids.len(), 2);
    for (n, id) in ids.iter().enumerate() {
        let path = s.chunk_path(id);
        let good = std::fs::read(&path).unwrap();
        let is_zstd = good[3] == 1;
        assert_eq!(is_zstd, n == 1, "chunk 0 is raw, chunk 1 is zstd");
        let mut harmless = Vec::new();
        // Every byte of the (small) zstd file; every header byte and a stride of the
        // raw body (the codec tests flip every byte; hashing in debug builds is slow).
        let positions: Vec<usize> = if is_zstd {
            (0..good.len()).collect()
        } else {
            (0..HEADER_LEN)
                .chain((HEADER_LEN..good.len()).step_by(13))
                .chain([good.len() - 1])
                .collect()
        };
        for &i in &positions {
            let masks: &[u8] = if is_zstd {
                &[0x01, 0x10, 0x80]
            } else {
                &[0x10]
            };
            for &mask in masks {
                let mut bad = good.clone();
                bad[i] ^= mask;
                std::fs::write(&path, &bad).unwrap();
                // zstd ignores a few bits (e.g. the frame header's unused bit); a
                // flip there still restores the exact data, which the hash proves.
                let what = format!("chunk {n} byte {i} ^ {mask:#x}");
                if !restore_fails_on_chunk(&m, &mem, &s, n, id, is_zstd, &what) {
                    harmless.push((i, mask));
                }
            }
        }
        // The only one found: bit 4 of the zstd frame header descriptor ("unused").
        assert!(
            harmless.iter().all(|&h| h == (12, 0x10)),
            "harmless flips: {harmless:?}"
        );
        for &len in &positions {
            std::fs::write(&path, &good[..len]).unwrap();
            let what = format!("chunk {n} truncated to {len}");
            assert!(restore_fails_on_chunk(&m, &mem, &s, n, id, false, &what));
        }
        std::fs::remove_file(&path).unwrap();
        assert!(restore_fails_on_chunk(
            &m, &mem, &s, n, id, false, "deleted"
        ));
        let mut dest = blank(&mem, 0);
        let e = restore_into(&m, &mut dest, &s, ZeroChunks::Write).unwrap_err();
        assert!(
            matches!(
                &e,
                ManifestError::Chunk {
                    source: StoreError::NotFound { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        std::fs::write(&path, &good).unwrap();
    }
    let mut dest = blank(&mem, 0);
    restore_into(&m, &mut dest, &s, ZeroChunks::Write).unwrap();
    assert_eq!(dest, mem);
}

#[test]
fn layout_mismatch_is_refused() {
    let dir = TempDir::new("mf-layout");
    let s = store(&dir, "s", Compression::None);
    let mem = memory();
    let (m, _) = save_memory(&views(&mem), CS, &s).unwrap();
    let mut fewer = vec![(0u64, vec![0u8; 8 * CS])];
    let mut moved = blank(&mem, 0);
    moved[1].0 += 4096;
    let mut resized = blank(&mem, 0);
    resized[0].1.truncate(7 * CS);
    for dest in [&mut fewer, &mut moved, &mut resized] {
        let e = restore_into(&m, dest, &s, ZeroChunks::Write).unwrap_err();
        assert!(matches!(e, ManifestError::LayoutMismatch { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("guest memory layout does not match")
        );
    }
}

#[test]
fn invalid_chunk_sizes_are_refused() {
    let dir = TempDir::new("mf-cs");
    let s = store(&dir, "s", Compression::None);
    let mem = vec![(0u64, vec![0u8; 8192])];
    for cs in [0, 1000, 4097, MAX_CHUNK_LEN + 4096] {
        assert!(matches!(
            save_memory(&views(&mem), cs, &s),
            Err(ManifestError::InvalidChunkSize { .. })
        ));
    }
    let bad = MemoryManifest {
        chunk_size: 3,
        regions: vec![],
    };
    assert!(bad.validate().is_err());
    let mut dest = blank(&mem, 0);
    assert!(restore_into(&bad, &mut dest, &s, ZeroChunks::Write).is_err());
}

#[test]
fn manifest_file_round_trip_and_corruption() {
    let dir = TempDir::new("mf-file");
    let s = store(&dir, "s", Compression::None);
    let (m, _) = save_memory(&views(&memory()), CS, &s).unwrap();
    let path = dir.path().join("memory.manifest");
    m.write_to(&path).unwrap();
    assert_eq!(MemoryManifest::read_from(&path).unwrap(), m);

    let good = std::fs::read(&path).unwrap();
    assert_eq!(&good[..8], b"VMMMEMM\0");
    for i in (0..good.len()).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        std::fs::write(&path, &bad).unwrap();
        assert!(MemoryManifest::read_from(&path).is_err(), "flip at {i}");
    }
    std::fs::write(&path, &good[..good.len() - 1]).unwrap();
    assert!(MemoryManifest::read_from(&path).is_err());

    // A state file is not a manifest.
    crate::formats::file::write_state_file(&path, &m).unwrap();
    let e = MemoryManifest::read_from(&path).unwrap_err();
    let ManifestError::File(StateFileError::Invalid { source, .. }) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(source.to_string(), "not a vmm memory manifest (bad magic)");

    // Well-formed file whose regions lack entries: refused by validation.
    let mut short = m.clone();
    short.regions[1].chunks.pop();
    short.write_to(&path).unwrap();
    assert!(matches!(
        MemoryManifest::read_from(&path),
        Err(ManifestError::ChunkCount { region: 1, .. })
    ));
}

#[test]
fn store_errors_during_save_are_reported() {
    let dir = TempDir::new("mf-saveerr");
    let s = store(&dir, "s", Compression::None);
    // Make every fan-out directory a file so no chunk can be written.
    for i in 0..256 {
        std::fs::write(dir.path().join(format!("s/chunks/{i:02x}")), b"").unwrap();
    }
    let e = save_memory(&views(&memory()), CS, &s).unwrap_err();
    assert!(matches!(e, ManifestError::Store { .. }), "{e:?}");
}

#[test]
fn is_zero_detects_any_set_byte() {
    for len in [0usize, 1, 255, 256, 257, 4096, 5000] {
        let mut v = vec![0u8; len];
        assert!(is_zero(&v));
        for i in [0, len / 2, len.saturating_sub(1)] {
            if i < len {
                v[i] = 0x20;
                assert!(!is_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }
}

#[test]
fn parallel_map_keeps_order_and_stops_on_error() {
    let out = parallel_map((0..1000).collect(), 3, 7, |i: u32| Ok::<_, ()>(i * 2)).unwrap();
    assert_eq!(out, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
    let e = parallel_map((0..1000).collect(), 4, 3, |i: u32| {
        if i == 500 { Err(i) } else { Ok(i) }
    });
    assert_eq!(e, Err(500));
    let empty: Vec<u32> = parallel_map(Vec::new(), 4, 4, |i: u32| Ok::<_, ()>(i)).unwrap();
    assert!(empty.is_empty());
}

/// For counting the flushes and renames of one snapshot's memory save (docs/BENCHMARKS.md,
/// "Snapshot create"): `SYSCALL_COUNT_MIB` MiB of random memory (default 64) saved into a
/// fresh store in packs, then the manifest written. Run it under
/// `strace -f -c -e trace=fsync,fdatasync,rename,renameat,renameat2,syncfs` with
/// `TMPDIR` on the file system to measure.
#[test]
#[ignore]
fn syscall_count_of_one_save() {
    let mib: usize = std::env::var("SYSCALL_COUNT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = TempDir::new("syscalls");
    let mut mem = vec![0u8; mib << 20];
    Rng::new(7).fill(&mut mem);
    let store = LocalStore::open(dir.path(), LocalStoreOptions::packs()).unwrap();
    let (m, stats) = save_memory(&[(0, &mem)], DEFAULT_CHUNK_SIZE, &store).unwrap();
    m.write_to(dir.path().join("memory")).unwrap();
    eprintln!("{mib} MiB: {} chunks written", stats.chunks_new);
}
