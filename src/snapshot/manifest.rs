//! Guest memory manifests: guest memory saved as content-addressed chunks.
//!
//! Each guest memory region (guest physical address, size) is cut into fixed-size
//! chunks (the last one may be shorter). A chunk of zeros is recorded as
//! [`ChunkEntry::Zero`] and costs nothing in the store; any other chunk is put in a
//! [`ChunkWrite`] store and recorded by its [`ChunkId`]. Identical chunks, within one
//! snapshot or across snapshots sharing a store, are stored once.
//!
//! Saving and restoring run across all cores. The guest must not run while its
//! memory is saved or restored.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::formats::MANIFEST_KIND;
use crate::formats::file::{self, StateFileError};
use crate::store::{ChunkId, ChunkRead, ChunkWrite, MAX_CHUNK_LEN, PutOutcome, StoreError};
pub use crate::vstate::memory::{ChunkEntry, RegionManifest};

/// Default chunk size: 64 KiB (measurements in `docs/SNAPSHOT_FORMAT.md`).
pub const DEFAULT_CHUNK_SIZE: usize = 64 << 10;

/// Chunk sizes must be a multiple of this (the page size).
pub const CHUNK_ALIGN: usize = 4096;

/// Errors of saving and restoring guest memory.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The chunk size is not usable.
    #[error(
        "chunk size {size} is invalid: it must be a non-zero multiple of {CHUNK_ALIGN} \
         and at most {MAX_CHUNK_LEN}"
    )]
    InvalidChunkSize {
        /// The rejected size.
        size: u64,
    },
    /// A region's chunk list does not cover the region.
    #[error("manifest region {region} at {gpa:#x} has {found} chunk entries, expected {expected}")]
    ChunkCount {
        /// Index of the region.
        region: usize,
        /// Its guest physical address.
        gpa: u64,
        /// Entries needed for its size.
        expected: u64,
        /// Entries present.
        found: u64,
    },
    /// The guest memory given does not have the manifest's layout.
    #[error("guest memory layout does not match the manifest: {detail}")]
    LayoutMismatch {
        /// Which region differs and how.
        detail: String,
    },
    /// Storing a chunk failed.
    #[error("cannot store the chunk at guest address {gpa:#x}")]
    Store {
        /// Guest physical address of the chunk.
        gpa: u64,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Making the stored chunks durable failed.
    #[error("cannot make the stored chunks durable")]
    Sync(#[source] StoreError),
    /// Fetching a chunk failed (missing, corrupt, unreadable).
    #[error("cannot restore chunk {id} at guest address {gpa:#x}")]
    Chunk {
        /// The chunk.
        id: ChunkId,
        /// Guest physical address it belongs at.
        gpa: u64,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Reading or writing the manifest file failed.
    #[error("memory manifest file error")]
    File(#[source] StateFileError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ManifestError>;

/// Guest memory as chunks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryManifest {
    /// Size of every chunk but possibly the last of each region; a non-zero multiple
    /// of [`CHUNK_ALIGN`], at most [`MAX_CHUNK_LEN`].
    pub chunk_size: u64,
    /// The regions, in the order they were given when saving.
    pub regions: Vec<RegionManifest>,
}

/// Counts from [`save_memory`] / [`save_memory_incremental`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SaveStats {
    /// Chunks in the manifest.
    pub chunks_total: u64,
    /// Chunks found to be all zeros (never stored).
    pub chunks_zero: u64,
    /// Clean chunks whose entry was copied from the parent manifest unread.
    pub chunks_reused: u64,
    /// Chunks newly written to the store.
    pub chunks_new: u64,
    /// Non-zero chunks already in the store or repeated within this save.
    pub chunks_deduped: u64,
    /// Uncompressed bytes of the new chunks.
    pub bytes_new: u64,
    /// Bytes the store used for the new chunks (after compression): "bytes added".
    pub bytes_written: u64,
}

/// Counts from [`restore_memory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreStats {
    /// Chunks in the manifest.
    pub chunks_total: u64,
    /// Zero chunks (written or skipped according to [`ZeroChunks`]).
    pub chunks_zero: u64,
    /// Chunks read from the store.
    pub chunks_fetched: u64,
    /// Bytes of guest memory filled from the store.
    pub bytes_fetched: u64,
}

/// What [`restore_memory`] does with zero chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroChunks {
    /// The destination is freshly mapped zeroed memory: leave zero chunks untouched
    /// (and unfaulted).
    AlreadyZero,
    /// Write zeros over zero chunks.
    Write,
}

fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

fn check_chunk_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(CHUNK_ALIGN as u64) || size > MAX_CHUNK_LEN as u64 {
        return Err(ManifestError::InvalidChunkSize { size });
    }
    Ok(())
}

impl MemoryManifest {
    /// Checks the chunk size and that each region has exactly the entries its size
    /// needs.
    pub fn validate(&self) -> Result<()> {
        check_chunk_size(self.chunk_size)?;
        for (i, r) in self.regions.iter().enumerate() {
            let expected = chunk_count(r.size, self.chunk_size);
            if r.chunks.len() as u64 != expected {
                return Err(ManifestError::ChunkCount {
                    region: i,
                    gpa: r.guest_addr,
                    expected,
                    found: r.chunks.len() as u64,
                });
            }
        }
        Ok(())
    }

    /// Every stored chunk id referenced, in order, with repeats.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.regions.iter().flat_map(|r| {
            r.chunks.iter().filter_map(|c| match c {
                ChunkEntry::Zero => None,
                ChunkEntry::Chunk(id) => Some(id),
            })
        })
    }

    /// Total guest memory described, in bytes.
    pub fn memory_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The manifest as a complete (checksummed) file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        file::encode(&MANIFEST_KIND, self).map_err(ManifestError::File)
    }

    /// Writes the manifest to `path` atomically and durably.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        file::write_file(path.as_ref(), &MANIFEST_KIND, self).map_err(ManifestError::File)
    }

    /// Reads and validates a manifest written by [`write_to`](Self::write_to).
    pub fn read_from(path: impl AsRef<Path>) -> Result<Self> {
        let m: Self =
            file::read_file(path.as_ref(), &MANIFEST_KIND).map_err(ManifestError::File)?;
        m.validate()?;
        Ok(m)
    }

    /// Checks, decodes and validates the bytes of a manifest file (what
    /// [`read_from`](Self::read_from) does after reading them).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let m: Self = file::decode(&MANIFEST_KIND, bytes).map_err(ManifestError::File)?;
        m.validate()?;
        Ok(m)
    }
}

/// Whether `buf` is all zeros; written so the compiler vectorizes it.
fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(256);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// Worker threads for saving and restoring: more than the cores, because much of
/// the time is spent waiting on file I/O (fsync above all), not hashing.
/// When non-zero, the worker count used by save and restore (tests only, for
/// measurements).
#[cfg(test)]
static WORKERS_OVERRIDE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn workers() -> usize {
    #[cfg(test)]
    {
        let n = WORKERS_OVERRIDE.load(Ordering::Relaxed);
        if n != 0 {
            return n;
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
    (cores * 4).min(32)
}

/// Applies `f` to every item on `workers` threads, returning results in item order,
/// or the first error met (remaining items are then skipped).
fn parallel_map<T, R, E, F>(
    items: Vec<T>,
    workers: usize,
    batch: usize,
    f: F,
) -> std::result::Result<Vec<R>, E>
where
    T: Send,
    R: Send,
    E: Send,
    F: Fn(T) -> std::result::Result<R, E> + Sync,
{
    let n = items.len();
    let workers = workers.min(n.div_ceil(batch.max(1)));
    if workers <= 1 {
        return items.into_iter().map(f).collect();
    }
    let queue = Mutex::new(items.into_iter().enumerate());
    let failed = AtomicBool::new(false);
    let worker = || -> std::result::Result<Vec<(usize, R)>, E> {
        let mut out = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let work: Vec<(usize, T)> = queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_ref()
                .take(batch.max(1))
                .collect();
            if work.is_empty() {
                break;
            }
            for (i, item) in work {
                match f(item) {
                    Ok(r) => out.push((i, r)),
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        }
        Ok(out)
    };
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(n).collect();
    for outcome in outcomes {
        for (i, r) in outcome? {
            slots[i] = Some(r);
        }
    }
    Ok(slots
        .into_iter()
        .map(|r| r.expect("every item is processed when no worker failed"))
        .collect())
}

/// Items per work batch, so a batch is about 256 KiB of guest memory.
fn batch_for(chunk_size: usize) -> usize {
    ((256 << 10) / chunk_size).max(1)
}

/// How one chunk was saved.
#[derive(Clone, Copy)]
enum Saved {
    Zero,
    Reused(ChunkEntry),
    Stored(ChunkId, PutOutcome),
    Repeated(ChunkId),
}

/// The shared core of [`save_memory`] and [`save_memory_incremental`].
fn save(
    regions: &[(u64, &[u8])],
    chunk_size: usize,
    store: &dyn ChunkWrite,
    reuse: &(dyn Fn(usize, usize) -> Option<ChunkEntry> + Sync),
) -> Result<(MemoryManifest, SaveStats)> {
    check_chunk_size(chunk_size as u64)?;
    let mut items = Vec::new();
    for (r, &(gpa, mem)) in regions.iter().enumerate() {
        for (c, data) in mem.chunks(chunk_size).enumerate() {
            items.push((r, c, gpa + (c * chunk_size) as u64, data));
        }
    }
    // Ids seen in this save: a repeat is not put twice.
    let seen = Mutex::new(std::collections::HashSet::new());
    let saved = parallel_map(
        items,
        workers(),
        batch_for(chunk_size),
        |(r, c, gpa, data)| {
            if let Some(entry) = reuse(r, c) {
                return Ok(Saved::Reused(entry));
            }
            if is_zero(data) {
                return Ok(Saved::Zero);
            }
            let id = ChunkId::of(data);
            if !seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id)
            {
                return Ok(Saved::Repeated(id));
            }
            let outcome = store
                .put_hashed(&id, data)
                .map_err(|source| ManifestError::Store { gpa, source })?;
            Ok(Saved::Stored(id, outcome))
        },
    )?;

    let mut stats = SaveStats::default();
    let mut saved = saved.into_iter();
    let mut manifest = MemoryManifest {
        chunk_size: chunk_size as u64,
        regions: Vec::with_capacity(regions.len()),
    };
    for &(gpa, mem) in regions {
        let n = mem.len().div_ceil(chunk_size);
        let mut chunks = Vec::with_capacity(n);
        for (c, s) in saved.by_ref().take(n).enumerate() {
            let len = chunk_size.min(mem.len() - c * chunk_size) as u64;
            stats.chunks_total += 1;
            chunks.push(match s {
                Saved::Zero => {
                    stats.chunks_zero += 1;
                    ChunkEntry::Zero
                }
                Saved::Reused(entry) => {
                    stats.chunks_reused += 1;
                    entry
                }
                Saved::Repeated(id) | Saved::Stored(id, PutOutcome::Present) => {
                    stats.chunks_deduped += 1;
                    ChunkEntry::Chunk(id)
                }
                Saved::Stored(id, PutOutcome::Written { stored_bytes }) => {
                    stats.chunks_new += 1;
                    stats.bytes_new += len;
                    stats.bytes_written += stored_bytes;
                    ChunkEntry::Chunk(id)
                }
            });
        }
        manifest.regions.push(RegionManifest {
            guest_addr: gpa,
            size: mem.len() as u64,
            chunks,
        });
    }
    store.sync().map_err(ManifestError::Sync)?;
    Ok((manifest, stats))
}

/// Saves guest memory `regions` (guest physical address, host bytes) into `store`
/// in chunks of `chunk_size` bytes, returning the manifest that describes it.
///
/// All-zero chunks are recorded as [`ChunkEntry::Zero`] without touching the store.
/// Ends with [`ChunkWrite::sync`], so the chunks are durable when it returns.
/// The guest must be paused: memory that changes while being saved yields chunks
/// that fail verification on restore.
pub fn save_memory(
    regions: &[(u64, &[u8])],
    chunk_size: usize,
    store: &dyn ChunkWrite,
) -> Result<(MemoryManifest, SaveStats)> {
    save(regions, chunk_size, store, &|_, _| None)
}

/// Like [`save_memory`], but only the chunks for which `dirty(region_index,
/// chunk_index)` is true are read; the others keep the entry of `parent` (the
/// manifest of the previous snapshot of the same memory, whose chunks must be in
/// `store`). The chunk size is the parent's, and `regions` must have the parent's
/// layout.
pub fn save_memory_incremental(
    regions: &[(u64, &[u8])],
    store: &dyn ChunkWrite,
    parent: &MemoryManifest,
    dirty: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Result<(MemoryManifest, SaveStats)> {
    parent.validate()?;
    check_layout(parent, regions.iter().map(|(gpa, m)| (*gpa, m.len())))?;
    let reuse = |r: usize, c: usize| {
        if dirty(r, c) {
            None
        } else {
            Some(parent.regions[r].chunks[c])
        }
    };
    save(regions, parent.chunk_size as usize, store, &reuse)
}

fn check_layout(
    manifest: &MemoryManifest,
    regions: impl ExactSizeIterator<Item = (u64, usize)>,
) -> Result<()> {
    if regions.len() != manifest.regions.len() {
        return Err(ManifestError::LayoutMismatch {
            detail: format!(
                "{} regions given, manifest has {}",
                regions.len(),
                manifest.regions.len()
            ),
        });
    }
    for (i, ((gpa, len), m)) in regions.zip(&manifest.regions).enumerate() {
        if gpa != m.guest_addr || len as u64 != m.size {
            return Err(ManifestError::LayoutMismatch {
                detail: format!(
                    "region {i} is {len:#x} bytes at {gpa:#x}, manifest has {:#x} bytes at {:#x}",
                    m.size, m.guest_addr
                ),
            });
        }
    }
    Ok(())
}

/// Fills guest memory `regions` (guest physical address, host bytes) from the
/// chunks of `manifest`, decompressing each straight into place and verifying its
/// hash. The regions must have the manifest's layout.
///
/// On error, the memory content is unspecified.
pub fn restore_memory(
    manifest: &MemoryManifest,
    regions: &mut [(u64, &mut [u8])],
    store: &dyn ChunkRead,
    zero_chunks: ZeroChunks,
) -> Result<RestoreStats> {
    manifest.validate()?;
    check_layout(manifest, regions.iter().map(|(gpa, m)| (*gpa, m.len())))?;
    let chunk_size = manifest.chunk_size as usize;
    let mut stats = RestoreStats::default();
    let mut items = Vec::new();
    for ((gpa, mem), m) in regions.iter_mut().zip(&manifest.regions) {
        for (c, (buf, entry)) in mem.chunks_mut(chunk_size).zip(&m.chunks).enumerate() {
            stats.chunks_total += 1;
            let addr = *gpa + (c * chunk_size) as u64;
            match entry {
                ChunkEntry::Zero => {
                    stats.chunks_zero += 1;
                    if zero_chunks == ZeroChunks::Write {
                        items.push((addr, None, buf));
                    }
                }
                ChunkEntry::Chunk(id) => {
                    stats.chunks_fetched += 1;
                    stats.bytes_fetched += buf.len() as u64;
                    items.push((addr, Some(id), buf));
                }
            }
        }
    }
    parallel_map(
        items,
        workers(),
        batch_for(chunk_size),
        |(gpa, id, buf)| match id {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(id) => store
                .get_into(id, buf)
                .map_err(|source| ManifestError::Chunk {
                    id: *id,
                    gpa,
                    source,
                }),
        },
    )?;
    Ok(stats)
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "chunk_size_bench.rs"]
mod chunk_size_bench;
