//! Snapshot state: what a snapshot directory holds — the state file's contents
//! ([`microvm::MicrovmState`], older versions in `legacy`) and the content-addressed guest
//! memory manifest ([`manifest`]) — and the chunks a snapshot refers to ([`refs`]). The
//! checksummed container the files are written in is [`crate::formats::file`]; the
//! [`Persist`](crate::formats::Persist) trait of the saved components is in
//! [`crate::formats`] too, below the components.
//!
//! The formats are described in `docs/SNAPSHOT_FORMAT.md`.

pub mod create;
mod legacy;
pub mod manifest;
pub mod microvm;
pub mod refs;

pub use manifest::{
    ChunkEntry, DEFAULT_CHUNK_SIZE, ManifestError, MemoryManifest, RegionManifest, RestoreStats,
    SaveStats, ZeroChunks, restore_memory, save_memory, save_memory_incremental,
};
