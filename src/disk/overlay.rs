//! [`OverlayBackend`]: a persistent copy-on-write overlay over any (usually read-only) disk.
//!
//! Two files:
//!
//! ```text
//! FILE       sparse data file of the disk's size; block i at i * block_size
//! FILE.map   map (checksummed container, kind VMMOVLY\0): disk size, block size,
//!            identity of the base disk, bitmap of blocks held in FILE
//! ```
//!
//! Reads take written blocks from `FILE` and the rest from the base. A write covering a
//! block partially, whose block is not yet in the overlay, first copies the block from the
//! base (read-modify-write). Blocks are [`DEFAULT_BLOCK_SIZE`] (4 KiB) for new overlays.
//!
//! Crash semantics (those of a disk with a volatile write cache): data goes to `FILE` first,
//! then its bits are set in memory. [`flush`](BlockBackend::flush) takes the bits, fsyncs
//! `FILE`, then replaces `FILE.map` atomically (temp file, fsync, rename, directory fsync).
//! So every block the map names is durable; writes not yet flushed may be lost on a crash
//! (a block already in the overlay may then hold old, new or mixed bytes, as on a real
//! disk). A new overlay writes its (empty) map before creating `FILE`, so an interrupted
//! creation is completed on the next open.
//!
//! The map records the base's identity: an overlay opened over another disk (other kind or
//! size, other content stamp — for a remote image, its image id — or, without stamps, other
//! location) is refused. The data file is locked (`flock`) while open.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;

use super::{BackendIdentity, BlockBackend, DiskError, check_range};
use crate::formats::MAP_KIND;
use crate::formats::file::{self, StateFileError};
use crate::util::{IoError, lock};

/// Chunk size of captured overlays (`overlay_capture`): 64 KiB, like guest memory (or the
/// overlay's block size when that is larger); an overlay tracks the spans written since
/// its last capture in these units.
pub const CAPTURE_CHUNK_SIZE: u32 = 64 << 10;

/// Block size of new overlays: the copy-on-write granularity.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// Errors of opening an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A file operation failed.
    #[error("overlay")]
    Io(#[from] IoError),
    /// The map file is unreadable or corrupt.
    #[error("overlay map {}", path.display())]
    Map {
        /// The map file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: StateFileError,
    },
    /// The map decoded but its fields are inconsistent.
    #[error("overlay map {}: {reason}", path.display())]
    BadMap {
        /// The map file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The data file exists without its map (or the map names blocks but the data is gone).
    #[error(
        "overlay {} is incomplete: {reason}; remove {} and {} to start a new overlay",
        path.display(), path.display(), map.display()
    )]
    Incomplete {
        /// The data file.
        path: PathBuf,
        /// The map file.
        map: PathBuf,
        /// What is missing.
        reason: &'static str,
    },
    /// The overlay was made over another base disk.
    #[error("overlay {} was created over {expected}, not over {found}", path.display())]
    BaseMismatch {
        /// The overlay data file.
        path: PathBuf,
        /// The base recorded in the map.
        expected: Box<BackendIdentity>,
        /// The base given now.
        found: Box<BackendIdentity>,
    },
    /// Another process has the overlay open.
    #[error("overlay {} is in use by another process", path.display())]
    Busy {
        /// The overlay data file.
        path: PathBuf,
    },
}

/// Result type of opening an overlay.
pub type Result<T> = std::result::Result<T, OverlayError>;

/// Contents of `FILE.map`.
#[derive(Serialize, Deserialize)]
pub(crate) struct OverlayMap {
    pub(crate) size: u64,
    pub(crate) block_size: u32,
    pub(crate) base: BackendIdentity,
    pub(crate) bits: Vec<u64>,
}

/// A persistent copy-on-write overlay (see the module documentation).
pub struct OverlayBackend {
    base: Arc<dyn BlockBackend>,
    base_identity: BackendIdentity,
    path: PathBuf,
    map_path: PathBuf,
    data: File,
    size: u64,
    block: u64,
    bits: Vec<AtomicU64>,
    dirty: AtomicBool,
    /// One bit per [`CAPTURE_CHUNK_SIZE`] span written since the last
    /// [`clear_touched`](OverlayBackend::clear_touched): what an incremental capture re-reads.
    touched: Vec<AtomicU64>,
    /// Serializes writes (read-modify-write of partial blocks must not interleave).
    write_lock: Mutex<()>,
    /// Serializes flushes so the last map written is the newest.
    flush_lock: Mutex<()>,
}

impl std::fmt::Debug for OverlayBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayBackend")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

/// Path of the map file of overlay `path`: `path` with `.map` appended.
pub fn map_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".map");
    PathBuf::from(s)
}

/// Whether an overlay made over `saved` may be used over `now`.
fn same_base(saved: &BackendIdentity, now: &BackendIdentity) -> bool {
    saved.kind == now.kind
        && saved.size == now.size
        && match (&saved.stamp, &now.stamp) {
            (Some(a), Some(b)) => a == b,
            _ => saved.location == now.location,
        }
        && match (&saved.inner, &now.inner) {
            (None, None) => true,
            (Some(a), Some(b)) => same_base(a, b),
            _ => false,
        }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OverlayError + use<> {
    crate::util::io_err(op, path)
}

fn disk_io(op: &'static str) -> impl Fn(io::Error) -> DiskError {
    move |source| DiskError::Io { op, source }
}

/// Reads and checks the existing map of overlay `path` over a base of `size` bytes
/// identified by `base_identity`.
fn read_map(
    path: &Path,
    map_path: &Path,
    size: u64,
    base_identity: &BackendIdentity,
    data_exists: bool,
) -> Result<OverlayMap> {
    let map: OverlayMap =
        file::read_file(map_path, &MAP_KIND).map_err(|source| OverlayError::Map {
            path: map_path.to_path_buf(),
            source,
        })?;
    let bad = |reason: String| OverlayError::BadMap {
        path: map_path.to_path_buf(),
        reason,
    };
    if !map.block_size.is_power_of_two() || !(512..=1 << 20).contains(&map.block_size) {
        return Err(bad(format!("invalid block size {}", map.block_size)));
    }
    let words = map.size.div_ceil(u64::from(map.block_size)).div_ceil(64);
    if map.bits.len() as u64 != words {
        return Err(bad(format!(
            "bitmap of {} words for {} bytes in {}-byte blocks",
            map.bits.len(),
            map.size,
            map.block_size
        )));
    }
    if map.size != size || !same_base(&map.base, base_identity) {
        return Err(OverlayError::BaseMismatch {
            path: path.to_path_buf(),
            expected: Box::new(map.base),
            found: Box::new(base_identity.clone()),
        });
    }
    if !data_exists && map.bits.iter().any(|&w| w != 0) {
        return Err(OverlayError::Incomplete {
            path: path.to_path_buf(),
            map: map_path.to_path_buf(),
            reason: "the data file is missing",
        });
    }
    Ok(map)
}

/// Writes the empty map of a new overlay (default block size) over `base_identity`.
fn new_map(map_path: &Path, size: u64, base_identity: &BackendIdentity) -> Result<OverlayMap> {
    let block = u64::from(DEFAULT_BLOCK_SIZE);
    let map = OverlayMap {
        size,
        block_size: DEFAULT_BLOCK_SIZE,
        base: base_identity.clone(),
        bits: vec![0; size.div_ceil(block).div_ceil(64) as usize],
    };
    file::write_file(map_path, &MAP_KIND, &map).map_err(|source| OverlayError::Map {
        path: map_path.to_path_buf(),
        source,
    })?;
    Ok(map)
}

/// Opens (creating it) and locks the data file of overlay `path`, and gives it the
/// disk's `size` if it is shorter and holds nothing the map relies on.
fn open_data(path: &Path, size: u64, map: &OverlayMap) -> Result<File> {
    let data = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("open", path))?;
    match data.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(OverlayError::Busy { path: path.into() });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", path)(e)),
    }
    let len = data.metadata().map_err(io_err("stat", path))?.len();
    if len != size {
        if len > size || map.bits.iter().any(|&w| w != 0) && len != 0 {
            return Err(OverlayError::BadMap {
                path: path.to_path_buf(),
                reason: format!("data file is {len} bytes, the disk {size}"),
            });
        }
        data.set_len(size).map_err(io_err("resize", path))?;
        data.sync_all().map_err(io_err("fsync", path))?;
    }
    Ok(data)
}

impl OverlayBackend {
    /// Opens the overlay at `path` over `base`, creating it (with 4 KiB blocks) if neither
    /// `path` nor its map exists.
    pub fn open(path: &Path, base: Arc<dyn BlockBackend>) -> Result<Self> {
        let map_path = map_path(path);
        let base_identity = base.identity();
        let size = base.size();
        let exists = |p: &Path| p.try_exists().map_err(io_err("stat", p));
        let (data_exists, map_exists) = (exists(path)?, exists(&map_path)?);
        let map = if map_exists {
            read_map(path, &map_path, size, &base_identity, data_exists)?
        } else {
            if data_exists {
                return Err(OverlayError::Incomplete {
                    path: path.to_path_buf(),
                    map: map_path.clone(),
                    reason: "the map file is missing",
                });
            }
            new_map(&map_path, size, &base_identity)?
        };
        let data = open_data(path, size, &map)?;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(OverlayBackend {
            base,
            base_identity,
            map_path,
            path,
            data,
            size,
            block: u64::from(map.block_size),
            bits: map.bits.into_iter().map(AtomicU64::new).collect(),
            dirty: AtomicBool::new(false),
            touched: (0..size.div_ceil(u64::from(CAPTURE_CHUNK_SIZE)).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            write_lock: Mutex::new(()),
            flush_lock: Mutex::new(()),
        })
    }

    /// The overlay data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The base disk.
    pub fn base(&self) -> &Arc<dyn BlockBackend> {
        &self.base
    }

    /// Bytes of the disk held in the overlay (written blocks).
    pub fn written_bytes(&self) -> u64 {
        let blocks: u64 = self
            .bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        (blocks * self.block).min(self.size)
    }

    /// Copy-on-write block size.
    pub fn block_size(&self) -> u32 {
        self.block as u32
    }

    /// The bitmap of blocks held in the overlay (bit `b % 64` of word `b / 64`).
    pub fn bitmap(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Reads the overlay's data file (not merged with the base) at `offset`.
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.data.read_exact_at(buf, offset)
    }

    /// Bitmap of the [`CAPTURE_CHUNK_SIZE`] spans written since the last
    /// [`clear_touched`](Self::clear_touched) (or since opening).
    pub fn touched(&self) -> Vec<u64> {
        self.touched
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// Clears the given bits of [`touched`](Self::touched), once a capture that read
    /// those spans is durable.
    pub fn clear_touched(&self, bits: &[u64]) {
        for (w, b) in self.touched.iter().zip(bits) {
            w.fetch_and(!b, Ordering::AcqRel);
        }
    }

    fn has(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    fn set(&self, b: u64) {
        self.bits[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::AcqRel);
    }

    /// End of block `b` (the last block may be short).
    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * self.block).min(self.size)
    }

    /// Writes `data` at `pos` inside block `b`, which is not in the overlay, merging it
    /// with the base's bytes of that block.
    fn merge_block(&self, b: u64, pos: u64, data: &[u8]) -> super::Result<()> {
        let start = b * self.block;
        let mut blk = vec![0u8; (self.block_end(b) - start) as usize];
        self.base.read_at(&mut blk, start)?;
        let skip = (pos - start) as usize;
        blk[skip..skip + data.len()].copy_from_slice(data);
        self.data
            .write_all_at(&blk, start)
            .map_err(disk_io("write"))
    }
}

impl BlockBackend for OverlayBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> super::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            // A run of blocks all in the overlay, or all not.
            let mut b = pos / self.block;
            let inside = self.has(b);
            let mut run_end = self.block_end(b).min(end);
            while run_end < end {
                b += 1;
                if self.has(b) != inside {
                    break;
                }
                run_end = self.block_end(b).min(end);
            }
            let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if inside {
                self.data.read_exact_at(out, pos).map_err(disk_io("read"))?;
            } else {
                self.base.read_at(out, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> super::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _w = lock(&self.write_lock);
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / self.block, (end - 1) / self.block);
        let (mut lo, mut hi) = (offset, end);
        // Partially covered edge blocks not yet in the overlay need the base's bytes.
        if (!offset.is_multiple_of(self.block) || end < self.block_end(first)) && !self.has(first) {
            let stop = self.block_end(first).min(end);
            self.merge_block(first, offset, &buf[..(stop - offset) as usize])?;
            lo = stop;
        }
        if lo < hi && last != first && end < self.block_end(last) && !self.has(last) {
            let start = last * self.block;
            self.merge_block(last, start, &buf[(start - offset) as usize..])?;
            hi = start;
        }
        if lo < hi {
            self.data
                .write_all_at(&buf[(lo - offset) as usize..(hi - offset) as usize], lo)
                .map_err(disk_io("write"))?;
        }
        for b in first..=last {
            self.set(b);
        }
        let span = u64::from(CAPTURE_CHUNK_SIZE);
        for c in first * self.block / span..=(self.block_end(last) - 1) / span {
            self.touched[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::AcqRel);
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Flushes the base (a remote disk persists its cache there), then makes the overlay's
    /// writes durable as described in the module documentation.
    fn flush(&self) -> super::Result<()> {
        self.base.flush()?;
        let _f = lock(&self.flush_lock);
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return self.data.sync_data().map_err(disk_io("flush"));
        }
        let bits: Vec<u64> = self
            .bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        let result = self
            .data
            .sync_data()
            .map_err(disk_io("flush"))
            .and_then(|()| {
                let map = OverlayMap {
                    size: self.size,
                    block_size: self.block as u32,
                    base: self.base_identity.clone(),
                    bits,
                };
                file::write_file(&self.map_path, &MAP_KIND, &map)
                    .map_err(|e| disk_io("flush")(io::Error::other(crate::util::error_chain(&e))))
            });
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    fn read_only(&self) -> bool {
        false
    }

    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            kind: "overlay".into(),
            location: self.path.display().to_string(),
            size: self.size,
            stamp: None,
            inner: Some(Box::new(self.base.identity())),
        }
    }
}

impl Drop for OverlayBackend {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::error!(
                "overlay {}: final flush failed: {}",
                self.path.display(),
                crate::util::error_chain(&e)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::MemBackend;
    use crate::util::testutil::{Rng, TempDir};

    fn base(size: usize, seed: u64) -> (Arc<dyn BlockBackend>, Vec<u8>) {
        let mut data = vec![0u8; size];
        Rng::new(seed).fill(&mut data);
        let b = MemBackend::from_vec(data.clone()).with_read_only(true);
        (Arc::new(b), data)
    }

    #[test]
    fn writes_merge_with_base_and_persist() {
        let dir = TempDir::new("overlay");
        let path = dir.path().join("ov");
        let (b, orig) = base(64 * 1024 + 1536, 3);
        let mut shadow = orig.clone();
        let mut rng = Rng::new(9);
        {
            let ov = OverlayBackend::open(&path, b.clone()).unwrap();
            for i in 0..200u64 {
                let off = (rng.next() % shadow.len() as u64) as usize;
                let len = ((rng.next() % 9000) as usize).min(shadow.len() - off);
                let data: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
                ov.write_at(&data, off as u64).unwrap();
                shadow[off..off + len].copy_from_slice(&data);
                let mut back = vec![0u8; len];
                ov.read_at(&mut back, off as u64).unwrap();
                assert_eq!(back, data);
            }
            // The last, short block.
            ov.write_at(&[7; 10], shadow.len() as u64 - 10).unwrap();
            shadow[orig.len() - 10..].fill(7);
            ov.flush().unwrap();
            assert!(OverlayBackend::open(&path, b.clone()).is_err(), "locked");
        }
        let ov = OverlayBackend::open(&path, b.clone()).unwrap();
        let mut all = vec![0u8; shadow.len()];
        ov.read_at(&mut all, 0).unwrap();
        assert!(all == shadow, "contents after reopen");
        let mut base_now = vec![0u8; orig.len()];
        b.read_at(&mut base_now, 0).unwrap();
        assert!(base_now == orig, "base untouched");
        let id = ov.identity();
        assert_eq!(id.kind, "overlay");
        assert_eq!(id.inner.as_deref(), Some(&b.identity()));
    }

    #[test]
    fn unflushed_writes_are_dropped_but_flushed_kept() {
        let dir = TempDir::new("overlay-crash");
        let path = dir.path().join("ov");
        let (b, orig) = base(16384, 4);
        let ov = OverlayBackend::open(&path, b.clone()).unwrap();
        ov.write_at(&[1; 4096], 0).unwrap();
        ov.flush().unwrap();
        ov.write_at(&[2; 4096], 8192).unwrap();
        // Simulate a crash: no final flush.
        std::mem::forget(ov);
        // The forgotten handle still holds the lock; a crash would release it. Reopen the
        // files by hand instead: the map must only name block 0.
        let map: OverlayMap = file::read_file(&map_path(&path), &MAP_KIND).unwrap();
        assert_eq!(map.bits, vec![1]);
        let _ = orig;
    }

    #[test]
    fn refuses_other_base_and_incomplete_files() {
        let dir = TempDir::new("overlay-bad");
        let path = dir.path().join("ov");
        let (b, _) = base(8192, 5);
        drop(OverlayBackend::open(&path, b).unwrap());
        let (other, _) = base(16384, 5);
        let e = OverlayBackend::open(&path, other).unwrap_err();
        assert!(matches!(e, OverlayError::BaseMismatch { .. }), "{e}");
        // Map without data and with no written block: creation is completed.
        std::fs::remove_file(&path).unwrap();
        let (b, _) = base(8192, 5);
        let ov = OverlayBackend::open(&path, b.clone()).unwrap();
        ov.write_at(&[1], 3).unwrap();
        drop(ov);
        std::fs::remove_file(&path).unwrap();
        let e = OverlayBackend::open(&path, b.clone()).unwrap_err();
        assert!(e.to_string().contains("data file is missing"), "{e}");
        std::fs::remove_file(map_path(&path)).unwrap();
        std::fs::write(&path, b"").unwrap();
        let e = OverlayBackend::open(&path, b.clone()).unwrap_err();
        assert!(e.to_string().contains("map file is missing"), "{e}");
        std::fs::remove_file(&path).unwrap();
        drop(OverlayBackend::open(&path, b.clone()).unwrap());
        std::fs::write(map_path(&path), b"garbage").unwrap();
        let e = OverlayBackend::open(&path, b).unwrap_err();
        assert!(matches!(e, OverlayError::Map { .. }), "{e}");
    }
}
