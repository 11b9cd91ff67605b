//! Capturing a copy-on-write overlay's content into a chunk store for a snapshot, and
//! materialising it again as an overlay on restore.
//!
//! A capture lists, for every [`CAPTURE_CHUNK_SIZE`] span of the overlay's data file that
//! holds at least one overlay block, the content-addressed chunk of that span (blocks not
//! in the overlay read as zeros inside it), plus the overlay's block bitmap. All-zero
//! spans are not stored. An incremental capture re-reads only the spans written since
//! the parent capture ([`OverlayBackend::touched`]) and copies the other entries.
//!
//! On restore, [`prepare`] makes the overlay file at the configured path hold exactly
//! the captured content: an existing overlay that already does is kept as is (the
//! usual case of restoring the snapshot a VM just took); one that differs is moved
//! aside to `FILE.pre-restore-<unix time>` (with its map), never deleted; then the
//! captured content is written to a new data file and map.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::BackendIdentity;
use super::overlay::{CAPTURE_CHUNK_SIZE, OverlayBackend, OverlayMap, map_path};
use crate::formats::MAP_KIND;
use crate::formats::file::{self, StateFileError};
use crate::store::{ChunkId, ChunkRead, ChunkWrite, PutOutcome, StoreError};
use crate::util::IoError;

/// An overlay's content at snapshot time: which blocks it held and their bytes, as
/// content-addressed chunks of `chunk_size` bytes of the overlay's data file.
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

/// Errors of capturing or materialising an overlay.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading or writing an overlay file failed.
    #[error("overlay")]
    Io(#[from] IoError),
    /// The chunk store failed.
    #[error("overlay chunk store")]
    Store(#[source] StoreError),
    /// The overlay map could not be read or written.
    #[error("overlay map {}", path.display())]
    Map {
        /// The map file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StateFileError,
    },
    /// The captured manifest is inconsistent (corrupt snapshot).
    #[error("captured overlay is invalid: {0}")]
    Invalid(String),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, CaptureError>;

/// What a capture did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CaptureStats {
    /// Spans holding overlay blocks.
    pub chunks_total: u64,
    /// Spans whose entry was copied from the parent capture unread.
    pub chunks_reused: u64,
    /// Spans read and hashed.
    pub chunks_read: u64,
    /// Chunks newly written to the store.
    pub chunks_new: u64,
    /// Bytes the store used for the new chunks.
    pub bytes_written: u64,
}

fn chunk_size_for(block: u32) -> u32 {
    CAPTURE_CHUNK_SIZE.max(block)
}

fn bit(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

impl OverlayManifest {
    /// Checks the manifest's fields against each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CaptureError::Invalid(m));
        if !self.block_size.is_power_of_two() || !(512..=1 << 20).contains(&self.block_size) {
            return bad(format!("block size {}", self.block_size));
        }
        if self.chunk_size != chunk_size_for(self.block_size) {
            return bad(format!("chunk size {}", self.chunk_size));
        }
        let blocks = self.disk_size.div_ceil(u64::from(self.block_size));
        if self.bitmap.len() as u64 != blocks.div_ceil(64) {
            return bad(format!("bitmap of {} words", self.bitmap.len()));
        }
        let chunks = self.disk_size.div_ceil(u64::from(self.chunk_size));
        let mut prev = None;
        for (c, _) in &self.chunks {
            if *c >= chunks || prev.is_some_and(|p| p >= *c) {
                return bad(format!("chunk index {c} out of order or range"));
            }
            prev = Some(*c);
        }
        Ok(())
    }

    /// Bytes of the disk held by the overlay.
    pub fn overlay_bytes(&self) -> u64 {
        let blocks: u64 = self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        (blocks * u64::from(self.block_size)).min(self.disk_size)
    }
}

/// A view of an overlay's data for capturing: its geometry, bitmap and raw data reads.
struct Source<'a> {
    disk_size: u64,
    block: u32,
    bitmap: Vec<u64>,
    read: &'a dyn Fn(&mut [u8], u64) -> io::Result<()>,
    path: &'a Path,
}

/// Reads span `c` into `buf` (resized to the span), zeroing blocks not in the overlay;
/// returns false if the span holds no overlay block.
fn read_span(src: &Source<'_>, chunk: u64, c: u64, buf: &mut Vec<u8>) -> Result<bool> {
    let start = c * chunk;
    let end = (start + chunk).min(src.disk_size);
    let block = u64::from(src.block);
    let (first, last) = (start / block, (end - 1) / block);
    if !(first..=last).any(|b| bit(&src.bitmap, b)) {
        return Ok(false);
    }
    buf.resize((end - start) as usize, 0);
    (src.read)(buf, start).map_err(io_at("read", src.path))?;
    for b in first..=last {
        if !bit(&src.bitmap, b) {
            let lo = (b * block - start) as usize;
            let hi = (((b + 1) * block).min(end) - start) as usize;
            buf[lo..hi].fill(0);
        }
    }
    Ok(true)
}

/// Captures `overlay` into `store`. With `parent` (the capture this overlay's
/// [`touched`](OverlayBackend::touched) bits are relative to), spans not written since
/// are copied from it. Returns the manifest, the touched bits it consumed (clear them
/// with [`OverlayBackend::clear_touched`] once the snapshot is durable) and counts.
///
/// The overlay must be flushed and receive no writes meanwhile (the VM is paused).
/// Chunks are synced to the store before it returns.
pub fn capture(
    overlay: &OverlayBackend,
    store: &dyn ChunkWrite,
    parent: Option<&OverlayManifest>,
) -> Result<(OverlayManifest, Vec<u64>, CaptureStats)> {
    let touched = overlay.touched();
    let read = |buf: &mut [u8], off: u64| overlay.read_data(buf, off);
    let src = Source {
        disk_size: super::BlockBackend::size(overlay),
        block: overlay.block_size(),
        bitmap: overlay.bitmap(),
        read: &read,
        path: overlay.path(),
    };
    let chunk = chunk_size_for(src.block);
    let parent = parent.filter(|p| {
        p.disk_size == src.disk_size && p.block_size == src.block && p.chunk_size == chunk
    });
    let reuse: Option<HashMap<u64, ChunkId>> = parent.map(|p| p.chunks.iter().copied().collect());
    let spans_per_chunk = u64::from(chunk / CAPTURE_CHUNK_SIZE);
    let mut stats = CaptureStats::default();
    let mut chunks = Vec::new();
    let mut buf = Vec::new();
    let n = src.disk_size.div_ceil(u64::from(chunk));
    for c in 0..n {
        let dirty = (c * spans_per_chunk..(c + 1) * spans_per_chunk).any(|s| bit(&touched, s));
        if let (Some(map), false) = (&reuse, dirty) {
            let block = u64::from(src.block);
            let start = c * u64::from(chunk);
            let end = (start + u64::from(chunk)).min(src.disk_size);
            if (start / block..=(end - 1) / block).any(|b| bit(&src.bitmap, b)) {
                stats.chunks_total += 1;
                stats.chunks_reused += 1;
                if let Some(id) = map.get(&c) {
                    chunks.push((c, *id));
                }
            }
            continue;
        }
        if !read_span(&src, u64::from(chunk), c, &mut buf)? {
            continue;
        }
        stats.chunks_total += 1;
        stats.chunks_read += 1;
        if buf.iter().all(|&b| b == 0) {
            continue;
        }
        let id = ChunkId::of(&buf);
        if let PutOutcome::Written { stored_bytes } =
            store.put_hashed(&id, &buf).map_err(CaptureError::Store)?
        {
            stats.chunks_new += 1;
            stats.bytes_written += stored_bytes;
        }
        chunks.push((c, id));
    }
    store.sync().map_err(CaptureError::Store)?;
    let manifest = OverlayManifest {
        disk_size: src.disk_size,
        block_size: src.block,
        chunk_size: chunk,
        bitmap: src.bitmap,
        chunks,
    };
    Ok((manifest, touched, stats))
}

/// Whether the overlay files at `path` hold exactly `want` (same bitmap, same bytes).
fn holds(path: &Path, map: &OverlayMap, want: &OverlayManifest) -> Result<bool> {
    if map.size != want.disk_size || map.block_size != want.block_size || map.bits != want.bitmap {
        return Ok(false);
    }
    let data = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(want.chunks.is_empty()),
        Err(source) => {
            return Err(io_at("open", path)(source));
        }
    };
    let read = |buf: &mut [u8], off: u64| data.read_exact_at(buf, off);
    let src = Source {
        disk_size: map.size,
        block: map.block_size,
        bitmap: map.bits.clone(),
        read: &read,
        path,
    };
    let want_ids: HashMap<u64, ChunkId> = want.chunks.iter().copied().collect();
    let mut buf = Vec::new();
    for c in 0..map.size.div_ceil(u64::from(want.chunk_size)) {
        let id = if read_span(&src, u64::from(want.chunk_size), c, &mut buf)?
            && buf.iter().any(|&b| b != 0)
        {
            Some(ChunkId::of(&buf))
        } else {
            None
        };
        if id != want_ids.get(&c).copied() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What [`prepare`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The overlay at the path already held the captured content.
    Kept,
    /// The captured content was written; a differing overlay was moved to the path given.
    Written {
        /// Where the previous overlay data file went, if there was one.
        moved_aside: Option<PathBuf>,
    },
}

fn io_at(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CaptureError + use<> {
    crate::util::io_err(op, path)
}

/// Moves an existing overlay at `path` (data file and map `map_file`) to
/// `path.pre-restore-T` (and `.map`); returns where the data file went, if it existed.
fn move_aside(path: &Path, map_file: &Path) -> Result<Option<PathBuf>> {
    let exists = |p: &Path| p.try_exists().map_err(io_at("stat", p));
    let mut moved_aside = None;
    if exists(map_file)? || exists(path)? {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = |p: &Path| {
            let mut s = p.as_os_str().to_owned();
            s.push(format!(".pre-restore-{stamp}"));
            PathBuf::from(s)
        };
        if exists(path)? {
            let to = aside(path);
            std::fs::rename(path, &to).map_err(io_at("move aside", path))?;
            log::warn!(
                "overlay {} differs from the snapshot's: moved to {}",
                path.display(),
                to.display()
            );
            moved_aside = Some(to);
        }
        if exists(map_file)? {
            // `FILE.pre-restore-T.map`: the moved overlay stays openable as is.
            std::fs::rename(map_file, map_path(&aside(path)))
                .map_err(io_at("move aside", map_file))?;
        }
    }
    Ok(moved_aside)
}

/// Writes the captured chunks of `want` (from `store`, verified) into the data file
/// `path`: under a temp name, fsynced, renamed into place. The map is written after it,
/// so a crash in between leaves a data file without a map, which opening reports as
/// incomplete.
fn write_data(path: &Path, want: &OverlayManifest, store: &dyn ChunkRead) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".restore-tmp");
    let tmp = PathBuf::from(tmp);
    let data = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_at("create", &tmp))?;
    data.set_len(want.disk_size)
        .map_err(io_at("resize", &tmp))?;
    let chunk = u64::from(want.chunk_size);
    let mut buf = Vec::new();
    for (c, id) in &want.chunks {
        let start = c * chunk;
        buf.resize(((start + chunk).min(want.disk_size) - start) as usize, 0);
        store.get_into(id, &mut buf).map_err(CaptureError::Store)?;
        data.write_all_at(&buf, start)
            .map_err(io_at("write", &tmp))?;
    }
    data.sync_all().map_err(io_at("fsync", &tmp))?;
    drop(data);
    std::fs::rename(&tmp, path).map_err(io_at("rename", &tmp))
}

/// Makes the overlay at `path` (data file; its map is `path.map`) hold the captured
/// content `want` over a base whose identity is `base` (see the module documentation).
/// Chunks come from `store`, verified.
pub fn prepare(
    path: &Path,
    base: &BackendIdentity,
    want: &OverlayManifest,
    store: &dyn ChunkRead,
) -> Result<Prepared> {
    want.validate()?;
    if want.disk_size != base.size {
        return Err(CaptureError::Invalid(format!(
            "captured for a {}-byte disk, the base is {} bytes",
            want.disk_size, base.size
        )));
    }
    let map_file = map_path(path);
    let exists = |p: &Path| p.try_exists().map_err(io_at("stat", p));
    if exists(&map_file)? {
        let map: Option<OverlayMap> = file::read_file(&map_file, &MAP_KIND).ok();
        if let Some(map) = &map
            && holds(path, map, want)?
        {
            return Ok(Prepared::Kept);
        }
    }
    let moved_aside = move_aside(path, &map_file)?;
    write_data(path, want, store)?;
    let map = OverlayMap {
        size: want.disk_size,
        block_size: want.block_size,
        base: base.clone(),
        bits: want.bitmap.clone(),
    };
    file::write_file(&map_file, &MAP_KIND, &map).map_err(|source| CaptureError::Map {
        path: map_file.clone(),
        source,
    })?;
    Ok(Prepared::Written { moved_aside })
}

#[cfg(test)]
#[path = "overlay_capture_tests.rs"]
mod tests;
