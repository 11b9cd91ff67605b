//! Every on-disk format `vmm` writes, with the version this build writes and the oldest
//! version it still reads, the one error every reader gives for a version it cannot read
//! ([`VersionError`]), and the small JSON marker files that version directory layouts
//! ([`read_marker`], [`write_marker`]).
//!
//! The rule (docs/KEEPING_SNAPSHOTS.md, "Versions"): a change to a format bumps its
//! version, keeps a reader for every older version, and adds a fixture set under
//! `tests/fixtures/` (`scripts/make-fixtures.sh`), which every later build must read.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A format version this build cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct VersionError {
    /// What the file is, e.g. "vmm snapshot file".
    pub name: &'static str,
    /// The version found.
    pub found: u32,
    /// The oldest version this build reads.
    pub oldest: u32,
    /// The newest version this build reads (= the one it writes).
    pub newest: u32,
}

impl VersionError {
    fn message(&self) -> String {
        let range = if self.oldest == self.newest {
            format!("version {}", self.newest)
        } else {
            format!("versions {} to {}", self.oldest, self.newest)
        };
        if self.found > self.newest {
            format!(
                "{} has format version {}, but this vmm ({}) reads {range}: it needs a newer \
                 vmm, one that reads version {}",
                self.name,
                self.found,
                env!("CARGO_PKG_VERSION"),
                self.found
            )
        } else {
            format!(
                "{} has format version {}, older than this vmm ({}) reads ({range})",
                self.name,
                self.found,
                env!("CARGO_PKG_VERSION")
            )
        }
    }
}

/// `Ok` if `found` is in `oldest..=newest`, else the error naming what is needed.
pub fn check_version(
    name: &'static str,
    found: u32,
    oldest: u32,
    newest: u32,
) -> Result<(), VersionError> {
    if (oldest..=newest).contains(&found) {
        Ok(())
    } else {
        Err(VersionError {
            name,
            found,
            oldest,
            newest,
        })
    }
}

/// One on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Format {
    /// Short name (the key in fixture sets' `FORMATS.json`).
    pub name: &'static str,
    /// What it is and where it lives.
    pub what: &'static str,
    /// The version this build writes (and the newest it reads).
    pub version: u32,
    /// The oldest version this build reads.
    pub oldest: u32,
}

/// Every format, in the order of docs/KEEPING_SNAPSHOTS.md.
pub fn all() -> Vec<Format> {
    use crate::snapshot::file::FileKind;
    let kind = |name, what, k: &FileKind| Format {
        name,
        what,
        version: k.version,
        oldest: k.version,
    };
    vec![
        Format {
            name: "state",
            what: "snapshot state file (DIR/state)",
            version: FileKind::STATE.version,
            oldest: crate::snapshot::microvm::OLDEST_STATE_VERSION,
        },
        kind(
            "memory_manifest",
            "memory manifest (DIR/memory)",
            &crate::snapshot::manifest::MANIFEST_KIND,
        ),
        Format {
            name: "chunk",
            what: "chunk file (STORE/chunks/xx/<id>)",
            version: u32::from(crate::store::codec::VERSION),
            oldest: u32::from(crate::store::codec::VERSION),
        },
        Format {
            name: "repository",
            what: "snapshot repository layout and catalogue (REPO/vmm-repo.json, meta.json)",
            version: crate::repo::REPO_VERSION,
            oldest: crate::repo::REPO_VERSION,
        },
        Format {
            name: "export",
            what: "repository export file (vmm snapshot export)",
            version: crate::repo::export::VERSION,
            oldest: crate::repo::export::VERSION,
        },
        Format {
            name: "archive",
            what: "archive layout (ARCHIVE/vmm-archive.json; absent = 1)",
            version: crate::archive::ARCHIVE_VERSION,
            oldest: 1,
        },
        kind(
            "image_index",
            "disk image index (ARCHIVE/images/NAME)",
            &crate::image::INDEX_KIND,
        ),
        kind(
            "working_set",
            "working-set file (ARCHIVE/vms/NAME/workingset)",
            &crate::archive::workingset::WORKINGSET_KIND,
        ),
        kind(
            "overlay_map",
            "disk overlay block map (FILE.map next to an overlay=FILE)",
            &crate::disk::overlay::MAP_KIND,
        ),
        kind(
            "cache_bitmap",
            "remote image cache presence bitmap (CACHE/<image id>/present)",
            &crate::disk::cache::PRESENT_KIND,
        ),
    ]
}

/// Format name → version this build writes.
pub fn current() -> BTreeMap<&'static str, u32> {
    all().into_iter().map(|f| (f.name, f.version)).collect()
}

/// Errors of marker files.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// The marker cannot be read or written.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The marker file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
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
        source: crate::snapshot::file::StateFileError,
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
        Err(source) => {
            return Err(MarkerError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            });
        }
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
pub fn write_marker(
    path: &Path,
    format: &str,
    version: u32,
) -> Result<(), crate::snapshot::file::StateFileError> {
    let bytes = serde_json::to_vec_pretty(&Marker {
        format: format.into(),
        version,
    })
    .expect("a marker serializes");
    crate::snapshot::file::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::TempDir;

    #[test]
    fn messages_say_what_is_needed() {
        let newer = check_version("vmm snapshot file", 4, 2, 3).unwrap_err();
        assert_eq!(
            newer.to_string(),
            format!(
                "vmm snapshot file has format version 4, but this vmm ({}) reads versions 2 \
                 to 3: it needs a newer vmm, one that reads version 4",
                env!("CARGO_PKG_VERSION")
            )
        );
        let one = check_version("chunk file", 2, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            one.contains("reads version 1: it needs a newer vmm"),
            "{one}"
        );
        let older = check_version("x", 1, 2, 3).unwrap_err().to_string();
        assert!(older.contains("older than this vmm"), "{older}");
        assert!(check_version("x", 3, 2, 3).is_ok());
    }

    #[test]
    fn every_format_has_a_version_and_unique_name() {
        let all = all();
        let names: std::collections::BTreeSet<_> = all.iter().map(|f| f.name).collect();
        assert_eq!(names.len(), all.len());
        for f in &all {
            assert!(
                f.version >= 1 && f.oldest >= 1 && f.oldest <= f.version,
                "{f:?}"
            );
        }
    }

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
            crate::vmm::error_chain(&e).contains("thing has format version 7"),
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
