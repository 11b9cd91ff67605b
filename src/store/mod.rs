//! Content-addressed chunk stores.
//!
//! A chunk is an arbitrary byte string (in practice a fixed-size piece of guest
//! memory) named by the BLAKE3 hash of its contents, its [`ChunkId`]. Every store reads
//! chunks by id ([`ChunkRead`]); a writable one also keeps them ([`ChunkWrite`]): writing
//! the same bytes twice stores them once.
//!
//! * [`local`] — [`LocalStore`], chunks in packs or as files under a directory.
//! * [`pack`] — the pack and pack index formats ([`pack::PackWriter`], [`pack::PackSet`]).
//! * [`http`] — [`HttpStore`](http::HttpStore), a read-only store over HTTP.
//! * [`cache`] — [`CachedStore`](cache::CachedStore), a read-through local chunk cache
//!   in front of another store.
//! * [`s3`] — [`S3Store`](s3::S3Store), chunks as objects in S3-compatible storage
//!   (reads through the HTTP store, `s3://` URLs signed by [`s3sign`]).
//! * [`codec`] — the on-disk encoding of one chunk file (raw or zstd), shared by
//!   every store that reads the same layout (e.g. a future HTTP store).
//!
//! The layout and chunk file format are described in `docs/SNAPSHOT_FORMAT.md`.

pub mod cache;
pub mod codec;
pub mod evict;
pub mod http;
pub mod local;
pub mod pack;
pub mod pack_gc;
pub mod pack_migrate;
pub mod s3;
pub mod s3sign;

pub use codec::Compression;
pub use local::{Layout, LocalStore, LocalStoreOptions, StoreStats};

use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::util::IoError;

/// Largest chunk any store accepts or returns (16 MiB).
///
/// Bounds allocations made while reading untrusted chunk files.
pub const MAX_CHUNK_LEN: usize = 16 << 20;

/// Errors of the chunk store module.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store has no chunk with this id.
    #[error("chunk {id} is missing from the store")]
    NotFound {
        /// The chunk asked for.
        id: ChunkId,
    },
    /// The stored chunk is damaged: bad header, undecodable payload, wrong length or
    /// contents that do not hash to the id.
    #[error("chunk {id} is corrupt: {reason}")]
    Corrupt {
        /// The damaged chunk.
        id: ChunkId,
        /// What was found wrong.
        reason: String,
    },
    /// The chunk file has a format version this build does not read.
    #[error("chunk {id}")]
    Version {
        /// The chunk.
        id: ChunkId,
        /// The version problem.
        #[source]
        source: Box<crate::formats::VersionError>,
    },
    /// `get_into` was given a buffer whose length differs from the chunk's.
    #[error("chunk {id} holds {actual} bytes but the destination buffer holds {expected}")]
    LengthMismatch {
        /// The chunk read.
        id: ChunkId,
        /// Length of the caller's buffer.
        expected: usize,
        /// Length recorded for the chunk.
        actual: usize,
    },
    /// A chunk larger than [`MAX_CHUNK_LEN`] was offered to `put`.
    #[error("chunk of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Offered length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string is not a 64-digit hexadecimal chunk id.
    #[error("invalid chunk id {input:?}: expected 64 hexadecimal digits")]
    InvalidId {
        /// The rejected text (cut to 80 characters).
        input: String,
    },
    /// Compressing a chunk failed.
    #[error("cannot compress chunk {id}")]
    Compress {
        /// The chunk being written.
        id: ChunkId,
        /// Underlying zstd error.
        #[source]
        source: io::Error,
    },
    /// A file system operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Identity of a chunk: the 32-byte BLAKE3 hash of its uncompressed contents.
///
/// Displayed and parsed as 64 lowercase hexadecimal digits.
///
/// Serde: in human-readable formats (JSON) it is the 64-digit hex string; in binary
/// formats (bincode, used by snapshot files) it is the 32 raw bytes, as a fixed-size
/// tuple, so each id costs exactly 32 bytes in a manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// Hashes `data` into its id.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Wraps 32 raw hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkId(bytes)
    }

    /// The raw hash bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// Path of the chunk file relative to a store root: `chunks/<2 hex>/<64 hex>`.
    ///
    /// Uses `/` separators so the same string is a URL path suffix for remote stores.
    pub fn relative_path(&self) -> String {
        let hex = self.to_hex();
        format!("chunks/{}/{}", &hex[..2], hex)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl FromStr for ChunkId {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || StoreError::InvalidId {
            input: s.chars().take(80).collect(),
        };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or_else(invalid)?;
            let lo = hex_digit(pair[1]).ok_or_else(invalid)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(ChunkId(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(deserializer).map(ChunkId)
        }
    }
}

/// Reading side of a content-addressed store of chunks.
///
/// Every store reads; only some write ([`ChunkWrite`]). A read-only store (an archive
/// over HTTP, a read-through cache) implements this trait alone, so it cannot be asked
/// to write:
///
/// ```compile_fail
/// use vmm::store::ChunkWrite;
/// use vmm::store::http::{HttpStore, HttpStoreOptions};
/// let store = HttpStore::new("http://h/a", HttpStoreOptions::default()).unwrap();
/// store.put(b"data"); // HttpStore is not a ChunkWrite
/// ```
///
/// Implementations must be usable from many threads at once: snapshot code hashes,
/// stores and restores chunks in parallel.
pub trait ChunkRead: Send + Sync {
    /// Returns the chunk's bytes, after checking they hash to `id`
    /// ([`StoreError::Corrupt`] otherwise, [`StoreError::NotFound`] if absent).
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>>;

    /// Fills `buf`, whose length must equal the chunk's, with the chunk's bytes and
    /// checks they hash to `id`. Meant for decompressing straight into guest memory.
    ///
    /// On error the contents of `buf` are unspecified.
    fn get_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        let data = self.get(id)?;
        if data.len() != buf.len() {
            return Err(StoreError::LengthMismatch {
                id: *id,
                expected: buf.len(),
                actual: data.len(),
            });
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Whether the store holds a chunk with this id (its contents are not checked).
    fn contains(&self, id: &ChunkId) -> Result<bool>;

    /// Whether the store itself retries transient failures (with backoff, within a
    /// budget), so that an error it returns is final and a caller must not retry it.
    /// Retries live in exactly one layer (docs/DESIGN.md, "Chunk stores"): the store
    /// that knows which failures are transient (the HTTP store), else the caller.
    /// The default: no.
    fn retries(&self) -> bool {
        false
    }
}

/// Writing side of a content-addressed store of chunks: writing the same bytes twice
/// stores them once.
pub trait ChunkWrite: ChunkRead {
    /// Stores `data` and returns its id. Idempotent: if the chunk is already present
    /// it is not rewritten.
    fn put(&self, data: &[u8]) -> Result<ChunkId>;

    /// Makes every chunk put so far durable. Call once after a whole snapshot,
    /// before writing anything that refers to the chunks. The default does nothing.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Like [`put`](Self::put) for a caller that has already computed
    /// `id == ChunkId::of(data)` (so the store need not hash again), and that wants
    /// to know whether the chunk was new. Passing a wrong id stores a chunk that
    /// later reads report as corrupt.
    fn put_hashed(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        debug_assert_eq!(*id, ChunkId::of(data));
        if self.contains(id)? {
            return Ok(PutOutcome::Present);
        }
        self.put(data)?;
        Ok(PutOutcome::Written {
            stored_bytes: data.len() as u64,
        })
    }
}

/// What [`ChunkWrite::put_hashed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The chunk was already stored; nothing was written.
    Present,
    /// The chunk was written.
    Written {
        /// Bytes the store used for it (after compression, headers included).
        stored_bytes: u64,
    },
}

/// Checks that `data` hashes to `id`.
pub(crate) fn verify(id: &ChunkId, data: &[u8]) -> Result<()> {
    let actual = ChunkId::of(data);
    if actual != *id {
        return Err(StoreError::Corrupt {
            id: *id,
            reason: format!("contents hash to {actual}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hex_round_trip() {
        let id = ChunkId::of(b"hello");
        let hex = id.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(hex.parse::<ChunkId>().unwrap(), id);
        assert_eq!(hex.to_uppercase().parse::<ChunkId>().unwrap(), id);
        assert_eq!(id.relative_path(), format!("chunks/{}/{}", &hex[..2], hex));
    }

    #[test]
    fn id_parse_rejects_bad_input() {
        for bad in [
            "",
            "00",
            &"g".repeat(64),
            &"0".repeat(63),
            &"0".repeat(65),
            &"é".repeat(32),
        ] {
            assert!(matches!(
                bad.parse::<ChunkId>(),
                Err(StoreError::InvalidId { .. })
            ));
        }
    }

    #[test]
    fn id_serde_binary_is_32_bytes_and_json_is_hex() {
        let id = ChunkId::of(b"x");
        let bin = bincode::serialize(&id).unwrap();
        assert_eq!(bin, id.as_bytes());
        assert_eq!(bincode::deserialize::<ChunkId>(&bin).unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ChunkId>("\"zz\"").is_err());
    }
}
