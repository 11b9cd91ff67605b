//! `vmm archive push SNAPSHOT s3://BUCKET/PREFIX --name NAME`: an archive in a bucket.
//!
//! The bucket gets exactly the layout of a local archive (`PREFIX/vmm-archive.json`,
//! `PREFIX/chunks/…`, `PREFIX/images/…`, `PREFIX/vms/NAME/{memory,workingset,state}`),
//! so the same objects resume with `vmm restore s3://BUCKET/PREFIX/vms/NAME` (signed) or
//! through the bucket's public HTTP endpoint with `vmm restore http://…/vms/NAME`.
//!
//! 1. The snapshot is pushed into a local staging archive (a temporary directory,
//!    removed afterwards) by [`super::push::push`]: same chunk checks, disk imports and
//!    state rewriting as a local push.
//! 2. Its chunk files are uploaded by a small pool of threads, each chunk only if a
//!    `HEAD` does not find it; then the marker and the image indexes.
//! 3. Then `vms/NAME/memory`, the working set (or the removal of a stale one), and
//!    `vms/NAME/state` **last**: a reader that finds the state finds every object it
//!    refers to. Two pushes of the same VM at once both succeed (every object they write
//!    has the same content; each `PUT` is atomic).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::push::{PushError, push_in_layout};
use super::{VMS_DIR, WORKINGSET_FILE};
use crate::formats::marker::ARCHIVE_MARKER;
use crate::snapshot::microvm::{MEMORY_FILE, STATE_FILE};
use crate::store::Layout;
use crate::store::http::{HttpError, HttpStoreOptions};
use crate::store::s3::S3Store;
use crate::store::s3sign::S3Error;
use crate::store::{ChunkId, PutOutcome};
use crate::util::IoError;

/// Requests in flight while uploading.
pub const UPLOAD_THREADS: usize = 8;

/// Errors of pushing to S3.
#[derive(Debug, thiserror::Error)]
pub enum S3PushError {
    /// The VM name is unusable.
    #[error("archive push")]
    Name(#[source] super::ArchiveError),
    /// The bucket URL or the S3 configuration is unusable.
    #[error("archive push")]
    Config(#[source] S3Error),
    /// Staging the archive locally failed.
    #[error("archive push (staging)")]
    Stage(#[source] Box<PushError>),
    /// Staging an image import locally failed.
    #[error("image import (staging)")]
    Import(#[source] Box<crate::image::ImageError>),
    /// A staged file could not be read.
    #[error(transparent)]
    Io(#[from] IoError),
    /// An upload failed.
    #[error("cannot upload {key}")]
    Upload {
        /// The object key.
        key: String,
        /// Cause.
        #[source]
        source: HttpError,
    },
}

/// What a push to S3 did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct S3PushReport {
    /// `s3://BUCKET/PREFIX/vms/NAME`.
    pub vm_url: String,
    /// Chunks the snapshot needs (memory and captured overlays).
    pub chunks_total: u64,
    /// Chunk files uploaded (those of imported disk images included).
    pub chunks_uploaded: u64,
    /// Chunks the bucket already had.
    pub chunks_present: u64,
    /// Bytes uploaded (every object).
    pub bytes_uploaded: u64,
    /// Requests made (HEAD, PUT, DELETE; retries included).
    pub requests: u64,
    /// Wall time.
    pub elapsed_ms: u64,
}

impl std::fmt::Display for S3PushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pushed {}: {} chunks, {} chunk files uploaded (disk images included), {} \
             already in the bucket; {} bytes in {} requests in {:.2} s",
            self.vm_url,
            self.chunks_total,
            self.chunks_uploaded,
            self.chunks_present,
            self.bytes_uploaded,
            self.requests,
            self.elapsed_ms as f64 / 1e3
        )
    }
}

/// A temporary directory removed on drop.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

fn staging_dir() -> Result<Staging, S3PushError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let d = std::env::temp_dir().join(format!("vmm-s3-push-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| IoError::new("create", &d, e))?;
    Ok(Staging(d))
}

/// Every file under `dir/sub`, as paths relative to `dir` with `/` separators.
fn files_under(dir: &Path, sub: &str) -> Result<Vec<String>, S3PushError> {
    let mut out = Vec::new();
    let mut todo = vec![sub.to_string()];
    while let Some(rel) = todo.pop() {
        let p = dir.join(&rel);
        if !p.exists() {
            continue;
        }
        let entries = std::fs::read_dir(&p).map_err(|e| IoError::new("list", &p, e))?;
        for e in entries {
            let e = e.map_err(|e| IoError::new("list", &p, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let child = format!("{rel}/{name}");
            if e.path().is_dir() {
                todo.push(child);
            } else if !name.starts_with('.') && !name.contains(".tmp") {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Uploads `files` (relative to `dir`) with [`UPLOAD_THREADS`] threads; chunk files only
/// when the bucket lacks them. Returns (uploaded, present) chunk counts.
fn upload_all(
    store: &S3Store,
    dir: &Path,
    files: &[String],
    chunks: bool,
) -> Result<(u64, u64), S3PushError> {
    let next = AtomicUsize::new(0);
    let (uploaded, present) = (AtomicU64::new(0), AtomicU64::new(0));
    let failed: Mutex<Option<S3PushError>> = Mutex::new(None);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(rel) = files.get(i) else { return };
            if crate::util::lock(&failed).is_some() {
                return;
            }
            if let Err(e) = upload_one(store, dir, rel, chunks, &uploaded, &present) {
                crate::util::lock(&failed).get_or_insert(e);
                return;
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..UPLOAD_THREADS.min(files.len()).max(1) {
            s.spawn(work);
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok((uploaded.into_inner(), present.into_inner())),
    }
}

fn upload_one(
    store: &S3Store,
    dir: &Path,
    rel: &str,
    chunk: bool,
    uploaded: &AtomicU64,
    present: &AtomicU64,
) -> Result<(), S3PushError> {
    let p = dir.join(rel);
    let body = std::fs::read(&p).map_err(|e| IoError::new("read", &p, e))?;
    let upload = |source| S3PushError::Upload {
        key: format!("{}/{rel}", store.url()),
        source,
    };
    let id = chunk
        .then(|| {
            rel.rsplit('/')
                .next()
                .and_then(|n| n.parse::<ChunkId>().ok())
        })
        .flatten();
    match id {
        Some(id) => match store.put_chunk_file(&id, &body).map_err(upload)? {
            PutOutcome::Present => present.fetch_add(1, Ordering::Relaxed),
            PutOutcome::Written { .. } => uploaded.fetch_add(1, Ordering::Relaxed),
        },
        None => {
            store.put_object(rel, &body).map_err(upload)?;
            0
        }
    };
    Ok(())
}

/// Pushes the snapshot in `snapshot_dir` to the archive at `url` (`s3://BUCKET/PREFIX`)
/// as VM `name` (see the module documentation), with `opts` for the requests.
pub fn push_s3(
    snapshot_dir: &Path,
    url: &str,
    name: &str,
    opts: HttpStoreOptions,
) -> Result<S3PushReport, S3PushError> {
    let t0 = Instant::now();
    super::check_vm_name(name).map_err(S3PushError::Name)?;
    let store = S3Store::open(url, opts).map_err(S3PushError::Config)?;
    let staging = staging_dir()?;
    let dir = staging.0.as_path();
    // Chunk files, not packs: each chunk is one object, skipped when the bucket has it,
    // and concurrent pushes need no shared pack list (docs/OBJECT_STORAGE.md).
    let local = push_in_layout(snapshot_dir, dir, name, Layout::Files)
        .map_err(|e| S3PushError::Stage(Box::new(e)))?;
    let chunk_files = files_under(dir, "chunks")?;
    let (uploaded, present) = upload_all(&store, dir, &chunk_files, true)?;
    let mut rest = vec![ARCHIVE_MARKER.to_string()];
    rest.extend(files_under(dir, "images")?);
    upload_all(&store, dir, &rest, false)?;
    let vm = format!("{VMS_DIR}/{name}");
    let one = |rel: String| upload_all(&store, dir, &[rel], false);
    one(format!("{vm}/{MEMORY_FILE}"))?;
    if dir.join(&vm).join(WORKINGSET_FILE).is_file() {
        one(format!("{vm}/{WORKINGSET_FILE}"))?;
    } else {
        let rel = format!("{vm}/{WORKINGSET_FILE}");
        store
            .delete_object(&rel)
            .map_err(|source| S3PushError::Upload {
                key: format!("{}/{rel}", store.url()),
                source,
            })?;
    }
    one(format!("{vm}/{STATE_FILE}"))?;
    let w = store.write_stats();
    Ok(S3PushReport {
        vm_url: format!("{}/{vm}", store.url()),
        chunks_total: local.chunks_total,
        chunks_uploaded: uploaded,
        chunks_present: present,
        bytes_uploaded: w.put_bytes,
        requests: w.requests,
        elapsed_ms: t0.elapsed().as_millis() as u64,
    })
}

/// `vmm image import SRC s3://BUCKET/PREFIX --name NAME`: imports the image into a local
/// staging archive ([`crate::image::import_image`]), uploads the chunk files the bucket
/// lacks, then `images/NAME` last. Returns the report line.
pub fn import_image_s3(
    src: &Path,
    url: &str,
    name: &str,
    chunk_size: u32,
    opts: HttpStoreOptions,
) -> Result<String, S3PushError> {
    let t0 = Instant::now();
    let store = S3Store::open(url, opts).map_err(S3PushError::Config)?;
    let staging = staging_dir()?;
    let dir = staging.0.as_path();
    let local = crate::image::import_image(src, dir, name, chunk_size)
        .map_err(|e| S3PushError::Import(Box::new(e)))?;
    let chunk_files = files_under(dir, "chunks")?;
    let (uploaded, present) = upload_all(&store, dir, &chunk_files, true)?;
    upload_all(&store, dir, &[format!("images/{name}")], false)?;
    let w = store.write_stats();
    Ok(format!(
        "{local}; uploaded to {}/images/{name}: {uploaded} chunk files uploaded, {present} \
         already in the bucket; {} bytes in {} requests in {:.2} s",
        store.url(),
        w.put_bytes,
        w.requests,
        t0.elapsed().as_secs_f64()
    ))
}
