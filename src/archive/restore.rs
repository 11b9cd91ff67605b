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

pub use super::session::{ArchiveSession, FetchSnapshot};
use super::session::{Meters, describe};
use super::workingset::{FillRate, PrefetchPlan, Prefetcher, WorkingSet, manifest_hash};
use super::{ArchiveError, INSTANCE_OVERLAY, Source, WORKINGSET_FILE, resolve_url};
use crate::builder::{BuildError, Console};
use crate::builder::{RestoreOptions, build_from_parts};
use crate::disk::BackendIdentity;
use crate::formats::file::{self, FileKind, StateFileError};
use crate::formats::{MANIFEST_KIND, WORKINGSET_KIND};
use crate::snapshot::manifest::{ManifestError, MemoryManifest};
use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::store::cache::{CacheError, CachedStore};
use crate::store::http::{HttpError, HttpStore, HttpStoreOptions};
use crate::store::local::LocalStore;
use crate::store::{ChunkId, ChunkRead, StoreError};
use crate::util::error_chain;
use crate::vmm::Vmm;

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
    /// Root of the one chunk cache (`chunks/`, memory and remote disks alike); `None` =
    /// [`default_cache_root`](super::default_cache_root).
    pub cache_root: Option<PathBuf>,
    /// Size limit of that cache in MiB (oldest chunks evicted first, down to 7/8 of it),
    /// kept by this instance's memory and remote disks; `None` = no limit.
    pub cache_max_mib: Option<u64>,
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
            cache_max_mib: None,
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

/// The metadata of an archived VM.
struct Loaded {
    state: MicrovmState,
    manifest: MemoryManifest,
    manifest_hash: [u8; 32],
    working_set: Option<WorkingSet>,
    /// Upstream store of the chunks, and its HTTP store if remote.
    upstream: Arc<dyn ChunkRead>,
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
        Source::Http { vm_url } => load_http(vm_url, http),
        Source::Local { vm_dir } => load_local(vm_dir),
    }
}

/// An HTTP store on `url`.
fn http_store(url: &str, http: &HttpStoreOptions) -> Result<Arc<HttpStore>, RestoreError> {
    HttpStore::new(url, http.clone())
        .map(Arc::new)
        .map_err(|source| RestoreError::Http {
            url: url.to_string(),
            source,
        })
}

/// Fetches file `f` of the VM at `vm_url` through `meta`. The container (length,
/// checksum) is checked inside the fetch, so an answer damaged on the way is asked for
/// again; what it holds is decoded by the caller.
fn fetch_checked(
    meta: &HttpStore,
    vm_url: &str,
    f: &str,
    kind: &FileKind,
) -> Result<Vec<u8>, RestoreError> {
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
                url: vm_url.to_string(),
            }
        } else {
            RestoreError::Fetch {
                url: format!("{vm_url}/{f}"),
                source,
            }
        }
    })
}

/// The archived working set over HTTP, if there is a usable one.
fn fetch_working_set(meta: &HttpStore, vm_url: &str) -> Option<WorkingSet> {
    let url = format!("{vm_url}/{WORKINGSET_FILE}");
    match meta.fetch(WORKINGSET_FILE, cap(&WORKINGSET_KIND)) {
        Ok(b) => WorkingSet::decode(&b)
            .map_err(|e| log::warn!("ignoring {url}: {}", error_chain(&e)))
            .ok(),
        Err(e) if e.is_not_found() => None,
        Err(e) => {
            log::warn!("no working set: {}", error_chain(&e));
            None
        }
    }
}

/// The base URL of the chunk store the state names (relative to the VM's URL).
fn chunk_base(state: &MicrovmState, vm_url: &str) -> Result<String, RestoreError> {
    match &state.store {
        None => Ok(vm_url.to_string()),
        Some(p) if p.is_absolute() => Err(RestoreError::Url(ArchiveError::BadUrl {
            url: vm_url.to_string(),
            reason: format!(
                "the archived state names a local chunk store {} (push it with \
                 `vmm archive push`)",
                p.display()
            ),
        })),
        Some(p) => resolve_url(vm_url, &p.to_string_lossy()).map_err(RestoreError::Url),
    }
}

fn load_http(vm_url: &str, http: &HttpStoreOptions) -> Result<Loaded, RestoreError> {
    let meta = http_store(vm_url, http)?;
    let url = |f: &str| format!("{vm_url}/{f}");
    let state_bytes = fetch_checked(&meta, vm_url, STATE_FILE, &FileKind::STATE)?;
    let state = MicrovmState::decode(&state_bytes).map_err(|source| RestoreError::State {
        url: url(STATE_FILE),
        source,
    })?;
    let mem_bytes = fetch_checked(&meta, vm_url, MEMORY_FILE, &MANIFEST_KIND)?;
    let manifest = decode_manifest(&mem_bytes, &url(MEMORY_FILE))?;
    let working_set = fetch_working_set(&meta, vm_url);
    let chunks = http_store(&chunk_base(&state, vm_url)?, http)?;
    Ok(Loaded {
        state,
        manifest,
        manifest_hash: manifest_hash(&mem_bytes),
        working_set,
        upstream: chunks.clone(),
        meta_http: Some(meta),
        chunks_http: Some(chunks),
        meta_local_bytes: 0,
        vm_url: Some(vm_url.to_string()),
        state_name: url(STATE_FILE),
        memory_name: url(MEMORY_FILE),
    })
}

/// The working set in a local VM directory, if there is a usable one.
fn read_working_set(vm_dir: &Path) -> Option<WorkingSet> {
    let ws_path = vm_dir.join(WORKINGSET_FILE);
    ws_path
        .is_file()
        .then(|| {
            WorkingSet::read_from(&ws_path)
                .map_err(|e| log::warn!("ignoring {}: {}", ws_path.display(), error_chain(&e)))
                .ok()
        })
        .flatten()
}

fn load_local(vm_dir: &Path) -> Result<Loaded, RestoreError> {
    let read = |f: &str| {
        let p = vm_dir.join(f);
        std::fs::read(&p).map_err(|source| RestoreError::Read { path: p, source })
    };
    let name = |f: &str| vm_dir.join(f).display().to_string();
    let state_bytes = read(STATE_FILE)?;
    let state = MicrovmState::decode(&state_bytes).map_err(|source| RestoreError::State {
        url: name(STATE_FILE),
        source,
    })?;
    let mem_bytes = read(MEMORY_FILE)?;
    let manifest = decode_manifest(&mem_bytes, &name(MEMORY_FILE))?;
    let working_set = read_working_set(vm_dir);
    let store_dir = state.store_dir(vm_dir);
    crate::formats::check_archive(&store_dir).map_err(RestoreError::Archive)?;
    let store = LocalStore::open_read(&store_dir).map_err(RestoreError::Store)?;
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
    b.cache = Some(cache_root.to_path_buf());
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

/// The store serving guest memory: the upstream store through the shared chunk cache
/// (when the chunks are remote), recording the chunks read if `record`.
fn open_store(
    loaded: &Loaded,
    cache_root: &Path,
    max_mib: Option<u64>,
    record: bool,
) -> Result<Arc<CachedStore>, RestoreError> {
    let remote_chunks = loaded.chunks_http.is_some();
    let store = Arc::new(
        CachedStore::with_limit(
            Arc::clone(&loaded.upstream),
            remote_chunks.then(|| cache_root.join("chunks")).as_deref(),
            max_mib.map(|m| m << 20),
        )
        .map_err(RestoreError::Cache)?,
    );
    if record {
        store.start_recording();
    }
    Ok(store)
}

/// Where the fresh disk overlays go: the caller's directory, else a per-instance
/// directory under the cache root, made when first needed.
struct OverlayDirs<'a> {
    given: Option<&'a Path>,
    cache_root: &'a Path,
    temp: Option<PathBuf>,
}

impl OverlayDirs<'_> {
    fn get(&mut self) -> Result<PathBuf, RestoreError> {
        let d = match (self.given, &self.temp) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(t)) => return Ok(t.clone()),
            (None, None) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let d = self
                    .cache_root
                    .join("instances")
                    .join(format!("{}-{nanos}", std::process::id()));
                self.temp = Some(d.clone());
                d
            }
        };
        std::fs::create_dir_all(&d).map_err(|source| RestoreError::Read {
            path: d.clone(),
            source,
        })?;
        Ok(d)
    }
}

/// Prepares every disk of `loaded` ([`prepare_disk`]); returns the per-instance
/// directory made for overlays, if one was.
fn prepare_disks(
    loaded: &mut Loaded,
    cache_root: &Path,
    overlay_dir: Option<&Path>,
) -> Result<Option<PathBuf>, RestoreError> {
    let mut dirs = OverlayDirs {
        given: overlay_dir,
        cache_root,
        temp: None,
    };
    for i in 0..loaded.state.blocks.len() {
        prepare_disk(
            &mut loaded.state,
            i,
            loaded.vm_url.as_deref(),
            cache_root,
            &mut || dirs.get(),
        )?;
    }
    Ok(dirs.temp)
}

/// What to prefetch (the matching working set, then the rest), decided before the
/// manifest moves into the builder.
fn prefetch_plan(loaded: &mut Loaded, opts: &ArchiveRestoreOptions) -> PrefetchPlan {
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
    PrefetchPlan {
        working_set: ws,
        rest,
        fill: if opts.record {
            FillRate::Off
        } else {
            opts.fill
        },
        threads: opts.prefetch_threads,
    }
}

/// Checks that the remote images are the archived ones (`recorded` identities);
/// with `force` a mismatch is only logged.
fn check_images(vmm: &Vmm, recorded: &[BackendIdentity], force: bool) -> Result<(), RestoreError> {
    for (i, disk) in &vmm.machine.remote {
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
            if !force {
                return Err(RestoreError::Disk {
                    index: *i,
                    reason: format!("{msg} (--force to accept)"),
                });
            }
            log::warn!("disk {i}: {msg}; continuing because of --force");
        }
    }
    Ok(())
}

/// Resumes the vCPUs, logs when, and has a thread record the fetch totals one second
/// later.
fn resume_and_report(
    vmm: &mut Vmm,
    session: &mut ArchiveSession,
    started: Instant,
) -> Result<(), RestoreError> {
    vmm.resume()
        .map_err(|e| RestoreError::Build(BuildError::Device(format!("resuming: {e}"))))?;
    let ms = started.elapsed().as_millis() as u64;
    session.running_after_ms = Some(ms);
    log::info!(
        "archive {}: guest running {ms} ms after start",
        session.source
    );
    let slot = Arc::clone(&session.first_second);
    let (m, src) = (Arc::clone(&session.meters), session.source.clone());
    let memory_size = session.memory_size;
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
    Ok(())
}

/// Puts the cache limit on the archived VM's remote disks; returns the identities of the
/// disks the snapshot recorded (checked against the opened ones after the build).
fn limit_disk_caches(loaded: &mut Loaded, cache_max_mib: Option<u64>) -> Vec<BackendIdentity> {
    for b in &mut loaded.state.config.blocks {
        if b.url.is_some() {
            b.cache_max_mib = cache_max_mib;
        }
    }
    loaded
        .state
        .blocks
        .iter()
        .map(|b| b.device.identity.clone())
        .collect()
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
    let store = open_store(&loaded, &cache_root, opts.cache_max_mib, opts.record)?;
    let temp_dir = prepare_disks(&mut loaded, &cache_root, opts.overlay_dir.as_deref())?;
    let recorded = limit_disk_caches(&mut loaded, opts.cache_max_mib);
    let plan = (!opts.eager_memory && remote_chunks).then(|| prefetch_plan(&mut loaded, &opts));
    let memory_size = loaded.manifest.memory_size();
    let ropts = RestoreOptions {
        console: opts.console,
        blocks: None,
        nets: Vec::new(),
        force: opts.force,
        start_paused: true,
        eager_memory: opts.eager_memory,
        clock: opts.clock,
    };
    let mut vmm = build_from_parts(
        loaded.state,
        loaded.manifest,
        Arc::clone(&store) as Arc<dyn ChunkRead>,
        Path::new(&loaded.state_name),
        Path::new(&loaded.memory_name),
        ropts,
        // Over HTTP the prefetcher starts the fill once the cache is warm; from a local
        // archive the handler's own fill reads local files, unless there is none.
        !remote_chunks && !opts.record && opts.fill != FillRate::Off,
    )
    .map_err(RestoreError::Build)?;
    check_images(&vmm, &recorded, opts.force)?;
    let meters = Arc::new(Meters {
        started,
        meta: loaded.meta_http,
        chunks_http: loaded.chunks_http,
        meta_local_bytes: loaded.meta_local_bytes,
        store: Arc::clone(&store),
        disks: vmm
            .machine
            .remote
            .iter()
            .map(|(_, d)| Arc::clone(d))
            .collect(),
        lazy: vmm.machine.lazy.as_ref().and_then(|l| l.handle().ok()),
    });
    let before = meters.snapshot();
    let mut session = ArchiveSession {
        source: source.display(),
        memory_size,
        meters,
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
        resume_and_report(&mut vmm, &mut session, started)?;
    }
    if let Some(plan) = plan {
        let lazy = vmm.machine.lazy.as_ref().and_then(|l| l.handle().ok());
        session.prefetcher = Some(Prefetcher::start(store, plan, lazy));
    }
    Ok((vmm, session))
}

/// Marker check used by tests and `push`: whether an overlay path is the archive's
/// "fresh overlay per instance" placeholder.
pub fn is_instance_overlay(p: &Path) -> bool {
    p == Path::new(INSTANCE_OVERLAY)
}
