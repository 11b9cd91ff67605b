//! Capturing a copy-on-write overlay's content into a chunk store for a snapshot, and
//! materialising it again as an overlay on restore.

use serde::{Deserialize, Serialize};

use crate::store::ChunkId;

/// Chunk size of captured overlays: 64 KiB, like guest memory.
pub const CAPTURE_CHUNK_SIZE: u32 = 64 << 10;

/// An overlay's content at snapshot time: which blocks it held and their bytes, as
/// content-addressed chunks of [`CAPTURE_CHUNK_SIZE`] bytes of the overlay's data file.
/// Chunks whose bytes are all zero, and chunks holding no overlay block, are not listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayManifest {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Copy-on-write block size of the overlay.
    pub block_size: u32,
    /// Chunk size of `chunks`.
    pub chunk_size: u32,
    /// Bitmap of the blocks the overlay holds (bit `i % 64` of word `i / 64`).
    pub bitmap: Vec<u64>,
    /// (chunk index, id) for every stored chunk, in increasing index order.
    pub chunks: Vec<(u64, ChunkId)>,
}
