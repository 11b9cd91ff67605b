//! `vmm store migrate DIR`: converts a chunk store (a snapshot directory, repository or
//! archive) from chunk files (`chunks/xx/<id>`, store layout 1) to packs (layout 2).
//!
//! Every chunk file is copied as it is stored (its record, checked to decode to its id)
//! into new packs, which are made durable and indexed first; only then are the chunk
//! files deleted (each fan-out directory fsynced, empty ones removed). Killed at any point,
//! every chunk is in a chunk file or an indexed pack (or both): running it again finishes
//! the job. A damaged chunk file is reported and left in place. Run it while no other
//! `vmm` writes to the store (a repository's lock is taken by the caller).

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

use super::local::{LocalStore, LocalStoreOptions};
use super::{ChunkId, PutOutcome, Result};
use crate::util::IoError;
use crate::util::fs::fsync_dir;

/// What [`migrate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrateReport {
    /// Chunk files copied into packs and deleted.
    pub chunks_moved: u64,
    /// Chunk files whose chunk a pack already held: deleted.
    pub chunks_already_packed: u64,
    /// Chunk files that do not decode to their name: left in place.
    pub damaged: Vec<String>,
    /// Bytes of the chunk records moved.
    pub bytes_moved: u64,
}

impl std::fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "moved {} chunks ({} bytes) into packs, {} were packed already",
            self.chunks_moved, self.bytes_moved, self.chunks_already_packed
        )?;
        if !self.damaged.is_empty() {
            write!(
                f,
                "; {} damaged chunk files left: {}",
                self.damaged.len(),
                self.damaged.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Moves the chunk files of the store at `root` into packs (see the module
/// documentation). `publish_list`: also list the new packs in `packs/list` (archives).
pub fn migrate(root: &Path, publish_list: bool) -> Result<MigrateReport> {
    let mut report = MigrateReport::default();
    let chunks_dir = root.join("chunks");
    let fanouts = match fs::read_dir(&chunks_dir) {
        Ok(rd) => {
            let mut v: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(IoError::new("read directory", &chunks_dir, e).into()),
    };
    let store = LocalStore::open(
        root,
        LocalStoreOptions {
            publish_list,
            ..LocalStoreOptions::packs()
        },
    )?;
    let mut moved: Vec<(std::path::PathBuf, ChunkId)> = Vec::new();
    for dir in &fanouts {
        let rd = fs::read_dir(dir).map_err(|e| IoError::new("read directory", dir, e))?;
        for e in rd.flatten() {
            let Ok(id) = e.file_name().to_string_lossy().parse::<ChunkId>() else {
                continue;
            };
            let path = e.path();
            let bytes = fs::read(&path).map_err(|e| IoError::new("read", &path, e))?;
            match store.put_stored_in_pack(&id, &bytes) {
                Ok(PutOutcome::Written { stored_bytes }) => {
                    report.chunks_moved += 1;
                    report.bytes_moved += stored_bytes;
                }
                Ok(PutOutcome::Present) => report.chunks_already_packed += 1,
                Err(err) => {
                    log::warn!("{}: {}", path.display(), crate::util::error_chain(&err));
                    report.damaged.push(path.display().to_string());
                    continue;
                }
            }
            moved.push((path, id));
        }
    }
    // The packs are durable and indexed before any chunk file goes.
    store.sync()?;
    for (path, _) in &moved {
        fs::remove_file(path).map_err(|e| IoError::new("remove", path, e))?;
    }
    for dir in &fanouts {
        fsync_dir(dir)?;
        // Only empty fan-out directories can be removed; others keep damaged files.
        let _ = fs::remove_dir(dir);
    }
    if fs::remove_dir(&chunks_dir).is_ok() {
        fsync_dir(root)?;
    } else {
        fsync_dir(&chunks_dir)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ChunkRead, ChunkWrite};
    use crate::util::testutil::{Rng, TempDir};

    #[test]
    fn chunk_files_move_into_packs_and_damage_stays() {
        let dir = TempDir::new("migrate");
        let old = LocalStore::open(dir.path(), LocalStoreOptions::default()).unwrap();
        let datas: Vec<Vec<u8>> = (0..12).map(|i| Rng::new(2 * i + 1).bytes(20000)).collect();
        let ids: Vec<ChunkId> = datas.iter().map(|d| old.put(d).unwrap()).collect();
        old.sync().unwrap();
        let bad = old.chunk_path(&ids[3]);
        let mut b = fs::read(&bad).unwrap();
        b[100] ^= 1;
        fs::write(&bad, &b).unwrap();
        drop(old);
        let r = migrate(dir.path(), false).unwrap();
        assert_eq!((r.chunks_moved, r.damaged.len()), (11, 1), "{r:?}");
        let s = LocalStore::open(dir.path(), LocalStoreOptions::default()).unwrap();
        for (i, (id, d)) in ids.iter().zip(&datas).enumerate() {
            if i != 3 {
                assert_eq!(&s.get(id).unwrap(), d);
                assert!(!s.chunk_path(id).exists());
            }
        }
        assert!(bad.exists(), "the damaged file stays");
        // Again: nothing left to move.
        let again = migrate(dir.path(), false).unwrap();
        assert_eq!(again.chunks_moved, 0);
    }
}
