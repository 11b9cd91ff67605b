//! [`CachedStore`]: a read-through local chunk cache in front of another chunk store
//! (an archive served over HTTP), shared by every VM resumed on the host. It stands in
//! the store layer so that every user of remote chunks can share it (docs/DESIGN.md,
//! "Chunk stores").
//!
//! The cache is a directory in the [`LocalStore`] layout (`ROOT/chunks/xx/<id>`). Reads
//! try it first; a chunk found there is verified against its id like any store read
//! (a damaged cache file is deleted, logged and fetched again). A miss is fetched from
//! the upstream store (which verifies it too), handed to the caller, then written to
//! the cache: a temp file named after the process and a counter, renamed into place.
//! The write is not fsynced — the cache is not the only copy, and a file left damaged
//! by a crash fails verification and is fetched again — so caching costs the fault path
//! one page-cache write, not a disk flush. Two processes caching the same chunk at once
//! write two temp files and rename one over the other, with the same bytes: safe.
//!
//! Chunk ids are content hashes, so one cache serves every archive, every remote disk
//! image and every VM. With a size limit ([`CachedStore::with_limit`]) the directory is
//! kept under it by a [`Budget`]: oldest chunks first, down to 7/8 of the limit, safe
//! with other processes sharing the directory (a reader whose chunk was evicted under it
//! fetches it again). Without one nothing is evicted.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::codec::{self, Compression};
use super::evict::{Budget, EvictError};
use super::local::{LocalStore, LocalStoreOptions};
use super::{ChunkId, ChunkRead, Result, StoreError};
use crate::util::fs::Staged;

/// `$XDG_CACHE_HOME/vmm`, else `$HOME/.cache/vmm`, else `<tmp>/vmm-cache`: the default
/// root of the one shared chunk cache (chunks in `chunks/` below it), used by remote
/// disks and archive memory alike.
pub fn default_cache_root() -> PathBuf {
    let nonempty = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(x) = nonempty("XDG_CACHE_HOME") {
        return x.join("vmm");
    }
    if let Some(h) = nonempty("HOME") {
        return h.join(".cache/vmm");
    }
    std::env::temp_dir().join("vmm-cache")
}

/// Errors of opening a chunk cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory cannot be created or opened.
    #[error("cannot open the chunk cache {}", path.display())]
    Open {
        /// The cache root.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The cache directory cannot be counted or trimmed to its size limit.
    #[error("cannot keep the chunk cache {} within its size limit", path.display())]
    Evict {
        /// The cache root.
        path: PathBuf,
        /// Cause.
        #[source]
        source: EvictError,
    },
}

/// Where [`CachedStore::read_into`] found a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// In the cache.
    Cache,
    /// Fetched from the upstream store (and cached).
    Upstream,
}

/// Why a chunk is being warmed (fetched into the cache ahead of the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// From a working-set list, right after resume.
    Prefetch,
    /// The rate-limited background fill of the rest.
    Fill,
}

/// Counters of a [`CachedStore`], in chunk bytes (uncompressed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that went to the upstream store (guest demand, i.e. page faults, and
    /// device or eager reads).
    pub demand_fetches: u64,
    /// Bytes of those.
    pub demand_bytes: u64,
    /// Chunks fetched by the working-set prefetch.
    pub prefetched: u64,
    /// Bytes of those.
    pub prefetch_bytes: u64,
    /// Chunks fetched by the background fill.
    pub filled: u64,
    /// Bytes of those.
    pub fill_bytes: u64,
    /// Cache files found damaged (deleted and fetched again).
    pub corrupt_in_cache: u64,
    /// Failed cache writes (the chunk was served anyway).
    pub write_errors: u64,
    /// Chunks this process evicted to keep the cache within its size limit.
    pub evicted: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    demand_fetches: AtomicU64,
    demand_bytes: AtomicU64,
    prefetched: AtomicU64,
    prefetch_bytes: AtomicU64,
    filled: AtomicU64,
    fill_bytes: AtomicU64,
    corrupt_in_cache: AtomicU64,
    write_errors: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A read-only chunk store ([`ChunkRead`] only): a local cache in front of an upstream store (see the
/// module documentation). With no cache directory it only counts and records.
pub struct CachedStore {
    upstream: Arc<dyn ChunkRead>,
    cache: Option<LocalStore>,
    budget: Option<Budget>,
    counters: Counters,
    /// Chunk ids read through [`ChunkRead::get_into`] while recording, in order.
    recording: Mutex<Option<Vec<ChunkId>>>,
}

impl std::fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("cache", &self.cache.as_ref().map(|c| c.root()))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl CachedStore {
    /// A store reading from `upstream` through the cache rooted at `cache_root` (created
    /// if needed), or without a cache.
    pub fn new(
        upstream: Arc<dyn ChunkRead>,
        cache_root: Option<&Path>,
    ) -> std::result::Result<Self, CacheError> {
        Self::with_limit(upstream, cache_root, None)
    }

    /// As [`new`](Self::new), keeping the cache directory within `max_bytes` (`None`: no
    /// limit); a cache already over it is trimmed now.
    pub fn with_limit(
        upstream: Arc<dyn ChunkRead>,
        cache_root: Option<&Path>,
        max_bytes: Option<u64>,
    ) -> std::result::Result<Self, CacheError> {
        let cache = match cache_root {
            None => None,
            Some(root) => Some(
                LocalStore::open(
                    root,
                    LocalStoreOptions {
                        compression: Compression::None,
                        ..Default::default()
                    },
                )
                .map_err(|source| CacheError::Open {
                    path: root.to_path_buf(),
                    source,
                })?,
            ),
        };
        let budget = match (cache_root, max_bytes) {
            (Some(root), Some(max)) => {
                Some(Budget::open(root, max).map_err(|source| CacheError::Evict {
                    path: root.to_path_buf(),
                    source,
                })?)
            }
            _ => None,
        };
        Ok(CachedStore {
            upstream,
            cache,
            budget,
            counters: Counters::default(),
            recording: Mutex::new(None),
        })
    }

    /// The cache root, if there is a cache.
    pub fn cache_root(&self) -> Option<&Path> {
        self.cache.as_ref().map(|c| c.root())
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: g(&c.hits),
            demand_fetches: g(&c.demand_fetches),
            demand_bytes: g(&c.demand_bytes),
            prefetched: g(&c.prefetched),
            prefetch_bytes: g(&c.prefetch_bytes),
            filled: g(&c.filled),
            fill_bytes: g(&c.fill_bytes),
            corrupt_in_cache: g(&c.corrupt_in_cache),
            write_errors: g(&c.write_errors),
            evicted: self.budget.as_ref().map_or(0, Budget::evicted),
        }
    }

    /// Starts recording the ids read through [`ChunkRead::get_into`] (what the lazy
    /// memory handler reads: faults, and the background fill if it runs).
    pub fn start_recording(&self) {
        *self
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Vec::new());
    }

    /// Stops recording and returns the ids read, first read first, each once.
    pub fn take_recording(&self) -> Vec<ChunkId> {
        let ids = self
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        ids.into_iter().filter(|id| seen.insert(*id)).collect()
    }

    fn record(&self, id: &ChunkId) {
        if let Some(v) = self
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            v.push(*id);
        }
    }

    /// Whether the cache holds chunk `id` (not verified).
    pub fn is_cached(&self, id: &ChunkId) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.contains(id).unwrap_or(false))
    }

    /// Fetches chunk `id` into the cache unless it is there already; returns whether it
    /// was fetched. Without a cache, does nothing.
    pub fn warm(&self, id: &ChunkId, purpose: Purpose) -> Result<bool> {
        if self.cache.is_none() || self.is_cached(id) {
            return Ok(false);
        }
        let data = self.upstream.get(id)?;
        let (n, bytes) = match purpose {
            Purpose::Prefetch => (&self.counters.prefetched, &self.counters.prefetch_bytes),
            Purpose::Fill => (&self.counters.filled, &self.counters.fill_bytes),
        };
        add(n, 1);
        add(bytes, data.len() as u64);
        self.cache_put(id, &data);
        Ok(true)
    }

    /// Reads chunk `id` (of `buf.len()` bytes) into `buf` from the cache only, verified;
    /// false on a miss (a damaged cache file is removed and counts as one). For callers
    /// that fetch misses themselves and then [`insert`](Self::insert) them.
    pub fn lookup_into(&self, id: &ChunkId, buf: &mut [u8]) -> bool {
        let hit = self.cache_get_into(id, buf);
        if hit {
            add(&self.counters.hits, 1);
        }
        hit
    }

    /// Caches chunk `id` whose verified bytes are `data` (best effort: failures are
    /// counted and logged once), keeping the cache within its limit.
    pub fn insert(&self, id: &ChunkId, data: &[u8]) {
        self.cache_put(id, data);
    }

    /// Reads chunk `id` into `buf` (its exact length) from the cache, else from the
    /// upstream store (then cached); says which.
    pub fn read_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<Source> {
        self.record(id);
        if self.lookup_into(id, buf) {
            return Ok(Source::Cache);
        }
        self.upstream.get_into(id, buf)?;
        add(&self.counters.demand_fetches, 1);
        add(&self.counters.demand_bytes, buf.len() as u64);
        self.cache_put(id, buf);
        Ok(Source::Upstream)
    }

    /// Reads `id` from the cache into `buf`; false on a miss (or a damaged file, which
    /// is removed).
    fn cache_get_into(&self, id: &ChunkId, buf: &mut [u8]) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        match cache.get_into(id, buf) {
            Ok(()) => true,
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => {
                add(&self.counters.corrupt_in_cache, 1);
                log::warn!(
                    "chunk cache {}: {}; removing it and fetching the chunk again",
                    cache.root().display(),
                    crate::util::error_chain(&e)
                );
                let _ = fs::remove_file(cache.chunk_path(id));
                false
            }
        }
    }

    /// Writes a verified chunk into the cache (best effort, see the module docs).
    fn cache_put(&self, id: &ChunkId, data: &[u8]) {
        let Some(cache) = &self.cache else {
            return;
        };
        let dest = cache.chunk_path(id);
        // Not fsynced: a chunk lost in a crash is fetched again.
        let result = (|| -> io::Result<()> {
            let enc = codec::encode(id, data, Compression::None).map_err(io::Error::other)?;
            let len = (enc.header.len() + enc.body.len()) as u64;
            if self.budget.as_ref().is_some_and(|b| !b.fits(len)) {
                return Ok(());
            }
            let dir = dest.parent().unwrap_or(cache.root());
            fs::create_dir_all(dir)?;
            Staged::write(&dest, false, |f| {
                f.write_all(&enc.header)?;
                f.write_all(&enc.body)
            })
            .and_then(|mut staged| staged.commit())
            .map_err(io::Error::other)?;
            match &self.budget {
                Some(b) => b.added(len).map_err(io::Error::other),
                None => Ok(()),
            }
        })();
        if let Err(e) = result
            && self.counters.write_errors.fetch_add(1, Ordering::Relaxed) == 0
        {
            log::warn!(
                "cannot write chunk {id} to the cache {}: {e} (further errors not logged)",
                cache.root().display()
            );
        }
    }
}

impl ChunkRead for CachedStore {
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(cache) = &self.cache {
            match cache.get(id) {
                Ok(v) => {
                    add(&self.counters.hits, 1);
                    return Ok(v);
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => {
                    add(&self.counters.corrupt_in_cache, 1);
                    log::warn!(
                        "chunk cache: {}; fetching it again",
                        crate::util::error_chain(&e)
                    );
                    let _ = fs::remove_file(cache.chunk_path(id));
                }
            }
        }
        let data = self.upstream.get(id)?;
        add(&self.counters.demand_fetches, 1);
        add(&self.counters.demand_bytes, data.len() as u64);
        self.cache_put(id, &data);
        Ok(data)
    }

    fn get_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        self.read_into(id, buf).map(|_| ())
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.is_cached(id) {
            return Ok(true);
        }
        self.upstream.contains(id)
    }

    /// As the upstream store: the cache adds no retries of its own.
    fn retries(&self) -> bool {
        self.upstream.retries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkWrite;
    use crate::util::testutil::{Rng, TempDir};

    fn chunk(seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; 64 << 10];
        Rng::new(seed).fill(&mut v);
        v
    }

    #[test]
    fn reads_through_and_then_hits() {
        let up_dir = TempDir::new("cache-up");
        let cache_dir = TempDir::new("cache-c");
        let up = Arc::new(LocalStore::open(up_dir.path(), LocalStoreOptions::default()).unwrap());
        let data = chunk(1);
        let id = up.put(&data).unwrap();
        let c = CachedStore::new(up.clone(), Some(cache_dir.path())).unwrap();
        c.start_recording();
        let mut buf = vec![0u8; data.len()];
        c.get_into(&id, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert!(c.is_cached(&id));
        // Gone upstream: still served from the cache.
        fs::remove_file(up.chunk_path(&id)).unwrap();
        buf.fill(0);
        c.get_into(&id, &mut buf).unwrap();
        assert_eq!(buf, data);
        let s = c.stats();
        assert_eq!((s.hits, s.demand_fetches, s.demand_bytes), (1, 1, 64 << 10));
        assert_eq!(c.take_recording(), vec![id]);
        // Writing is refused at compile time: CachedStore is no `ChunkWrite`.
    }

    #[test]
    fn damaged_cache_files_are_refetched_and_warm_counts() {
        let up_dir = TempDir::new("cache-up2");
        let cache_dir = TempDir::new("cache-c2");
        let up = Arc::new(LocalStore::open(up_dir.path(), LocalStoreOptions::default()).unwrap());
        let (a, b) = (chunk(5), chunk(7));
        let (ia, ib) = (up.put(&a).unwrap(), up.put(&b).unwrap());
        let c = CachedStore::new(up.clone(), Some(cache_dir.path())).unwrap();
        assert!(c.warm(&ia, Purpose::Prefetch).unwrap());
        assert!(!c.warm(&ia, Purpose::Prefetch).unwrap());
        assert!(c.warm(&ib, Purpose::Fill).unwrap());
        // Damage the cached copy of `a`: the next read notices, refetches, repairs.
        let cached = cache_dir.path().join(ia.relative_path());
        let mut bytes = fs::read(&cached).unwrap();
        bytes[100] ^= 1;
        fs::write(&cached, &bytes).unwrap();
        let mut buf = vec![0u8; a.len()];
        c.get_into(&ia, &mut buf).unwrap();
        assert_eq!(buf, a);
        let s = c.stats();
        assert_eq!((s.prefetched, s.filled, s.corrupt_in_cache), (1, 1, 1));
        assert_eq!(s.demand_fetches, 1);
        assert_eq!(c.get(&ia).unwrap(), a);
        assert_eq!(c.stats().hits, 1);
        // A corrupt upstream chunk is an error, and is not cached.
        let d = chunk(9);
        let id = up.put(&d).unwrap();
        let p = up.chunk_path(&id);
        let mut bytes = fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&p, &bytes).unwrap();
        let mut buf = vec![0u8; d.len()];
        assert!(matches!(
            c.get_into(&id, &mut buf),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(!c.is_cached(&id));
    }

    #[test]
    fn a_size_limit_evicts_oldest_and_readers_refetch() {
        let up_dir = TempDir::new("cache-up3");
        let cache_dir = TempDir::new("cache-c3");
        let up = Arc::new(LocalStore::open(up_dir.path(), LocalStoreOptions::default()).unwrap());
        let ids: Vec<_> = (0..6)
            .map(|i| up.put(&chunk(101 + 2 * i)).unwrap())
            .collect();
        // Room for four chunk files (64 KiB + a small header each).
        let limit = 4 * (64 << 10) + 4 * 64;
        let c = CachedStore::with_limit(up.clone(), Some(cache_dir.path()), Some(limit)).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        for id in &ids {
            assert_eq!(c.read_into(id, &mut buf).unwrap(), Source::Upstream);
            // Distinct modification times, whatever the file system's granularity.
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let u = super::super::evict::usage(cache_dir.path()).unwrap();
        assert!(u.bytes <= limit, "{u:?}");
        assert!(c.stats().evicted >= 2, "{:?}", c.stats());
        assert!(!c.is_cached(&ids[0]) && c.is_cached(&ids[5]));
        // An evicted chunk is simply fetched again.
        assert_eq!(c.read_into(&ids[0], &mut buf).unwrap(), Source::Upstream);
        assert_eq!(buf, chunk(101));
        assert_eq!(c.read_into(&ids[0], &mut buf).unwrap(), Source::Cache);
        // A second store on the same directory (another process, say) sees its chunks,
        // and a limit smaller than one chunk caches nothing.
        let c2 = CachedStore::with_limit(up.clone(), Some(cache_dir.path()), Some(100)).unwrap();
        assert!(!c2.is_cached(&ids[5]), "trimmed at open");
        assert_eq!(c2.read_into(&ids[5], &mut buf).unwrap(), Source::Upstream);
        assert!(!c2.is_cached(&ids[5]));
    }
}
