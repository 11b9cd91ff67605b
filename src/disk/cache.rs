//! [`ChunkCache`]: a persistent local cache of a remote image's chunks.
//!
//! One directory per image, named by the image id (the hash of its index, so the same
//! image served from another URL shares the cache and a republished image does not):
//!
//! ```text
//! CACHE_DIR/<image id, 64 hex>/data      sparse file of the image size; chunk i at i * chunk_size
//! CACHE_DIR/<image id, 64 hex>/present   presence bitmap (checksummed container, kind VMMCACH\0)
//! ```
//!
//! Crash safety: a chunk's bytes are written to `data` before its bit is set in memory; the
//! bitmap is persisted as "take the bits, fsync `data`, replace `present` atomically"
//! (temp file + fsync + rename), so every persisted bit names bytes that are on disk. After
//! a crash, chunks cached since the last persist are simply fetched again. Eviction clears
//! bits and persists them *before* punching holes, so a persisted bit never names a hole.
//! Persisting happens on [`ChunkCache::persist`] (the disk's flush), every
//! [`PERSIST_EVERY`] new chunks, and on drop.
//!
//! Size limit: when caching a chunk would exceed `max_bytes`, the oldest cached chunks (in
//! caching order; chunks found at open count as oldest, in index order) are evicted until
//! the cache is at most 7/8 of the limit, in one batch. Cached bytes are trusted (they were
//! verified against their id before being written); the directory is locked (`flock`) so
//! two processes never share it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::formats::PRESENT_KIND;
use crate::formats::file::{self, StateFileError};
use crate::image::{ImageId, ImageIndex};
use crate::util::{IoError, lock};

/// New chunks cached between two automatic persists of the bitmap.
pub const PERSIST_EVERY: u64 = 256;

/// Errors of the chunk cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Another process uses this cache directory.
    #[error("image cache {} is in use by another process", path.display())]
    Busy {
        /// The cache data file.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("image cache: cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The bitmap file could not be written.
    #[error("image cache: cannot write the presence bitmap")]
    Bitmap(#[source] StateFileError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, CacheError>;

/// Persisted presence bitmap.
#[derive(Serialize, Deserialize)]
struct PresentFile {
    image_id: ImageId,
    size: u64,
    chunk_size: u32,
    bits: Vec<u64>,
}

/// Running totals of a [`ChunkCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Chunks cached now.
    pub chunks: u64,
    /// Bytes of the chunks cached now.
    pub bytes: u64,
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads of chunks not in the cache.
    pub misses: u64,
    /// Chunks evicted to respect the size limit.
    pub evicted: u64,
}

struct Order {
    /// Cached chunks, oldest first.
    queue: VecDeque<u32>,
    /// Bytes of cached chunks.
    bytes: u64,
    /// Chunks cached since the last persist.
    unsynced: u64,
    /// Bits changed since the last persist.
    dirty: bool,
}

/// A persistent cache of one image's chunks (see the module documentation).
pub struct ChunkCache {
    dir: PathBuf,
    data_path: PathBuf,
    present_path: PathBuf,
    data: File,
    image_id: ImageId,
    size: u64,
    chunk_size: u32,
    max_bytes: Option<u64>,
    bits: Vec<AtomicU64>,
    /// Held shared by reads and inserts, exclusively by eviction.
    evict_lock: RwLock<()>,
    order: Mutex<Order>,
    /// Serializes persists so the last bitmap written is the newest.
    persist_lock: Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    evicted: AtomicU64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// Opens (or creates) the cache of image `image_id` with `index` under `root`, keeping
    /// at most `max_bytes` of chunks (`None`: no limit). A bitmap that is unreadable or
    /// belongs to other parameters is discarded with a warning.
    pub fn open(
        root: &Path,
        index: &ImageIndex,
        image_id: &ImageId,
        max_bytes: Option<u64>,
    ) -> Result<Self> {
        let dir = root.join(image_id.to_hex());
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let data_path = dir.join("data");
        let present_path = dir.join("present");
        let data = open_locked(&data_path)?;
        let saved = read_bitmap(&present_path, index, image_id);
        let bits = size_data(&data, &data_path, &present_path, index, saved)?;
        let (queue, bytes) = cached_in_index_order(&bits, index);
        let cache = ChunkCache {
            dir,
            data_path,
            present_path,
            data,
            image_id: *image_id,
            size: index.size,
            chunk_size: index.chunk_size,
            max_bytes,
            bits,
            evict_lock: RwLock::new(()),
            order: Mutex::new(Order {
                queue,
                bytes,
                unsynced: 0,
                dirty: false,
            }),
            persist_lock: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        };
        if max_bytes.is_some_and(|m| bytes > m) {
            cache.evict(0)?;
        }
        Ok(cache)
    }

    /// The cache's directory (`root/<image id>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Totals.
    pub fn stats(&self) -> CacheStats {
        let o = lock(&self.order);
        CacheStats {
            chunks: o.queue.len() as u64,
            bytes: o.bytes,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }

    fn chunk_len(&self, idx: usize) -> u64 {
        let start = idx as u64 * u64::from(self.chunk_size);
        (self.size - start).min(u64::from(self.chunk_size))
    }

    /// Whether chunk `idx` is cached.
    pub fn contains(&self, idx: usize) -> bool {
        self.bits
            .get(idx / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (idx % 64)) != 0)
    }

    /// Reads `buf.len()` bytes at `within` in chunk `idx` if the chunk is cached; returns
    /// whether it was.
    pub fn read(&self, idx: usize, within: usize, buf: &mut [u8]) -> Result<bool> {
        let _shared = self.evict_lock.read().unwrap_or_else(|e| e.into_inner());
        if !self.contains(idx) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let off = idx as u64 * u64::from(self.chunk_size) + within as u64;
        self.data
            .read_exact_at(buf, off)
            .map_err(|source| CacheError::Io {
                op: "read",
                path: self.data_path.clone(),
                source,
            })?;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Caches chunk `idx` (whose verified bytes are `data`), evicting older chunks if the
    /// size limit requires. A chunk larger than the whole limit is not cached.
    pub fn insert(&self, idx: usize, data: &[u8]) -> Result<()> {
        if idx >= self.bits.len() * 64 || data.len() as u64 != self.chunk_len(idx) {
            return Ok(());
        }
        let len = data.len() as u64;
        if let Some(max) = self.max_bytes {
            if len > max {
                return Ok(());
            }
            let over = lock(&self.order).bytes + len > max;
            if over {
                self.evict(len)?;
            }
        }
        let persist_now = {
            let _shared = self.evict_lock.read().unwrap_or_else(|e| e.into_inner());
            if self.contains(idx) {
                return Ok(());
            }
            let off = idx as u64 * u64::from(self.chunk_size);
            self.data
                .write_all_at(data, off)
                .map_err(|source| CacheError::Io {
                    op: "write",
                    path: self.data_path.clone(),
                    source,
                })?;
            let mut o = lock(&self.order);
            // Re-check under the lock: another thread may have cached it meanwhile.
            let prev = self.bits[idx / 64].fetch_or(1 << (idx % 64), Ordering::AcqRel);
            if prev & (1 << (idx % 64)) != 0 {
                return Ok(());
            }
            o.queue.push_back(idx as u32);
            o.bytes += len;
            o.dirty = true;
            o.unsynced += 1;
            o.unsynced >= PERSIST_EVERY
        };
        if persist_now {
            self.persist()?;
        }
        Ok(())
    }

    /// Evicts oldest chunks until `incoming` more bytes fit within 7/8 of the limit.
    fn evict(&self, incoming: u64) -> Result<()> {
        let Some(max) = self.max_bytes else {
            return Ok(());
        };
        let target = (max - max / 8).saturating_sub(incoming);
        let _excl = self.evict_lock.write().unwrap_or_else(|e| e.into_inner());
        let mut victims = Vec::new();
        {
            let mut o = lock(&self.order);
            while o.bytes > target {
                let Some(idx) = o.queue.pop_front() else {
                    break;
                };
                let idx = idx as usize;
                self.bits[idx / 64].fetch_and(!(1 << (idx % 64)), Ordering::AcqRel);
                o.bytes -= self.chunk_len(idx);
                victims.push(idx);
            }
            if victims.is_empty() {
                return Ok(());
            }
            o.dirty = true;
        }
        // The cleared bits must be durable before the data goes.
        self.persist()?;
        for &idx in &victims {
            self.punch(idx);
        }
        self.evicted
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        log::debug!(
            "image cache {}: evicted {} chunks",
            self.dir.display(),
            victims.len()
        );
        Ok(())
    }

    /// Frees the disk space of chunk `idx` (best effort).
    fn punch(&self, idx: usize) {
        let off = idx as u64 * u64::from(self.chunk_size);
        let len = self.chunk_len(idx);
        // SAFETY: fallocate only reads its integer arguments and acts on our open file
        // descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            log::debug!(
                "image cache: cannot punch a hole in {}: {}",
                self.data_path.display(),
                io::Error::last_os_error()
            );
        }
    }

    /// Makes the cached chunks durable and persists the bitmap, if anything changed.
    pub fn persist(&self) -> Result<()> {
        let _p = lock(&self.persist_lock);
        let bits: Vec<u64> = {
            let mut o = lock(&self.order);
            if !o.dirty {
                return Ok(());
            }
            o.dirty = false;
            o.unsynced = 0;
            self.bits
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect()
        };
        let result = self
            .data
            .sync_data()
            .map_err(|source| CacheError::Io {
                op: "fsync",
                path: self.data_path.clone(),
                source,
            })
            .and_then(|()| {
                let p = PresentFile {
                    image_id: self.image_id,
                    size: self.size,
                    chunk_size: self.chunk_size,
                    bits,
                };
                file::write_file(&self.present_path, &PRESENT_KIND, &p).map_err(CacheError::Bitmap)
            });
        if result.is_err() {
            lock(&self.order).dirty = true;
        }
        result
    }
}

impl Drop for ChunkCache {
    fn drop(&mut self) {
        if let Err(e) = self.persist() {
            log::warn!("{}", crate::util::error_chain(&e));
        }
    }
}

/// Maps an I/O error of `op` on `path` to a [`CacheError`].
fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { op, path, source }
}

/// Opens (creating it) the data file and locks it for this process.
fn open_locked(data_path: &Path) -> Result<File> {
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(data_path)
        .map_err(io_err("open", data_path))?;
    match data.try_lock() {
        Ok(()) => Ok(data),
        Err(std::fs::TryLockError::WouldBlock) => Err(CacheError::Busy {
            path: data_path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", data_path)(e)),
    }
}

/// The persisted bitmap, if it is readable and made for this image and index.
fn read_bitmap(present_path: &Path, index: &ImageIndex, image_id: &ImageId) -> Option<PresentFile> {
    let saved: PresentFile = match file::read_file(present_path, &PRESENT_KIND) {
        Ok(p) => p,
        Err(StateFileError::Io(IoError { source, .. }))
            if source.kind() == io::ErrorKind::NotFound =>
        {
            return None;
        }
        Err(e) => {
            log::warn!(
                "discarding image cache bitmap: {}",
                crate::util::error_chain(&e)
            );
            return None;
        }
    };
    let words = index.chunk_count().div_ceil(64);
    if saved.image_id != *image_id
        || saved.size != index.size
        || saved.chunk_size != index.chunk_size
        || saved.bits.len() != words
    {
        log::warn!(
            "discarding image cache bitmap {}: made for another image",
            present_path.display()
        );
        return None;
    }
    Some(saved)
}

/// Gives the data file the image's size, emptying it first unless `saved` (still
/// matching the file's size) says what in it is valid; returns the presence bits.
fn size_data(
    data: &File,
    data_path: &Path,
    present_path: &Path,
    index: &ImageIndex,
    mut saved: Option<PresentFile>,
) -> Result<Vec<AtomicU64>> {
    let len = data.metadata().map_err(io_err("stat", data_path))?.len();
    if saved.is_some() && len != index.size {
        log::warn!(
            "discarding image cache bitmap {}: the data file changed size",
            present_path.display()
        );
        saved = None;
    }
    if saved.is_none() && len != 0 {
        // Nothing in it is known to be valid: drop the old blocks.
        data.set_len(0).map_err(io_err("truncate", data_path))?;
    }
    if len != index.size || saved.is_none() {
        data.set_len(index.size)
            .map_err(io_err("resize", data_path))?;
    }
    let words = index.chunk_count().div_ceil(64);
    Ok(match saved {
        Some(p) => p.bits.into_iter().map(AtomicU64::new).collect(),
        None => (0..words).map(|_| AtomicU64::new(0)).collect(),
    })
}

/// The cached chunks in index order (the eviction order of chunks found at open), and
/// their bytes.
fn cached_in_index_order(bits: &[AtomicU64], index: &ImageIndex) -> (VecDeque<u32>, u64) {
    let mut queue = VecDeque::new();
    let mut bytes = 0;
    for idx in 0..index.chunk_count() {
        if bits[idx / 64].load(Ordering::Relaxed) & (1 << (idx % 64)) != 0 {
            queue.push_back(idx as u32);
            bytes += index.chunk_len(idx) as u64;
        }
    }
    (queue, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageEntry;
    use crate::store::ChunkId;
    use crate::util::testutil::TempDir;

    fn index(chunks: usize) -> ImageIndex {
        ImageIndex {
            size: chunks as u64 * 4096 - 512,
            chunk_size: 4096,
            entries: (0..chunks)
                .map(|i| ImageEntry::Chunk(ChunkId::of(&i.to_le_bytes())))
                .collect(),
        }
    }

    fn chunk(i: usize, len: usize) -> Vec<u8> {
        vec![i as u8 + 1; len]
    }

    #[test]
    fn survives_reopen_and_refuses_sharing() {
        let dir = TempDir::new("cache-reopen");
        let idx = index(10);
        let id = idx.id();
        {
            let c = ChunkCache::open(dir.path(), &idx, &id, None).unwrap();
            assert!(matches!(
                ChunkCache::open(dir.path(), &idx, &id, None),
                Err(CacheError::Busy { .. })
            ));
            let mut b = [0u8; 8];
            assert!(!c.read(3, 0, &mut b).unwrap());
            c.insert(3, &chunk(3, 4096)).unwrap();
            c.insert(9, &chunk(9, 3584)).unwrap();
            c.insert(8, &[1; 5]).unwrap(); // wrong length: ignored
            assert!(c.read(3, 100, &mut b).unwrap());
            assert_eq!(b, [4; 8]);
            assert_eq!(c.stats().chunks, 2);
        }
        let c = ChunkCache::open(dir.path(), &idx, &id, None).unwrap();
        assert!(c.contains(3) && c.contains(9) && !c.contains(8));
        let mut b = [0u8; 4];
        assert!(c.read(9, 3580, &mut b).unwrap());
        assert_eq!(b, [10; 4]);
        drop(c);
        // A corrupt bitmap starts the cache afresh.
        let present = dir.path().join(id.to_hex()).join("present");
        let mut bytes = std::fs::read(&present).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(&present, bytes).unwrap();
        let c = ChunkCache::open(dir.path(), &idx, &id, None).unwrap();
        assert_eq!(c.stats().chunks, 0);
    }

    #[test]
    fn size_limit_evicts_oldest() {
        let dir = TempDir::new("cache-evict");
        let idx = index(10);
        let id = idx.id();
        let c = ChunkCache::open(dir.path(), &idx, &id, Some(4 * 4096)).unwrap();
        for i in 0..6 {
            c.insert(i, &chunk(i, 4096)).unwrap();
        }
        let st = c.stats();
        assert!(st.bytes <= 4 * 4096, "{st:?}");
        assert!(st.evicted >= 2, "{st:?}");
        assert!(!c.contains(0) && c.contains(5));
        let mut b = [0u8; 2];
        assert!(c.read(5, 0, &mut b).unwrap());
        assert_eq!(b, [6; 2]);
        drop(c);
        // Reopening with a smaller limit evicts at open.
        let c = ChunkCache::open(dir.path(), &idx, &id, Some(4096)).unwrap();
        assert!(c.stats().bytes <= 4096);
        // A chunk bigger than the limit is not cached.
        let c2 = {
            drop(c);
            ChunkCache::open(dir.path(), &idx, &id, Some(100)).unwrap()
        };
        c2.insert(7, &chunk(7, 4096)).unwrap();
        assert!(!c2.contains(7));
    }
}
