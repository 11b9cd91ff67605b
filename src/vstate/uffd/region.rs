//! The regions a [`LazyMemory`](super::LazyMemory) serves: the arguments checked, and
//! each chunk's progress as the handler sees it.

use super::shared::UffdError;
use super::sys::PAGE_SIZE;
use crate::store::MAX_CHUNK_LEN;
use crate::vstate::memory::{ChunkEntry, RegionManifest};

/// Progress of one chunk, known to the handler only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkState {
    Pending,
    /// Handed to a fetch worker; its copy will wake whoever faults on it meanwhile.
    Fetching,
    Placed,
    Failed,
}

/// A registered region as the handler sees it.
pub(super) struct Region {
    pub(super) host: usize,
    pub(super) len: usize,
    pub(super) gpa: u64,
    pub(super) chunks: Vec<ChunkEntry>,
    pub(super) state: Vec<ChunkState>,
}

/// Checks the arguments of [`LazyMemory::start`](super::LazyMemory::start); returns the regions sorted by
/// host address.
pub(super) fn validate(
    regions: Vec<(usize, usize, RegionManifest)>,
    chunk_size: usize,
) -> Result<Vec<Region>, UffdError> {
    if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE) || chunk_size > MAX_CHUNK_LEN {
        return Err(UffdError::InvalidChunkSize { size: chunk_size });
    }
    let mut out = Vec::with_capacity(regions.len());
    for (index, (host, len, manifest)) in regions.into_iter().enumerate() {
        let invalid = |detail: String| UffdError::InvalidRegion {
            index,
            host_addr: host,
            detail,
        };
        if host == 0 || !host.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(invalid(format!(
                "address and length {len:#x} must be non-null multiples of {PAGE_SIZE}"
            )));
        }
        if len == 0 || host.checked_add(len).is_none() {
            return Err(invalid(format!("length {len:#x} is empty or wraps")));
        }
        if manifest.size != len as u64 {
            return Err(invalid(format!(
                "length {len:#x} differs from the manifest's {:#x}",
                manifest.size
            )));
        }
        let expected = len.div_ceil(chunk_size);
        if manifest.chunks.len() != expected {
            return Err(invalid(format!(
                "manifest has {} chunk entries, expected {expected}",
                manifest.chunks.len()
            )));
        }
        out.push((
            index,
            Region {
                host,
                len,
                gpa: manifest.guest_addr,
                state: vec![ChunkState::Pending; expected],
                chunks: manifest.chunks,
            },
        ));
    }
    out.sort_by_key(|(_, r)| r.host);
    for pair in out.windows(2) {
        let ((_, a), (index, b)) = (&pair[0], &pair[1]);
        if a.host + a.len > b.host {
            return Err(UffdError::InvalidRegion {
                index: *index,
                host_addr: b.host,
                detail: format!("overlaps the region at {:#x}", a.host),
            });
        }
    }
    Ok(out.into_iter().map(|(_, r)| r).collect())
}
