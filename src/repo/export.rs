//! `export ID FILE` / `import FILE`: one snapshot with exactly the chunks it needs, as one
//! self-contained file.
//!
//! ```text
//! "VMMEXPRT"  u32 version (1)
//! u32 N, N bytes of JSON: {"id": …, "meta": SnapshotMeta}
//! u64 S, S bytes: the state file as stored
//! u64 M, M bytes: the memory manifest as stored
//! u64 C, then C times: 32-byte chunk id, u32 L, L bytes: the chunk file (store format)
//! "VMMEXEND"  32 bytes: BLAKE3 of every byte before it
//! ```
//!
//! All integers little endian. Export writes a temp file next to FILE, fsyncs and renames
//! it. Import checks every length against a cap before allocating, decodes and hashes every
//! chunk, checks the id of the state + manifest and the trailing hash, and lists the
//! snapshot only after all of that; chunks of an import that fails are unreferenced and go
//! at the next `gc`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::progress::Progress;
use super::{CommitMeta, Repo, RepoError, SnapshotId, SnapshotMeta, lock::LockMode};
use crate::formats::EXPORT_VERSION;
use crate::snapshot::microvm::{MEMORY_FILE, STATE_FILE};
use crate::store::local::LocalStore;
use crate::store::{ChunkId, ChunkWrite, MAX_CHUNK_LEN, codec};
use crate::util::IoError;
use crate::util::fs::{Staged, fsync_dir, parent_dir};

const MAGIC: &[u8; 8] = b"VMMEXPRT";
const END: &[u8; 8] = b"VMMEXEND";
const MAX_HEADER: u32 = 1 << 20;
const MAX_STATE: u64 = 64 << 20;
const MAX_MEMORY: u64 = 1 << 30;
const MAX_CHUNK_FILE: u32 = (MAX_CHUNK_LEN + codec::HEADER_LEN + 1024) as u32;

/// Errors of export and import.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A repository operation failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Reading or writing the export file failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A chunk of the snapshot could not be read from the repository.
    #[error("snapshot {id} cannot be exported")]
    Chunk {
        /// The snapshot.
        id: String,
        /// Cause.
        #[source]
        source: crate::store::StoreError,
    },
    /// The export has a format version this build does not read.
    #[error("{}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version problem.
        #[source]
        source: crate::formats::VersionError,
    },
    /// The file is not a valid export.
    #[error("{} is not a valid vmm snapshot export: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, ExportError>;

#[derive(Serialize, Deserialize)]
struct Header {
    id: SnapshotId,
    meta: Option<SnapshotMeta>,
}

/// What an export or import moved.
#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    /// The snapshot.
    pub id: SnapshotId,
    /// The export file.
    pub file: PathBuf,
    /// Chunks in the file.
    pub chunks: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// Import only: chunks the repository did not have yet.
    pub chunks_new: u64,
    /// Import only: false when the snapshot was already in the repository.
    pub new: bool,
}

struct HashWriter<W: Write> {
    inner: W,
    hash: blake3::Hasher,
    n: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.hash.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes snapshot `id` of `repo` to `file`.
pub fn export(
    repo: &Repo,
    id: &SnapshotId,
    file: &Path,
    progress: Option<bool>,
) -> Result<TransferReport> {
    let dir = repo.snapshot_dir(id);
    let read = |name: &str| {
        let p = dir.join(name);
        fs::read(&p).map_err(|source| {
            ExportError::Io(IoError {
                op: "read",
                path: p,
                source,
            })
        })
    };
    let state = read(STATE_FILE)?;
    let memory = read(MEMORY_FILE)?;
    if SnapshotId::of_files(&state, &memory) != *id {
        return Err(ExportError::Repo(RepoError::BadMeta {
            id: id.short(),
            reason: "its state and manifest do not hash to its id (run verify)".into(),
        }));
    }
    let refs = repo.refs(id)?;
    let meta = repo.read_meta(id).ok();
    let store = repo.store()?;

    // Written under a temp name beside `file` (removed on failure), then renamed over it.
    let (mut staged, f) = Staged::create(file)?;
    let tmp = staged.tmp().to_path_buf();
    let parts = ExportParts {
        id,
        meta,
        state: &state,
        memory: &memory,
        refs: &refs,
    };
    let n = write_export(f, &tmp, &parts, &store, progress)?;
    staged.commit()?;
    fsync_dir(parent_dir(file))?;
    Ok(TransferReport {
        id: *id,
        file: file.to_path_buf(),
        chunks: refs.len() as u64,
        file_bytes: n,
        chunks_new: 0,
        new: false,
    })
}

/// What an export file holds.
struct ExportParts<'a> {
    id: &'a SnapshotId,
    meta: Option<SnapshotMeta>,
    state: &'a [u8],
    memory: &'a [u8],
    refs: &'a BTreeSet<ChunkId>,
}

/// Writes the whole export to `f` (the temp file `tmp`) and fsyncs it; returns its length.
fn write_export(
    f: File,
    tmp: &Path,
    parts: &ExportParts<'_>,
    store: &LocalStore,
    progress: Option<bool>,
) -> Result<u64> {
    let io_tmp = |op| IoError::at(op, tmp);
    let mut w = HashWriter {
        inner: BufWriter::with_capacity(1 << 20, f),
        hash: blake3::Hasher::new(),
        n: 0,
    };
    let header = Header {
        id: *parts.id,
        meta: parts.meta.clone(),
    };
    let header = serde_json::to_vec(&header).expect("header serializes");
    let bar = Progress::new("export", parts.refs.len() as u64, progress);
    write_head(&mut w, &header, parts).map_err(io_tmp("write"))?;
    for c in parts.refs {
        let bytes = read_chunk(store, parts.id, c)?;
        (|| -> io::Result<()> {
            w.write_all(c.as_bytes())?;
            w.write_all(&(bytes.len() as u32).to_le_bytes())?;
            w.write_all(&bytes)
        })()
        .map_err(io_tmp("write"))?;
        bar.add(1);
    }
    bar.finish();
    w.write_all(END).map_err(io_tmp("write"))?;
    let digest = w.hash.finalize();
    w.inner
        .write_all(digest.as_bytes())
        .map_err(io_tmp("write"))?;
    let n = w.n + 32;
    let f = w
        .inner
        .into_inner()
        .map_err(|e| io_tmp("write")(e.into_error()))?;
    f.sync_all().map_err(io_tmp("fsync"))?;
    Ok(n)
}

/// Writes everything before the chunks: magic, version, header, state, manifest, count.
fn write_head(w: &mut impl Write, header: &[u8], parts: &ExportParts<'_>) -> io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&EXPORT_VERSION.to_le_bytes())?;
    w.write_all(&(header.len() as u32).to_le_bytes())?;
    w.write_all(header)?;
    w.write_all(&(parts.state.len() as u64).to_le_bytes())?;
    w.write_all(parts.state)?;
    w.write_all(&(parts.memory.len() as u64).to_le_bytes())?;
    w.write_all(parts.memory)?;
    w.write_all(&(parts.refs.len() as u64).to_le_bytes())?;
    Ok(())
}

/// Reads chunk `c` of snapshot `id` as stored (its record, from a pack or a chunk file),
/// checking that it decodes: never export damage, the importer would refuse it anyway.
fn read_chunk(store: &LocalStore, id: &SnapshotId, c: &ChunkId) -> Result<Vec<u8>> {
    store.read_stored(c).map_err(|source| ExportError::Chunk {
        id: id.short(),
        source,
    })
}

struct HashReader<R: Read> {
    inner: R,
    hash: blake3::Hasher,
    n: u64,
}

impl<R: Read> HashReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hash.update(buf);
        self.n += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn vec(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.exact(&mut v)?;
        Ok(v)
    }
}

/// The part of an export file before its chunks ([`ExportReader::head`]).
#[derive(Debug)]
pub struct ExportHead {
    /// The snapshot's id, checked against the state file and manifest.
    pub id: SnapshotId,
    /// Its catalogue entry, if the export has one.
    pub meta: Option<SnapshotMeta>,
    /// The state file as stored.
    pub state: Vec<u8>,
    /// The memory manifest as stored.
    pub memory: Vec<u8>,
    /// How many chunks follow.
    pub count: u64,
}

/// Reads an export file's parts in order, checking each before allocating for it:
/// [`head`](Self::head), then `count` times [`chunk`](Self::chunk), then
/// [`finish`](Self::finish). Errors name `path`.
pub struct ExportReader<R: Read> {
    r: HashReader<R>,
    path: PathBuf,
    file_len: u64,
}

impl<R: Read> ExportReader<R> {
    /// A reader of `file_len` bytes of export from `inner`.
    pub fn new(inner: R, file_len: u64, path: &Path) -> Self {
        Self {
            r: HashReader {
                inner,
                hash: blake3::Hasher::new(),
                n: 0,
            },
            path: path.to_path_buf(),
            file_len,
        }
    }

    fn invalid(&self, reason: String) -> ExportError {
        ExportError::Invalid {
            path: self.path.clone(),
            reason,
        }
    }

    fn trunc(&self) -> impl Fn(io::Error) -> ExportError + '_ {
        |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.invalid("truncated".into())
            } else {
                ExportError::Io(IoError {
                    op: "read",
                    path: self.path.clone(),
                    source: e,
                })
            }
        }
    }

    /// Reads and checks everything before the chunks.
    pub fn head(&mut self) -> Result<ExportHead> {
        let mut magic = [0u8; 8];
        self.r.exact(&mut magic).map_err(self.trunc())?;
        if &magic != MAGIC {
            return Err(self.invalid("bad magic".into()));
        }
        let version = self.r.u32().map_err(self.trunc())?;
        crate::formats::check_version(
            "vmm snapshot export",
            version,
            EXPORT_VERSION,
            EXPORT_VERSION,
        )
        .map_err(|source| ExportError::Version {
            path: self.path.clone(),
            source,
        })?;
        let hlen = self.r.u32().map_err(self.trunc())?;
        if hlen > MAX_HEADER || u64::from(hlen) > self.file_len {
            return Err(self.invalid(format!("header of {hlen} bytes")));
        }
        let raw = self.r.vec(hlen as usize).map_err(self.trunc())?;
        let header: Header =
            serde_json::from_slice(&raw).map_err(|e| self.invalid(format!("bad header: {e}")))?;
        let slen = self.r.u64().map_err(self.trunc())?;
        if slen > MAX_STATE || slen > self.file_len {
            return Err(self.invalid(format!("state of {slen} bytes")));
        }
        let state = self.r.vec(slen as usize).map_err(self.trunc())?;
        let mlen = self.r.u64().map_err(self.trunc())?;
        if mlen > MAX_MEMORY || mlen > self.file_len {
            return Err(self.invalid(format!("memory manifest of {mlen} bytes")));
        }
        let memory = self.r.vec(mlen as usize).map_err(self.trunc())?;
        let id = SnapshotId::of_files(&state, &memory);
        if id != header.id {
            return Err(self.invalid(format!(
                "its state and manifest hash to {}, the header says {}",
                id.short(),
                header.id.short()
            )));
        }
        let count = self.r.u64().map_err(self.trunc())?;
        if count > self.file_len / 36 {
            return Err(self.invalid(format!("{count} chunks announced")));
        }
        Ok(ExportHead {
            id,
            meta: header.meta,
            state,
            memory,
            count,
        })
    }

    /// Reads the next chunk: its id and decoded bytes (which hash to the id).
    pub fn chunk(&mut self) -> Result<(ChunkId, Vec<u8>)> {
        let mut idb = [0u8; 32];
        self.r.exact(&mut idb).map_err(self.trunc())?;
        let cid = ChunkId::from_bytes(idb);
        let len = self.r.u32().map_err(self.trunc())?;
        if len > MAX_CHUNK_FILE || u64::from(len) > self.file_len {
            return Err(self.invalid(format!("chunk {cid} of {len} bytes")));
        }
        let bytes = self.r.vec(len as usize).map_err(self.trunc())?;
        let data = codec::decode(&cid, &bytes).map_err(|e| self.invalid(e.to_string()))?;
        Ok((cid, data))
    }

    /// Reads and checks the end marker and the checksum, and that nothing follows; returns
    /// the file's length.
    pub fn finish(mut self) -> Result<u64> {
        let mut end = [0u8; 8];
        self.r.exact(&mut end).map_err(self.trunc())?;
        if &end != END {
            return Err(self.invalid("bad end marker".into()));
        }
        let digest = self.r.hash.finalize();
        let mut want = [0u8; 32];
        self.r.inner.read_exact(&mut want).map_err(self.trunc())?;
        if digest.as_bytes() != &want {
            return Err(self.invalid("checksum mismatch".into()));
        }
        let mut extra = [0u8; 1];
        if self.r.inner.read(&mut extra).map_err(self.trunc())? != 0 {
            return Err(self.invalid("unexpected data after the checksum".into()));
        }
        Ok(self.r.n + 32)
    }
}

/// Imports the export `file` into `repo` (which may be freshly created). `name`, if given,
/// is pointed at the imported snapshot.
pub fn import(
    repo: &Repo,
    file: &Path,
    name: Option<&str>,
    progress: Option<bool>,
) -> Result<TransferReport> {
    if let Some(n) = name
        && !super::valid_name(n)
    {
        return Err(RepoError::BadName(n.into()).into());
    }
    let f = File::open(file).map_err(|source| {
        ExportError::Io(IoError {
            op: "open",
            path: file.to_path_buf(),
            source,
        })
    })?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = ExportReader::new(BufReader::with_capacity(1 << 20, f), file_len, file);
    let ExportHead {
        id,
        meta,
        state,
        memory,
        count,
    } = r.head()?;

    let _lock = repo.lock(LockMode::Shared, "snapshot import")?;
    let store = repo.store()?;
    let (seen, chunks_new) = import_chunks(&mut r, &store, &id, count, progress)?;
    let file_bytes = r.finish()?;
    store.sync().map_err(|source| ExportError::Chunk {
        id: id.short(),
        source,
    })?;

    let work = repo.new_work_dir("import")?;
    let head = ImportedHead {
        id: &id,
        meta: meta.as_ref(),
        state: &state,
        memory: &memory,
    };
    let (id, new) = match commit_import(repo, &work, &head, name, &seen, file) {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    if let Some(n) = name {
        repo.set_name(n, &id)?;
    }
    Ok(TransferReport {
        id,
        file: file.to_path_buf(),
        chunks: count,
        file_bytes,
        chunks_new,
        new,
    })
}

/// Stores the `count` chunks of the export `r` in `store`; returns their ids and how many
/// were new.
fn import_chunks<R: Read>(
    r: &mut ExportReader<R>,
    store: &LocalStore,
    id: &SnapshotId,
    count: u64,
    progress: Option<bool>,
) -> Result<(BTreeSet<ChunkId>, u64)> {
    let bar = Progress::new("import", count, progress);
    let mut seen = BTreeSet::new();
    let mut chunks_new = 0;
    for _ in 0..count {
        let (cid, data) = r.chunk()?;
        if let crate::store::PutOutcome::Written { .. } =
            store
                .put_hashed(&cid, &data)
                .map_err(|source| ExportError::Chunk {
                    id: id.short(),
                    source,
                })?
        {
            chunks_new += 1;
        }
        seen.insert(cid);
        bar.add(1);
    }
    bar.finish();
    Ok((seen, chunks_new))
}

/// The snapshot an export file describes, read from its head.
struct ImportedHead<'a> {
    id: &'a SnapshotId,
    meta: Option<&'a SnapshotMeta>,
    state: &'a [u8],
    memory: &'a [u8],
}

/// Writes the imported state and manifest into the work directory `work`, checks that
/// the file held every chunk they need (`seen`), and lists the snapshot. Returns its id
/// and whether it is new.
fn commit_import(
    repo: &Repo,
    work: &Path,
    head: &ImportedHead<'_>,
    name: Option<&str>,
    seen: &BTreeSet<ChunkId>,
    file: &Path,
) -> Result<(SnapshotId, bool)> {
    for (n, bytes) in [(STATE_FILE, head.state), (MEMORY_FILE, head.memory)] {
        let p = work.join(n);
        crate::util::fs::write_atomic(&p, bytes)
            .map_err(|source| RepoError::Write { path: p, source })?;
    }
    let refs = crate::snapshot::refs::chunk_refs(work).map_err(|source| RepoError::Snapshot {
        id: head.id.short(),
        source: Box::new(source),
    })?;
    if let Some(c) = refs.iter().find(|c| !seen.contains(c)) {
        return Err(ExportError::Invalid {
            path: file.to_path_buf(),
            reason: format!("chunk {c} the snapshot needs is not in the file"),
        });
    }
    let meta = head.meta;
    Ok(repo.commit(
        work,
        CommitMeta {
            parent: meta.and_then(|m| m.parent),
            name: name
                .map(str::to_string)
                .or_else(|| meta.and_then(|m| m.name.clone())),
            added: None,
        },
    )?)
}
