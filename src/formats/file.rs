//! Checksummed state files.
//!
//! ```text
//! offset      size  field
//! 0           8     magic, e.g. b"VMMSNAP\0" (one per file kind)
//! 8           4     format version, u32 little endian
//! 12          8     payload length N, u64 little endian
//! 20          N     payload: bincode 1.x (fixint, little endian) of the value
//! 20+N        32    BLAKE3 hash of the payload
//! ```
//!
//! The file ends right after the hash. Readers check the magic, the version, the
//! length (against a per-kind cap and the real file size), the hash, and decode with
//! an allocation limit, so a corrupt or hostile file yields an error, never a panic
//! or a huge allocation.
//!
//! Files are written to a temp name in the same directory, fsynced, renamed into
//! place, and the directory is fsynced ([`write_atomic`](crate::util::fs::write_atomic)).
//!
//! Every file kind written in this container, with its magic and version, is listed in
//! [`crate::formats`].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::version::{VersionError, check_version};
use crate::util::IoError;
use crate::util::fs::write_atomic;

/// Length of the fixed header (magic, version, payload length).
pub const HEADER_LEN: usize = 20;
/// Length of the trailing payload hash.
pub const TRAILER_LEN: usize = 32;

/// Errors of state file encoding, decoding and I/O.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The magic bytes are not those of the expected kind.
    #[error("not a {name} (bad magic)")]
    BadMagic {
        /// Description of the expected kind, e.g. "vmm snapshot file".
        name: &'static str,
    },
    /// The file has a format version this build does not read.
    #[error(transparent)]
    UnsupportedVersion(#[from] VersionError),
    /// The recorded payload length is above the kind's cap.
    #[error("payload length {len} exceeds the limit of {max} bytes")]
    TooLarge {
        /// Recorded length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The file is shorter than its header says.
    #[error("file is truncated: {actual} bytes, expected {expected}")]
    Truncated {
        /// Length the header implies (or the header length).
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// Bytes follow the checksum.
    #[error("file has unexpected data after the checksum: {actual} bytes, expected {expected}")]
    TrailingData {
        /// Length the header implies.
        expected: u64,
        /// Actual length (or a lower bound).
        actual: u64,
    },
    /// The payload does not match its checksum.
    #[error("checksum mismatch: the payload is corrupt")]
    ChecksumMismatch,
    /// The payload passed the checksum but does not decode as the expected type.
    #[error("payload does not decode")]
    Decode(#[source] bincode::Error),
    /// The value could not be encoded.
    #[error("cannot encode the payload")]
    Encode(#[source] bincode::Error),
    /// A file's contents are invalid.
    #[error("invalid file {}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<StateFileError>,
    },
    /// A file system operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, StateFileError>;

/// What distinguishes one kind of state file from another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileKind {
    /// The 8 magic bytes at the start of the file.
    pub magic: [u8; 8],
    /// The format version written, and the newest one read (older ones only through
    /// [`decode_frame`] by readers that know them).
    pub version: u32,
    /// Largest payload accepted when reading.
    pub max_payload: u64,
    /// Description used in error messages, e.g. "vmm snapshot file".
    pub name: &'static str,
}

impl FileKind {
    /// Device and vCPU state of a snapshot (`write_state_file`/`read_state_file`).
    pub const STATE: FileKind = FileKind {
        magic: *b"VMMSNAP\0",
        version: 4,
        max_payload: 64 << 20,
        name: "vmm snapshot file",
    };
}

fn options(limit: u64) -> impl Options {
    // Same encoding as `bincode::serialize` (fixint, little endian), but rejecting
    // trailing bytes and never reading or allocating past `limit`.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(limit)
}

/// Encodes `value` as a complete file of the given kind.
pub fn encode<T: Serialize + ?Sized>(kind: &FileKind, value: &T) -> Result<Vec<u8>> {
    let payload = options(kind.max_payload)
        .serialize(value)
        .map_err(StateFileError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    Ok(out)
}

/// Checks and decodes a complete file of the given kind (of its current version only).
pub fn decode<T: DeserializeOwned>(kind: &FileKind, bytes: &[u8]) -> Result<T> {
    let (_, payload) = decode_frame(kind, bytes, kind.version)?;
    decode_payload(payload)
}

/// Checks the container of a file of the given kind (magic, version, length, checksum)
/// without decoding its payload: whether the bytes arrived whole. Any version up to this
/// build's is accepted here; the reader decides which versions it decodes.
pub fn check_container(kind: &FileKind, bytes: &[u8]) -> Result<()> {
    decode_frame(kind, bytes, 1).map(|_| ())
}

/// Checks a complete file of the given kind whose version is from `oldest` to
/// `kind.version` and returns that version and the payload, for a reader that decodes
/// older payloads itself (see `snapshot::microvm`).
pub fn decode_frame<'a>(kind: &FileKind, bytes: &'a [u8], oldest: u32) -> Result<(u32, &'a [u8])> {
    let actual = bytes.len() as u64;
    if bytes.len() < 8 || bytes[..8] != kind.magic {
        return Err(StateFileError::BadMagic { name: kind.name });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            expected: HEADER_LEN as u64,
            actual,
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    check_version(kind.name, version, oldest, kind.version)?;
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > kind.max_payload {
        return Err(StateFileError::TooLarge {
            len,
            max: kind.max_payload,
        });
    }
    let expected = HEADER_LEN as u64 + len + TRAILER_LEN as u64;
    if actual < expected {
        return Err(StateFileError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(StateFileError::TrailingData { expected, actual });
    }
    // `len` <= max_payload and fits in the slice, so it fits in usize.
    let payload = &bytes[HEADER_LEN..HEADER_LEN + len as usize];
    let hash = &bytes[HEADER_LEN + len as usize..];
    if blake3::hash(payload).as_bytes()[..] != *hash {
        return Err(StateFileError::ChecksumMismatch);
    }
    Ok((version, payload))
}

/// Decodes a payload checked by [`decode_frame`]: bincode with an allocation limit of the
/// payload's own length, trailing bytes refused.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    options(payload.len() as u64)
        .deserialize(payload)
        .map_err(StateFileError::Decode)
}

/// Writes `value` to `path` as a file of the given kind, atomically and durably.
pub fn write_file<T: Serialize + ?Sized>(path: &Path, kind: &FileKind, value: &T) -> Result<()> {
    Ok(write_atomic(path, &encode(kind, value)?)?)
}

/// Reads, checks and decodes a file of the given kind.
pub fn read_file<T: DeserializeOwned>(path: &Path, kind: &FileKind) -> Result<T> {
    let bytes = read_bytes(path, kind)?;
    decode(kind, &bytes).map_err(|e| invalid(path, e))
}

/// Reads the bytes of a file of the given kind (at most one byte more than its largest
/// valid size, so oversized files are reported without reading them whole).
pub fn read_bytes(path: &Path, kind: &FileKind) -> Result<Vec<u8>> {
    let f = File::open(path).map_err(IoError::at("open", path))?;
    let cap = HEADER_LEN as u64 + kind.max_payload + TRAILER_LEN as u64 + 1;
    let mut bytes = Vec::new();
    f.take(cap)
        .read_to_end(&mut bytes)
        .map_err(IoError::at("read", path))?;
    Ok(bytes)
}

/// `e` about the contents of the file at `path`.
pub fn invalid(path: &Path, e: StateFileError) -> StateFileError {
    StateFileError::Invalid {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Writes `value` as a snapshot state file ([`FileKind::STATE`]).
pub fn write_state_file<T: Serialize + ?Sized>(path: impl AsRef<Path>, value: &T) -> Result<()> {
    write_file(path.as_ref(), &FileKind::STATE, value)
}

/// Reads a snapshot state file ([`FileKind::STATE`]) of the current version, written by
/// [`write_state_file`]. A snapshot's `MicrovmState` is read with
/// `snapshot::microvm::MicrovmState::read`, which also reads older versions.
pub fn read_state_file<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    read_file(path.as_ref(), &FileKind::STATE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::TempDir;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        flag: bool,
        opt: Option<u32>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            regs: vec![1, 2, 0xdead_beef],
            flag: true,
            opt: Some(7),
        }
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = TempDir::new("statefile");
        let path = dir.path().join("vm.state");
        write_state_file(&path, &sample()).unwrap();
        assert_eq!(read_state_file::<Sample>(&path).unwrap(), sample());
        // Overwrite in place, and no temp files remain.
        let other = Sample {
            name: "x".into(),
            ..sample()
        };
        write_state_file(&path, &other).unwrap();
        assert_eq!(read_state_file::<Sample>(&path).unwrap(), other);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"VMMSNAP\0");
        assert_eq!(decode::<Sample>(&FileKind::STATE, &bytes).unwrap(), other);
    }

    #[test]
    fn the_container_check_needs_the_whole_file() {
        let good = encode(&FileKind::STATE, &sample()).unwrap();
        check_container(&FileKind::STATE, &good).unwrap();
        assert!(check_container(&FileKind::STATE, &good[..good.len() - 1]).is_err());
        assert!(check_container(&MANIFEST_LIKE, &good).is_err());
    }

    const MANIFEST_LIKE: FileKind = FileKind {
        magic: *b"VMMOTHR\0",
        ..FileKind::STATE
    };

    #[test]
    fn every_flipped_byte_is_an_error() {
        let good = encode(&FileKind::STATE, &sample()).unwrap();
        for i in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                let r = decode::<Sample>(&FileKind::STATE, &bad);
                assert!(r.is_err(), "flip {mask:#x} at {i} decoded to {r:?}");
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let good = encode(&FileKind::STATE, &sample()).unwrap();
        for len in 0..good.len() {
            assert!(decode::<Sample>(&FileKind::STATE, &good[..len]).is_err());
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            decode::<Sample>(&FileKind::STATE, &longer),
            Err(StateFileError::TrailingData { .. })
        ));
    }

    #[test]
    fn clear_messages() {
        let dir = TempDir::new("statefile-msg");
        let path = dir.path().join("junk");
        std::fs::write(&path, b"#!/bin/sh\necho not a snapshot\n").unwrap();
        let e = read_state_file::<Sample>(&path).unwrap_err();
        let StateFileError::Invalid { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(source.to_string(), "not a vmm snapshot file (bad magic)");

        let mut other = encode(&FileKind::STATE, &sample()).unwrap();
        let newer = FileKind::STATE.version + 1;
        other[8..12].copy_from_slice(&newer.to_le_bytes());
        let e = decode::<Sample>(&FileKind::STATE, &other).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "vmm snapshot file has format version {newer}, but this vmm ({}) reads version {}: \
                 it needs a newer vmm, one that reads version {newer}",
                env!("CARGO_PKG_VERSION"),
                FileKind::STATE.version
            )
        );

        let e = read_state_file::<Sample>(dir.path().join("absent")).unwrap_err();
        assert!(matches!(e, StateFileError::Io(IoError { op: "open", .. })));
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut big = encode(&FileKind::STATE, &sample()).unwrap();
        big[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&FileKind::STATE, &big),
            Err(StateFileError::TooLarge { .. })
        ));
    }

    #[test]
    fn hostile_payload_with_valid_checksum_does_not_allocate_wildly() {
        // A Vec<u64> claiming 2^60 elements, correctly framed and checksummed.
        let payload = (1u64 << 60).to_le_bytes();
        let mut file = FileKind::STATE.magic.to_vec();
        file.extend_from_slice(&FileKind::STATE.version.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&payload);
        file.extend_from_slice(blake3::hash(&payload).as_bytes());
        assert!(matches!(
            decode::<Vec<u64>>(&FileKind::STATE, &file),
            Err(StateFileError::Decode(_))
        ));
        // Wrong type behind a valid frame is a decode error too.
        let file = encode(&FileKind::STATE, &sample()).unwrap();
        assert!(decode::<(u64, u64, u64, u64, u64, u64)>(&FileKind::STATE, &file).is_err());
    }
}
