//! [`Budget`]: the size limit of a chunk cache directory and its one eviction policy,
//! oldest first down to 7/8 of the limit.
//!
//! The cache directory is in the [`LocalStore`](super::local::LocalStore) layout
//! (`ROOT/chunks/xx/<id>`) and may be shared by several processes. None of them knows the
//! others' writes, so each keeps an estimate of the directory's size (counted at open,
//! plus its own writes) and, when the estimate passes the limit, counts the directory
//! again and removes the oldest chunk files (by modification time: the time they were
//! cached) until it holds at most 7/8 of the limit. One process evicts at a time (an
//! `flock` on `ROOT/evict.lock`, not waited for: a process finding it taken leaves the
//! work to the holder). Removing a chunk another process is reading is harmless: an open
//! file stays readable, and a reader that finds the file gone treats it as a miss and
//! fetches the chunk again. Temp files left by a crash are removed once an hour old.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::util::IoError;

/// Age after which a leftover temp file in the cache is removed.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Errors of counting or trimming a cache directory.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// A directory or file of the cache could not be listed, opened or removed.
    #[error(transparent)]
    Io(#[from] IoError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EvictError + use<> {
    let at = IoError::at(op, path);
    move |source| EvictError::Io(at(source))
}

/// One chunk file found by a scan.
struct Found {
    modified: SystemTime,
    len: u64,
    path: PathBuf,
}

/// What a scan of the cache directory found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Chunk files.
    pub chunks: u64,
    /// Their bytes (file lengths).
    pub bytes: u64,
}

/// The size limit of one cache directory, as seen by one process (see the module docs).
#[derive(Debug)]
pub struct Budget {
    root: PathBuf,
    max: u64,
    /// The shared count of the directory's bytes.
    counter: SharedCount,
    /// Chunks this process evicted.
    evicted: AtomicU64,
    /// One eviction at a time inside the process.
    running: Mutex<()>,
}

impl Budget {
    /// The budget of the cache rooted at `root` with a limit of `max` bytes; counts the
    /// directory, trimming it at once if it is over the limit.
    pub fn open(root: &Path, max: u64) -> Result<Budget, EvictError> {
        fs::create_dir_all(root).map_err(io_err("create", root))?;
        let b = Budget {
            root: root.to_path_buf(),
            max,
            counter: SharedCount::open(&root.join("usage"))?,
            evicted: AtomicU64::new(0),
            running: Mutex::new(()),
        };
        let usage = usage_of(&scan(root)?);
        b.counter.update(|_| usage.bytes)?;
        if usage.bytes > max {
            b.trim()?;
        }
        Ok(b)
    }

    /// The limit in bytes.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Chunks this process has evicted so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Whether a chunk file of `len` bytes may be cached at all (not larger than the
    /// whole limit).
    pub fn fits(&self, len: u64) -> bool {
        len <= self.max
    }

    /// Notes a chunk file of `len` bytes written by this process; trims the directory if
    /// the shared count passes the limit.
    pub fn added(&self, len: u64) -> Result<(), EvictError> {
        let now = self.counter.update(|n| n.saturating_add(len))?;
        if now > self.max {
            self.trim()?;
        }
        Ok(())
    }

    /// Counts the directory and removes the oldest chunk files until at most 7/8 of the
    /// limit remains; does nothing if another thread or process is trimming already.
    pub fn trim(&self) -> Result<(), EvictError> {
        let Ok(_inside) = self.running.try_lock() else {
            return Ok(());
        };
        let lock_path = self.root.join("evict.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let n = self.trim_locked(&lock)?;
        if n > 0 {
            log::debug!("chunk cache {}: evicted {n} chunks", self.root.display());
        }
        Ok(())
    }

    /// The trimming itself, under the `evict.lock` held through `_lock`; returns the
    /// number of chunks removed.
    fn trim_locked(&self, _lock: &File) -> Result<u64, EvictError> {
        let mut found = scan(&self.root)?;
        let mut total = usage_of(&found).bytes;
        let target = self.max - self.max / 8;
        let mut removed = 0;
        if total > target {
            found.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
            for f in &found {
                if total <= target {
                    break;
                }
                match fs::remove_file(&f.path) {
                    Ok(()) => removed += 1,
                    // Removed by someone else meanwhile: gone either way.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove", &f.path)(e)),
                }
                total -= f.len;
            }
        }
        self.counter.update(|_| total)?;
        self.evicted.fetch_add(removed, Ordering::Relaxed);
        Ok(removed)
    }
}

/// A byte count shared by the processes using one cache directory: an 8-byte file, read
/// and rewritten under an exclusive lock.
#[derive(Debug)]
struct SharedCount {
    file: File,
    path: PathBuf,
}

impl SharedCount {
    fn open(path: &Path) -> Result<SharedCount, EvictError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        Ok(SharedCount {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Replaces the count `n` by `f(n)` (a missing or short file counts as 0); returns the
    /// new count.
    fn update(&self, f: impl FnOnce(u64) -> u64) -> Result<u64, EvictError> {
        self.file.lock().map_err(io_err("lock", &self.path))?;
        let r = (|| {
            let mut b = [0u8; 8];
            let n = match self.file.read_exact_at(&mut b, 0) {
                Ok(()) => u64::from_le_bytes(b),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(io_err("read", &self.path)(e)),
            };
            let new = f(n);
            self.file
                .write_all_at(&new.to_le_bytes(), 0)
                .map_err(io_err("write", &self.path))?;
            Ok(new)
        })();
        let _ = self.file.unlock();
        r
    }
}

/// Chunks and bytes of a scan.
fn usage_of(found: &[Found]) -> Usage {
    Usage {
        chunks: found.len() as u64,
        bytes: found.iter().map(|f| f.len).sum(),
    }
}

/// Counts the chunk files of the cache rooted at `root` (no chunks yet: zero).
pub fn usage(root: &Path) -> Result<Usage, EvictError> {
    Ok(usage_of(&scan(root)?))
}

/// Whether `name` is a chunk file's name (64 lowercase hex digits).
fn is_chunk_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The chunk files under `root/chunks/*/`; removes temp files older than
/// [`STALE_TEMP`] on the way. Files vanishing during the scan are skipped.
fn scan(root: &Path) -> Result<Vec<Found>, EvictError> {
    let chunks = root.join("chunks");
    let dirs = match fs::read_dir(&chunks) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", &chunks)(e)),
    };
    let mut found = Vec::new();
    for dir in dirs {
        let dir = dir.map_err(io_err("list", &chunks))?.path();
        let entries = match fs::read_dir(&dir) {
            Ok(d) => d,
            // Not a directory, or removed meanwhile: not ours to count.
            Err(_) => continue,
        };
        for e in entries {
            let Ok(e) = e else { continue };
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let name = e.file_name();
            let name = name.to_string_lossy();
            if is_chunk_name(&name) {
                found.push(Found {
                    modified,
                    len: meta.len(),
                    path: e.path(),
                });
            } else if name.contains(".tmp.") && modified.elapsed().is_ok_and(|age| age > STALE_TEMP)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkId;
    use crate::util::testutil::TempDir;

    /// Writes a fake chunk file of `len` bytes with modification time `age_s` seconds
    /// after the epoch; returns its path.
    fn put(root: &Path, seed: u64, len: usize, age_s: u64) -> PathBuf {
        let p = root.join(ChunkId::of(&seed.to_le_bytes()).relative_path());
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, vec![1u8; len]).unwrap();
        let f = File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + age_s))
            .unwrap();
        p
    }

    #[test]
    fn trims_oldest_first_to_seven_eighths() {
        let dir = TempDir::new("evict");
        let paths: Vec<_> = (0..8).map(|i| put(dir.path(), i, 1000, i)).collect();
        // 8000 bytes under a limit of 8000: nothing to do.
        let b = Budget::open(dir.path(), 8000).unwrap();
        assert_eq!(b.evicted(), 0);
        let p8 = put(dir.path(), 8, 1000, 8);
        b.added(1000).unwrap();
        // 9000 > 8000: down to 7000, the two oldest gone.
        assert_eq!(b.evicted(), 2);
        assert!(!paths[0].exists() && !paths[1].exists() && paths[2].exists() && p8.exists());
        assert_eq!(
            usage(dir.path()).unwrap(),
            Usage {
                chunks: 7,
                bytes: 7000
            }
        );
        // Reopening with a smaller limit trims at open; junk is not counted.
        fs::write(dir.path().join("chunks/zz"), b"x").unwrap();
        fs::write(paths[3].with_file_name("notachunk"), b"x").unwrap();
        let b = Budget::open(dir.path(), 2000).unwrap();
        assert_eq!(usage(dir.path()).unwrap().bytes, 1000);
        assert!(p8.exists() && b.evicted() == 6);
        assert!(b.fits(2000) && !b.fits(2001));
    }

    #[test]
    fn the_limit_holds_for_all_users_of_the_directory_together() {
        let dir = TempDir::new("evict-shared");
        // Two budgets over one directory: two processes sharing a cache.
        let a = Budget::open(dir.path(), 8000).unwrap();
        let b = Budget::open(dir.path(), 8000).unwrap();
        for i in 0..5 {
            put(dir.path(), i, 1000, i);
            a.added(1000).unwrap();
            put(dir.path(), 10 + i, 1000, 10 + i);
            b.added(1000).unwrap();
        }
        // 10 chunks of 1000 bytes were written under a limit of 8000; each budget alone
        // wrote only 5000, but the shared count made one of them trim.
        let u = usage(dir.path()).unwrap();
        // At 9000 bytes the directory went down to 7000 (the two oldest removed), then
        // the tenth chunk made 8000.
        assert_eq!(u.bytes, 8000, "{u:?}");
        assert_eq!(a.evicted() + b.evicted(), 2);
        // The count follows the directory.
        assert_eq!(a.counter.update(|n| n).unwrap(), u.bytes);
    }

    #[test]
    fn another_holder_of_the_lock_is_left_to_do_it() {
        let dir = TempDir::new("evict-lock");
        for i in 0..4 {
            put(dir.path(), i, 1000, i);
        }
        let b = Budget::open(dir.path(), 10_000).unwrap();
        let other = File::create(dir.path().join("evict.lock")).unwrap();
        other.lock().unwrap();
        // Another open file description holds the lock: this one skips the work.
        b.added(20_000).unwrap();
        assert_eq!(usage(dir.path()).unwrap().chunks, 4);
        other.unlock().unwrap();
        b.trim().unwrap();
        assert_eq!(b.evicted(), 0, "4000 bytes are within 7/8 of 10000");
        // An empty or absent cache is fine.
        let empty = TempDir::new("evict-empty");
        assert_eq!(usage(empty.path()).unwrap(), Usage::default());
    }
}
