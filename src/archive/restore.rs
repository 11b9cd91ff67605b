//! Resuming an archived VM: [`restore`].
//!
//! 1. Fetch `state`, `memory` and (if present) `workingset` from the VM's directory
//!    (`http://HOST/ARCHIVE/vms/NAME`, or a local `ARCHIVE/vms/NAME`); both files are
//!    checksummed, so a damaged one is refused.
//! 2. Memory: an [`HttpStore`] on the archive (the state's store, `../..`), wrapped in a
//!    [`CachedStore`] on the host's shared chunk cache; [`build_from_parts`] serves guest
//!    memory from it lazily (userfaultfd), or eagerly with `eager_memory`.
//! 3. Disks: their URLs are resolved against the VM's directory and opened by the
//!    remote-disk backend; writable disks get a fresh overlay in a per-instance directory
//!    (removed when the session ends unless the caller named the directory), filled with
//!    the overlay content captured in the snapshot if any (by the builder). The image ids must be the
//!    recorded ones.
//! 4. Resume; then prefetch the working set and fill the rest in the background
//!    ([`Prefetcher`]). Bytes fetched before the first guest instruction and during its
//!    first second are logged and kept in the [`ArchiveSession`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::cache::{CacheError, CachedStore};
use super::workingset::{FillRate, PrefetchPlan, Prefetcher, WorkingSet, manifest_hash};
use super::{ArchiveError, INSTANCE_OVERLAY, Source, WORKINGSET_FILE, resolve_url};
use crate::builder::{BuildError, Console};
use crate::builder::{RestoreOptions, build_from_parts};
use crate::disk::BackendIdentity;
use crate::disk::http::LazyHttpDisk;
use crate::formats::file::{self, FileKind, StateFileError};
use crate::formats::{MANIFEST_KIND, WORKINGSET_KIND};
use crate::snapshot::manifest::{ManifestError, MemoryManifest};
use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::store::http::{HttpError, HttpStats, HttpStore, HttpStoreOptions};
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::store::{ChunkId, ChunkStore, StoreError};
use crate::util::error_chain;
use crate::vmm::Vmm;
use crate::vstate::uffd::LazyHandle;

/// Errors of resuming an archived VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The local archive's layout is one this build does not read.
    #[error("archive")]
    Archive(#[source] crate::formats::MarkerError),
    /// A URL could not be resolved.
    #[error("archive URL")]
    Url(#[source] ArchiveError),
    /// The archive's HTTP store could not be set up.
    #[error("archive {url}")]
    Http {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The VM is not in the archive.
    #[error("no archived VM at {url} (HTTP 404 for its state file)")]
    NotFound {
        /// The VM's URL.
        url: String,
    },
    /// A file of the archived VM could not be fetched or read.
    #[error("cannot fetch {url}")]
    Fetch {
        /// The file.
        url: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// A local file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is damaged or of another version.
    #[error("archived state {url}")]
    State {
        /// Where it came from.
        url: String,
        /// Cause.
        #[source]
        source: StateFileError,
    },
    /// The memory manifest is damaged.
    #[error("archived memory manifest {url}")]
    Manifest {
        /// Where it came from.
        url: String,
        /// Cause.
        #[source]
        source: ManifestError,
    },
    /// The chunk store or cache could not be opened.
    #[error("chunk store")]
    Store(#[source] StoreError),
    /// The local chunk cache could not be opened.
    #[error("chunk cache")]
    Cache(#[source] CacheError),
    /// A disk cannot be prepared.
    #[error("disk {index}: {reason}")]
    Disk {
        /// Disk index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Building the VM failed.
    #[error("restoring the archived VM")]
    Build(#[source] BuildError),
}

/// How to resume an archived VM.
pub struct ArchiveRestoreOptions {
    /// Console destination.
    pub console: Console,
    /// Root of the chunk cache (`chunks/`) and remote-disk cache (`images/`); `None` =
    /// [`default_cache_root`](super::default_cache_root).
    pub cache_root: Option<PathBuf>,
    /// Directory for the fresh disk overlays (kept); `None` = a per-instance directory
    /// under the cache root, removed when the session ends.
    pub overlay_dir: Option<PathBuf>,
    /// HTTP retries, timeouts, mirrors.
    pub http: HttpStoreOptions,
    /// Prefetch the archived working set, if there is one.
    pub prefetch: bool,
    /// Background fill of the chunks outside the working set.
    pub fill: FillRate,
    /// Threads fetching the working set.
    pub prefetch_threads: usize,
    /// Leave the vCPUs paused.
    pub start_paused: bool,
    /// Load all memory before the vCPUs start.
    pub eager_memory: bool,
    /// Accept disks whose identity differs from the record.
    pub force: bool,
    /// How the guest's kvmclock continues.
    pub clock: crate::arch::x86_64::ClockMode,
    /// Record the chunks read by the lazy memory handler (for a working set); turns the
    /// background fill off.
    pub record: bool,
    /// When the user asked for the VM (default: when [`restore`] is called); "guest
    /// running after" is measured from here.
    pub started: Option<Instant>,
}

impl ArchiveRestoreOptions {
    /// Console on stdio, default cache, working-set prefetch, fill at 64 MiB/s.
    pub fn new(console: Console) -> Self {
        Self {
            console,
            cache_root: None,
            overlay_dir: None,
            http: HttpStoreOptions::default(),
            prefetch: true,
            fill: FillRate::BytesPerSec(64 << 20),
            prefetch_threads: 2,
            start_paused: false,
            eager_memory: false,
            force: false,
            clock: Default::default(),
            record: false,
            started: None,
        }
    }
}

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
    /// HTTP bytes of remote disks (indexes and chunks).
    pub disk_bytes: u64,
    /// Page faults served so far.
    pub faults: u64,
    /// Everything on the wire: metadata + memory + disks.
    pub total_bytes: u64,
}

/// What an [`ArchiveSession`] measures from.
struct Meters {
    started: Instant,
    meta: Option<Arc<HttpStore>>,
    chunks_http: Option<Arc<HttpStore>>,
    meta_local_bytes: u64,
    store: Arc<CachedStore>,
    disks: Vec<Arc<LazyHttpDisk>>,
    lazy: Option<LazyHandle>,
}

impl Meters {
    fn snapshot(&self) -> FetchSnapshot {
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
    source: String,
    memory_size: u64,
    meters: Arc<Meters>,
    prefetcher: Option<Prefetcher>,
    /// Milliseconds from start until the vCPUs were resumed.
    pub running_after_ms: Option<u64>,
    /// Fetched before the first guest instruction.
    pub before_first_instruction: FetchSnapshot,
    first_second: Arc<Mutex<Option<FetchSnapshot>>>,
    temp_dir: Option<PathBuf>,
    manifest_hash: [u8; 32],
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

fn describe(s: &FetchSnapshot, memory: u64) -> String {
    format!(
        "{} bytes ({:.2} % of {} MiB of memory): metadata {}, memory {} in {} requests \
         (faults {}, prefetch {}, fill {}; {} cache hits), disks {}; {} faults",
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

/// The metadata of an archived VM.
struct Loaded {
    state: MicrovmState,
    manifest: MemoryManifest,
    manifest_hash: [u8; 32],
    working_set: Option<WorkingSet>,
    /// Upstream store of the chunks, and its HTTP store if remote.
    upstream: Arc<dyn ChunkStore>,
    meta_http: Option<Arc<HttpStore>>,
    chunks_http: Option<Arc<HttpStore>>,
    meta_local_bytes: u64,
    /// Directory URL disk URLs are relative to (HTTP only).
    vm_url: Option<String>,
    state_name: String,
    memory_name: String,
}

fn cap(kind: &FileKind) -> u64 {
    kind.max_payload + (file::HEADER_LEN + file::TRAILER_LEN) as u64
}

fn load(source: &Source, http: &HttpStoreOptions) -> Result<Loaded, RestoreError> {
    match source {
        Source::Http { vm_url } => {
            let meta = Arc::new(HttpStore::new(vm_url, http.clone()).map_err(|source| {
                RestoreError::Http {
                    url: vm_url.clone(),
                    source,
                }
            })?);
            let url = |f: &str| format!("{vm_url}/{f}");
            // The container (length, checksum) is checked inside the fetch, so an answer
            // damaged on the way is asked for again; what it holds is decoded below.
            let fetch = |f: &str, kind: &FileKind| {
                let whole = |u: &str, body: Vec<u8>| match file::check_container(kind, &body) {
                    Ok(()) => Ok(body),
                    Err(e) => Err(HttpError::Invalid {
                        url: u.into(),
                        reason: error_chain(&e),
                    }),
                };
                meta.fetch_with(f, cap(kind), whole).map_err(|source| {
                    if source.is_not_found() && f == STATE_FILE {
                        RestoreError::NotFound {
                            url: vm_url.clone(),
                        }
                    } else {
                        RestoreError::Fetch {
                            url: url(f),
                            source,
                        }
                    }
                })
            };
            let state_bytes = fetch(STATE_FILE, &FileKind::STATE)?;
            let state =
                MicrovmState::decode(&state_bytes).map_err(|source| RestoreError::State {
                    url: url(STATE_FILE),
                    source,
                })?;
            let mem_bytes = fetch(MEMORY_FILE, &MANIFEST_KIND)?;
            let manifest = decode_manifest(&mem_bytes, &url(MEMORY_FILE))?;
            let working_set = match meta.fetch(WORKINGSET_FILE, cap(&WORKINGSET_KIND)) {
                Ok(b) => WorkingSet::decode(&b)
                    .map_err(|e| {
                        log::warn!("ignoring {}: {}", url(WORKINGSET_FILE), error_chain(&e))
                    })
                    .ok(),
                Err(e) if e.is_not_found() => None,
                Err(e) => {
                    log::warn!("no working set: {}", error_chain(&e));
                    None
                }
            };
            let base = match &state.store {
                None => vm_url.clone(),
                Some(p) if p.is_absolute() => {
                    return Err(RestoreError::Url(ArchiveError::BadUrl {
                        url: vm_url.clone(),
                        reason: format!(
                            "the archived state names a local chunk store {} (push it with \
                             `vmm archive push`)",
                            p.display()
                        ),
                    }));
                }
                Some(p) => resolve_url(vm_url, &p.to_string_lossy()).map_err(RestoreError::Url)?,
            };
            let chunks = Arc::new(HttpStore::new(&base, http.clone()).map_err(|source| {
                RestoreError::Http {
                    url: base.clone(),
                    source,
                }
            })?);
            Ok(Loaded {
                state,
                manifest,
                manifest_hash: manifest_hash(&mem_bytes),
                working_set,
                upstream: chunks.clone(),
                meta_http: Some(meta),
                chunks_http: Some(chunks),
                meta_local_bytes: 0,
                vm_url: Some(vm_url.clone()),
                state_name: url(STATE_FILE),
                memory_name: url(MEMORY_FILE),
            })
        }
        Source::Local { vm_dir } => {
            let read = |f: &str| {
                let p = vm_dir.join(f);
                std::fs::read(&p).map_err(|source| RestoreError::Read { path: p, source })
            };
            let name = |f: &str| vm_dir.join(f).display().to_string();
            let state_bytes = read(STATE_FILE)?;
            let state =
                MicrovmState::decode(&state_bytes).map_err(|source| RestoreError::State {
                    url: name(STATE_FILE),
                    source,
                })?;
            let mem_bytes = read(MEMORY_FILE)?;
            let manifest = decode_manifest(&mem_bytes, &name(MEMORY_FILE))?;
            let ws_path = vm_dir.join(WORKINGSET_FILE);
            let working_set = ws_path
                .is_file()
                .then(|| {
                    WorkingSet::read_from(&ws_path)
                        .map_err(|e| {
                            log::warn!("ignoring {}: {}", ws_path.display(), error_chain(&e))
                        })
                        .ok()
                })
                .flatten();
            let store_dir = state.store_dir(vm_dir);
            crate::formats::check_archive(&store_dir).map_err(RestoreError::Archive)?;
            let store = LocalStore::open(&store_dir, LocalStoreOptions::default())
                .map_err(RestoreError::Store)?;
            Ok(Loaded {
                meta_local_bytes: (state_bytes.len() + mem_bytes.len()) as u64,
                state,
                manifest,
                manifest_hash: manifest_hash(&mem_bytes),
                working_set,
                upstream: Arc::new(store),
                meta_http: None,
                chunks_http: None,
                // Disk images relative to the archive are read from the directory
                // through the remote-disk backend's `file://` support.
                vm_url: Some(format!(
                    "file://{}",
                    std::fs::canonicalize(vm_dir)
                        .unwrap_or_else(|_| vm_dir.to_path_buf())
                        .display()
                )),
                state_name: name(STATE_FILE),
                memory_name: name(MEMORY_FILE),
            })
        }
    }
}

fn decode_manifest(bytes: &[u8], url: &str) -> Result<MemoryManifest, RestoreError> {
    let err = |source| RestoreError::Manifest {
        url: url.into(),
        source,
    };
    let m: MemoryManifest =
        file::decode(&MANIFEST_KIND, bytes).map_err(|e| err(ManifestError::File(e)))?;
    m.validate().map_err(err)?;
    Ok(m)
}

/// The http identity inside a recorded disk identity.
fn base_identity(id: &mut BackendIdentity) -> &mut BackendIdentity {
    if id.kind == "overlay" && id.inner.is_some() {
        id.inner.as_deref_mut().unwrap_or_else(|| unreachable!())
    } else {
        id
    }
}

/// Points disk `i` at the archive (resolved URL, cache, fresh overlay) and patches the
/// recorded identity accordingly. (The builder then fills a fresh overlay with the
/// overlay content captured in the snapshot, if any.)
fn prepare_disk(
    state: &mut MicrovmState,
    i: usize,
    vm_url: Option<&str>,
    cache_root: &Path,
    overlay_dir: &mut dyn FnMut() -> Result<PathBuf, RestoreError>,
) -> Result<(), RestoreError> {
    let derr = |reason: String| RestoreError::Disk { index: i, reason };
    let b = &mut state.config.blocks[i];
    let Some(url) = b.url.clone() else {
        // A local file (a VM snapshotted elsewhere and copied in): used as recorded.
        return Ok(());
    };
    let abs = match vm_url {
        Some(v) => resolve_url(v, &url).map_err(RestoreError::Url)?,
        None if super::is_relative_url(&url) => {
            return Err(derr(format!(
                "its image {url} is relative to the archive: serve the archive over HTTP and \
                 restore http://HOST/…/vms/NAME"
            )));
        }
        None => url,
    };
    b.url = Some(abs.clone());
    b.cache = Some(cache_root.join("images"));
    b.record_prefetch = None;
    b.prefetch = None;
    let overlay = match &b.overlay {
        None => None,
        Some(_) => {
            let p = overlay_dir()?.join(format!("disk{i}.overlay"));
            if p.exists() {
                return Err(derr(format!(
                    "overlay {} already exists (give every instance its own --overlay-dir)",
                    p.display()
                )));
            }
            b.overlay = Some(p.clone());
            Some(p)
        }
    };
    let identity = &mut state.blocks[i].device.identity;
    if let Some(p) = &overlay
        && identity.kind == "overlay"
    {
        identity.location = p.display().to_string();
    }
    base_identity(identity).location = abs;
    Ok(())
}

/// Resumes the archived VM at `source` (see the module documentation). The VM runs
/// (unless `start_paused`) when this returns; run it with [`Vmm::run`] and drop the
/// session after the VM.
pub fn restore(
    source: &Source,
    opts: ArchiveRestoreOptions,
) -> Result<(Vmm, ArchiveSession), RestoreError> {
    let started = opts.started.unwrap_or_else(Instant::now);
    let cache_root = opts
        .cache_root
        .clone()
        .unwrap_or_else(super::default_cache_root);
    let mut loaded = load(source, &opts.http)?;
    let remote_chunks = loaded.chunks_http.is_some();
    let store = Arc::new(
        CachedStore::new(
            Arc::clone(&loaded.upstream),
            remote_chunks.then(|| cache_root.join("chunks")).as_deref(),
        )
        .map_err(RestoreError::Cache)?,
    );
    if opts.record {
        store.start_recording();
    }

    // Disks.
    let mut temp_dir = None;
    let mut overlay_dir = || -> Result<PathBuf, RestoreError> {
        let d = match (&opts.overlay_dir, &temp_dir) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => return Ok(PathBuf::clone(t)),
            (None, None) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let d = cache_root
                    .join("instances")
                    .join(format!("{}-{nanos}", std::process::id()));
                temp_dir = Some(d.clone());
                d
            }
        };
        std::fs::create_dir_all(&d).map_err(|source| RestoreError::Read {
            path: d.clone(),
            source,
        })?;
        Ok(d)
    };
    for i in 0..loaded.state.blocks.len() {
        prepare_disk(
            &mut loaded.state,
            i,
            loaded.vm_url.as_deref(),
            &cache_root,
            &mut overlay_dir,
        )?;
    }
    let recorded: Vec<BackendIdentity> = loaded
        .state
        .blocks
        .iter()
        .map(|b| b.device.identity.clone())
        .collect();

    // What to prefetch, decided before the manifest moves into the builder.
    let mut plan = None;
    if !opts.eager_memory && remote_chunks {
        let mut ws: Vec<ChunkId> = Vec::new();
        if opts.prefetch
            && let Some(w) = loaded.working_set.take()
        {
            if w.manifest_hash == loaded.manifest_hash {
                ws = w.chunks;
            } else {
                log::warn!(
                    "the archived working set was recorded for another memory manifest; ignored"
                );
            }
        }
        let in_ws: std::collections::HashSet<ChunkId> = ws.iter().copied().collect();
        let mut seen = std::collections::HashSet::new();
        let rest: Vec<ChunkId> = loaded
            .manifest
            .chunk_ids()
            .filter(|id| !in_ws.contains(id) && seen.insert(**id))
            .copied()
            .collect();
        plan = Some(PrefetchPlan {
            working_set: ws,
            rest,
            fill: if opts.record {
                FillRate::Off
            } else {
                opts.fill
            },
            threads: opts.prefetch_threads,
        });
    }
    let memory_size = loaded.manifest.memory_size();
    let ropts = RestoreOptions {
        console: opts.console,
        blocks: None,
        force: opts.force,
        start_paused: true,
        eager_memory: opts.eager_memory,
        clock: opts.clock,
    };
    let mut vmm = build_from_parts(
        loaded.state,
        loaded.manifest,
        Arc::clone(&store) as Arc<dyn ChunkStore>,
        Path::new(&loaded.state_name),
        Path::new(&loaded.memory_name),
        ropts,
        // Over HTTP the prefetcher starts the fill once the cache is warm; from a local
        // archive the handler's own fill reads local files, unless there is none.
        !remote_chunks && !opts.record && opts.fill != FillRate::Off,
    )
    .map_err(RestoreError::Build)?;
    // The images must be the archived ones.
    for (i, disk) in &vmm.remote {
        let want = recorded
            .get(*i)
            .and_then(|id| {
                let mut id = id.clone();
                base_identity(&mut id).stamp.clone()
            })
            .unwrap_or_default();
        let found = format!("image-id={}", disk.image_id());
        if want != found {
            let msg = format!(
                "image {} is {found}, the archived VM was snapshotted on {want}",
                disk.url()
            );
            if !opts.force {
                return Err(RestoreError::Disk {
                    index: *i,
                    reason: format!("{msg} (--force to accept)"),
                });
            }
            log::warn!("disk {i}: {msg}; continuing because of --force");
        }
    }
    let lazy = vmm.lazy.as_ref().and_then(|l| l.handle().ok());
    let meters = Arc::new(Meters {
        started,
        meta: loaded.meta_http,
        chunks_http: loaded.chunks_http,
        meta_local_bytes: loaded.meta_local_bytes,
        store: Arc::clone(&store),
        disks: vmm.remote.iter().map(|(_, d)| Arc::clone(d)).collect(),
        lazy,
    });
    let before = meters.snapshot();
    let mut session = ArchiveSession {
        source: source.display(),
        memory_size,
        meters: Arc::clone(&meters),
        prefetcher: None,
        running_after_ms: None,
        before_first_instruction: before,
        first_second: Arc::new(Mutex::new(None)),
        temp_dir,
        manifest_hash: loaded.manifest_hash,
    };
    log::info!(
        "archive {}: fetched before the first guest instruction: {}",
        session.source,
        describe(&before, memory_size)
    );
    if !opts.start_paused {
        vmm.resume()
            .map_err(|e| RestoreError::Build(BuildError::Device(format!("resuming: {e}"))))?;
        let ms = started.elapsed().as_millis() as u64;
        session.running_after_ms = Some(ms);
        log::info!(
            "archive {}: guest running {ms} ms after start",
            session.source
        );
        let slot = Arc::clone(&session.first_second);
        let (m, src) = (Arc::clone(&meters), session.source.clone());
        let _ = std::thread::Builder::new()
            .name("archive-report".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                let s = m.snapshot();
                log::info!(
                    "archive {src}: fetched by the end of the guest's first second: {}",
                    describe(&s, memory_size)
                );
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
            });
    }
    if let Some(plan) = plan {
        let lazy = vmm.lazy.as_ref().and_then(|l| l.handle().ok());
        session.prefetcher = Some(Prefetcher::start(store, plan, lazy));
    }
    Ok((vmm, session))
}

/// Marker check used by tests and `push`: whether an overlay path is the archive's
/// "fresh overlay per instance" placeholder.
pub fn is_instance_overlay(p: &Path) -> bool {
    p == Path::new(INSTANCE_OVERLAY)
}
