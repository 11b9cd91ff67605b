//! Durable file replacement: a new file is written under a temp name in its destination's
//! directory (`.NAME.tmp.PID.SEQ`, which `repo gc` recognises as litter), fsynced, renamed
//! over the destination, and the directory is fsynced ([`write_atomic`]). A reader sees the
//! old file or the new one, never a part; after a crash the file is one or the other.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::IoError;

/// The directory of `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Fsyncs a directory, so the entries created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(IoError::at("fsync directory", dir))
}

/// A fresh temp name beside `dest`: `.NAME.tmp.PID.SEQ` in the same directory.
pub fn temp_path(dest: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    parent_dir(dest).join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A file written under a temp name beside its destination, not yet renamed into place
/// ([`Staged::commit`]); the temp file is removed if it is dropped uncommitted.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Creates a new, empty temp file for `dest`; the caller writes it through the `File`
    /// (and fsyncs it if it must be durable before [`commit`](Self::commit)).
    pub fn create(dest: &Path) -> Result<(Staged, File), IoError> {
        if dest.file_name().is_none() {
            return Err(IoError::new(
                "write",
                dest,
                io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
            ));
        }
        let tmp = temp_path(dest);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(IoError::at("create", &tmp))?;
        let staged = Staged {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        };
        Ok((staged, f))
    }

    /// Writes a temp file for `dest` with `write` (its errors are reported as "write" on
    /// the temp file) and closes it, fsynced first when `durable`.
    pub fn write(
        dest: &Path,
        durable: bool,
        write: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<Staged, IoError> {
        let (staged, mut f) = Staged::create(dest)?;
        write(&mut f).map_err(IoError::at("write", &staged.tmp))?;
        if durable {
            f.sync_all().map_err(IoError::at("fsync", &staged.tmp))?;
        }
        Ok(staged)
    }

    /// The temp file.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temp file over the destination (the directory is not fsynced). After a
    /// failure it stays staged: commit again, or drop it to remove the temp file.
    pub fn commit(&mut self) -> Result<(), IoError> {
        std::fs::rename(&self.tmp, &self.dest)
            .map_err(IoError::at("rename temp file to", &self.dest))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to a temp file next to `path` and fsyncs it; [`Staged::commit`] renames
/// it over `path`.
pub fn stage(path: &Path, bytes: &[u8]) -> Result<Staged, IoError> {
    Staged::write(path, true, |f| f.write_all(bytes))
}

/// Replaces `path` with `bytes` atomically and durably: writes a temp file in the same
/// directory, fsyncs it, renames it over `path` and fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    stage(path, bytes)?.commit()?;
    fsync_dir(parent_dir(path))
}

/// Moves `path` aside to `.NAME.prev` in its directory; None if it does not exist.
fn move_aside(path: &Path) -> Result<Option<(PathBuf, PathBuf)>, IoError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let aside = parent_dir(path).join(format!(".{name}.prev"));
    match std::fs::rename(path, &aside) {
        Ok(()) => Ok(Some((aside, path.to_path_buf()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::new("move aside", path, e)),
    }
}

/// Renames files moved aside by [`move_aside`] back (best effort: this runs on an error
/// path).
fn move_back(moved: &[Option<(PathBuf, PathBuf)>]) {
    for (aside, path) in moved.iter().flatten() {
        if let Err(e) = std::fs::rename(aside, path) {
            log::error!(
                "cannot move {} back to {}: {e}",
                aside.display(),
                path.display()
            );
        }
    }
}

/// Replaces two files of one directory that belong together — `first` (e.g. a memory
/// manifest) and `last` (the state file whose presence marks the pair complete) — so that
/// neither a failure nor a crash leaves the new `first` beside the old `last`:
///
/// 1. both are written and made durable under temp names (a failure here, e.g. a full
///    disk, leaves the old pair untouched);
/// 2. the old `last`, then the old `first`, are moved aside (`.NAME.prev`), durably;
/// 3. the new `first`, then the new `last`, are renamed into place, the directory is
///    fsynced and the old files are deleted.
///
/// A failure in steps 2–3 moves the old pair back. A crash there leaves the directory
/// without `last`: incomplete, never mixed.
pub fn replace_pair(first: (&Path, &[u8]), last: (&Path, &[u8])) -> Result<(), IoError> {
    let dir = parent_dir(last.0);
    let mut a = stage(first.0, first.1)?;
    let mut b = stage(last.0, last.1)?;
    let mut moved = vec![move_aside(last.0)?];
    let swap = (|| {
        moved.push(move_aside(first.0)?);
        fsync_dir(dir)?;
        a.commit()?;
        b.commit()?;
        fsync_dir(dir)
    })();
    if let Err(e) = swap {
        // Whatever got into place is replaced by the old files again.
        move_back(&moved);
        let _ = fsync_dir(dir);
        return Err(e);
    }
    for (aside, _) in moved.iter().flatten() {
        let _ = std::fs::remove_file(aside);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::TempDir;

    #[test]
    fn write_atomic_replaces_and_leaves_nothing_behind() {
        let dir = TempDir::new("fs-atomic");
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = write_atomic(&dir.path().join("missing/f"), b"x").unwrap_err();
        assert_eq!(e.op, "create");
    }

    #[test]
    fn an_uncommitted_stage_is_removed() {
        let dir = TempDir::new("fs-stage");
        let p = dir.path().join("f");
        let s = stage(&p, b"x").unwrap();
        assert!(s.tmp().exists());
        let tmp = s.tmp().to_path_buf();
        drop(s);
        assert!(!tmp.exists() && !p.exists());
    }

    #[test]
    fn replace_pair_replaces_both_and_leaves_nothing_behind() {
        let dir = TempDir::new("fs-pair");
        let (a, b) = (dir.path().join("memory"), dir.path().join("state"));
        replace_pair((&a, b"m1"), (&b, b"s1")).unwrap();
        replace_pair((&a, b"m2"), (&b, b"s2")).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"m2");
        assert_eq!(std::fs::read(&b).unwrap(), b"s2");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A failure before anything is replaced (here: `last` cannot be staged because
        // its directory is missing) leaves the old pair and no temp file.
        let gone = dir.path().join("missing/state");
        assert!(replace_pair((&a, b"m3"), (&gone, b"s3")).is_err());
        assert_eq!(std::fs::read(&a).unwrap(), b"m2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
