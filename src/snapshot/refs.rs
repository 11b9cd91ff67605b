//! Which chunks a snapshot directory references: what garbage collection must keep,
//! what `verify` and `export` walk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::formats::StateFileError;
use crate::snapshot::manifest::{ManifestError, MemoryManifest};
use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::store::ChunkId;

/// Errors of reading a snapshot's references.
#[derive(Debug, thiserror::Error)]
pub enum RefsError {
    /// The state file could not be read.
    #[error("reading snapshot state {}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StateFileError,
    },
    /// The memory manifest could not be read.
    #[error("reading memory manifest {}", path.display())]
    Memory {
        /// The manifest file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ManifestError,
    },
}

/// Every chunk id the snapshot in `dir` needs to be restored: its memory chunks and
/// the chunks of captured disk overlays. Zero chunks are not listed (never stored).
pub fn chunk_refs(dir: &Path) -> Result<BTreeSet<ChunkId>, RefsError> {
    let state_path = dir.join(STATE_FILE);
    let state = MicrovmState::read(&state_path).map_err(|source| RefsError::State {
        path: state_path.clone(),
        source,
    })?;
    let mem_path = dir.join(MEMORY_FILE);
    let manifest = MemoryManifest::read_from(&mem_path).map_err(|source| RefsError::Memory {
        path: mem_path.clone(),
        source,
    })?;
    let mut out: BTreeSet<ChunkId> = manifest.chunk_ids().copied().collect();
    for b in &state.blocks {
        if let Some(o) = &b.overlay {
            out.extend(o.chunks.iter().map(|(_, id)| *id));
        }
    }
    Ok(out)
}
