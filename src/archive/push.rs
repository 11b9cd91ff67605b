//! `vmm archive push SNAPSHOT ARCHIVE --name NAME`: writes a snapshot into an archive.
//!
//! 1. Reads the snapshot's state and manifest, and every chunk it needs
//!    ([`chunk_refs`]: memory and captured overlays).
//! 2. Copies the chunks the archive lacks into one new pack `ARCHIVE/packs/<id>.pack`,
//!    record by record as they are stored (compressed or not), each verified against its
//!    id first; then the pack and its index are made durable and the pack is added to
//!    `ARCHIVE/packs/list` (what HTTP readers load). A crash before the index is renamed
//!    leaves a pack without an index, which every reader ignores.
//! 3. Disks: a remote image stays a URL — relative (`../../images/X`) when the same image
//!    (same image id) is in this archive; a local file is imported as image
//!    `NAME.diskN` ([`crate::image`]) and referred to relatively. Writable disks get
//!    [`INSTANCE_OVERLAY`](super::INSTANCE_OVERLAY): each resumed instance gets a fresh
//!    overlay. The recorded disk identity is rewritten to match.
//! 4. Writes `vms/NAME/memory`, the working set if the snapshot has one (else removes a
//!    stale one), and `vms/NAME/state` last, with its store set to `../..`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::{INSTANCE_OVERLAY, STORE_FROM_VM_DIR, VMS_DIR, WORKINGSET_FILE};
use crate::disk::BackendIdentity;
use crate::formats::file::{self, FileKind, StateFileError};
use crate::image::{self, ImageError};
use crate::snapshot::manifest::{ManifestError, MemoryManifest};
use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::snapshot::refs::{RefsError, chunk_refs};
use crate::store::{
    ChunkId, ChunkRead, Layout, LocalStore, LocalStoreOptions, PutOutcome, StoreError,
};
use crate::util::IoError;
use crate::util::fs::replace_pair;

/// Errors of `archive push`.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The VM name is unusable.
    #[error("archive push")]
    Name(#[source] super::ArchiveError),
    /// The archive's layout is one this build does not write.
    #[error("archive")]
    Archive(#[source] crate::formats::MarkerError),
    /// The snapshot's state file.
    #[error("cannot read the snapshot state {}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StateFileError,
    },
    /// The snapshot's memory manifest.
    #[error("cannot read the memory manifest {}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ManifestError,
    },
    /// The list of chunks the snapshot needs.
    #[error("cannot list the snapshot's chunks")]
    Refs(#[source] RefsError),
    /// A chunk of the snapshot is missing or damaged, or the archive's store failed.
    #[error("chunk store {}", path.display())]
    Chunk {
        /// The store (the snapshot's or the archive's).
        path: PathBuf,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// A file operation in the archive failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Importing a local disk as an image failed.
    #[error("cannot import disk {index} ({}) into the archive", path.display())]
    Import {
        /// Disk index.
        index: usize,
        /// The disk file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ImageError,
    },
    /// A disk that cannot be archived.
    #[error("disk {index}: {reason}")]
    Disk {
        /// Disk index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Writing the archived state, manifest or working set failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StateFileError,
    },
}

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    /// The archived VM's directory.
    pub vm_dir: PathBuf,
    /// Chunks the snapshot needs.
    pub chunks_total: u64,
    /// Chunks copied into the archive.
    pub chunks_copied: u64,
    /// Bytes of chunk files copied.
    pub bytes_copied: u64,
    /// Chunks the archive already had.
    pub chunks_present: u64,
    /// Images imported for local disks (their names).
    pub images_imported: Vec<String>,
    /// Whether a working set was archived along.
    pub working_set: bool,
    /// Wall time.
    pub elapsed_ms: u64,
}

impl std::fmt::Display for PushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pushed {}: {} chunks, {} copied ({} bytes), {} already in the archive",
            self.vm_dir.display(),
            self.chunks_total,
            self.chunks_copied,
            self.bytes_copied,
            self.chunks_present
        )?;
        if !self.images_imported.is_empty() {
            write!(f, "; disks imported as {}", self.images_imported.join(", "))?;
        }
        write!(f, " in {:.2} s", self.elapsed_ms as f64 / 1e3)
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PushError + use<> {
    crate::util::io_err(op, path)
}

/// Pushes the snapshot in `snapshot_dir` into `archive` as VM `name` (see the module
/// documentation), new chunks in packs. Pushing again under the same name replaces the
/// archived VM.
pub fn push(snapshot_dir: &Path, archive: &Path, name: &str) -> Result<PushReport, PushError> {
    push_in_layout(snapshot_dir, archive, name, Layout::Packs)
}

/// [`push`], writing new chunks in `layout`: packs for an archive directory, chunk
/// files for the staging copy of an object-store push (docs/OBJECT_STORAGE.md). Pushing
/// again under the same name replaces the archived VM.
pub fn push_in_layout(
    snapshot_dir: &Path,
    archive: &Path,
    name: &str,
    layout: Layout,
) -> Result<PushReport, PushError> {
    let t0 = Instant::now();
    super::check_vm_name(name).map_err(PushError::Name)?;
    crate::formats::prepare_archive(archive).map_err(PushError::Archive)?;
    let state_path = snapshot_dir.join(STATE_FILE);
    let mut state = MicrovmState::read(&state_path).map_err(|source| PushError::State {
        path: state_path.clone(),
        source,
    })?;
    let mem_path = snapshot_dir.join(MEMORY_FILE);
    let manifest = MemoryManifest::read_from(&mem_path).map_err(|source| PushError::Manifest {
        path: mem_path.clone(),
        source,
    })?;
    let refs = chunk_refs(snapshot_dir).map_err(PushError::Refs)?;
    let src_store = state.store_dir(snapshot_dir);
    let (copied, bytes, present) = copy_chunks(&refs, &src_store, archive, layout)?;

    let mut imported = Vec::new();
    for i in 0..state.blocks.len() {
        if let Some(img) = archive_disk(&mut state, i, archive, name)? {
            imported.push(img);
        }
    }

    let vm_dir = archive.join(VMS_DIR).join(name);
    fs::create_dir_all(&vm_dir).map_err(io("create", &vm_dir))?;
    // The manifest goes as read (same bytes: a working set names its hash).
    let mem_bytes = fs::read(&mem_path).map_err(io("read", &mem_path))?;
    drop(manifest);
    let working_set = copy_working_set(snapshot_dir, &vm_dir)?;
    state.store = Some(PathBuf::from(STORE_FROM_VM_DIR));
    let dest = vm_dir.join(STATE_FILE);
    let state_bytes =
        file::encode(&FileKind::STATE, &state).map_err(|source| PushError::Write {
            path: dest.clone(),
            source,
        })?;
    // Pushing over an archived VM: never its old state beside the new manifest (a working
    // set written above names the manifest it was recorded for, so a stale one is ignored).
    replace_pair(
        (&vm_dir.join(MEMORY_FILE), &mem_bytes),
        (&dest, &state_bytes),
    )
    .map_err(|source| PushError::Write {
        path: dest,
        source: source.into(),
    })?;
    Ok(PushReport {
        vm_dir,
        chunks_total: refs.len() as u64,
        chunks_copied: copied,
        bytes_copied: bytes,
        chunks_present: present,
        images_imported: imported,
        working_set,
        elapsed_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Copies the snapshot's working set (if it has one) into the archived VM's directory,
/// or removes a stale one there; returns whether there was one.
fn copy_working_set(snapshot_dir: &Path, vm_dir: &Path) -> Result<bool, PushError> {
    let ws_src = snapshot_dir.join(WORKINGSET_FILE);
    let ws_dest = vm_dir.join(WORKINGSET_FILE);
    let working_set = ws_src.is_file();
    if working_set {
        let ws = super::workingset::WorkingSet::read_from(&ws_src).map_err(|e| match e {
            super::workingset::WorkingSetError::File(source) => PushError::Write {
                path: ws_src.clone(),
                source,
            },
        })?;
        ws.write_to(&ws_dest).map_err(|e| match e {
            super::workingset::WorkingSetError::File(source) => PushError::Write {
                path: ws_dest.clone(),
                source,
            },
        })?;
    } else if ws_dest.exists() {
        fs::remove_file(&ws_dest).map_err(io("remove the stale", &ws_dest))?;
    }
    Ok(working_set)
}

/// Copies the chunks of `refs` missing from `archive` out of `src_store` (records as
/// stored, each checked to decode to its id) into one new pack of the archive, on a few
/// threads, and publishes it: pack and index made durable, `packs/list` updated, one
/// directory fsync. Returns (copied, bytes copied, already present).
fn copy_chunks(
    refs: &BTreeSet<ChunkId>,
    src_store: &Path,
    archive: &Path,
    layout: Layout,
) -> Result<(u64, u64, u64), PushError> {
    let store_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PushError::Chunk { path, source }
    };
    let src =
        LocalStore::open(src_store, LocalStoreOptions::default()).map_err(store_err(src_store))?;
    let dest = LocalStore::open(
        archive,
        LocalStoreOptions {
            layout,
            publish_list: layout == Layout::Packs,
            ..LocalStoreOptions::default()
        },
    )
    .map_err(store_err(archive))?;
    let ids: Vec<&ChunkId> = refs.iter().collect();
    let next = AtomicU64::new(0);
    let (copied, bytes, present) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let first_err = Mutex::new(None);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(id) = ids.get(i) else { return };
                    if crate::util::lock(&first_err).is_some() {
                        return;
                    }
                    let copy = || -> Result<PutOutcome, PushError> {
                        if dest.contains(id).map_err(store_err(archive))? {
                            return Ok(PutOutcome::Present);
                        }
                        let rec = src.read_stored(id).map_err(store_err(src_store))?;
                        dest.put_stored(id, &rec).map_err(store_err(archive))
                    };
                    match copy() {
                        Ok(PutOutcome::Present) => {
                            present.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(PutOutcome::Written { stored_bytes }) => {
                            copied.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(stored_bytes, Ordering::Relaxed);
                        }
                        Err(e) => {
                            crate::util::lock(&first_err).get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    // On an error, dropping `dest` unsynced deletes the new pack.
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    dest.sync().map_err(store_err(archive))?;
    Ok((
        copied.into_inner(),
        bytes.into_inner(),
        present.into_inner(),
    ))
}

/// The image id a remote disk's identity records (`image-id=<hex>`).
fn recorded_image_id(id: &BackendIdentity) -> Option<String> {
    let http = if id.kind == "overlay" {
        id.inner.as_deref()?
    } else {
        id
    };
    http.stamp
        .as_deref()?
        .strip_prefix("image-id=")
        .map(str::to_string)
}

/// The disk's GET_ID string as recorded.
fn disk_id_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Where remote disk `i` (image `url`) is found from the archive: relative to it when
/// the archive holds the same image (same content id), else the recorded URL; and the
/// recorded image id.
fn remote_disk_url(
    url: &str,
    saved: &BackendIdentity,
    i: usize,
    archive: &Path,
) -> Result<(String, Option<String>), PushError> {
    let (_, img) = crate::disk::http::split_image_url(url).map_err(|e| PushError::Disk {
        index: i,
        reason: crate::util::error_chain(&e),
    })?;
    let stamp = recorded_image_id(saved);
    let local = image::read_index(&image::index_path(archive, &img))
        .ok()
        .map(|ix| ix.id().to_string());
    let url = match (&local, &stamp) {
        (Some(l), Some(s)) if l == s => format!("{STORE_FROM_VM_DIR}/images/{img}"),
        _ => url.to_string(),
    };
    Ok((url, stamp))
}

/// Imports file disk `i` (of `size` bytes at snapshot time, identity kind `kind`) as image
/// `NAME.diskI`; returns its URL from the VM's directory, its image id and its name.
fn import_file_disk(
    b: &crate::config::BlockConfig,
    kind: &str,
    size: u64,
    i: usize,
    archive: &Path,
    name: &str,
) -> Result<(String, String, String), PushError> {
    if kind != "file" {
        return Err(PushError::Disk {
            index: i,
            reason: format!("a {kind} disk cannot be archived (only files and remote images)"),
        });
    }
    let img = format!("{name}.disk{i}");
    let meta = fs::metadata(&b.path).map_err(io("stat", &b.path))?;
    if meta.len() != size {
        return Err(PushError::Disk {
            index: i,
            reason: format!(
                "{} is {} bytes now, {size} at snapshot time",
                b.path.display(),
                meta.len()
            ),
        });
    }
    log::info!(
        "archive push: importing disk {i} ({}) as image {img}; the archive gets the \
         file's current content",
        b.path.display()
    );
    let report = image::import_image(&b.path, archive, &img, image::DEFAULT_IMAGE_CHUNK_SIZE)
        .map_err(|source| PushError::Import {
            index: i,
            path: b.path.clone(),
            source,
        })?;
    Ok((
        format!("{STORE_FROM_VM_DIR}/images/{img}"),
        report.image_id.to_string(),
        img,
    ))
}

/// The identity an archived disk is recorded with: the image at `url`, under a fresh
/// per-instance overlay if `writable`.
fn archived_identity(
    url: &str,
    size: u64,
    stamp: Option<String>,
    writable: bool,
) -> BackendIdentity {
    let base = BackendIdentity {
        kind: "http".into(),
        location: url.to_string(),
        size,
        stamp: stamp.map(|s| format!("image-id={s}")),
        inner: None,
    };
    if writable {
        BackendIdentity {
            kind: "overlay".into(),
            location: INSTANCE_OVERLAY.into(),
            size,
            stamp: None,
            inner: Some(Box::new(base)),
        }
    } else {
        base
    }
}

/// Rewrites disk `i` of `state` for the archive; returns the image name imported, if any.
fn archive_disk(
    state: &mut MicrovmState,
    i: usize,
    archive: &Path,
    name: &str,
) -> Result<Option<String>, PushError> {
    let b = &state.config.blocks[i];
    let saved = &state.blocks[i].device;
    let size = saved.identity.size;
    let disk_id = disk_id_string(&saved.disk_id);
    let (url, stamp, imported, writable) = match &b.url {
        Some(url) => {
            let (url, stamp) = remote_disk_url(url, &saved.identity, i, archive)?;
            (url, stamp, None, b.overlay.is_some())
        }
        None => {
            let (url, stamp, img) =
                import_file_disk(b, &saved.identity.kind, size, i, archive, name)?;
            (url, Some(stamp), Some(img), !b.read_only)
        }
    };
    let identity = archived_identity(&url, size, stamp, writable);
    let b = &mut state.config.blocks[i];
    b.path = PathBuf::new();
    b.url = Some(url);
    b.id = Some(disk_id);
    b.cache = None;
    b.cache_max_mib = None;
    b.record_prefetch = None;
    b.prefetch = None;
    b.direct = false;
    b.overlay = writable.then(|| PathBuf::from(INSTANCE_OVERLAY));
    state.blocks[i].device.identity = identity;
    Ok(imported)
}
