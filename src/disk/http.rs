//! [`LazyHttpDisk`]: a read-only disk whose bytes are an image in an archive on a web
//! server, fetched chunk by chunk when first read.
//!
//! The URL names the image index: `http://HOST/ARCHIVE/images/NAME`; chunks are fetched from
//! `http://HOST/ARCHIVE/chunks/...` (and from mirrors: other archive base URLs) with an
//! [`HttpStore`], verified, and kept in a [`ChunkCache`] on local disk. Zero chunks are
//! never fetched. Writes are refused: put an [`OverlayBackend`] on top for a writable disk.
//!
//! Prefetch: with [`LazyHttpOptions::record_prefetch`], the chunk indexes read (in first-read
//! order, each once) are written to a file at every flush and at drop; with
//! [`LazyHttpOptions::prefetch`] (or [`LazyHttpDisk::start_prefetch`]), such a list is
//! fetched into the cache by a background thread while the guest runs.
//!
//! [`OverlayBackend`]: super::overlay::OverlayBackend

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::cache::{CacheError, CacheStats, ChunkCache};
use super::overlay::{OverlayBackend, OverlayError};
use super::{BackendIdentity, BlockBackend, DiskError, check_range};
use crate::formats::file::{HEADER_LEN, TRAILER_LEN};
use crate::image::{self, ImageEntry, ImageId, ImageIndex};
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
    /// The local cache could not be opened or used.
    #[error("cannot open the image cache")]
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
    /// Cache root directory; `None` = [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Size limit of this image's cache in bytes; `None` = no limit.
    pub cache_max_bytes: Option<u64>,
    /// HTTP options, mirrors (archive base URLs) included.
    pub http: HttpStoreOptions,
    /// Record the chunks read into this file (written at flush and drop).
    pub record_prefetch: Option<PathBuf>,
    /// Fetch the chunks listed in this file (made by `record_prefetch`) in the background,
    /// if the file exists and was recorded for the same image.
    pub prefetch: Option<PathBuf>,
}

/// `$XDG_CACHE_HOME/vmm/images`, else `$HOME/.cache/vmm/images`, else `<tmp>/vmm-images`.
pub fn default_cache_dir() -> PathBuf {
    let nonempty = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(x) = nonempty("XDG_CACHE_HOME") {
        return x.join("vmm/images");
    }
    if let Some(h) = nonempty("HOME") {
        return h.join(".cache/vmm/images");
    }
    std::env::temp_dir().join("vmm-images")
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
    /// Cache state and hits.
    pub cache: CacheStats,
    /// Bytes the guest read.
    pub bytes_read: u64,
    /// Chunks fetched for guest reads.
    pub chunks_fetched: u64,
    /// Chunks fetched by prefetch.
    pub chunks_prefetched: u64,
    /// Failed chunk reads.
    pub read_errors: u64,
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
    store: HttpStore,
    cache: ChunkCache,
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
        let store = HttpStore::new(&base, opts.http.clone()).map_err(RemoteDiskError::Http)?;
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
        let cache = ChunkCache::open(&cache_root, &index, &image_id, opts.cache_max_bytes)
            .map_err(RemoteDiskError::Cache)?;
        log::info!(
            "remote disk {url}: {} bytes in {} chunks of {} KiB, image id {image_id}, index fetched in {} ms, cache {} ({} chunks cached)",
            index.size,
            index.chunk_count(),
            index.chunk_size >> 10,
            t.elapsed().as_millis(),
            cache.dir().display(),
            cache.stats().chunks
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
            cache: i.cache.stats(),
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
            if self.cache.contains(idx) {
                continue;
            }
            match self.store.fetch_chunk(id, Some(self.index.chunk_len(idx))) {
                Ok(data) => {
                    if let Err(e) = self.cache.insert(idx, &data) {
                        log::warn!("prefetch stopped: {}", error_chain(&e));
                        break;
                    }
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
        match self.cache.read(idx, within, out) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => log::warn!("{}; fetching instead", error_chain(&e)),
        }
        let _stripe = lock(&self.fetch_locks[idx % FETCH_STRIPES]);
        // Another reader may have fetched it while this one waited for the stripe.
        if self.cache.contains(idx) && matches!(self.cache.read(idx, within, out), Ok(true)) {
            return Ok(());
        }
        let data = self
            .store
            .fetch_chunk(&id, Some(self.index.chunk_len(idx)))
            .map_err(|source| RemoteDiskError::Fetch {
                url: self.url.clone(),
                idx,
                source,
            })?;
        self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.cache.insert(idx, &data) {
            log::warn!("{}", error_chain(&e));
        }
        out.copy_from_slice(&data[within..within + out.len()]);
        Ok(())
    }
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

    /// Persists the cache bitmap and the prefetch record; their failures are logged, not
    /// returned (the guest's data does not depend on them).
    fn flush(&self) -> super::Result<()> {
        if let Err(e) = self.inner.cache.persist() {
            log::warn!("{}", error_chain(&e));
        }
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
