//! Encoding of one chunk file: an 8-byte header followed by the raw or
//! zstd-compressed chunk bytes.
//!
//! ```text
//! offset size  field
//! 0      2     magic  b"VC"
//! 2      1     format version, 1
//! 3      1     encoding: 0 = raw, 1 = zstd (one zstd frame)
//! 4      4     uncompressed length, u32 little endian (<= MAX_CHUNK_LEN)
//! 8      ...   body: the chunk (raw) or its zstd frame; nothing follows it
//! ```
//!
//! Decoding never trusts the file: every field is checked, the uncompressed length
//! bounds allocations, and the decoded bytes must hash to the chunk id.

use std::borrow::Cow;
use std::cell::RefCell;

use super::{ChunkId, MAX_CHUNK_LEN, Result, StoreError, verify};
use crate::formats::CHUNK_VERSION;

/// Length of the chunk file header.
pub const HEADER_LEN: usize = 8;
/// First two bytes of every chunk file.
pub const MAGIC: [u8; 2] = *b"VC";
/// How a chunk's body is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The chunk bytes as they are.
    Raw = 0,
    /// A zstd frame that decompresses to the chunk bytes.
    Zstd = 1,
}

/// Compression policy used when writing chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Always store raw.
    None,
    /// Try zstd at this level; keep it only if it saves at least 1/8 of the chunk.
    Zstd {
        /// zstd compression level (1..=22; 0 means zstd's default).
        level: i32,
    },
}

/// A decoded chunk file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// How the body is stored.
    pub encoding: Encoding,
    /// Length of the chunk once decoded.
    pub len: usize,
}

impl ChunkHeader {
    /// Serializes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&MAGIC);
        h[2] = CHUNK_VERSION;
        h[3] = self.encoding as u8;
        // `len` never exceeds MAX_CHUNK_LEN, which fits in a u32.
        h[4..].copy_from_slice(&(self.len as u32).to_le_bytes());
        h
    }

    /// Parses and checks the header at the start of `file` (the chunk `id`'s file).
    pub fn parse(id: &ChunkId, file: &[u8]) -> Result<Self> {
        let corrupt = |reason: String| StoreError::Corrupt { id: *id, reason };
        if file.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                file.len()
            )));
        }
        if file[..2] != MAGIC {
            return Err(corrupt("bad magic, not a chunk file".into()));
        }
        let v = u32::from(CHUNK_VERSION);
        crate::formats::check_version("chunk file", u32::from(file[2]), v, v).map_err(|e| {
            StoreError::Version {
                id: *id,
                source: Box::new(e),
            }
        })?;
        let encoding = match file[3] {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            e => return Err(corrupt(format!("unknown encoding {e}"))),
        };
        let len = u32::from_le_bytes([file[4], file[5], file[6], file[7]]) as usize;
        if len > MAX_CHUNK_LEN {
            return Err(corrupt(format!(
                "recorded length {len} exceeds the limit of {MAX_CHUNK_LEN} bytes"
            )));
        }
        Ok(ChunkHeader { encoding, len })
    }
}

/// A chunk ready to be written: header then body.
#[derive(Debug)]
pub struct Encoded<'a> {
    /// The header bytes.
    pub header: [u8; HEADER_LEN],
    /// The body: the chunk itself or its compressed form.
    pub body: Cow<'a, [u8]>,
}

impl Encoded<'_> {
    /// Total file length.
    pub fn file_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Encodes chunk `data` (whose id is `id`) according to `compression`.
pub fn encode<'a>(id: &ChunkId, data: &'a [u8], compression: Compression) -> Result<Encoded<'a>> {
    if data.len() > MAX_CHUNK_LEN {
        return Err(StoreError::TooLarge {
            len: data.len(),
            max: MAX_CHUNK_LEN,
        });
    }
    let raw = |data: &'a [u8]| Encoded {
        header: ChunkHeader {
            encoding: Encoding::Raw,
            len: data.len(),
        }
        .to_bytes(),
        body: Cow::Borrowed(data),
    };
    let Compression::Zstd { level } = compression else {
        return Ok(raw(data));
    };
    // Worth it only if the frame is at most 7/8 of the chunk: a destination of
    // that capacity makes zstd fail early on anything bigger.
    let limit = data.len() - data.len() / 8;
    if limit == 0 {
        return Ok(raw(data));
    }
    let mut out = Vec::with_capacity(limit);
    let compressed = COMPRESSOR.with(|cell| -> Result<bool> {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            let c = zstd::bulk::Compressor::new(level)
                .map_err(|source| StoreError::Compress { id: *id, source })?;
            *slot = Some((level, c));
        }
        let (_, c) = slot.as_mut().expect("compressor was just set");
        // An error here means the frame would not fit in `limit`: store raw.
        Ok(c.compress_to_buffer(data, &mut out).is_ok() && out.len() <= limit)
    })?;
    if !compressed {
        return Ok(raw(data));
    }
    Ok(Encoded {
        header: ChunkHeader {
            encoding: Encoding::Zstd,
            len: data.len(),
        }
        .to_bytes(),
        body: Cow::Owned(out),
    })
}

/// Decodes a whole chunk file and checks the result hashes to `id`.
pub fn decode(id: &ChunkId, file: &[u8]) -> Result<Vec<u8>> {
    let header = ChunkHeader::parse(id, file)?;
    let mut buf = vec![0u8; header.len];
    decode_body(id, &header, &file[HEADER_LEN..], &mut buf)?;
    Ok(buf)
}

/// Decodes a whole chunk file into `buf` (which must be exactly the chunk's length)
/// and checks the result hashes to `id`. On error `buf` holds unspecified bytes.
pub fn decode_into(id: &ChunkId, file: &[u8], buf: &mut [u8]) -> Result<()> {
    let header = ChunkHeader::parse(id, file)?;
    if header.len != buf.len() {
        return Err(StoreError::LengthMismatch {
            id: *id,
            expected: buf.len(),
            actual: header.len,
        });
    }
    decode_body(id, &header, &file[HEADER_LEN..], buf)
}

/// Decodes `body` as described by `header` into `buf` (of length `header.len`) and
/// verifies the hash.
pub fn decode_body(id: &ChunkId, header: &ChunkHeader, body: &[u8], buf: &mut [u8]) -> Result<()> {
    decode_body_unverified(id, header, body, buf)?;
    verify(id, buf)
}

/// [`decode_body`] without the final hash check: what the body decodes to, whether or not
/// it is chunk `id` (named in errors only).
pub fn decode_body_unverified(
    id: &ChunkId,
    header: &ChunkHeader,
    body: &[u8],
    buf: &mut [u8],
) -> Result<()> {
    debug_assert_eq!(header.len, buf.len());
    let corrupt = |reason: String| StoreError::Corrupt { id: *id, reason };
    match header.encoding {
        Encoding::Raw => {
            if body.len() != buf.len() {
                return Err(corrupt(format!(
                    "raw body is {} bytes, header says {}",
                    body.len(),
                    buf.len()
                )));
            }
            buf.copy_from_slice(body);
        }
        Encoding::Zstd => {
            let n = DECOMPRESSOR.with(|cell| -> Result<usize> {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| corrupt(format!("cannot create zstd decoder: {e}")))?,
                    );
                }
                let d = slot.as_mut().expect("decompressor was just set");
                d.decompress_to_buffer(body, buf)
                    .map_err(|e| corrupt(format!("zstd body does not decode: {e}")))
            })?;
            if n != buf.len() {
                return Err(corrupt(format!(
                    "zstd body decodes to {n} bytes, header says {}",
                    buf.len()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::Rng;

    fn file_of(e: &Encoded<'_>) -> Vec<u8> {
        let mut f = e.header.to_vec();
        f.extend_from_slice(&e.body);
        f
    }

    #[test]
    fn raw_and_zstd_round_trip() {
        let mut random = vec![0u8; 8192];
        Rng::new(7).fill(&mut random);
        let text: Vec<u8> = b"the quick brown fox "
            .iter()
            .cycle()
            .take(8192)
            .copied()
            .collect();
        for (data, want) in [(&random, Encoding::Raw), (&text, Encoding::Zstd)] {
            let id = ChunkId::of(data);
            let enc = encode(&id, data, Compression::Zstd { level: 3 }).unwrap();
            let file = file_of(&enc);
            assert_eq!(ChunkHeader::parse(&id, &file).unwrap().encoding, want);
            assert_eq!(&decode(&id, &file).unwrap(), data);
            let mut buf = vec![0u8; data.len()];
            decode_into(&id, &file, &mut buf).unwrap();
            assert_eq!(&buf, data);
            // Uncompressed policy always stores raw.
            let enc = encode(&id, data, Compression::None).unwrap();
            assert_eq!(
                ChunkHeader::parse(&id, &enc.header).unwrap().encoding,
                Encoding::Raw
            );
            assert_eq!(&decode(&id, &file_of(&enc)).unwrap(), data);
        }
    }

    #[test]
    fn empty_chunk() {
        let id = ChunkId::of(b"");
        let enc = encode(&id, b"", Compression::Zstd { level: 3 }).unwrap();
        assert_eq!(decode(&id, &file_of(&enc)).unwrap(), b"");
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_an_error() {
        let text: Vec<u8> = b"abcdefgh".iter().cycle().take(4096).copied().collect();
        let mut random = vec![0u8; 512];
        Rng::new(3).fill(&mut random);
        for data in [&text, &random] {
            let id = ChunkId::of(data);
            let file = file_of(&encode(&id, data, Compression::Zstd { level: 3 }).unwrap());
            for i in 0..file.len() {
                let mut bad = file.clone();
                bad[i] ^= 0x41;
                assert!(decode(&id, &bad).is_err(), "flip at {i} accepted");
                let mut buf = vec![0u8; data.len()];
                assert!(decode_into(&id, &bad, &mut buf).is_err());
            }
            for len in 0..file.len() {
                assert!(
                    decode(&id, &file[..len]).is_err(),
                    "truncation to {len} accepted"
                );
            }
            let mut longer = file.clone();
            longer.push(0);
            assert!(decode(&id, &longer).is_err());
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let id = ChunkId::of(b"x");
        let mut h = ChunkHeader {
            encoding: Encoding::Raw,
            len: 0,
        }
        .to_bytes();
        h[4..].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&id, &h).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn wrong_buffer_length() {
        let id = ChunkId::of(b"abc");
        let file = file_of(&encode(&id, b"abc", Compression::None).unwrap());
        let mut buf = [0u8; 4];
        assert!(matches!(
            decode_into(&id, &file, &mut buf),
            Err(StoreError::LengthMismatch {
                expected: 4,
                actual: 3,
                ..
            })
        ));
    }
}
