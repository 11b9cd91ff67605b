//! Guest memory: anonymous mappings laid out by the arch module.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

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
