//! Guest memory: anonymous mappings laid out by the arch module, and a region's content
//! described as content-addressed chunks ([`RegionManifest`]: what a snapshot's memory
//! manifest holds per region and what lazy restore serves page faults from).

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion};

use crate::store::ChunkId;

/// Errors of the memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The mapping could not be created.
    #[error("cannot map {size_mib} MiB of guest memory")]
    Map {
        /// Requested size.
        size_mib: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Guest memory type used across the VMM.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Maps anonymous private memory for `regions` (guest address, length).
pub fn create_anonymous(regions: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    let size: usize = regions.iter().map(|r| r.1).sum();
    GuestMemoryMmap::from_ranges(regions).map_err(|source| MemoryError::Map {
        size_mib: (size >> 20) as u64,
        source,
    })
}

/// Host views of every guest memory region, as (guest address, bytes).
///
/// # Safety
/// The caller must make sure nothing writes guest memory while the slices live: the vCPUs
/// are paused and every disk's I/O gate is held (as `Vmm::pause` does).
pub unsafe fn memory_slices(mem: &GuestMemory) -> Vec<(u64, &[u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len()` bytes at `as_ptr()` for as long as `mem`
            // lives; the caller guarantees no concurrent writers.
            let s =
                unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u8, r.len() as usize) };
            (r.start_addr().0, s)
        })
        .collect()
}

/// Mutable host views of every guest memory region, as (guest address, bytes).
///
/// # Safety
/// The caller must make sure nothing else reads or writes guest memory while the slices
/// live (no vCPU runs, no device is active).
#[allow(clippy::mut_from_ref)]
pub unsafe fn memory_slices_mut(mem: &GuestMemory) -> Vec<(u64, &mut [u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len()` bytes at `as_ptr()` for as long as `mem`
            // lives; regions are disjoint and the caller guarantees exclusive access.
            let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
            (r.start_addr().0, s)
        })
        .collect()
}

/// One chunk of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkEntry {
    /// All zeros; not in the store.
    Zero,
    /// Stored under this id.
    Chunk(ChunkId),
}

/// The chunks of one guest memory region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionManifest {
    /// Guest physical address of the region.
    pub guest_addr: u64,
    /// Size of the region in bytes.
    pub size: u64,
    /// `ceil(size / chunk_size)` entries, in address order.
    pub chunks: Vec<ChunkEntry>,
}
