//! The small JSON marker files that version directory layouts (`{"format": "...",
//! "version": N}`), and the archive's marker, which `vmm image import` writes as well as
//! `vmm archive push`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ARCHIVE_VERSION;
use super::version::{VersionError, check_version};
use crate::util::IoError;
use crate::util::fs::write_atomic;

/// The marker file of an archive. Archives written before markers existed have none and
/// are version 1.
pub const ARCHIVE_MARKER: &str = "vmm-archive.json";
/// `format` value of the archive marker.
pub const ARCHIVE_FORMAT: &str = "vmm-archive";

/// Errors of marker files.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// The marker cannot be read, or its directory cannot be created.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The marker is not JSON of the expected shape, or names another format.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The marker file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The marker could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The marker file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: IoError,
    },
    /// The marker's version is one this build does not read.
    #[error("{}", path.display())]
    Version {
        /// The marker file.
        path: PathBuf,
        /// The version problem.
        #[source]
        source: VersionError,
    },
}

/// A marker file: `{"format": "...", "version": N}`.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
}

/// Reads the marker at `path` (`Ok(None)` if there is none) and checks it names `format`
/// in a version from `oldest` to `newest`; `name` describes the format in errors.
pub fn read_marker(
    path: &Path,
    format: &str,
    name: &'static str,
    oldest: u32,
    newest: u32,
) -> Result<Option<u32>, MarkerError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IoError::new("read", path, e).into()),
    };
    parse_marker(path, &bytes, format, name, oldest, newest).map(Some)
}

/// Checks the bytes of the marker file at `path` (named in errors only) as
/// [`read_marker`] does, and returns its version.
pub fn parse_marker(
    path: &Path,
    bytes: &[u8],
    format: &str,
    name: &'static str,
    oldest: u32,
    newest: u32,
) -> Result<u32, MarkerError> {
    let invalid = |reason: String| MarkerError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let m: Marker = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    if m.format != format {
        return Err(invalid(format!(
            "format {:?}, expected {format:?}",
            m.format
        )));
    }
    check_version(name, m.version, oldest, newest).map_err(|source| MarkerError::Version {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(m.version)
}

/// Writes the marker at `path` atomically and durably.
pub fn write_marker(path: &Path, format: &str, version: u32) -> Result<(), IoError> {
    let bytes = serde_json::to_vec_pretty(&Marker {
        format: format.into(),
        version,
    })
    .expect("a marker serializes");
    write_atomic(path, &bytes)
}

/// Checks that the archive at `root` has a layout this build reads (its marker, if any).
/// Resumes over HTTP do not fetch the marker: there the state file's and the chunks' own
/// versions are checked.
pub fn check_archive(root: &Path) -> Result<(), MarkerError> {
    read_marker(
        &root.join(ARCHIVE_MARKER),
        ARCHIVE_FORMAT,
        "vmm archive",
        1,
        ARCHIVE_VERSION,
    )
    .map(drop)
}

/// Before writing into the archive at `root` (created if missing): checks its layout and
/// marks it if it has no marker yet, so an older `vmm` never writes into a newer layout.
pub fn prepare_archive(root: &Path) -> Result<(), MarkerError> {
    check_archive(root)?;
    let marker = root.join(ARCHIVE_MARKER);
    if marker.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(IoError::at("create directory", root))?;
    write_marker(&marker, ARCHIVE_FORMAT, ARCHIVE_VERSION).map_err(|source| MarkerError::Write {
        path: marker,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::error_chain;
    use crate::util::testutil::TempDir;

    #[test]
    fn markers() {
        let dir = TempDir::new("formats-marker");
        let p = dir.path().join("m.json");
        assert!(read_marker(&p, "f", "thing", 1, 1).unwrap().is_none());
        write_marker(&p, "f", 1).unwrap();
        assert_eq!(read_marker(&p, "f", "thing", 1, 1).unwrap(), Some(1));
        write_marker(&p, "f", 7).unwrap();
        let e = read_marker(&p, "f", "thing", 1, 2).unwrap_err();
        assert!(
            error_chain(&e).contains("thing has format version 7"),
            "{e:?}"
        );
        assert!(matches!(
            read_marker(&p, "other", "thing", 1, 7),
            Err(MarkerError::Invalid { .. })
        ));
        std::fs::write(&p, b"{").unwrap();
        assert!(matches!(
            read_marker(&p, "f", "thing", 1, 1),
            Err(MarkerError::Invalid { .. })
        ));
    }
}
