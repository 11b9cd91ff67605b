//! What the HTTP store knows of an archive's packs: `packs/list` and each listed pack's
//! index are fetched once (again when a chunk is not found, at most once per
//! [`RELOAD_INTERVAL`]); a chunk in a pack is fetched with one `Range` request for its
//! record, and [`runs`] groups chunks adjacent in a pack so that `HttpStore::fetch_many`
//! fetches them with one request. Archives without `packs/list` (older layout) are read
//! chunk file by chunk file. The fetching itself is in the parent module.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::formats::PACK_INDEX_KIND;
use crate::formats::file;
use crate::store::pack::{self, PackId, PackIndex};
use crate::store::{ChunkId, codec};

/// A missing chunk reloads the pack list at most this often.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// The longest run of adjacent records one request fetches.
pub const MAX_RUN_BYTES: u64 = 4 << 20;

/// Where a chunk's record is in a remote pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RemoteLoc {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
}

/// The pack indexes loaded from the servers.
#[derive(Debug, Default)]
pub(super) struct RemotePacks {
    map: HashMap<ChunkId, RemoteLoc>,
    loaded: HashSet<PackId>,
    last_load: Option<Instant>,
}

impl RemotePacks {
    /// Where chunk `id` is, if a loaded index lists it.
    pub(super) fn get(&self, id: &ChunkId) -> Option<RemoteLoc> {
        self.map.get(id).copied()
    }

    /// Whether the list should be (re)loaded: never loaded yet, or, after a miss
    /// (`on_miss`), not loaded for [`RELOAD_INTERVAL`].
    pub(super) fn due(&self, on_miss: bool) -> bool {
        match self.last_load {
            None => true,
            Some(t) => on_miss && t.elapsed() >= RELOAD_INTERVAL,
        }
    }

    /// Notes that a load starts now.
    pub(super) fn loading(&mut self) {
        self.last_load = Some(Instant::now());
    }

    /// Whether pack `id`'s index is loaded.
    pub(super) fn has(&self, id: &PackId) -> bool {
        self.loaded.contains(id)
    }

    /// Adds the entries of pack `id`'s index.
    pub(super) fn add(&mut self, id: PackId, ix: &PackIndex) {
        for e in &ix.entries {
            self.map.entry(e.id).or_insert(RemoteLoc {
                pack: id,
                offset: e.offset,
                len: e.len,
            });
        }
        self.loaded.insert(id);
    }
}

/// `packs/list`, relative to the archive.
pub(super) fn list_rel() -> String {
    format!("{}/{}", pack::PACKS_DIR, pack::LIST_FILE)
}

/// Largest index file accepted.
pub(super) const INDEX_CAP: u64 = 20 + PACK_INDEX_KIND.max_payload + 32;

/// Decodes and checks the index of pack `id` fetched as `body`.
pub(super) fn parse_index(id: PackId, body: &[u8]) -> std::result::Result<PackIndex, String> {
    let ix: PackIndex =
        file::decode(&PACK_INDEX_KIND, body).map_err(|e| crate::util::error_chain(&e))?;
    if ix.pack != id {
        return Err(format!("describes pack {}", ix.pack));
    }
    ix.validate()?;
    Ok(ix)
}

/// Splits records sorted by (pack, offset) into runs of adjacent records of one pack, each
/// at most [`MAX_RUN_BYTES`] long (a record longer than that is a run of its own).
pub(super) fn runs(sorted: &[(RemoteLoc, usize)]) -> Vec<&[(RemoteLoc, usize)]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=sorted.len() {
        let split = i == sorted.len() || {
            let (a, _) = sorted[i - 1];
            let (b, _) = sorted[i];
            let (first, _) = sorted[start];
            a.pack != b.pack
                || a.offset + u64::from(a.len) != b.offset
                || b.offset + u64::from(b.len) - first.offset > MAX_RUN_BYTES
        };
        if split {
            out.push(&sorted[start..i]);
            start = i;
        }
    }
    out
}

/// Decodes record `rec` of chunk `id` and checks its length; the error is the reason.
pub(super) fn decode_checked(
    id: &ChunkId,
    rec: &[u8],
    len: Option<usize>,
) -> std::result::Result<Vec<u8>, String> {
    let data = codec::decode(id, rec).map_err(|e| match e {
        crate::store::StoreError::Corrupt { reason, .. } => reason,
        e => e.to_string(),
    })?;
    match len {
        Some(l) if l != data.len() => Err(format!("chunk is {} bytes, expected {l}", data.len())),
        _ => Ok(data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_records_of_one_pack_only() {
        let (p, q) = (PackId([1; 16]), PackId([2; 16]));
        let l = |pack, offset, len| RemoteLoc { pack, offset, len };
        let sorted = vec![
            (l(p, 16, 100), 0),
            (l(p, 116, 50), 1),
            (l(p, 200, 10), 2),
            (l(q, 116, 10), 3),
            (l(q, 126, MAX_RUN_BYTES as u32), 4),
        ];
        let r: Vec<Vec<usize>> = runs(&sorted)
            .iter()
            .map(|run| run.iter().map(|(_, i)| *i).collect())
            .collect();
        assert_eq!(r, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        assert!(runs(&[]).is_empty());
    }
}
