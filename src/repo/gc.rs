//! Removing snapshots, space accounting and garbage collection (mark and sweep).
//!
//! Crash safety: `rm` takes a snapshot out of the listing with one atomic rename
//! (`snapshots/<id>` → `tmp/rm-…`) before deleting anything, so a listed snapshot is always
//! complete. `gc` holds the repository lock exclusively (no create or import can be between
//! writing chunks and listing its snapshot), marks the chunks of every listed snapshot, and
//! only then deletes chunk files outside that set and packs with no live chunk, and repacks
//! packs that are mostly dead (`store::pack_gc`: the new pack is durable before the old ones
//! go); it aborts without deleting anything if a listed snapshot cannot be read. Killing it at any point leaves every listed snapshot with
//! all its chunks; the next run finishes the job.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::progress::Progress;
use super::{Repo, RepoError, Result, SnapshotId, lock::LockMode};
use crate::store::pack::PACKS_DIR;
use crate::store::pack_gc::{PackGcReport, REPACK_LIVE_FRACTION, sweep_packs_below};
use crate::store::{ChunkId, LocalStore};
use crate::util::IoError;
use crate::util::fs::fsync_dir;

/// Test hook: microseconds to sleep after each chunk file gc deletes, so a test can kill gc
/// in the middle of its sweep. Not for production use.
pub const GC_DELAY_ENV: &str = "VMM_REPO_GC_DELAY_US";

/// Repacks packs whose live bytes are below this fraction instead of the default
/// (`store::pack_gc::REPACK_LIVE_FRACTION`); `1` repacks every pack with a dead chunk, so
/// that gc frees every dead chunk. A test hook and an escape hatch, not a tuning knob.
pub const GC_REPACK_BELOW_ENV: &str = "VMM_REPO_GC_REPACK_BELOW";

/// Disk usage of one snapshot's chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Distinct chunks the snapshot needs.
    pub chunks: u64,
    /// Bytes of the chunk files only this snapshot uses (what removing it frees).
    pub bytes_unique: u64,
    /// Bytes of the chunk files it shares with other listed snapshots.
    pub bytes_shared: u64,
    /// Chunks it needs that are not in the store.
    pub chunks_missing: u64,
}

/// Size on disk of a chunk's record (in a pack or a chunk file), `None` when it is
/// missing or cannot be looked up.
fn chunk_file_len(store: Option<&LocalStore>, id: &ChunkId) -> Option<u64> {
    store?.stored_len(id).ok().flatten()
}

/// Usage of every snapshot in `refs`, given the chunks of all listed snapshots.
pub fn usage(
    repo: &Repo,
    refs: &BTreeMap<SnapshotId, BTreeSet<ChunkId>>,
) -> BTreeMap<SnapshotId, Usage> {
    let mut users: BTreeMap<&ChunkId, u32> = BTreeMap::new();
    for set in refs.values() {
        for c in set {
            *users.entry(c).or_default() += 1;
        }
    }
    let store = repo.store().ok();
    let sizes: BTreeMap<&ChunkId, Option<u64>> = users
        .keys()
        .map(|c| (*c, chunk_file_len(store.as_ref(), c)))
        .collect();
    refs.iter()
        .map(|(id, set)| {
            let mut u = Usage {
                chunks: set.len() as u64,
                ..Usage::default()
            };
            for c in set {
                match sizes[c] {
                    None => u.chunks_missing += 1,
                    Some(n) if users[c] == 1 => u.bytes_unique += n,
                    Some(n) => u.bytes_shared += n,
                }
            }
            (*id, u)
        })
        .collect()
}

/// One removed snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct Removed {
    /// Its id.
    pub id: SnapshotId,
    /// Names that pointed at it (removed too).
    pub names: Vec<String>,
}

/// What `rm` did.
#[derive(Clone, Debug, Serialize)]
pub struct RmReport {
    /// The snapshots removed.
    pub removed: Vec<Removed>,
    /// Chunks no remaining snapshot uses: `gc` deletes them.
    pub chunks_freed: u64,
    /// Their bytes on disk: what the next `gc` frees.
    pub bytes_freed: u64,
}

/// Removes snapshots from the listing (their chunks stay until `gc`). Snapshots that cannot
/// be read are removed too; their chunks are then simply not counted.
pub fn rm(repo: &Repo, ids: &[SnapshotId]) -> Result<RmReport> {
    let _lock = repo.lock(LockMode::Shared, "snapshot rm")?;
    let gone: BTreeSet<SnapshotId> = ids.iter().copied().collect();
    let mut kept_chunks: BTreeSet<ChunkId> = BTreeSet::new();
    let mut gone_chunks: BTreeSet<ChunkId> = BTreeSet::new();
    let mut kept_complete = true;
    for id in repo.list()? {
        match repo.refs(&id) {
            Ok(r) if gone.contains(&id) => gone_chunks.extend(r),
            Ok(r) => kept_chunks.extend(r),
            Err(e) if !gone.contains(&id) => {
                log::warn!("{}", crate::util::error_chain(&e));
                kept_complete = false;
            }
            Err(_) => {}
        }
    }
    let (mut chunks_freed, mut bytes_freed) = (0, 0);
    if kept_complete {
        let store = repo.store().ok();
        for c in gone_chunks.difference(&kept_chunks) {
            if let Some(n) = chunk_file_len(store.as_ref(), c) {
                chunks_freed += 1;
                bytes_freed += n;
            }
        }
    }
    let names = repo.names_by_id()?;
    let mut removed = Vec::new();
    for id in &gone {
        let dir = repo.snapshot_dir(id);
        let trash = repo.new_work_dir(&format!("rm-{}", id.short()))?;
        // Renaming onto an empty directory replaces it atomically.
        fs::rename(&dir, &trash).map_err(|source| {
            RepoError::Io(IoError {
                op: "move out of the listing",
                path: dir.clone(),
                source,
            })
        })?;
        fsync_dir(&repo.snapshots_dir())?;
        let n = names.get(id).cloned().unwrap_or_default();
        for name in &n {
            repo.remove_name(name)?;
        }
        fs::remove_dir_all(&trash).map_err(|source| {
            RepoError::Io(IoError {
                op: "remove",
                path: trash.clone(),
                source,
            })
        })?;
        removed.push(Removed { id: *id, names: n });
    }
    Ok(RmReport {
        removed,
        chunks_freed,
        bytes_freed,
    })
}

/// What `gc` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Listed snapshots whose chunks were kept.
    pub snapshots: u64,
    /// Chunks kept (chunk files, and live chunks in packs).
    pub chunks_kept: u64,
    /// Chunks deleted (chunk files, and dead chunks of packs deleted or repacked).
    pub chunks_deleted: u64,
    /// What was done to the packs (`packs/`).
    pub packs: PackGcReport,
    /// Bytes deleted.
    pub bytes_freed: u64,
    /// Leftovers of interrupted writes deleted (temp chunk files, work directories).
    pub leftovers_deleted: u64,
    /// Names that pointed at removed snapshots, deleted.
    pub names_deleted: Vec<String>,
}

/// Deletes every chunk no listed snapshot needs, leftovers of interrupted operations, and
/// names of removed snapshots. Holds the repository lock exclusively.
pub fn gc(repo: &Repo, progress: Option<bool>) -> Result<GcReport> {
    let _lock = repo.lock(LockMode::Exclusive, "snapshot gc")?;
    let delay = std::env::var(GC_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_micros);
    let mut report = GcReport::default();

    // Mark. Any unreadable snapshot aborts before anything is deleted.
    let refs = repo.all_refs()?;
    report.snapshots = refs.len() as u64;
    let live: BTreeSet<ChunkId> = refs.values().flatten().copied().collect();

    remove_work_dirs(repo, &mut report);

    // Sweep.
    let fanouts = chunk_fanouts(repo)?;
    let bar = Progress::new("gc", fanouts.len() as u64, progress);
    for dir in fanouts {
        sweep_fanout(&dir, &live, delay, &mut report)?;
        bar.add(1);
    }
    bar.finish();
    let below = std::env::var(GC_REPACK_BELOW_ENV)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(REPACK_LIVE_FRACTION);
    let packs = sweep_packs_below(&repo.root().join(PACKS_DIR), &live, delay, below)
        .map_err(RepoError::Store)?;
    report.chunks_kept += packs.chunks_kept;
    report.chunks_deleted += packs.chunks_deleted;
    report.bytes_freed += packs.bytes_freed;
    report.leftovers_deleted += packs.leftovers_deleted;
    report.packs = packs;

    // Names of removed snapshots (left by an rm that was killed after its rename).
    let listed: BTreeSet<SnapshotId> = refs.keys().copied().collect();
    for (name, id) in repo.names()? {
        if !listed.contains(&id) && repo.remove_name(&name)? {
            report.names_deleted.push(name);
        }
    }
    log::info!(
        "gc: {} snapshots, kept {} chunks, deleted {} chunks ({} bytes) and {} leftovers",
        report.snapshots,
        report.chunks_kept,
        report.chunks_deleted,
        report.bytes_freed,
        report.leftovers_deleted
    );
    Ok(report)
}

/// Removes the work directories: nobody holds the lock, so they are leftovers of killed
/// processes.
fn remove_work_dirs(repo: &Repo, report: &mut GcReport) {
    let tmp = repo.tmp_dir();
    if let Ok(rd) = fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            match r {
                Ok(()) => report.leftovers_deleted += 1,
                Err(e) => log::warn!("cannot remove {}: {e}", p.display()),
            }
        }
    }
}

/// The fan-out directories of `chunks/`, sorted (none if it does not exist).
fn chunk_fanouts(repo: &Repo) -> Result<Vec<PathBuf>> {
    let chunks_dir = repo.root().join("chunks");
    let mut fanouts: Vec<_> = match fs::read_dir(&chunks_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(RepoError::Io(IoError {
                op: "read directory",
                path: chunks_dir,
                source,
            }));
        }
    };
    fanouts.sort();
    Ok(fanouts)
}

/// Deletes the dead chunks and temp-file leftovers of one fan-out directory, sleeping
/// `delay` after each deletion; fsyncs the directory if anything went.
fn sweep_fanout(
    dir: &Path,
    live: &BTreeSet<ChunkId>,
    delay: Option<Duration>,
    report: &mut GcReport,
) -> Result<()> {
    let read_err = |source| {
        RepoError::Io(IoError {
            op: "read directory",
            path: dir.to_path_buf(),
            source,
        })
    };
    let mut deleted_here = false;
    for e in fs::read_dir(dir).map_err(read_err)? {
        let e = e.map_err(read_err)?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let leftover = name.starts_with('.') && name.contains(".tmp.");
        let dead = match name.parse::<ChunkId>() {
            Ok(id) => !live.contains(&id),
            Err(_) => false,
        };
        if !(leftover || dead) {
            if !name.starts_with('.') {
                report.chunks_kept += 1;
            }
            continue;
        }
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(e.path()) {
            Ok(()) => {
                deleted_here = true;
                if leftover {
                    report.leftovers_deleted += 1;
                } else {
                    report.chunks_deleted += 1;
                    report.bytes_freed += len;
                }
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
            }
            Err(err) => log::warn!("cannot remove {}: {err}", e.path().display()),
        }
    }
    if deleted_here {
        fsync_dir(dir)?;
    }
    Ok(())
}
