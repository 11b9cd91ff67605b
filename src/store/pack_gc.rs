//! Garbage collection of packs: what `repo gc` does to `STORE/packs/` once it knows the
//! live chunks.
//!
//! * a pack none of whose chunks is live is deleted (index first, then the pack);
//! * a pack whose live records take less than [`REPACK_LIVE_FRACTION`] of its bytes is
//!   **repacked**: its live chunks are copied into one new pack, whose pack and index are
//!   made durable (and the directory fsynced) before the old indexes are removed (fsync)
//!   and then the old packs. Killed at any point, every live chunk is in at least one
//!   complete, indexed pack (duplicates are harmless: readers take either);
//! * packs without an index and indexes without a complete pack (interrupted writers,
//!   damage) and temp files are deleted.
//!
//! The caller must exclude writers (the repository lock held exclusively): a pack still
//! being written has no index yet and would be taken for litter.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::pack::{self, PackId, PackIndex, PackWriter};
use super::{ChunkId, Result};
use crate::util::IoError;
use crate::util::fs::fsync_dir;

/// A pack is repacked when its live records take less than this fraction of its bytes.
pub const REPACK_LIVE_FRACTION: f64 = 0.5;

/// What [`sweep_packs`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PackGcReport {
    /// Packs left as they were.
    pub packs_kept: u64,
    /// Packs deleted because none of their chunks is live.
    pub packs_deleted: u64,
    /// Packs whose live chunks were copied into a new pack and which were then deleted.
    pub packs_repacked: u64,
    /// Live chunks copied by repacking.
    pub chunks_copied: u64,
    /// Live chunks in the packs kept (and in the new pack).
    pub chunks_kept: u64,
    /// Dead chunks dropped with their packs.
    pub chunks_deleted: u64,
    /// Bytes freed (old packs and indexes removed, minus the new pack written).
    pub bytes_freed: u64,
    /// Packs without an index, indexes without a complete pack, temp files: deleted.
    pub leftovers_deleted: u64,
}

/// One complete pack found in the directory.
struct Found {
    id: PackId,
    index: PackIndex,
    /// Bytes of pack + index on disk.
    disk_bytes: u64,
}

/// Collects the packs of `dir` that `live` does not fully need (see the module
/// documentation). `delay` is slept after each chunk copied and each file deleted (a test
/// hook to kill gc in the middle).
pub fn sweep_packs(
    dir: &Path,
    live: &BTreeSet<ChunkId>,
    delay: Option<Duration>,
) -> Result<PackGcReport> {
    sweep_packs_below(dir, live, delay, REPACK_LIVE_FRACTION)
}

/// [`sweep_packs`] repacking the packs whose live bytes are below `repack_below` (a
/// fraction: 1.0 repacks every pack holding a dead chunk).
pub fn sweep_packs_below(
    dir: &Path,
    live: &BTreeSet<ChunkId>,
    delay: Option<Duration>,
    repack_below: f64,
) -> Result<PackGcReport> {
    let mut report = PackGcReport::default();
    let (found, litter) = scan(dir)?;
    let pause = || {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
    };
    let mut dead_packs = Vec::new();
    let mut repack = Vec::new();
    for f in &found {
        let total: u64 = f.index.entries.iter().map(|e| u64::from(e.len)).sum();
        let live_bytes: u64 = f
            .index
            .entries
            .iter()
            .filter(|e| live.contains(&e.id))
            .map(|e| u64::from(e.len))
            .sum();
        let n_live = f
            .index
            .entries
            .iter()
            .filter(|e| live.contains(&e.id))
            .count() as u64;
        if n_live == 0 {
            dead_packs.push(f);
        } else if (live_bytes as f64) < repack_below * total as f64 {
            repack.push(f);
        } else {
            report.packs_kept += 1;
            report.chunks_kept += n_live;
        }
    }
    if !repack.is_empty() {
        let written = copy_live(dir, &repack, live, &pause, &mut report)?;
        report.bytes_freed = report.bytes_freed.saturating_sub(written);
    }
    // Indexes first (one directory fsync), then the packs: a pack that loses its index is
    // ignored by readers from then on.
    let going: Vec<&Found> = dead_packs.iter().chain(&repack).copied().collect();
    for f in &going {
        remove(&dir.join(format!("{}.idx", f.id)))?;
        pause();
    }
    if !going.is_empty() {
        fsync_dir(dir)?;
    }
    for f in &going {
        remove(&dir.join(format!("{}.pack", f.id)))?;
        report.bytes_freed += f.disk_bytes;
        pause();
    }
    for f in &dead_packs {
        report.packs_deleted += 1;
        report.chunks_deleted += f.index.entries.len() as u64;
    }
    for f in &repack {
        report.packs_repacked += 1;
        report.chunks_deleted += f
            .index
            .entries
            .iter()
            .filter(|e| !live.contains(&e.id))
            .count() as u64;
    }
    for name in &litter {
        remove(&dir.join(name))?;
        report.leftovers_deleted += 1;
    }
    if !going.is_empty() || !litter.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(report)
}

/// Copies the live chunks of `packs` into one new pack (several past the size cap) and
/// makes it durable; returns the bytes written.
fn copy_live(
    dir: &Path,
    packs: &[&Found],
    live: &BTreeSet<ChunkId>,
    pause: &dyn Fn(),
    report: &mut PackGcReport,
) -> Result<u64> {
    let mut done: BTreeSet<ChunkId> = BTreeSet::new();
    let mut writers: Vec<PackWriter> = vec![PackWriter::create(dir)?];
    for f in packs {
        let Some((_, file)) = pack::open_complete(dir, f.id).map_err(pack_err)? else {
            continue;
        };
        let file = std::sync::Arc::new(file);
        for e in f.index.entries.iter().filter(|e| live.contains(&e.id)) {
            if !done.insert(e.id) {
                continue;
            }
            let loc = pack::Location {
                pack: std::sync::Arc::clone(&file),
                offset: e.offset,
                len: e.len,
            };
            let rec = loc.read_record(&e.id)?;
            let w = writers.last_mut().expect("one writer at least");
            if !w.is_empty() && w.len() + rec.len() as u64 > pack::MAX_PACK_LEN {
                writers.push(PackWriter::create(dir)?);
            }
            let w = writers.last_mut().expect("just pushed");
            let (h, b) = rec.split_at(super::codec::HEADER_LEN);
            w.append(&e.id, h, b)?;
            report.chunks_copied += 1;
            pause();
        }
    }
    let mut written = 0;
    for w in writers {
        let ix = w.finish()?;
        written += ix.pack_len;
    }
    fsync_dir(dir)?;
    report.chunks_kept += done.len() as u64;
    Ok(written)
}

fn pack_err(e: pack::PackError) -> super::StoreError {
    match e {
        pack::PackError::Io(e) => e.into(),
        e => super::StoreError::Corrupt {
            id: ChunkId::from_bytes([0; 32]),
            reason: crate::util::error_chain(&e),
        },
    }
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError::new("remove", path, e).into()),
    }
}

/// The complete packs of `dir`, and the names of its litter: packs without an index,
/// indexes that are damaged or without a complete pack, temp files.
fn scan(dir: &Path) -> Result<(Vec<Found>, Vec<String>)> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(IoError::new("read directory", dir, e).into()),
    };
    let mut packs: BTreeMap<PackId, u64> = BTreeMap::new();
    let mut indexes: BTreeMap<PackId, u64> = BTreeMap::new();
    let mut litter = Vec::new();
    for e in rd {
        let e = e.map_err(|e| IoError::new("read directory", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        let id = |suffix| name.strip_suffix(suffix).and_then(PackId::parse);
        if let Some(id) = id(".pack") {
            packs.insert(id, len);
        } else if let Some(id) = id(".idx") {
            indexes.insert(id, len);
        } else if name.starts_with('.') && name.contains(".tmp.") {
            litter.push(name);
        }
    }
    let mut found = Vec::new();
    for (id, idx_len) in &indexes {
        match pack::open_complete(dir, *id) {
            Ok(Some((index, _))) => found.push(Found {
                id: *id,
                index,
                disk_bytes: idx_len + packs.get(id).copied().unwrap_or(0),
            }),
            Ok(None) | Err(pack::PackError::Index { .. } | pack::PackError::Invalid { .. }) => {
                litter.push(format!("{id}.idx"));
                if packs.contains_key(id) {
                    litter.push(format!("{id}.pack"));
                }
            }
            Err(pack::PackError::Io(e)) => return Err(e.into()),
        }
    }
    for id in packs.keys().filter(|id| !indexes.contains_key(id)) {
        litter.push(format!("{id}.pack"));
    }
    Ok((found, litter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChunkRead, ChunkWrite, LocalStore, LocalStoreOptions};
    use crate::util::testutil::{Rng, TempDir};

    fn chunk(seed: u64) -> Vec<u8> {
        let mut d = vec![0u8; 32768];
        Rng::new(seed * 2 + 1).fill(&mut d);
        d
    }

    fn write_pack(root: &Path, seeds: std::ops::Range<u64>) -> Vec<ChunkId> {
        let s = LocalStore::open(root, LocalStoreOptions::packs()).unwrap();
        let ids = seeds.map(|i| s.put(&chunk(i)).unwrap()).collect();
        s.sync().unwrap();
        ids
    }

    #[test]
    fn dead_packs_go_sparse_ones_are_repacked_full_ones_stay() {
        let dir = TempDir::new("pack-gc");
        let root = dir.path();
        let a = write_pack(root, 0..10); // all live: kept
        let b = write_pack(root, 10..20); // 2 live: repacked
        let _c = write_pack(root, 20..30); // none live: deleted
        let live: BTreeSet<ChunkId> = a.iter().chain(&b[..2]).copied().collect();
        let packs = root.join(pack::PACKS_DIR);
        // Litter: a pack without an index, a temp index.
        fs::write(packs.join(format!("{}.pack", PackId::random())), b"x").unwrap();
        fs::write(packs.join(".junk.idx.tmp.1.2"), b"x").unwrap();
        let r = sweep_packs(&packs, &live, None).unwrap();
        assert_eq!(
            (r.packs_kept, r.packs_deleted, r.packs_repacked),
            (1, 1, 1),
            "{r:?}"
        );
        assert_eq!(
            (r.chunks_copied, r.chunks_kept, r.chunks_deleted),
            (2, 12, 18)
        );
        assert_eq!(r.leftovers_deleted, 2);
        assert!(r.bytes_freed > 20 * 32768, "{r:?}");
        let names = fs::read_dir(&packs).unwrap().count();
        assert_eq!(names, 4, "two packs with their indexes");
        let s = LocalStore::open(root, LocalStoreOptions::default()).unwrap();
        for (i, id) in a.iter().chain(&b[..2]).enumerate() {
            let seed = if i < 10 {
                i as u64
            } else {
                10 + (i - 10) as u64
            };
            assert_eq!(s.get(id).unwrap(), chunk(seed));
        }
        assert!(!s.contains(&b[5]).unwrap());
        // Nothing more to do the second time.
        let again = sweep_packs(&packs, &live, None).unwrap();
        assert_eq!(
            (again.packs_kept, again.packs_deleted, again.packs_repacked),
            (2, 0, 0)
        );
    }
}
