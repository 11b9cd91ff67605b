//! The repository lock: a file lock on `REPO/lock` (std's `File::try_lock`, an `flock(2)`
//! on Linux).
//!
//! Writers that add chunks and snapshots (create, import, rm) hold it shared; `gc` holds it
//! exclusive, so a sweep never runs while a snapshot whose chunks are not yet listed is being
//! written. The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed
//! process never leaves the repository locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::IoError;

/// Errors of taking the repository lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened (`open the repository lock file`) or locking
    /// failed for another reason than contention (`lock`).
    #[error(transparent)]
    Io(#[from] IoError),
    /// Another process held the lock for longer than the caller wanted to wait.
    #[error(
        "the repository is busy ({what} waited {waited:?} for {}; another vmm is running gc, create, import or rm)",
        path.display()
    )]
    Busy {
        /// What waited.
        what: &'static str,
        /// The lock file.
        path: PathBuf,
        /// How long it waited.
        waited: Duration,
    },
}

/// How the lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once (adding snapshots and chunks, removing snapshots).
    Shared,
    /// One holder, nobody else (garbage collection).
    Exclusive,
}

/// A held lock; released when dropped (the file is closed).
#[derive(Debug)]
pub struct RepoLock {
    _file: File,
    mode: LockMode,
}

impl RepoLock {
    /// How the lock is held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

/// Takes the lock on `path` in `mode`, waiting up to `timeout` for other holders.
pub fn acquire(
    path: &Path,
    mode: LockMode,
    timeout: Duration,
    what: &'static str,
) -> Result<RepoLock, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(IoError::at("open the repository lock file", path))?;
    let start = Instant::now();
    let mut told = false;
    loop {
        let r = match mode {
            LockMode::Shared => file.try_lock_shared(),
            LockMode::Exclusive => file.try_lock(),
        };
        match r {
            Ok(()) => return Ok(RepoLock { _file: file, mode }),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(TryLockError::Error(e)) => {
                return Err(IoError::new("lock", path, e).into());
            }
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(LockError::Busy {
                what,
                path: path.to_path_buf(),
                waited,
            });
        }
        if !told && waited > Duration::from_millis(500) {
            log::info!("{what}: waiting for the repository lock {}", path.display());
            told = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::TempDir;

    #[test]
    fn shared_locks_coexist_and_exclusive_waits() {
        let d = TempDir::new("repo-lock");
        let p = d.path().join("lock");
        let a = acquire(&p, LockMode::Shared, Duration::ZERO, "test").unwrap();
        let b = acquire(&p, LockMode::Shared, Duration::ZERO, "test").unwrap();
        assert_eq!(a.mode(), LockMode::Shared);
        let e = acquire(&p, LockMode::Exclusive, Duration::from_millis(50), "gc").unwrap_err();
        assert!(matches!(e, LockError::Busy { what: "gc", .. }), "{e}");
        drop(a);
        drop(b);
        let x = acquire(&p, LockMode::Exclusive, Duration::ZERO, "gc").unwrap();
        assert!(acquire(&p, LockMode::Shared, Duration::from_millis(30), "create").is_err());
        drop(x);
        acquire(&p, LockMode::Shared, Duration::ZERO, "create").unwrap();
    }
}
