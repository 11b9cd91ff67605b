//! Working sets: the memory chunks a resumed VM touches first, recorded once and
//! prefetched on every later resume while the guest already runs.
//!
//! A working-set file (`ARCHIVE/vms/NAME/workingset`) is the checksummed container of
//! `docs/SNAPSHOT_FORMAT.md`, kind `VMMWSET\0`, version 1, holding a [`WorkingSet`]: the
//! BLAKE3 hash of the memory manifest file it was recorded against, how long the
//! recording ran, and the chunk ids in first-touch order, each once.
//!
//! [`Prefetcher`] warms a [`CachedStore`] in the background: first the working set, on a
//! few threads, as fast as the archive answers; then, if asked, every other chunk of
//! the manifest on one thread at a limited rate ([`FillRate`]); and once all of it is
//! cached, it starts the lazy memory handler's own fill, which then only reads the
//! local cache. Page faults never wait for the prefetcher: a fault on a chunk being
//! prefetched shares its HTTP fetch, and any other fault is fetched at once.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::formats::WORKINGSET_KIND;
use crate::formats::file::{self, StateFileError};
use crate::store::ChunkId;
use crate::store::cache::{CachedStore, Purpose};
use crate::vstate::uffd::LazyHandle;

/// Errors of working-set files.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file cannot be read, written or decoded.
    #[error("working-set file")]
    File(#[source] StateFileError),
}

/// The chunks a resume touched first (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    /// BLAKE3 hash of the memory manifest file the list was recorded against.
    pub manifest_hash: [u8; 32],
    /// How long the recording ran, in milliseconds.
    pub recorded_ms: u64,
    /// Chunk ids in first-touch order, each once.
    pub chunks: Vec<ChunkId>,
}

impl WorkingSet {
    /// The file bytes.
    pub fn encode(&self) -> Result<Vec<u8>, WorkingSetError> {
        file::encode(&WORKINGSET_KIND, self).map_err(WorkingSetError::File)
    }

    /// Parses file bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WorkingSetError> {
        file::decode(&WORKINGSET_KIND, bytes).map_err(WorkingSetError::File)
    }

    /// Writes the file atomically.
    pub fn write_to(&self, path: &Path) -> Result<(), WorkingSetError> {
        file::write_file(path, &WORKINGSET_KIND, self).map_err(WorkingSetError::File)
    }

    /// Reads a file written by [`write_to`](Self::write_to).
    pub fn read_from(path: &Path) -> Result<Self, WorkingSetError> {
        file::read_file(path, &WORKINGSET_KIND).map_err(WorkingSetError::File)
    }
}

/// The hash a [`WorkingSet`] records for the manifest file `bytes`.
pub fn manifest_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// How fast the background fill fetches the chunks outside the working set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillRate {
    /// No background fill: chunks the guest never touches are never fetched (the VM
    /// needs the archive for as long as it runs).
    Off,
    /// At most this many chunk bytes per second.
    BytesPerSec(u64),
    /// As fast as the archive answers (one request at a time).
    Unlimited,
}

impl FillRate {
    /// `off`/`0`, `max`, or a rate in MiB/s.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "off" | "0" => Ok(FillRate::Off),
            "max" | "unlimited" => Ok(FillRate::Unlimited),
            n => n
                .parse::<u64>()
                .map(|m| FillRate::BytesPerSec(m << 20))
                .map_err(|_| format!("fill rate {s:?}: expected MiB/s, `off` or `max`")),
        }
    }
}

/// What a [`Prefetcher`] fetches.
#[derive(Clone, Debug)]
pub struct PrefetchPlan {
    /// The working set, in order.
    pub working_set: Vec<ChunkId>,
    /// Every other chunk, for the background fill.
    pub rest: Vec<ChunkId>,
    /// Rate of the background fill.
    pub fill: FillRate,
    /// Threads fetching the working set.
    pub threads: usize,
}

/// Progress of a [`Prefetcher`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrefetchProgress {
    /// Working-set chunks handled (fetched or found cached).
    pub working_set_done: u64,
    /// Working-set chunks in the plan.
    pub working_set_total: u64,
    /// Milliseconds from start until the working set was cached, once it is.
    pub working_set_ms: Option<u64>,
    /// Other chunks handled by the fill.
    pub fill_done: u64,
    /// Other chunks in the plan.
    pub fill_total: u64,
    /// Milliseconds from start until the fill had cached everything, once it has.
    pub fill_ms: Option<u64>,
    /// Whether prefetching stopped early on an error.
    pub failed: bool,
}

#[derive(Default)]
struct Progress {
    ws_done: AtomicU64,
    ws_ms: Mutex<Option<u64>>,
    fill_done: AtomicU64,
    fill_ms: Mutex<Option<u64>>,
    failed: AtomicBool,
}

/// Background warming of a [`CachedStore`] (see the module documentation). Stopped
/// (and joined) on drop.
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    totals: (u64, u64),
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("progress", &self.progress())
            .finish_non_exhaustive()
    }
}

impl Prefetcher {
    /// Starts warming `store` as `plan` says; when everything is cached and the fill
    /// is on, starts `lazy`'s own background fill.
    pub fn start(store: Arc<CachedStore>, plan: PrefetchPlan, lazy: Option<LazyHandle>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let totals = (plan.working_set.len() as u64, plan.rest.len() as u64);
        let (s, p) = (Arc::clone(&stop), Arc::clone(&progress));
        let thread = std::thread::Builder::new()
            .name("archive-prefetch".into())
            .spawn(move || run(&store, plan, lazy, &s, &p))
            .map_err(|e| log::warn!("cannot start the prefetch thread: {e}"))
            .ok();
        Prefetcher {
            stop,
            progress,
            totals,
            thread,
        }
    }

    /// Progress so far.
    pub fn progress(&self) -> PrefetchProgress {
        let p = &self.progress;
        let get = |m: &Mutex<Option<u64>>| *m.lock().unwrap_or_else(PoisonError::into_inner);
        PrefetchProgress {
            working_set_done: p.ws_done.load(Ordering::Relaxed),
            working_set_total: self.totals.0,
            working_set_ms: get(&p.ws_ms),
            fill_done: p.fill_done.load(Ordering::Relaxed),
            fill_total: self.totals.1,
            fill_ms: get(&p.fill_ms),
            failed: p.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops fetching (after the fetches in flight) and waits for the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a prefetch run shares: the stop flag, the progress, the start time.
struct Run<'a> {
    store: &'a CachedStore,
    stop: &'a AtomicBool,
    progress: &'a Progress,
    t0: Instant,
}

impl Run<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Marks the run failed (logging the first failure only).
    fn fail(&self, what: &str, id: &ChunkId, e: &crate::store::StoreError) {
        if !self.progress.failed.swap(true, Ordering::AcqRel) {
            log::warn!(
                "archive {what} stopped: chunk {id}: {} (page faults still fetch on demand)",
                crate::util::error_chain(e)
            );
        }
    }

    /// Warms the working set on `threads` threads sharing one cursor.
    fn working_set(&self, working_set: &[ChunkId], threads: usize) {
        let next = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..threads.max(1) {
                sc.spawn(|| {
                    loop {
                        if self.stopped() || self.progress.failed.load(Ordering::Acquire) {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(id) = working_set.get(i) else {
                            return;
                        };
                        match self.store.warm(id, Purpose::Prefetch) {
                            Ok(_) => {
                                self.progress.ws_done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => self.fail("working-set prefetch", id, &e),
                        }
                    }
                });
            }
        });
    }

    /// Warms `rest` one chunk at a time, paced by a token bucket of `rate` bytes per
    /// second (`None`: unpaced); returns whether it got through all of them.
    fn fill(&self, rest: &[ChunkId], rate: Option<u64>) -> bool {
        let fill_start = Instant::now();
        let mut fetched = 0u64;
        for id in rest {
            if self.stopped() {
                return false;
            }
            if let Some(r) = rate {
                loop {
                    let allowed = (fill_start.elapsed().as_secs_f64() * r as f64) as u64;
                    if fetched <= allowed || self.stopped() {
                        break;
                    }
                    let wait = (fetched - allowed) as f64 / r as f64;
                    std::thread::sleep(Duration::from_secs_f64(wait.min(0.05)));
                }
            }
            let before = self.store.stats().fill_bytes;
            match self.store.warm(id, Purpose::Fill) {
                Ok(_) => {
                    self.progress.fill_done.fetch_add(1, Ordering::Relaxed);
                    fetched += self.store.stats().fill_bytes.saturating_sub(before);
                }
                Err(e) => {
                    self.fail("background fill", id, &e);
                    return false;
                }
            }
        }
        true
    }

    /// Records in `slot` the milliseconds since the start; returns them.
    fn mark(&self, slot: &Mutex<Option<u64>>) -> u64 {
        let ms = self.t0.elapsed().as_millis() as u64;
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(ms);
        ms
    }
}

fn run(
    store: &CachedStore,
    plan: PrefetchPlan,
    lazy: Option<LazyHandle>,
    stop: &AtomicBool,
    progress: &Progress,
) {
    let run = Run {
        store,
        stop,
        progress,
        t0: Instant::now(),
    };
    run.working_set(&plan.working_set, plan.threads);
    if run.stopped() || progress.failed.load(Ordering::Acquire) {
        return;
    }
    let ws_ms = run.mark(&progress.ws_ms);
    if !plan.working_set.is_empty() {
        log::info!(
            "archive: working set of {} chunks cached {ws_ms} ms after resume",
            plan.working_set.len()
        );
    }
    let rate = match plan.fill {
        FillRate::Off => return,
        FillRate::BytesPerSec(r) => Some(r.max(1)),
        FillRate::Unlimited => None,
    };
    if !run.fill(&plan.rest, rate) {
        return;
    }
    let fill_ms = run.mark(&progress.fill_ms);
    log::info!(
        "archive: background fill cached all {} other chunks {fill_ms} ms after resume",
        plan.rest.len()
    );
    // Everything is local now: let the lazy handler place the rest from the cache.
    if let Some(l) = lazy {
        l.fill_in_background();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkWrite;
    use crate::store::local::{LocalStore, LocalStoreOptions};
    use crate::util::testutil::TempDir;

    #[test]
    fn file_round_trip_and_rejects_damage() {
        let dir = TempDir::new("ws-file");
        let ws = WorkingSet {
            manifest_hash: manifest_hash(b"m"),
            recorded_ms: 2000,
            chunks: vec![ChunkId::of(b"a"), ChunkId::of(b"b")],
        };
        let p = dir.path().join("workingset");
        ws.write_to(&p).unwrap();
        assert_eq!(WorkingSet::read_from(&p).unwrap(), ws);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[30] ^= 1;
        assert!(WorkingSet::decode(&bytes).is_err());
        assert!(FillRate::parse("x").is_err());
        assert_eq!(
            FillRate::parse("8").unwrap(),
            FillRate::BytesPerSec(8 << 20)
        );
        assert_eq!(FillRate::parse("off").unwrap(), FillRate::Off);
    }

    #[test]
    fn prefetcher_warms_working_set_then_fills_at_a_rate() {
        let up_dir = TempDir::new("ws-up");
        let cache_dir = TempDir::new("ws-cache");
        let up = Arc::new(LocalStore::open(up_dir.path(), LocalStoreOptions::default()).unwrap());
        let ids: Vec<ChunkId> = (0..12u32)
            .map(|i| up.put(&vec![i as u8 + 1; 64 << 10]).unwrap())
            .collect();
        let store = Arc::new(CachedStore::new(up, Some(cache_dir.path())).unwrap());
        let plan = PrefetchPlan {
            working_set: ids[..4].to_vec(),
            rest: ids[4..].to_vec(),
            // 8 chunks of 64 KiB at 1 MiB/s: about half a second.
            fill: FillRate::BytesPerSec(1 << 20),
            threads: 2,
        };
        let t = Instant::now();
        let p = Prefetcher::start(Arc::clone(&store), plan, None);
        while p.progress().fill_ms.is_none() && t.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pr = p.progress();
        assert_eq!((pr.working_set_done, pr.fill_done), (4, 8), "{pr:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(380),
            "{:?}",
            t.elapsed()
        );
        assert!(ids.iter().all(|id| store.is_cached(id)));
        let s = store.stats();
        assert_eq!((s.prefetched, s.filled), (4, 8));
    }
}
