//! A snapshot repository: many snapshots of one or more VMs sharing one chunk store, with a
//! small catalogue (ids, parents, names), garbage collection, verification and single-file
//! export/import. The design and on-disk layout are in `docs/REPOSITORY.md`.
//!
//! ```text
//! REPO/vmm-repo.json          marker: {"format": "vmm-snapshot-repository", "version": 1}
//! REPO/lock                   flock: shared for create/import/rm, exclusive for gc
//! REPO/packs/<id>.{pack,idx}  the LocalStore (REPO is its root), in packs
//! REPO/chunks/xx/<id>         chunk files of the older layout, still read
//! REPO/snapshots/<id>/state   MicrovmState, store = "../.."
//! REPO/snapshots/<id>/memory  memory manifest
//! REPO/snapshots/<id>/meta.json
//! REPO/names/<name>           a friendly name: the full snapshot id
//! REPO/tmp/                   in-progress creates/imports, snapshots being removed
//! ```
//!
//! A snapshot is listed exactly when `snapshots/<64 hex digits>/` exists; it only ever
//! appears there by an atomic rename of a complete directory, and leaves by an atomic
//! rename into `tmp/`. Its id is content-derived ([`SnapshotId::of_files`]).

pub mod cli;
pub mod export;
pub mod gc;
mod init;
mod listing;
pub mod lock;
pub mod progress;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::store::ChunkRead as _;
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::util::IoError;
use crate::util::fs::fsync_dir;
use lock::{LockMode, RepoLock};

/// The marker file that makes a directory a repository.
pub const MARKER_FILE: &str = "vmm-repo.json";
/// The lock file.
pub const LOCK_FILE: &str = "lock";
/// Directory of committed snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Directory of friendly names.
pub const NAMES_DIR: &str = "names";
/// Directory of work in progress.
pub const TMP_DIR: &str = "tmp";
/// Catalogue entry inside a snapshot directory.
pub const META_FILE: &str = "meta.json";
/// `format` value of the marker file.
pub const REPO_FORMAT: &str = "vmm-snapshot-repository";
/// The chunk store as seen from a snapshot directory (`REPO/snapshots/<id>` and
/// `REPO/tmp/<work>` are both two levels down).
pub const STORE_FROM_SNAPSHOT: &str = "../..";
/// How long create/import/rm wait for a running gc before giving up.
pub const SHARED_LOCK_TIMEOUT: Duration = Duration::from_secs(300);
/// How long gc waits for running creates/imports.
pub const EXCLUSIVE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Characters shown for a short snapshot id.
pub const SHORT_ID_LEN: usize = 12;
/// The shortest id prefix accepted on the command line.
pub const MIN_PREFIX_LEN: usize = 4;

/// Errors of the repository core.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A file system operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The directory is not a repository.
    #[error("{} is not a vmm snapshot repository (no {MARKER_FILE}){hint}", path.display())]
    NotARepo {
        /// The directory.
        path: PathBuf,
        /// Extra advice.
        hint: &'static str,
    },
    /// The marker file is damaged or of another version.
    #[error("bad repository marker {}: {reason}", path.display())]
    BadMarker {
        /// The marker file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No snapshot or name matches.
    #[error("no snapshot named or with an id starting with {0:?} in this repository")]
    Unknown(String),
    /// An id prefix matches several snapshots.
    #[error("{prefix:?} is ambiguous: it matches {}", candidates.join(", "))]
    Ambiguous {
        /// The prefix given.
        prefix: String,
        /// The short ids it matches.
        candidates: Vec<String>,
    },
    /// A name that cannot be used.
    #[error(
        "invalid snapshot name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit, and not 64 hex digits"
    )]
    BadName(String),
    /// A snapshot's catalogue entry is unreadable.
    #[error("snapshot {id}: bad {META_FILE}: {reason}")]
    BadMeta {
        /// The snapshot.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot's state or manifest is unreadable.
    #[error("snapshot {id}")]
    Snapshot {
        /// The snapshot (or work directory).
        id: String,
        /// Cause.
        #[source]
        source: Box<crate::snapshot::refs::RefsError>,
    },
    /// The chunk store could not be opened.
    #[error("opening the repository chunk store")]
    Store(#[source] crate::store::StoreError),
    /// A snapshot refers to chunks the repository does not hold.
    #[error(
        "the new snapshot refers to {count} chunk(s) missing from the repository (first: {first}); was its parent removed and garbage-collected?"
    )]
    MissingChunks {
        /// How many are missing.
        count: usize,
        /// One of them.
        first: crate::store::ChunkId,
    },
    /// Writing a small file failed.
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: IoError,
    },
    /// The repository lock could not be taken.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, RepoError>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RepoError + use<> {
    crate::util::io_err(op, path)
}

/// A snapshot's id: BLAKE3 over its state file and memory manifest bytes, so equal ids mean
/// equal snapshots, and an id survives export and import.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId([u8; 32]);

impl SnapshotId {
    /// The id of a snapshot whose state file and manifest are `state` and `memory`.
    pub fn of_files(state: &[u8], memory: &[u8]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"vmm-snapshot-id-v1\0");
        h.update(&(state.len() as u64).to_le_bytes());
        h.update(state);
        h.update(memory);
        SnapshotId(*h.finalize().as_bytes())
    }

    /// The id of the snapshot stored in `dir` (reads both files).
    pub fn of_dir(dir: &Path) -> Result<Self> {
        let s = dir.join(STATE_FILE);
        let m = dir.join(MEMORY_FILE);
        let state = fs::read(&s).map_err(io_err("read", &s))?;
        let memory = fs::read(&m).map_err(io_err("read", &m))?;
        Ok(Self::of_files(&state, &memory))
    }

    /// Wraps raw bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        SnapshotId(b)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first [`SHORT_ID_LEN`] hex digits.
    pub fn short(&self) -> String {
        self.to_string()[..SHORT_ID_LEN].to_string()
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({})", self.short())
    }
}

impl FromStr for SnapshotId {
    type Err = RepoError;

    /// Parses the full 64-digit form (a prefix is resolved by [`Repo::resolve`]).
    fn from_str(s: &str) -> Result<Self> {
        let id: crate::store::ChunkId = s.parse().map_err(|_| RepoError::Unknown(s.into()))?;
        Ok(SnapshotId(*id.as_bytes()))
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a VM looked like when snapshotted, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel path it booted from.
    pub kernel: String,
    /// Disk paths or URLs, in attach order.
    pub disks: Vec<String>,
}

impl VmSummary {
    /// The summary of a snapshot's state.
    pub fn of(state: &MicrovmState) -> Self {
        Self {
            mem_mib: state.config.mem_mib,
            vcpus: state.config.vcpus,
            kernel: state.config.kernel.path.display().to_string(),
            disks: state
                .config
                .blocks
                .iter()
                .map(|b| match &b.url {
                    Some(u) => u.clone(),
                    None => b.path.display().to_string(),
                })
                .collect(),
        }
    }
}

/// What creating a snapshot added to the repository's store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedStats {
    /// Bytes of chunk files written.
    pub bytes_written: u64,
    /// Chunks newly written.
    pub chunks_new: u64,
    /// Chunks reused from the parent without being read.
    pub chunks_reused: u64,
}

/// A snapshot's catalogue entry, `snapshots/<id>/meta.json`. Not part of the id: a damaged
/// entry never makes the snapshot unrestorable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The snapshot's id.
    pub id: SnapshotId,
    /// The snapshot the VM was at before (its previous repository snapshot, or the
    /// repository snapshot it was restored from).
    pub parent: Option<SnapshotId>,
    /// The name given at creation, if any (names live in `names/`).
    pub name: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// VM configuration summary.
    pub vm: VmSummary,
    /// What its creation added to the store (absent for imported snapshots).
    pub added: Option<AddedStats>,
}

/// Where a VM's next repository snapshot hangs in the tree: kept on the `Vmm`, set after a
/// repository snapshot and after restoring one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoParent {
    /// The repository (canonical path).
    pub repo: PathBuf,
    /// The snapshot.
    pub id: SnapshotId,
}

/// If `dir` is a committed snapshot of a repository (`REPO/snapshots/<id>`), which one.
pub fn origin_of_snapshot_dir(dir: &Path) -> Option<RepoParent> {
    let dir = fs::canonicalize(dir).ok()?;
    let id: SnapshotId = dir.file_name()?.to_str()?.parse().ok()?;
    let snaps = dir.parent()?;
    if snaps.file_name()? != SNAPSHOTS_DIR {
        return None;
    }
    let repo = snaps.parent()?;
    repo.join(MARKER_FILE).is_file().then(|| RepoParent {
        repo: repo.to_path_buf(),
        id,
    })
}

/// Checks the bytes of snapshot `id`'s catalogue entry (`meta.json`) and decodes it.
pub fn parse_meta(id: &SnapshotId, bytes: &[u8]) -> Result<SnapshotMeta> {
    let bad = |reason: String| RepoError::BadMeta {
        id: id.short(),
        reason,
    };
    let meta: SnapshotMeta = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if meta.id != *id {
        return Err(bad(format!("it names snapshot {}", meta.id.short())));
    }
    Ok(meta)
}

/// The snapshot a name file (`names/NAME`) points at; `None` when it is damaged.
pub fn parse_name_file(bytes: &[u8]) -> Option<SnapshotId> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// Whether `name` can be a friendly name.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !(b.len() == 64 && b.iter().all(u8::is_ascii_hexdigit))
}

/// An open repository.
#[derive(Clone, Debug)]
pub struct Repo {
    root: PathBuf,
}

impl Repo {
    /// The repository directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `REPO/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join(SNAPSHOTS_DIR)
    }

    /// The directory of snapshot `id`.
    pub fn snapshot_dir(&self, id: &SnapshotId) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// `REPO/names`.
    pub fn names_dir(&self) -> PathBuf {
        self.root.join(NAMES_DIR)
    }

    /// `REPO/tmp`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    /// The chunk store (new chunks are written in packs).
    pub fn store(&self) -> Result<LocalStore> {
        LocalStore::open(&self.root, LocalStoreOptions::packs()).map_err(RepoError::Store)
    }

    /// Takes the repository lock.
    pub fn lock(&self, mode: LockMode, what: &'static str) -> Result<RepoLock> {
        let timeout = match mode {
            LockMode::Shared => SHARED_LOCK_TIMEOUT,
            LockMode::Exclusive => EXCLUSIVE_LOCK_TIMEOUT,
        };
        Ok(lock::acquire(
            &self.root.join(LOCK_FILE),
            mode,
            timeout,
            what,
        )?)
    }

    /// A fresh work directory `tmp/<kind>-<pid>-<n>` (two levels below the root, like a
    /// snapshot directory, so [`STORE_FROM_SNAPSHOT`] holds in both).
    pub fn new_work_dir(&self, kind: &str) -> Result<PathBuf> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.tmp_dir();
        fs::create_dir_all(&tmp).map_err(io_err("create directory", &tmp))?;
        loop {
            let p = tmp.join(format!(
                "{kind}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            match fs::create_dir(&p) {
                Ok(()) => return Ok(p),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create directory", &p)(e)),
            }
        }
    }

    /// Every listed snapshot, sorted by id. Entries of `snapshots/` whose name is not an id
    /// are ignored.
    pub fn list(&self) -> Result<Vec<SnapshotId>> {
        let mut out: Vec<SnapshotId> = entry_names(&self.snapshots_dir())?
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        out.sort();
        Ok(out)
    }

    /// Reads a snapshot's catalogue entry.
    pub fn read_meta(&self, id: &SnapshotId) -> Result<SnapshotMeta> {
        let p = self.snapshot_dir(id).join(META_FILE);
        let bad = |reason: String| RepoError::BadMeta {
            id: id.short(),
            reason,
        };
        let bytes = fs::read(&p).map_err(|e| bad(format!("cannot read {}: {e}", p.display())))?;
        parse_meta(id, &bytes)
    }

    /// Every friendly name and the snapshot it points at (dangling names included).
    pub fn names(&self) -> Result<BTreeMap<String, SnapshotId>> {
        let dir = self.names_dir();
        let mut out = BTreeMap::new();
        for name in entry_names(&dir)? {
            if !valid_name(&name) {
                continue;
            }
            let path = dir.join(&name);
            match fs::read(&path) {
                Ok(s) => match parse_name_file(&s) {
                    Some(id) => {
                        out.insert(name, id);
                    }
                    None => log::warn!("ignoring damaged name file {}", path.display()),
                },
                Err(err) => log::warn!("cannot read {}: {err}", path.display()),
            }
        }
        Ok(out)
    }

    /// The names pointing at each snapshot.
    pub fn names_by_id(&self) -> Result<BTreeMap<SnapshotId, Vec<String>>> {
        let mut out: BTreeMap<SnapshotId, Vec<String>> = BTreeMap::new();
        for (n, id) in self.names()? {
            out.entry(id).or_default().push(n);
        }
        Ok(out)
    }

    /// Points `name` at `id` (replacing what it pointed at).
    pub fn set_name(&self, name: &str, id: &SnapshotId) -> Result<()> {
        if !valid_name(name) {
            return Err(RepoError::BadName(name.into()));
        }
        let dir = self.names_dir();
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let p = dir.join(name);
        crate::util::fs::write_atomic(&p, format!("{id}\n").as_bytes())
            .map_err(|source| RepoError::Write { path: p, source })
    }

    /// Removes a name; returns whether it existed.
    pub fn remove_name(&self, name: &str) -> Result<bool> {
        if !valid_name(name) {
            return Err(RepoError::BadName(name.into()));
        }
        let p = self.names_dir().join(name);
        match fs::remove_file(&p) {
            Ok(()) => {
                fsync_dir(&self.names_dir())?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove", &p)(e)),
        }
    }

    /// Finds a snapshot by name, full id or unique id prefix (at least
    /// [`MIN_PREFIX_LEN`] hex digits), in that order.
    pub fn resolve(&self, what: &str) -> Result<SnapshotId> {
        let all = self.list()?;
        if valid_name(what)
            && let Some(id) = self.names()?.get(what)
        {
            return if all.contains(id) {
                Ok(*id)
            } else {
                Err(RepoError::Unknown(format!(
                    "{what} (the name points at {}, which was removed)",
                    id.short()
                )))
            };
        }
        let lower = what.to_ascii_lowercase();
        if lower.len() < MIN_PREFIX_LEN || !lower.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(RepoError::Unknown(what.into()));
        }
        let hits: Vec<&SnapshotId> = all
            .iter()
            .filter(|id| id.to_string().starts_with(&lower))
            .collect();
        match hits.as_slice() {
            [] => Err(RepoError::Unknown(what.into())),
            [one] => Ok(**one),
            many => Err(RepoError::Ambiguous {
                prefix: what.into(),
                candidates: many.iter().map(|i| i.short()).collect(),
            }),
        }
    }

    /// Commits the complete snapshot in work directory `work` (state + memory, chunks in
    /// this repository's store): checks that every chunk it needs is present, writes
    /// `meta.json`, fsyncs, and renames it to `snapshots/<id>`. The caller holds the lock
    /// (shared). If the same snapshot already exists, `work` is removed and the existing
    /// one is kept. Returns the id and whether it was new.
    pub fn commit(&self, work: &Path, input: CommitMeta) -> Result<(SnapshotId, bool)> {
        let id = SnapshotId::of_dir(work)?;
        let refs =
            crate::snapshot::refs::chunk_refs(work).map_err(|source| RepoError::Snapshot {
                id: id.short(),
                source: Box::new(source),
            })?;
        let store = self.store()?;
        let mut missing = Vec::new();
        for c in &refs {
            if !store.contains(c).map_err(RepoError::Store)? {
                missing.push(c);
            }
        }
        if let Some(first) = missing.first() {
            return Err(RepoError::MissingChunks {
                count: missing.len(),
                first: **first,
            });
        }
        let state =
            MicrovmState::read(&work.join(STATE_FILE)).map_err(|source| RepoError::Snapshot {
                id: id.short(),
                source: Box::new(crate::snapshot::refs::RefsError::State {
                    path: work.join(STATE_FILE),
                    source,
                }),
            })?;
        let meta = SnapshotMeta {
            id,
            parent: input.parent,
            name: input.name,
            created_unix: state.created_unix,
            vm: VmSummary::of(&state),
            added: input.added,
        };
        let mp = work.join(META_FILE);
        crate::util::fs::write_atomic(
            &mp,
            &serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )
        .map_err(|source| RepoError::Write { path: mp, source })?;
        fsync_dir(work)?;
        let dest = self.snapshot_dir(&id);
        let snaps = self.snapshots_dir();
        fs::create_dir_all(&snaps).map_err(io_err("create directory", &snaps))?;
        if dest.exists() {
            let _ = fs::remove_dir_all(work);
            return Ok((id, false));
        }
        fs::rename(work, &dest).map_err(io_err("rename into place", &dest))?;
        let synced = fsync_dir(&snaps).and_then(|()| work.parent().map_or(Ok(()), fsync_dir));
        if let Err(e) = synced {
            // Listed but maybe not durable: take it back out, so a failed snapshot is
            // never listed. The caller removes the work directory.
            if let Err(back) = fs::rename(&dest, work) {
                log::warn!(
                    "snapshot {} stays listed after a failed directory fsync: {back}",
                    id.short()
                );
            }
            return Err(e.into());
        }
        Ok((id, true))
    }

    /// The chunks each listed snapshot needs. Fails on the first snapshot that cannot
    /// be read (what gc must do: it cannot know what such a snapshot needs).
    pub fn all_refs(&self) -> Result<BTreeMap<SnapshotId, BTreeSet<crate::store::ChunkId>>> {
        let mut out = BTreeMap::new();
        for id in self.list()? {
            let refs = self.refs(&id)?;
            out.insert(id, refs);
        }
        Ok(out)
    }

    /// The chunks snapshot `id` needs.
    pub fn refs(&self, id: &SnapshotId) -> Result<BTreeSet<crate::store::ChunkId>> {
        crate::snapshot::refs::chunk_refs(&self.snapshot_dir(id)).map_err(|source| {
            RepoError::Snapshot {
                id: id.short(),
                source: Box::new(source),
            }
        })
    }
}

/// Catalogue fields a caller of [`Repo::commit`] knows.
#[derive(Clone, Debug, Default)]
pub struct CommitMeta {
    /// Parent snapshot.
    pub parent: Option<SnapshotId>,
    /// Name given at creation.
    pub name: Option<String>,
    /// What creating it added.
    pub added: Option<AddedStats>,
}

/// The names of the entries of `dir` that are valid UTF-8, in no order; none if `dir`
/// does not exist.
fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read directory", dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io_err("read directory", dir))?;
        if let Some(name) = e.file_name().to_str() {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
