//! The bottom layer: small helpers that know nothing of VMs, snapshots or formats, and that
//! every other module may use (docs/DESIGN.md, "Layers"). Nothing here imports another
//! module of this crate.
//!
//! * [`IoError`]: a failed file system operation (what, on which path, why), the `Io`
//!   variant of the module error enums.
//! * [`error_chain`]: an error and its causes on one line.
//! * [`lock`]: a mutex guard, whether or not another thread panicked holding it.
//! * [`fs`]: durable file replacement (temp name, fsync, rename, fsync the directory).
//! * `testutil` (tests, and the `test-utils` feature only): shared test helpers.

pub mod fs;
#[cfg(any(test, feature = "test-utils"))]
pub mod testutil;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// A file system operation that failed: `cannot {op} {path}`, caused by the `io::Error`.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}", path.display())]
pub struct IoError {
    /// What was being done, e.g. "open" or "rename temp file to".
    pub op: &'static str,
    /// The file or directory concerned.
    pub path: PathBuf,
    /// Underlying error.
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// The error of `op` on `path`.
    pub fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        IoError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A `map_err` argument: turns an `io::Error` into the error of `op` on `path`.
    pub fn at(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IoError + use<> {
        let path = path.to_path_buf();
        move |source| IoError { op, path, source }
    }
}

/// A `map_err` argument for any error enum with an `Io(#[from] IoError)` variant: turns an
/// `io::Error` into that enum's error of `op` on `path`.
pub fn io_err<E: From<IoError>>(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> E + use<E> {
    let at = IoError::at(op, path);
    move |source| E::from(at(source))
}

/// An error and its causes on one line, separated by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Locks `m`, recovering the guard if another thread panicked while holding it (the data
/// guarded in this crate stays consistent across a panic: counters, maps, devices).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] IoError);
        let e = Outer(IoError::new(
            "open",
            Path::new("/x"),
            io::Error::new(io::ErrorKind::NotFound, "gone"),
        ));
        assert_eq!(error_chain(&e), "outer: cannot open /x: gone");
    }

    #[test]
    fn lock_survives_a_poisoned_mutex() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
