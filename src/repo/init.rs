//! Opening a repository ([`Repo::open`], [`Repo::open_or_init`]), creating one atomically,
//! and finishing one whose creation was interrupted.
//!
//! A new repository is built complete (layout and marker) under a temporary name next to
//! where it goes, made durable, and published with one `rename`: whoever looks at the path
//! sees nothing (or the empty directory that was there) or a whole repository, whenever the
//! creating process is killed. Where that rename cannot be done (the path is a mount point,
//! or its parent is not writable), the layout is made in place with the marker written
//! last.
//!
//! Builds before this one made the layout in place, marker last, so a process killed in
//! between left `snapshots/ names/ chunks/ tmp/` without `vmm-repo.json`, which every later
//! command refused as "not empty". Such a directory — nothing but the layout's entries, all
//! of them empty — is recognised as half-made and finished by writing the marker.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    LOCK_FILE, MARKER_FILE, NAMES_DIR, REPO_FORMAT, Repo, RepoError, Result, SNAPSHOTS_DIR,
    TMP_DIR, io_err,
};
use crate::formats::REPO_VERSION;
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::util::fs::fsync_dir;

/// The chunk store's directory inside a repository.
const CHUNKS_DIR: &str = "chunks";
/// The pack directory of the chunk store (`store::pack::PACKS_DIR`).
const PACKS_DIR: &str = crate::store::pack::PACKS_DIR;
/// Infix of the temporary names new repositories are built under (`.NAME.vmm-repo-new-…`).
const TEMP_INFIX: &str = ".vmm-repo-new-";

/// What is at a path where a repository is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// Nothing, or an empty directory.
    Nothing,
    /// A repository (the marker exists).
    Repo,
    /// The layout of a repository without its marker and with nothing in it.
    HalfMade,
    /// Anything else.
    Foreign,
}

/// Looks at `path` (without changing anything).
pub(crate) fn classify(path: &Path) -> Result<Found> {
    if path.join(MARKER_FILE).exists() {
        return Ok(Found::Repo);
    }
    let entries = match fs::read_dir(path) {
        Ok(rd) => rd
            .collect::<io::Result<Vec<_>>>()
            .map_err(io_err("read directory", path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(io_err("read directory", path)(e)),
    };
    if entries.is_empty() {
        return Ok(Found::Nothing);
    }
    for e in &entries {
        let p = e.path();
        let ok = match e.file_name().to_str() {
            Some(SNAPSHOTS_DIR | NAMES_DIR | TMP_DIR) => is_empty_dir(&p),
            Some(CHUNKS_DIR) => only_empty_dirs(&p, 2),
            Some(PACKS_DIR) => is_empty_dir(&p),
            Some(LOCK_FILE) => fs::symlink_metadata(&p).is_ok_and(|m| m.is_file() && m.len() == 0),
            _ => false,
        };
        if !ok {
            return Ok(Found::Foreign);
        }
    }
    Ok(Found::HalfMade)
}

fn is_empty_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
        && fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_none())
}

/// A directory holding nothing but directories (at most `depth` levels) that hold nothing.
fn only_empty_dirs(p: &Path, depth: u32) -> bool {
    if !fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
        return false;
    }
    let Ok(rd) = fs::read_dir(p) else {
        return false;
    };
    rd.into_iter()
        .all(|e| e.is_ok_and(|e| depth > 0 && only_empty_dirs(&e.path(), depth - 1)))
}

/// Makes the repository layout in `dir` (which exists): the directories, the chunk store,
/// then the marker, then fsyncs `dir`.
fn make_layout(dir: &Path) -> Result<()> {
    for d in [SNAPSHOTS_DIR, NAMES_DIR, TMP_DIR] {
        let p = dir.join(d);
        fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
    }
    LocalStore::open(dir, LocalStoreOptions::packs()).map_err(RepoError::Store)?;
    let mpath = dir.join(MARKER_FILE);
    crate::formats::write_marker(&mpath, REPO_FORMAT, REPO_VERSION).map_err(|source| {
        RepoError::Write {
            path: mpath,
            source,
        }
    })?;
    Ok(fsync_dir(dir)?)
}

/// The directory `path` is in (`.` for a bare name), and its last component.
fn split(path: &Path) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?.to_string();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((parent, name))
}

/// Removes temporary repositories of `name` in `parent` left by processes that are gone.
fn remove_stale_temps(parent: &Path, name: &str) {
    let prefix = format!(".{name}{TEMP_INFIX}");
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            log::info!(
                "removing {}, left by an interrupted repository creation",
                e.path().display()
            );
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Whether a failed publishing rename should fall back to making the layout in place.
fn rename_cannot_work(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY | libc::EXDEV | libc::EACCES | libc::EPERM | libc::EROFS)
    )
}

/// Creates a repository at `path`, where there is nothing or an empty directory.
pub(crate) fn create(path: &Path) -> Result<()> {
    let Some((parent, name)) = split(path) else {
        return in_place(path);
    };
    fs::create_dir_all(&parent).map_err(io_err("create directory", &parent))?;
    remove_stale_temps(&parent, &name);
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let temp = parent.join(format!(
        ".{name}{TEMP_INFIX}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let built = fs::create_dir(&temp)
        .map_err(io_err("create directory", &temp))
        .and_then(|()| make_layout(&temp));
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&temp);
        // E.g. a parent we may not write to, around a directory we may: try in place.
        log::debug!("cannot build the repository beside {}: {e}", path.display());
        return in_place(path);
    }
    // One rename publishes it (over an empty directory, if there is one).
    let renamed = fs::rename(&temp, path);
    if renamed.is_err() {
        let _ = fs::remove_dir_all(&temp);
    }
    match renamed {
        Ok(()) => Ok(fsync_dir(&parent)?),
        Err(e) if rename_cannot_work(&e) => in_place(path),
        // Someone else published a repository (or something else) there meanwhile.
        Err(e) if classify(path)? == Found::Repo => {
            log::debug!("{} was created concurrently ({e})", path.display());
            Ok(())
        }
        Err(e) => Err(io_err("publish the new repository at", path)(e)),
    }
}

/// Makes the layout in place, marker last: for paths where the publishing rename cannot be
/// used. An interruption leaves a half-made repository, which [`finish`] completes.
fn in_place(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(io_err("create directory", path))?;
    make_layout(path)?;
    match split(path) {
        Some((parent, _)) => Ok(fsync_dir(&parent)?),
        None => Ok(()),
    }
}

/// Completes a half-made repository (see the module documentation).
pub(crate) fn finish(path: &Path) -> Result<()> {
    log::warn!(
        "{} is a repository whose creation was interrupted (layout without {MARKER_FILE}, all of it empty): finishing it",
        path.display()
    );
    make_layout(path)
}

impl Repo {
    /// Opens an existing repository (finishing it first if its creation was interrupted,
    /// see `init.rs`).
    pub fn open(path: &Path) -> Result<Self> {
        use crate::formats::{MarkerError, read_marker};
        let marker = path.join(MARKER_FILE);
        let bad = |reason: String| RepoError::BadMarker {
            path: marker.clone(),
            reason,
        };
        match read_marker(
            &marker,
            REPO_FORMAT,
            "vmm snapshot repository",
            REPO_VERSION,
            REPO_VERSION,
        ) {
            Ok(Some(_)) => {}
            Ok(None) if classify(path)? == Found::HalfMade => {
                finish(path)?;
                return Self::open(path);
            }
            Ok(None) => {
                return Err(RepoError::NotARepo {
                    path: path.to_path_buf(),
                    hint: if path.exists() {
                        ""
                    } else {
                        " (the directory does not exist; `vmm snapshot create --repo` or `import` creates one)"
                    },
                });
            }
            Err(MarkerError::Io(e)) => return Err(RepoError::Io(e)),
            Err(MarkerError::Invalid { reason, .. }) => return Err(bad(reason)),
            Err(MarkerError::Version { source, .. }) => return Err(bad(source.to_string())),
            Err(e) => return Err(bad(crate::util::error_chain(&e))),
        }
        let root = fs::canonicalize(path).map_err(io_err("resolve", path))?;
        Ok(Self { root })
    }

    /// Opens the repository at `path`, creating it if `path` does not exist or is an empty
    /// directory (atomically: see [`self`]), and finishing it if its creation was
    /// interrupted. Any other directory without the marker is refused.
    pub fn open_or_init(path: &Path) -> Result<Self> {
        match classify(path)? {
            Found::Repo => {}
            Found::Nothing => create(path)?,
            Found::HalfMade => finish(path)?,
            Found::Foreign => {
                return Err(RepoError::NotARepo {
                    path: path.to_path_buf(),
                    hint: " and it is not empty: refusing to turn it into one",
                });
            }
        }
        Self::open(path)
    }
}
