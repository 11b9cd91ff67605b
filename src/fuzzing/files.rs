//! Harnesses of the checksummed file formats and the chunk codec.

use super::{Input, frame};
use crate::archive::workingset::WorkingSet;
use crate::formats::file::{self, FileKind, HEADER_LEN, TRAILER_LEN};
use crate::formats::{INDEX_KIND, MANIFEST_KIND, WORKINGSET_KIND};
use crate::image::ImageIndex;
use crate::snapshot::manifest::MemoryManifest;
use crate::snapshot::microvm::MicrovmState;
use crate::store::codec::{self, ChunkHeader, Compression, Encoding};
use crate::store::{ChunkId, MAX_CHUNK_LEN};

/// The file a container harness decodes: the input itself (first byte even), or the rest
/// of the input framed as a valid container of `kind` (odd; bit 1 picks `older` as the
/// version instead of the current one), so that the payload decoder is reached.
fn container(data: &[u8], kind: &FileKind, older: u32) -> Vec<u8> {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    if mode & 1 == 0 {
        return inp.rest().to_vec();
    }
    let mut f = frame(kind, inp.rest());
    if mode & 2 != 0 {
        f[8..12].copy_from_slice(&older.to_le_bytes());
    }
    f
}

/// The payload of a container file that decoded: whatever lies between header and hash.
fn payload(file: &[u8]) -> &[u8] {
    &file[HEADER_LEN..file.len() - TRAILER_LEN]
}

/// Snapshot state file (`MicrovmState::decode`, versions 2 and 3).
///
/// Properties: a decoded state re-encodes (current version) to a file that decodes to a
/// state encoding to the same bytes; the container check accepts every file that decodes.
pub fn state_file(data: &[u8]) {
    let f = container(data, &FileKind::STATE, 2);
    let decoded = MicrovmState::decode(&f);
    let Ok(state) = decoded else { return };
    file::check_container(&FileKind::STATE, &f).expect("a state file that decodes is whole");
    let again = file::encode(&FileKind::STATE, &state).expect("a decoded state encodes");
    let state2 = MicrovmState::decode(&again).expect("an encoded state decodes");
    let again2 = file::encode(&FileKind::STATE, &state2).expect("a decoded state encodes");
    assert_eq!(again, again2, "state round trip is not stable");
    // Not `again == f`: kvm-bindings' serde reads a short byte string into a KVM
    // structure zero-padded (on purpose, for newer kernels' larger structures), so a
    // valid file may re-encode longer.
}

/// Memory manifest (`MemoryManifest::decode`).
///
/// Properties: a manifest that decodes is valid, re-encodes to the same file, and its
/// derived figures (chunk ids, memory size) agree with its regions.
pub fn memory_manifest(data: &[u8]) {
    let f = container(data, &MANIFEST_KIND, MANIFEST_KIND.version);
    let Ok(m) = MemoryManifest::decode(&f) else {
        return;
    };
    m.validate().expect("a decoded manifest is valid");
    assert_eq!(m.encode().expect("a manifest encodes"), f);
    let entries: usize = m.regions.iter().map(|r| r.chunks.len()).sum();
    assert!(m.chunk_ids().count() <= entries);
    let size: u128 = m.regions.iter().map(|r| u128::from(r.size)).sum();
    assert_eq!(u128::from(m.memory_size()), size);
    for r in &m.regions {
        let full = r.chunks.len() as u128 * u128::from(m.chunk_size);
        assert!(u128::from(r.size) <= full && full < u128::from(r.size) + u128::from(m.chunk_size));
    }
}

/// Remote image index (`ImageIndex::decode`, what a remote disk reads over HTTP).
///
/// Properties: an index that decodes is valid, re-encodes to the same file, its id is the
/// file's trailing payload hash, and its chunks tile the image exactly.
pub fn image_index(data: &[u8]) {
    let f = container(data, &INDEX_KIND, INDEX_KIND.version);
    let Ok(index) = ImageIndex::decode(&f) else {
        return;
    };
    index.validate().expect("a decoded index is valid");
    assert_eq!(index.encode().expect("an index encodes"), f);
    assert_eq!(index.id(), ChunkId::of(payload(&f)));
    let mut total = 0u64;
    for i in 0..index.chunk_count() {
        assert_eq!(index.chunk_offset(i), total);
        let len = index.chunk_len(i);
        assert!(len > 0 && len <= index.chunk_size as usize);
        total += len as u64;
    }
    assert_eq!(total, index.size);
}

/// Working-set file (`WorkingSet::decode`) and remote-disk prefetch list
/// (`disk::http::parse_prefetch_list`): first byte 0–1 as in the container harnesses,
/// 2 and up for a prefetch list (the rest of the input as text).
///
/// Properties: a working set that decodes re-encodes to the same file and holds no more
/// ids than its payload has room for; a prefetch list that parses formats back to a list
/// that parses the same.
pub fn working_set(data: &[u8]) {
    if data.first().is_some_and(|&b| b >= 2) {
        let id = prefetch_image_id();
        let text = String::from_utf8_lossy(&data[1..]);
        if let Ok(list) = crate::disk::http::parse_prefetch_list(&text, &id) {
            let again = crate::disk::http::format_prefetch_list(&id, &list);
            let list2 = crate::disk::http::parse_prefetch_list(&again, &id)
                .expect("a formatted prefetch list parses");
            assert_eq!(list, list2);
        }
        return;
    }
    let f = container(data, &WORKINGSET_KIND, WORKINGSET_KIND.version);
    let Ok(ws) = WorkingSet::decode(&f) else {
        return;
    };
    assert_eq!(ws.encode().expect("a working set encodes"), f);
    assert!(ws.chunks.len() * 32 <= payload(&f).len());
}

/// The image id prefetch-list inputs are checked against (seeds use it too).
pub fn prefetch_image_id() -> ChunkId {
    ChunkId::of(b"vmm fuzz image")
}

/// Chunk codec (`store::codec`): first byte selects what the rest is.
///
/// * 0: a chunk file. Whatever its body decodes to, decoding under that content's own id
///   gives exactly it, and `decode_into` agrees.
/// * 1: a 32-byte id then a chunk file: decoding never returns data that does not hash
///   to the id.
/// * 2 and up: chunk contents. Encoding (raw and zstd at a level from the first byte)
///   then decoding returns them, and zstd is kept only when it saves 1/8.
pub fn chunk_codec(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() {
        0 => decode_own_id(inp.rest()),
        1 => {
            let id = ChunkId::from_bytes(inp.bytes(32).try_into().unwrap_or([0; 32]));
            let file = inp.rest();
            if let Ok(out) = codec::decode(&id, file) {
                assert_eq!(
                    ChunkId::of(&out),
                    id,
                    "decoded data does not hash to the id"
                );
                assert!(out.len() <= MAX_CHUNK_LEN);
            }
        }
        level => {
            let chunk = inp.rest();
            let id = ChunkId::of(chunk);
            let level = i32::from(level % 8);
            for c in [Compression::None, Compression::Zstd { level }] {
                let enc = codec::encode(&id, chunk, c).expect("a small chunk encodes");
                let mut file = enc.header.to_vec();
                file.extend_from_slice(&enc.body);
                let h = ChunkHeader::parse(&id, &file).expect("an encoded header parses");
                assert_eq!(h.len, chunk.len());
                if h.encoding == Encoding::Zstd {
                    assert!(enc.body.len() <= chunk.len() - chunk.len() / 8);
                }
                assert_eq!(codec::decode(&id, &file).expect("round trip"), chunk);
            }
        }
    }
}

fn decode_own_id(file: &[u8]) {
    let any = ChunkId::from_bytes([0; 32]);
    let Ok(h) = ChunkHeader::parse(&any, file) else {
        return;
    };
    assert!(h.len <= MAX_CHUNK_LEN);
    let mut content = vec![0u8; h.len];
    if codec::decode_body_unverified(&any, &h, &file[codec::HEADER_LEN..], &mut content).is_err() {
        return;
    }
    let id = ChunkId::of(&content);
    let out = codec::decode(&id, file).expect("a chunk decodes under its own id");
    assert_eq!(out, content);
    let mut into = vec![0u8; h.len];
    codec::decode_into(&id, file, &mut into).expect("decode_into agrees with decode");
    assert_eq!(into, content);
}
