//! Every on-disk format `vmm` writes, with the version this build writes and the oldest
//! version it still reads ([`all`]), the one error every reader gives for a version it
//! cannot read ([`VersionError`]), the checksummed container most formats use ([`file`]),
//! the small JSON marker files that version directory layouts ([`marker`]), and the
//! [`Persist`] trait of the components whose state a snapshot keeps.
//!
//! The rule (docs/KEEPING_SNAPSHOTS.md, "Versions"): a change to a format bumps its
//! version, keeps a reader for every older version, and adds a fixture set under
//! `tests/fixtures/` (`scripts/make-fixtures.sh`), which every later build must read.
//!
//! With `util`, this is the bottom layer (docs/DESIGN.md, "Layers"): the identity of every
//! format (magic, version, size cap) is defined here, and the modules that read and write
//! the files import it from here.

pub mod file;
pub mod marker;
mod persist;
mod version;

use std::collections::BTreeMap;

use serde::Serialize;

pub use file::{FileKind, StateFileError};
pub use marker::{
    MarkerError, check_archive, parse_marker, prepare_archive, read_marker, write_marker,
};
pub use persist::Persist;
pub use version::{VersionError, check_version};

/// The oldest state-file version this build reads ([`FileKind::STATE`] is the newest;
/// `snapshot::microvm` converts the older ones).
pub const OLDEST_STATE_VERSION: u32 = 2;

/// File kind of a memory manifest file (`snapshot::manifest`).
pub const MANIFEST_KIND: FileKind = FileKind {
    magic: *b"VMMMEMM\0",
    version: 1,
    max_payload: 1 << 30,
    name: "vmm memory manifest",
};

/// The chunk file format version written and understood (`store::codec`).
pub const CHUNK_VERSION: u8 = 1;

/// Repository layout version this build reads and writes (`repo`).
pub const REPO_VERSION: u32 = 1;

/// The repository export file format version written and read (`repo::export`).
pub const EXPORT_VERSION: u32 = 1;

/// Archive layout version this build reads and writes (`archive`; [`marker`]).
pub const ARCHIVE_VERSION: u32 = 1;

/// Container kind of a pack's index file (`store::pack`, `STORE/packs/<pack id>.idx`).
pub const PACK_INDEX_KIND: FileKind = FileKind {
    magic: *b"VMMPIDX\0",
    version: 1,
    max_payload: 256 << 20,
    name: "vmm pack index",
};

/// The pack file format version written and read (`store::pack`, `STORE/packs/<id>.pack`).
pub const PACK_VERSION: u32 = 1;

/// Chunk store layout version written (`store`): 1 = one file per chunk
/// (`chunks/xx/<id>`), 2 = packs (`packs/<id>.pack` + `.idx`). Both are read.
pub const STORE_VERSION: u32 = 2;

/// The container kind of disk image index files (`image`).
pub const INDEX_KIND: FileKind = FileKind {
    magic: *b"VMMIMG\0\0",
    version: 1,
    max_payload: 64 << 20,
    name: "vmm image index",
};

/// The working-set file kind (`archive::workingset`).
pub const WORKINGSET_KIND: FileKind = FileKind {
    magic: *b"VMMWSET\0",
    version: 1,
    max_payload: 256 << 20,
    name: "vmm working-set file",
};

/// Container kind of overlay map files (`disk::overlay`).
pub const MAP_KIND: FileKind = FileKind {
    magic: *b"VMMOVLY\0",
    version: 1,
    max_payload: 256 << 20,
    name: "vmm overlay map",
};

/// Container kind of the former per-image remote disk cache's presence bitmap file (no
/// longer written or read: the one chunk cache replaced it; kept so such files stay known).
pub const PRESENT_KIND: FileKind = FileKind {
    magic: *b"VMMCACH\0",
    version: 1,
    max_payload: 64 << 20,
    name: "vmm image cache bitmap",
};

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
    let mut v = snapshot_formats();
    v.extend(repository_and_archive_formats());
    v
}

/// A format written by one [`FileKind`], which reads only its own version.
fn kind(name: &'static str, what: &'static str, k: &FileKind) -> Format {
    Format {
        name,
        what,
        version: k.version,
        oldest: k.version,
    }
}

/// The formats of a snapshot directory and its chunk store.
fn snapshot_formats() -> Vec<Format> {
    vec![
        Format {
            name: "state",
            what: "snapshot state file (DIR/state)",
            version: FileKind::STATE.version,
            oldest: OLDEST_STATE_VERSION,
        },
        kind(
            "memory_manifest",
            "memory manifest (DIR/memory)",
            &MANIFEST_KIND,
        ),
        Format {
            name: "chunk",
            what: "chunk file (STORE/chunks/xx/<id>)",
            version: u32::from(CHUNK_VERSION),
            oldest: u32::from(CHUNK_VERSION),
        },
        Format {
            name: "store",
            what: "chunk store layout (1: STORE/chunks/xx/<id>; 2: STORE/packs/)",
            version: STORE_VERSION,
            oldest: 1,
        },
        Format {
            name: "pack",
            what: "pack file (STORE/packs/<pack id>.pack)",
            version: PACK_VERSION,
            oldest: PACK_VERSION,
        },
        kind(
            "pack_index",
            "pack index (STORE/packs/<pack id>.idx)",
            &PACK_INDEX_KIND,
        ),
    ]
}

/// The formats of repositories, exports, archives, images and their caches.
fn repository_and_archive_formats() -> Vec<Format> {
    vec![
        Format {
            name: "repository",
            what: "snapshot repository layout and catalogue (REPO/vmm-repo.json, meta.json)",
            version: REPO_VERSION,
            oldest: REPO_VERSION,
        },
        Format {
            name: "export",
            what: "repository export file (vmm snapshot export)",
            version: EXPORT_VERSION,
            oldest: EXPORT_VERSION,
        },
        Format {
            name: "archive",
            what: "archive layout (ARCHIVE/vmm-archive.json; absent = 1)",
            version: ARCHIVE_VERSION,
            oldest: 1,
        },
        kind(
            "image_index",
            "disk image index (ARCHIVE/images/NAME)",
            &INDEX_KIND,
        ),
        kind(
            "working_set",
            "working-set file (ARCHIVE/vms/NAME/workingset)",
            &WORKINGSET_KIND,
        ),
        kind(
            "overlay_map",
            "disk overlay block map (FILE.map next to an overlay=FILE)",
            &MAP_KIND,
        ),
        kind(
            "cache_bitmap",
            "remote image cache presence bitmap (CACHE/<image id>/present)",
            &PRESENT_KIND,
        ),
    ]
}

/// Format name → version this build writes.
pub fn current() -> BTreeMap<&'static str, u32> {
    all().into_iter().map(|f| (f.name, f.version)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
