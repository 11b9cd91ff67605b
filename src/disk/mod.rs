//! Block backends: where the bytes of a guest disk live.
//!
//! A [`BlockBackend`] is a flat, byte-addressed disk of fixed size. Backends compose: a wrapper
//! (an overlay, a cache, a remote fetcher) holds its inner backend as an `Arc<dyn BlockBackend>`.
//! Each backend reports a serializable [`BackendIdentity`] so that a snapshot restore can refuse
//! to attach a different disk than the one the snapshot was taken with.

pub mod file;
pub mod http;
pub mod mem;
pub mod overlay;
pub mod overlay_capture;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use file::FileBackend;
pub use mem::MemBackend;

/// Size of a disk sector in bytes: the unit of virtio-blk addressing and of disk sizes.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of disk backends.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The disk image does not exist.
    #[error("disk image {}: no such file", path.display())]
    NotFound {
        /// Path given for the image.
        path: PathBuf,
    },
    /// The disk image path names a directory.
    #[error("disk image {} is a directory", path.display())]
    IsDirectory {
        /// Path given for the image.
        path: PathBuf,
    },
    /// The disk image is neither a regular file nor a block device.
    #[error("disk image {} is not a regular file or block device", path.display())]
    NotAFile {
        /// Path given for the image.
        path: PathBuf,
    },
    /// The disk image size is not a whole number of sectors (or of direct-I/O blocks).
    #[error("disk image {}: size {size} is not a multiple of {multiple}", path.display())]
    BadSize {
        /// Path given for the image.
        path: PathBuf,
        /// Size found.
        size: u64,
        /// Required granularity.
        multiple: u64,
    },
    /// The disk image could not be opened or inspected.
    #[error("disk image {}: {source}", path.display())]
    Open {
        /// Path given for the image.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A write or other mutation was attempted on a read-only backend.
    #[error("write to read-only disk")]
    ReadOnly,
    /// An access reaches past the end of the disk.
    #[error("access of {len} bytes at offset {offset} is beyond disk size {size}")]
    OutOfRange {
        /// Start of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the disk.
        size: u64,
    },
    /// An I/O operation on the backing store failed.
    #[error("disk {op} failed: {source}")]
    Io {
        /// The operation: "read", "write" or "flush".
        op: &'static str,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A disk is not the one a saved state refers to.
    #[error("disk identity mismatch: expected {expected}, found {found}")]
    IdentityMismatch {
        /// Identity recorded in the saved state.
        expected: Box<BackendIdentity>,
        /// Identity of the disk now attached.
        found: Box<BackendIdentity>,
    },
}

/// Result type of disk operations.
pub type Result<T> = std::result::Result<T, DiskError>;

/// A byte-addressed disk of fixed size.
///
/// Implementations are shared between threads (`Send + Sync`) and take `&self`: any internal
/// mutable state needs its own synchronization. Accesses are never partial: `read_at` fills the
/// whole buffer or fails, `write_at` writes all of it or fails.
pub trait BlockBackend: Send + Sync {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at byte `offset`. Fails with [`DiskError::ReadOnly`] on read-only backends.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
    /// Whether the backend refuses writes.
    fn read_only(&self) -> bool;
    /// What this disk is, stable across VMM restarts for an unchanged disk.
    fn identity(&self) -> BackendIdentity;
}

/// A serializable description of which disk a backend serves.
///
/// Two identities compare equal only if they describe the same, unchanged disk content
/// (as far as the backend can tell: files use device, inode and modification time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendIdentity {
    /// Backend kind, e.g. `"file"` or `"mem"`.
    pub kind: String,
    /// Where the data lives: a path, a URL or a name.
    pub location: String,
    /// Disk size in bytes.
    pub size: u64,
    /// An opaque version stamp that changes when the content may have changed
    /// (`dev:ino:mtime` for files, an ETag for remote images), if the backend has one.
    pub stamp: Option<String>,
    /// Identity of the backend this one wraps, for composed backends.
    pub inner: Option<Box<BackendIdentity>>,
}

impl BackendIdentity {
    /// Checks that `found` (the disk now attached) is the disk `self` (a saved identity) names:
    /// same kind, location and size, recursively for wrapped backends. The version stamp is
    /// not compared — a VM that kept running after its snapshot legitimately changed its
    /// disk — but a differing stamp is logged.
    pub fn check_matches(&self, found: &BackendIdentity) -> Result<()> {
        if self.same_disk(found) {
            if self.stamp != found.stamp {
                log::warn!("disk {self} was modified since the snapshot (now {found})");
            }
            Ok(())
        } else {
            Err(DiskError::IdentityMismatch {
                expected: Box::new(self.clone()),
                found: Box::new(found.clone()),
            })
        }
    }

    fn same_disk(&self, other: &BackendIdentity) -> bool {
        self.kind == other.kind
            && self.location == other.location
            && self.size == other.size
            && match (&self.inner, &other.inner) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_disk(b),
                _ => false,
            }
    }
}

impl std::fmt::Display for BackendIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({} bytes", self.kind, self.location, self.size)?;
        if let Some(s) = &self.stamp {
            write!(f, ", {s}")?;
        }
        f.write_str(")")?;
        if let Some(inner) = &self.inner {
            write!(f, " over {inner}")?;
        }
        Ok(())
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(stamp: &str) -> BackendIdentity {
        BackendIdentity {
            kind: "file".into(),
            location: "/d.img".into(),
            size: 1024,
            stamp: Some(stamp.into()),
            inner: None,
        }
    }

    #[test]
    fn identity_match_and_display() {
        let a = ident("1:2:3");
        a.check_matches(&a.clone()).unwrap();
        // A changed stamp (the VM wrote after its snapshot) is accepted with a warning.
        a.check_matches(&ident("1:2:4")).unwrap();
        let mut other = ident("1:2:4");
        other.size = 2048;
        let err = a.check_matches(&other).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("1024") && msg.contains("2048"), "{msg}");
        let mut moved = ident("1:2:3");
        moved.location = "/e.img".into();
        assert!(a.check_matches(&moved).is_err());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<BackendIdentity>(&json).unwrap(), a);
    }

    #[test]
    fn range_checks() {
        check_range(0, 512, 512).unwrap();
        assert!(check_range(1, 512, 512).is_err());
        assert!(check_range(u64::MAX, 1, u64::MAX).is_err());
        check_range(512, 0, 512).unwrap();
    }
}
