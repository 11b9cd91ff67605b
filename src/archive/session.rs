//! [`ArchiveSession`]: what a resumed archived VM fetched ([`FetchSnapshot`]), when,
//! and the helpers that live as long as it (prefetcher, temporary overlay directory).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::workingset::{Prefetcher, WorkingSet};
use crate::disk::http::LazyHttpDisk;
use crate::store::cache::CachedStore;
use crate::store::http::{HttpStats, HttpStore};
use crate::vstate::uffd::LazyHandle;

/// Bytes fetched up to a point in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FetchSnapshot {
    /// Milliseconds since the restore started.
    pub at_ms: u64,
    /// State, manifest and working-set file bytes.
    pub metadata_bytes: u64,
    /// HTTP body bytes of memory chunks (faults, prefetch and fill; as stored: maybe
    /// compressed).
    pub memory_http_bytes: u64,
    /// HTTP requests for memory chunks.
    pub memory_requests: u64,
    /// Chunk bytes fetched for page faults and device accesses (uncompressed).
    pub demand_bytes: u64,
    /// Chunk bytes fetched by the working-set prefetch.
    pub prefetch_bytes: u64,
    /// Chunk bytes fetched by the background fill.
    pub fill_bytes: u64,
    /// Chunk reads served by the local cache.
    pub cache_hits: u64,
    /// Chunks this instance evicted from the local cache to keep it within its bound.
    pub cache_evicted: u64,
    /// HTTP bytes of remote disks (indexes and chunks).
    pub disk_bytes: u64,
    /// Page faults served so far.
    pub faults: u64,
    /// Everything on the wire: metadata + memory + disks.
    pub total_bytes: u64,
}

/// What an [`ArchiveSession`] measures from.
pub(super) struct Meters {
    pub(super) started: Instant,
    pub(super) meta: Option<Arc<HttpStore>>,
    pub(super) chunks_http: Option<Arc<HttpStore>>,
    pub(super) meta_local_bytes: u64,
    pub(super) store: Arc<CachedStore>,
    pub(super) disks: Vec<Arc<LazyHttpDisk>>,
    pub(super) lazy: Option<LazyHandle>,
}

impl Meters {
    pub(super) fn snapshot(&self) -> FetchSnapshot {
        let hs = |h: &Option<Arc<HttpStore>>| h.as_ref().map(|h| h.stats()).unwrap_or_default();
        let meta: HttpStats = hs(&self.meta);
        let mem: HttpStats = hs(&self.chunks_http);
        let c = self.store.stats();
        let disk_bytes = self
            .disks
            .iter()
            .map(|d| d.stats().http.bytes_fetched)
            .sum();
        let mut s = FetchSnapshot {
            at_ms: self.started.elapsed().as_millis() as u64,
            metadata_bytes: meta.bytes_fetched + self.meta_local_bytes,
            memory_http_bytes: mem.bytes_fetched,
            memory_requests: mem.requests,
            demand_bytes: c.demand_bytes,
            prefetch_bytes: c.prefetch_bytes,
            fill_bytes: c.fill_bytes,
            cache_hits: c.hits,
            cache_evicted: c.evicted,
            disk_bytes,
            faults: self.lazy.as_ref().map_or(0, |l| l.stats().faults),
            total_bytes: 0,
        };
        s.total_bytes = s.metadata_bytes + s.memory_http_bytes + s.disk_bytes;
        s
    }
}

/// A resumed archived VM's measurements and helpers; end it after the [`Vmm`]
/// (dropping it stops the prefetcher and removes a temporary overlay directory).
pub struct ArchiveSession {
    pub(super) source: String,
    pub(super) memory_size: u64,
    pub(super) meters: Arc<Meters>,
    pub(super) prefetcher: Option<Prefetcher>,
    /// Milliseconds from start until the vCPUs were resumed.
    pub running_after_ms: Option<u64>,
    /// Fetched before the first guest instruction.
    pub before_first_instruction: FetchSnapshot,
    pub(super) first_second: Arc<Mutex<Option<FetchSnapshot>>>,
    pub(super) temp_dir: Option<PathBuf>,
    pub(super) manifest_hash: [u8; 32],
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// One line of fetch totals, for the log.
pub(super) fn describe(s: &FetchSnapshot, memory: u64) -> String {
    format!(
        "{} bytes ({:.2} % of {} MiB of memory): metadata {}, memory {} in {} requests \
         (faults {}, prefetch {}, fill {}; {} cache hits, {} evicted), disks {}; {} faults",
        s.total_bytes,
        pct(s.total_bytes, memory),
        memory >> 20,
        s.metadata_bytes,
        s.memory_http_bytes,
        s.memory_requests,
        s.demand_bytes,
        s.prefetch_bytes,
        s.fill_bytes,
        s.cache_hits,
        s.cache_evicted,
        s.disk_bytes,
        s.faults
    )
}

impl ArchiveSession {
    /// Fetch totals now.
    pub fn now(&self) -> FetchSnapshot {
        self.meters.snapshot()
    }

    /// Fetch totals one second after the vCPUs started, once that second has passed.
    pub fn first_second(&self) -> Option<FetchSnapshot> {
        *self
            .first_second
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Guest memory size.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// The chunk store serving guest memory (cache statistics, working-set recording).
    pub fn store(&self) -> &Arc<CachedStore> {
        &self.meters.store
    }

    /// Prefetch progress, when a prefetcher runs.
    pub fn prefetch(&self) -> Option<super::workingset::PrefetchProgress> {
        self.prefetcher.as_ref().map(|p| p.progress())
    }

    /// Ends recording and returns the working set recorded since the restore started.
    pub fn take_working_set(&self) -> WorkingSet {
        WorkingSet {
            manifest_hash: self.manifest_hash,
            recorded_ms: self.meters.started.elapsed().as_millis() as u64,
            chunks: self.meters.store.take_recording(),
        }
    }

    /// Everything measured, as JSON.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.source,
            "memory_bytes": self.memory_size,
            "running_after_ms": self.running_after_ms,
            "before_first_instruction": self.before_first_instruction,
            "first_second": self.first_second(),
            "now": self.now(),
            "cache": self.meters.store.stats(),
            "prefetch": self.prefetch(),
        })
    }

    /// Logs the totals (at exit).
    pub fn log_totals(&self) {
        log::info!(
            "archive {}: fetched in total {}",
            self.source,
            describe(&self.now(), self.memory_size)
        );
    }
}

impl Drop for ArchiveSession {
    fn drop(&mut self) {
        if let Some(mut p) = self.prefetcher.take() {
            p.stop();
        }
        if let Some(d) = self.temp_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&d)
        {
            log::warn!("cannot remove the instance directory {}: {e}", d.display());
        }
    }
}
