//! [`LazyHttpDisk`]: a read-only disk whose bytes are an image in an archive on a web
//! server, fetched chunk by chunk when first read.
//!
//! The URL names the image index: `http://HOST/ARCHIVE/images/NAME`; chunks are fetched from
//! `http://HOST/ARCHIVE/chunks/...` (and from mirrors: other archive base URLs) with an
//! [`HttpStore`], verified, and kept in the shared content-addressed chunk cache
//! ([`CachedStore`], `CACHE_DIR/chunks/chunks/xx/<id>`: the same cache archive memory uses, so
//! a chunk held by two images or by an image and a VM's memory is cached once). The cache
//! is bounded by [`LazyHttpOptions::cache_max_bytes`] (oldest chunks evicted first) and
//! may be shared by any number of processes. The last few chunks read are kept in memory,
//! so the small reads of one chunk verify it once. Zero chunks are never fetched. Writes
//! are refused: put an [`OverlayBackend`] on top for a writable disk.
//!
//! Prefetch: with [`LazyHttpOptions::record_prefetch`], the chunk indexes read (in first-read
//! order, each once) are written to a file at every flush and at drop; with
//! [`LazyHttpOptions::prefetch`] (or [`LazyHttpDisk::start_prefetch`]), such a list is
//! fetched into the cache by a background thread while the guest runs.
//!
//! [`OverlayBackend`]: super::overlay::OverlayBackend

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::overlay::{OverlayBackend, OverlayError};
use super::{BackendIdentity, BlockBackend, DiskError, check_range};
use crate::formats::file::{HEADER_LEN, TRAILER_LEN};
use crate::image::{self, ImageEntry, ImageId, ImageIndex};
use crate::store::ChunkRead;
use crate::store::cache::{CacheError, CachedStore};
use crate::store::http::{HttpError, HttpStats, HttpStore, HttpStoreOptions};
use crate::util::error_chain;
use crate::util::fs::write_atomic;
use crate::util::lock;

/// First line of a prefetch list file.
const PREFETCH_MAGIC: &str = "vmm-prefetch v1";
/// Largest prefetch list file read.
const MAX_PREFETCH_FILE: u64 = 64 << 20;
/// Number of striped fetch locks.
const FETCH_STRIPES: usize = 64;
/// Verified chunks kept in memory per disk (the last ones read).
const RECENT_CHUNKS: usize = 4;

/// Errors of remote disks.
#[derive(Debug, thiserror::Error)]
pub enum RemoteDiskError {
    /// The URL is not `http://HOST/.../images/NAME`.
    #[error("invalid image URL {url:?}: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A base or mirror URL was refused.
    #[error("invalid archive or mirror URL")]
    Http(#[source] HttpError),
    /// The index is not on the server.
    #[error("image index {url} not found on the server (HTTP 404)")]
    IndexNotFound {
        /// The index URL.
        url: String,
    },
    /// The index could not be fetched or is corrupt.
    #[error("cannot load image index {url}")]
    Index {
        /// The index URL.
        url: String,
        /// What went wrong.
        #[source]
        source: HttpError,
    },
    /// The local chunk cache could not be opened.
    #[error("cannot open the chunk cache")]
    Cache(#[source] CacheError),
    /// Fetching a chunk failed.
    #[error("cannot read chunk {idx} of {url}")]
    Fetch {
        /// The image URL.
        url: String,
        /// The chunk index in the image.
        idx: usize,
        /// What went wrong.
        #[source]
        source: HttpError,
    },
    /// The overlay over the remote image could not be opened.
    #[error("cannot open the overlay of {url}")]
    Overlay {
        /// The image URL.
        url: String,
        /// What went wrong.
        #[source]
        source: OverlayError,
    },
    /// A prefetch list file is unreadable, malformed or for another image.
    #[error("prefetch list {}: {reason}", path.display())]
    Prefetch {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Options of [`LazyHttpDisk::open`].
#[derive(Clone, Debug, Default)]
pub struct LazyHttpOptions {
    /// Cache root directory (chunks in `DIR/chunks/`, shared with every image and with
    /// archive memory); `None` = [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Size limit of the whole shared chunk cache in bytes, kept by this disk's writes
    /// to it; `None` = no limit.
    pub cache_max_bytes: Option<u64>,
    /// HTTP options, mirrors (archive base URLs) included.
    pub http: HttpStoreOptions,
    /// Record the chunks read into this file (written at flush and drop).
    pub record_prefetch: Option<PathBuf>,
    /// Fetch the chunks listed in this file (made by `record_prefetch`) in the background,
    /// if the file exists and was recorded for the same image.
    pub prefetch: Option<PathBuf>,
}

/// The default cache root: [`crate::store::cache::default_cache_root`]
/// (`$XDG_CACHE_HOME/vmm`, else `$HOME/.cache/vmm`, else `<tmp>/vmm-cache`).
pub fn default_cache_dir() -> PathBuf {
    crate::store::cache::default_cache_root()
}

/// Opens the remote image at `url` and, with `overlay`, a persistent copy-on-write overlay
/// (file `overlay` plus `overlay.map`) on top of it: what `--block url=...,overlay=FILE`
/// attaches. Returns the remote disk (for [`LazyHttpDisk::stats`]) and the backend to give
/// the guest: the overlay, or the read-only remote disk itself without one.
pub fn open_remote_disk(
    url: &str,
    opts: LazyHttpOptions,
    overlay: Option<&Path>,
) -> Result<(Arc<LazyHttpDisk>, Arc<dyn BlockBackend>), RemoteDiskError> {
    let remote = Arc::new(LazyHttpDisk::open(url, opts)?);
    let top: Arc<dyn BlockBackend> = match overlay {
        Some(path) => Arc::new(
            OverlayBackend::open(path, remote.clone() as Arc<dyn BlockBackend>).map_err(
                |source| RemoteDiskError::Overlay {
                    url: remote.url().to_string(),
                    source,
                },
            )?,
        ),
        None => remote.clone(),
    };
    Ok((remote, top))
}

/// Splits `http://HOST/ARCHIVE/images/NAME` into the archive base URL and the image name.
pub fn split_image_url(url: &str) -> Result<(String, String), RemoteDiskError> {
    let bad = |reason: &str| RemoteDiskError::BadUrl {
        url: url.into(),
        reason: reason.into(),
    };
    let Some(pos) = url.rfind("/images/") else {
        return Err(bad("expected http://HOST/ARCHIVE/images/NAME"));
    };
    let (base, name) = (&url[..pos], &url[pos + "/images/".len()..]);
    image::check_name(name).map_err(|e| bad(&e.to_string()))?;
    let base = crate::store::http::normalize_base(base).map_err(|e| bad(&e.to_string()))?;
    Ok((base, name.into()))
}

/// Running totals of a [`LazyHttpDisk`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteDiskStats {
    /// HTTP traffic (bytes fetched, requests, retries, ...), the index included.
    pub http: HttpStats,
    /// This disk's use of the chunk cache.
    pub cache: RemoteCacheStats,
    /// Bytes the guest read.
    pub bytes_read: u64,
    /// Chunks fetched for guest reads.
    pub chunks_fetched: u64,
    /// Chunks fetched by prefetch.
    pub chunks_prefetched: u64,
    /// Failed chunk reads.
    pub read_errors: u64,
}

/// A remote disk's use of the shared chunk cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteCacheStats {
    /// Distinct chunks of this image found in the cache when the disk was opened.
    pub chunks: u64,
    /// Chunk loads served by the cache.
    pub hits: u64,
    /// Chunk loads that missed it (then fetched).
    pub misses: u64,
    /// Chunks this disk's writes evicted from the cache (oldest first).
    pub evicted: u64,
}

struct Recorder {
    path: PathBuf,
    /// (seen bitmap, indexes in first-read order).
    seen: Mutex<(Vec<u64>, Vec<u32>)>,
    dirty: AtomicBool,
}

struct Inner {
    url: String,
    index: ImageIndex,
    image_id: ImageId,
    store: Arc<HttpStore>,
    cache: CachedStore,
    /// Distinct chunks of the image cached at open.
    cached_at_open: u64,
    /// The last chunks loaded (index, verified bytes), newest last.
    recent: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
    hits: AtomicU64,
    misses: AtomicU64,
    recorder: Option<Recorder>,
    stop: AtomicBool,
    /// Striped locks held while a chunk is fetched and cached, so two readers of one
    /// uncached chunk make one fetch (the second finds it in the cache).
    fetch_locks: [Mutex<()>; FETCH_STRIPES],
    bytes_read: AtomicU64,
    chunks_fetched: AtomicU64,
    chunks_prefetched: AtomicU64,
    read_errors: AtomicU64,
}

/// A lazily fetched, verified, cached remote image (see the module documentation).
pub struct LazyHttpDisk {
    inner: Arc<Inner>,
    prefetch: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyHttpDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyHttpDisk")
            .field("url", &self.inner.url)
            .field("image_id", &self.inner.image_id)
            .finish_non_exhaustive()
    }
}

impl LazyHttpDisk {
    /// Opens the image at `url` (`http://HOST/ARCHIVE/images/NAME`): fetches and checks its
    /// index (a missing, truncated or corrupt index is an error here), opens the cache, and
    /// starts the prefetch named in `opts`, if any.
    pub fn open(url: &str, opts: LazyHttpOptions) -> Result<Self, RemoteDiskError> {
        let (base, name) = split_image_url(url)?;
        let url = format!("{base}/images/{name}");
        let store =
            Arc::new(HttpStore::new(&base, opts.http.clone()).map_err(RemoteDiskError::Http)?);
        let max = (HEADER_LEN + TRAILER_LEN) as u64 + crate::formats::INDEX_KIND.max_payload;
        let t = Instant::now();
        let index = store
            .fetch_with(&format!("images/{name}"), max, |u, bytes| {
                ImageIndex::decode(&bytes).map_err(|e| HttpError::Invalid {
                    url: u.into(),
                    reason: error_chain(&e),
                })
            })
            .map_err(|source| {
                if source.is_not_found() {
                    RemoteDiskError::IndexNotFound { url: url.clone() }
                } else {
                    RemoteDiskError::Index {
                        url: url.clone(),
                        source,
                    }
                }
            })?;
        let image_id = index.id();
        let cache_root = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
        let cache = CachedStore::with_limit(
            Arc::clone(&store) as Arc<dyn ChunkRead>,
            Some(&cache_root.join("chunks")),
            opts.cache_max_bytes,
        )
        .map_err(RemoteDiskError::Cache)?;
        let cached_at_open = count_cached(&cache, &index);
        log::info!(
            "remote disk {url}: {} bytes in {} chunks of {} KiB, image id {image_id}, index fetched in {} ms, cache {} ({cached_at_open} chunks cached)",
            index.size,
            index.chunk_count(),
            index.chunk_size >> 10,
            t.elapsed().as_millis(),
            cache_root.display(),
        );
        let recorder = opts.record_prefetch.as_ref().map(|p| Recorder {
            path: p.clone(),
            seen: Mutex::new((vec![0; index.chunk_count().div_ceil(64)], Vec::new())),
            dirty: AtomicBool::new(true),
        });
        let disk = LazyHttpDisk {
            inner: Arc::new(Inner {
                url,
                index,
                image_id,
                store,
                cache,
                cached_at_open,
                recent: Mutex::new(VecDeque::new()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                recorder,
                stop: AtomicBool::new(false),
                fetch_locks: std::array::from_fn(|_| Mutex::new(())),
                bytes_read: AtomicU64::new(0),
                chunks_fetched: AtomicU64::new(0),
                chunks_prefetched: AtomicU64::new(0),
                read_errors: AtomicU64::new(0),
            }),
            prefetch: Mutex::new(None),
        };
        if let Some(p) = opts.prefetch.as_deref().filter(|p| p.exists()) {
            match read_prefetch_list(p, &image_id) {
                Ok(list) => disk.start_prefetch(list),
                Err(e) => log::warn!("not prefetching: {}", error_chain(&e)),
            }
        }
        Ok(disk)
    }

    /// The image index URL.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The image's content id (the cache key).
    pub fn image_id(&self) -> ImageId {
        self.inner.image_id
    }

    /// The image index.
    pub fn index(&self) -> &ImageIndex {
        &self.inner.index
    }

    /// Totals since open.
    pub fn stats(&self) -> RemoteDiskStats {
        let i = &self.inner;
        RemoteDiskStats {
            http: i.store.stats(),
            cache: RemoteCacheStats {
                chunks: i.cached_at_open,
                hits: i.hits.load(Ordering::Relaxed),
                misses: i.misses.load(Ordering::Relaxed),
                evicted: i.cache.stats().evicted,
            },
            bytes_read: i.bytes_read.load(Ordering::Relaxed),
            chunks_fetched: i.chunks_fetched.load(Ordering::Relaxed),
            chunks_prefetched: i.chunks_prefetched.load(Ordering::Relaxed),
            read_errors: i.read_errors.load(Ordering::Relaxed),
        }
    }

    /// Starts a background thread fetching the chunks at `list` (chunk indexes) into the
    /// cache, skipping zero and cached chunks. It stops at the first failure, when the
    /// disk is dropped, or when a new prefetch is started (which waits for it).
    pub fn start_prefetch(&self, list: Vec<u32>) {
        let mut slot = lock(&self.prefetch);
        if let Some(h) = slot.take() {
            self.inner.stop.store(true, Ordering::Release);
            let _ = h.join();
            self.inner.stop.store(false, Ordering::Release);
        }
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("vmm-prefetch".into())
            .spawn(move || inner.prefetch(&list));
        match spawned {
            Ok(h) => *slot = Some(h),
            Err(e) => log::warn!("cannot start the prefetch thread: {e}"),
        }
    }

    /// Waits for the running prefetch, if any, to finish.
    pub fn wait_prefetch(&self) {
        if let Some(h) = lock(&self.prefetch).take() {
            let _ = h.join();
        }
    }

    /// Writes the recorded prefetch list now (done by flush and drop too).
    pub fn save_prefetch_record(&self) -> Result<(), RemoteDiskError> {
        self.inner.save_record()
    }
}

impl Inner {
    fn prefetch(&self, list: &[u32]) {
        let t = Instant::now();
        let mut fetched = 0u64;
        for &idx in list {
            let idx = idx as usize;
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let Some(ImageEntry::Chunk(id)) = self.index.entries.get(idx) else {
                continue;
            };
            let _stripe = lock(&self.fetch_locks[idx % FETCH_STRIPES]);
            if self.cache.is_cached(id) {
                continue;
            }
            match self.store.fetch_chunk(id, Some(self.index.chunk_len(idx))) {
                Ok(data) => {
                    self.cache.insert(id, &data);
                    fetched += 1;
                    self.chunks_prefetched.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    log::warn!("prefetch of {} stopped: {}", self.url, error_chain(&e));
                    break;
                }
            }
        }
        log::info!(
            "prefetch of {}: {fetched} chunks fetched in {} ms",
            self.url,
            t.elapsed().as_millis()
        );
    }

    fn record(&self, idx: usize) {
        let Some(r) = &self.recorder else {
            return;
        };
        let mut seen = lock(&r.seen);
        let (bits, order) = &mut *seen;
        if bits[idx / 64] & (1 << (idx % 64)) == 0 {
            bits[idx / 64] |= 1 << (idx % 64);
            order.push(idx as u32);
            r.dirty.store(true, Ordering::Release);
        }
    }

    fn save_record(&self) -> Result<(), RemoteDiskError> {
        let Some(r) = &self.recorder else {
            return Ok(());
        };
        if !r.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let text = format_prefetch_list(&self.image_id, &lock(&r.seen).1);
        write_atomic(&r.path, text.as_bytes()).map_err(|e| {
            r.dirty.store(true, Ordering::Release);
            RemoteDiskError::Prefetch {
                path: r.path.clone(),
                reason: format!("cannot write: {}", error_chain(&e)),
            }
        })
    }

    /// Fills `out` from chunk `idx` starting `within` bytes into it.
    fn read_chunk(&self, idx: usize, within: usize, out: &mut [u8]) -> Result<(), RemoteDiskError> {
        let id = match self.index.entries[idx] {
            ImageEntry::Zero => {
                out.fill(0);
                return Ok(());
            }
            ImageEntry::Chunk(id) => id,
        };
        self.record(idx);
        let data = match self.recent(idx) {
            Some(d) => d,
            None => {
                let _stripe = lock(&self.fetch_locks[idx % FETCH_STRIPES]);
                // Another reader may have loaded it while this one waited for the stripe.
                match self.recent(idx) {
                    Some(d) => d,
                    None => self.load(idx, &id)?,
                }
            }
        };
        out.copy_from_slice(&data[within..within + out.len()]);
        Ok(())
    }

    /// Chunk `idx` if it is among the last loaded.
    fn recent(&self, idx: usize) -> Option<Arc<Vec<u8>>> {
        lock(&self.recent)
            .iter()
            .find(|(i, _)| *i == idx)
            .map(|(_, d)| Arc::clone(d))
    }

    /// Loads chunk `idx` (id `id`) from the cache, else fetches and caches it; keeps it
    /// among the recent ones. Called with the chunk's fetch stripe held.
    fn load(
        &self,
        idx: usize,
        id: &crate::store::ChunkId,
    ) -> Result<Arc<Vec<u8>>, RemoteDiskError> {
        let len = self.index.chunk_len(idx);
        let mut buf = vec![0u8; len];
        let data = if self.cache.lookup_into(id, &mut buf) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            Arc::new(buf)
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            let data =
                self.store
                    .fetch_chunk(id, Some(len))
                    .map_err(|source| RemoteDiskError::Fetch {
                        url: self.url.clone(),
                        idx,
                        source,
                    })?;
            self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
            self.cache.insert(id, &data);
            data
        };
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_CHUNKS {
            recent.pop_front();
        }
        recent.push_back((idx, Arc::clone(&data)));
        Ok(data)
    }
}

/// The distinct chunks of `index` present in `cache` (not verified).
fn count_cached(cache: &CachedStore, index: &ImageIndex) -> u64 {
    let mut seen = std::collections::HashSet::new();
    index
        .entries
        .iter()
        .filter_map(|e| match e {
            ImageEntry::Chunk(id) if seen.insert(*id) => Some(id),
            _ => None,
        })
        .filter(|id| cache.is_cached(id))
        .count() as u64
}

/// Reads a prefetch list written by a disk recording with
/// [`LazyHttpOptions::record_prefetch`]; it must have been recorded for image `image_id`.
pub fn read_prefetch_list(path: &Path, image_id: &ImageId) -> Result<Vec<u32>, RemoteDiskError> {
    use std::io::Read;
    let bad = |reason: String| RemoteDiskError::Prefetch {
        path: path.into(),
        reason,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PREFETCH_FILE).read_to_string(&mut text))
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    parse_prefetch_list(&text, image_id).map_err(bad)
}

/// Parses the text of a prefetch list file (see [`read_prefetch_list`]); the error is the
/// reason it is refused.
pub fn parse_prefetch_list(text: &str, image_id: &ImageId) -> Result<Vec<u32>, String> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("");
    let Some(id) = header.strip_prefix(PREFETCH_MAGIC).map(str::trim) else {
        return Err("not a prefetch list".into());
    };
    if id != image_id.to_hex() {
        return Err(format!(
            "recorded for image {id}, not for this image {image_id}"
        ));
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse::<u32>().map_err(|_| {
                format!(
                    "bad chunk index {:?}",
                    l.chars().take(40).collect::<String>()
                )
            })
        })
        .collect()
}

/// The text of a prefetch list file for image `image_id` listing `indexes` (what a
/// recording disk writes).
pub fn format_prefetch_list(image_id: &ImageId, indexes: &[u32]) -> String {
    let mut text = format!("{PREFETCH_MAGIC} {image_id}\n");
    for idx in indexes {
        text.push_str(&idx.to_string());
        text.push('\n');
    }
    text
}

impl BlockBackend for LazyHttpDisk {
    fn size(&self) -> u64 {
        self.inner.index.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> super::Result<()> {
        let inner = &self.inner;
        check_range(offset, buf.len(), inner.index.size)?;
        let cs = u64::from(inner.index.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let n = (inner.index.chunk_len(idx) - within).min(buf.len() - done);
            if let Err(e) = inner.read_chunk(idx, within, &mut buf[done..done + n]) {
                inner.read_errors.fetch_add(1, Ordering::Relaxed);
                return Err(DiskError::Io {
                    op: "read",
                    source: std::io::Error::other(error_chain(&e)),
                });
            }
            done += n;
        }
        inner
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> super::Result<()> {
        Err(DiskError::ReadOnly)
    }

    /// Persists the prefetch record; its failure is logged, not returned (the guest's
    /// data does not depend on it). The chunk cache needs no flush: each chunk file is
    /// verified when read, so one lost in a crash is fetched again.
    fn flush(&self) -> super::Result<()> {
        if let Err(e) = self.inner.save_record() {
            log::warn!("{}", error_chain(&e));
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        true
    }

    fn identity(&self) -> BackendIdentity {
        BackendIdentity {
            kind: "http".into(),
            location: self.inner.url.clone(),
            size: self.inner.index.size,
            stamp: Some(format!("image-id={}", self.inner.image_id)),
            inner: None,
        }
    }
}

impl Drop for LazyHttpDisk {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.wait_prefetch();
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_urls() {
        let (b, n) = split_image_url("http://h:80/a/b/images/deb-12.raw").unwrap();
        assert_eq!((b.as_str(), n.as_str()), ("http://h:80/a/b", "deb-12.raw"));
        let (b, _) = split_image_url("http://h/images/x").unwrap();
        assert_eq!(b, "http://h");
        for bad in [
            "http://h/a/x",
            "http://h/images/",
            "http://h/images/a/b",
            "https://h/images/x",
            "file:///images/x",
            "http://h/images/..",
        ] {
            assert!(split_image_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefetch_list_parsing() {
        let dir = crate::util::testutil::TempDir::new("prefetch-list");
        let id = crate::store::ChunkId::of(b"img");
        let p = dir.path().join("list");
        std::fs::write(&p, format!("{PREFETCH_MAGIC} {id}\n3\n1\n\n7\n")).unwrap();
        assert_eq!(read_prefetch_list(&p, &id).unwrap(), vec![3, 1, 7]);
        let other = crate::store::ChunkId::of(b"other");
        assert!(read_prefetch_list(&p, &other).is_err());
        std::fs::write(&p, format!("{PREFETCH_MAGIC} {id}\nx\n")).unwrap();
        assert!(read_prefetch_list(&p, &id).is_err());
        std::fs::write(&p, "junk").unwrap();
        assert!(read_prefetch_list(&p, &id).is_err());
    }
}
