//! `verify`: re-reads and re-hashes every chunk the chosen snapshots need, checks their
//! state files, manifests, ids and catalogue entries, and reports every problem found.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

use super::progress::Progress;
use super::{Repo, Result, SnapshotId};
use crate::store::{ChunkId, ChunkRead, StoreError};

/// Problems found in one snapshot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotCheck {
    /// The snapshot.
    pub id: Option<SnapshotId>,
    /// Distinct chunks it needs.
    pub chunks: u64,
    /// Chunks missing from the store.
    pub missing: Vec<ChunkId>,
    /// Chunks whose file is damaged, with the reason.
    pub corrupt: Vec<(ChunkId, String)>,
    /// Other problems: unreadable state or manifest, id mismatch, bad `meta.json`.
    pub errors: Vec<String>,
}

impl SnapshotCheck {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty() && self.errors.is_empty()
    }
}

/// The result of [`verify`].
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// True when every checked snapshot is intact.
    pub ok: bool,
    /// Distinct chunks read and hashed.
    pub chunks_checked: u64,
    /// Per snapshot, in id order.
    pub snapshots: Vec<SnapshotCheck>,
}

/// Checks the snapshots `ids` (all listed snapshots when `None`).
pub fn verify(
    repo: &Repo,
    ids: Option<&[SnapshotId]>,
    progress: Option<bool>,
) -> Result<VerifyReport> {
    let ids: Vec<SnapshotId> = match ids {
        Some(i) => i.to_vec(),
        None => repo.list()?,
    };
    let mut checks: Vec<SnapshotCheck> = Vec::new();
    let mut refs: BTreeMap<SnapshotId, BTreeSet<ChunkId>> = BTreeMap::new();
    for id in &ids {
        checks.push(check_snapshot(repo, id, &mut refs));
    }

    let all: Vec<ChunkId> = refs
        .values()
        .flatten()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let bad = check_chunks(repo, &all, progress)?;
    for c in &mut checks {
        let Some(set) = c.id.and_then(|id| refs.get(&id)) else {
            continue;
        };
        for (chunk, what) in &bad {
            if set.contains(chunk) {
                match what {
                    None => c.missing.push(*chunk),
                    Some(reason) => c.corrupt.push((*chunk, reason.clone())),
                }
            }
        }
    }
    Ok(VerifyReport {
        ok: checks.iter().all(SnapshotCheck::ok),
        chunks_checked: all.len() as u64,
        snapshots: checks,
    })
}

/// Checks snapshot `id`'s own files (id, meta, chunk list); adds its chunks to `refs`.
fn check_snapshot(
    repo: &Repo,
    id: &SnapshotId,
    refs: &mut BTreeMap<SnapshotId, BTreeSet<ChunkId>>,
) -> SnapshotCheck {
    let mut c = SnapshotCheck {
        id: Some(*id),
        ..SnapshotCheck::default()
    };
    let dir = repo.snapshot_dir(id);
    match SnapshotId::of_dir(&dir) {
        Ok(actual) if actual != *id => c.errors.push(format!(
            "state and manifest hash to {}, not to the snapshot's id (files were modified)",
            actual.short()
        )),
        Ok(_) => {}
        Err(e) => c.errors.push(crate::util::error_chain(&e)),
    }
    if let Err(e) = repo.read_meta(id) {
        c.errors.push(e.to_string());
    }
    match repo.refs(id) {
        Ok(r) => {
            c.chunks = r.len() as u64;
            refs.insert(*id, r);
        }
        Err(e) => c.errors.push(crate::util::error_chain(&e)),
    }
    c
}

/// Reads and hashes the chunks `all` with a few threads; returns the bad ones: `None` if
/// missing, else why it is corrupt or unreadable.
fn check_chunks(
    repo: &Repo,
    all: &[ChunkId],
    progress: Option<bool>,
) -> Result<BTreeMap<ChunkId, Option<String>>> {
    let store = repo.store()?;
    let bar = Progress::new("verify", all.len() as u64, progress);
    let bad: Mutex<BTreeMap<ChunkId, Option<String>>> = Mutex::new(BTreeMap::new());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = all.get(i) else { break };
                    let verdict = match store.get(id) {
                        Ok(_) => None,
                        Err(StoreError::NotFound { .. }) => Some(None),
                        Err(e) => Some(Some(crate::util::error_chain(&e))),
                    };
                    if let Some(v) = verdict {
                        bad.lock().unwrap_or_else(|e| e.into_inner()).insert(*id, v);
                    }
                    bar.add(1);
                }
            });
        }
    });
    bar.finish();
    Ok(bad.into_inner().unwrap_or_else(|e| e.into_inner()))
}
