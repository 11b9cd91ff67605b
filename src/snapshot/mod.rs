//! Snapshot state: the [`Persist`] trait implemented by every component that is
//! saved and restored, the checksummed state file format ([`file`]) and the
//! content-addressed guest memory manifest ([`manifest`]).
//!
//! The formats are described in `docs/SNAPSHOT_FORMAT.md`.

pub mod create;
pub mod file;
mod legacy;
pub mod manifest;
pub mod microvm;
pub mod refs;

pub use file::{FileKind, StateFileError, read_state_file, write_state_file};
pub use manifest::{
    ChunkEntry, DEFAULT_CHUNK_SIZE, ManifestError, MemoryManifest, RegionManifest, RestoreStats,
    SaveStats, ZeroChunks, restore_memory, save_memory, save_memory_incremental,
};

/// A component whose state can be saved into a serializable value and rebuilt
/// from it (same shape as Firecracker's `Persist`).
pub trait Persist: Sized {
    /// The serializable saved state.
    type State;
    /// What `restore` needs besides the state (file descriptors, guest memory, ...).
    type Args;
    /// Error returned by `restore`.
    type Error;

    /// Captures the component's state.
    fn save(&self) -> Self::State;

    /// Rebuilds a component from saved state.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
