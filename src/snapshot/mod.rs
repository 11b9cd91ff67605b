//! Snapshot state: what a snapshot directory holds — the state file's contents
//! ([`microvm::MicrovmState`], older versions in `legacy`) and the content-addressed guest
//! memory manifest ([`manifest`]) — and the chunks a snapshot refers to ([`refs`]). The
//! checksummed container the files are written in is [`crate::formats::file`]; the
//! [`Persist`](crate::formats::Persist) trait of the saved components is in
//! [`crate::formats`] too, below the components.
//!
//! The formats are described in `docs/SNAPSHOT_FORMAT.md`.

mod legacy;
pub mod manifest;
pub mod microvm;
pub mod refs;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::BlockDeviceState;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::disk::overlay_capture::OverlayManifest;

pub use manifest::{
    ChunkEntry, DEFAULT_CHUNK_SIZE, ManifestError, MemoryManifest, RegionManifest, RestoreStats,
    SaveStats, ZeroChunks, restore_memory, save_memory, save_memory_incremental,
};

/// One virtio-block disk's saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// Transport registers and queues.
    pub transport: MmioTransportState,
    /// Device state, including the backend's identity.
    pub device: BlockDeviceState,
    /// The content of the disk's copy-on-write overlay, if it has one.
    pub overlay: Option<OverlayManifest>,
}

/// A virtio-net interface as a snapshot records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetSnapshot {
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// Transport registers, interrupt status and queues.
    pub transport: MmioTransportState,
    /// Device state (id, tap, MAC, features, configuration space).
    pub device: crate::devices::virtio::net::NetDeviceState,
}

/// What the next snapshot of a VM can be incremental against: the content of its
/// memory and overlays as of its last snapshot (or the snapshot it was restored from),
/// from which the dirty tracking counts.
#[derive(Clone, Debug)]
pub struct SnapshotBase {
    /// Canonical path of the chunk store holding the base's chunks.
    pub store: PathBuf,
    /// The memory manifest.
    pub memory: MemoryManifest,
    /// Captured overlays, by disk index.
    pub overlays: Vec<Option<OverlayManifest>>,
}
