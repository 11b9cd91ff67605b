//! The packs of an archive read over HTTP: `packs/list` and each listed pack's index are
//! fetched once (again when a chunk is not found, at most once per
//! [`RELOAD_INTERVAL`]), and a chunk in a pack is fetched with one `Range` request for its
//! record. [`HttpStore::fetch_many`] merges chunks that lie next to each other in a pack
//! into one request. Archives without `packs/list` (older layout) are read chunk file by
//! chunk file.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{HttpError, HttpStore};
use crate::formats::PACK_INDEX_KIND;
use crate::formats::file;
use crate::store::pack::{self, PackId, PackIndex};
use crate::store::{ChunkId, codec};
use crate::util::lock;

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

impl HttpStore {
    /// Where chunk `id` is in a pack: loads the list and indexes the first time, and again
    /// (rate-limited) when `reload_on_miss` and the chunk is unknown.
    pub(super) fn pack_location(&self, id: &ChunkId, reload_on_miss: bool) -> Option<RemoteLoc> {
        {
            let p = lock(&self.packs);
            if let Some(l) = p.map.get(id) {
                return Some(*l);
            }
            let due = match p.last_load {
                None => true,
                Some(t) => reload_on_miss && t.elapsed() >= RELOAD_INTERVAL,
            };
            if !due {
                return None;
            }
        }
        self.load_packs();
        lock(&self.packs).map.get(id).copied()
    }

    /// Fetches `packs/list` and the indexes not loaded yet. Failures are logged: the
    /// chunk file layout is still tried.
    fn load_packs(&self) {
        lock(&self.packs).last_load = Some(Instant::now());
        let list = match self.fetch(
            &format!("{}/{}", pack::PACKS_DIR, pack::LIST_FILE),
            64 << 20,
        ) {
            Ok(b) => pack::parse_list(&String::from_utf8_lossy(&b)),
            Err(e) if e.is_not_found() => return,
            Err(e) => {
                log::warn!("no pack list: {}", crate::util::error_chain(&e));
                return;
            }
        };
        for id in list {
            if lock(&self.packs).loaded.contains(&id) {
                continue;
            }
            let rel = id.index_rel();
            let cap = 20 + PACK_INDEX_KIND.max_payload + 32;
            let got = self.fetch_with(&rel, cap, |url, body| {
                let ix: PackIndex =
                    file::decode(&PACK_INDEX_KIND, &body).map_err(|e| HttpError::Invalid {
                        url: url.into(),
                        reason: crate::util::error_chain(&e),
                    })?;
                if ix.pack != id {
                    return Err(HttpError::Invalid {
                        url: url.into(),
                        reason: format!("describes pack {}", ix.pack),
                    });
                }
                ix.validate().map_err(|reason| HttpError::Invalid {
                    url: url.into(),
                    reason,
                })?;
                Ok(ix)
            });
            match got {
                Ok(ix) => {
                    let mut p = lock(&self.packs);
                    for e in &ix.entries {
                        p.map.entry(e.id).or_insert(RemoteLoc {
                            pack: id,
                            offset: e.offset,
                            len: e.len,
                        });
                    }
                    p.loaded.insert(id);
                }
                Err(e) => log::warn!("skipping pack {id}: {}", crate::util::error_chain(&e)),
            }
        }
    }

    /// Fetches the records `[offset, offset + len)` of a pack (one `Range` request, with
    /// retries and mirrors) and hands them to `check`.
    pub(super) fn fetch_range<T>(
        &self,
        pack: PackId,
        offset: u64,
        len: u64,
        check: impl Fn(&str, Vec<u8>) -> std::result::Result<T, HttpError>,
    ) -> std::result::Result<T, HttpError> {
        self.fetch_inner(&pack.pack_rel(), len, Some((offset, len)), check)
    }

    /// Fetches one chunk from its pack record, verified.
    pub(super) fn fetch_from_pack(
        &self,
        id: &ChunkId,
        loc: RemoteLoc,
        len: Option<usize>,
    ) -> std::result::Result<Vec<u8>, HttpError> {
        self.fetch_range(loc.pack, loc.offset, u64::from(loc.len), |url, rec| {
            decode_checked(id, url, &rec, len)
        })
    }

    /// Fetches several chunks, merging those adjacent in one pack (up to
    /// [`MAX_RUN_BYTES`] per request) into one `Range` request; chunks not in a pack are
    /// fetched one by one. Results are in the order of `ids`.
    pub fn fetch_many(&self, ids: &[ChunkId]) -> Vec<std::result::Result<Vec<u8>, HttpError>> {
        let mut out: Vec<Option<std::result::Result<Vec<u8>, HttpError>>> =
            (0..ids.len()).map(|_| None).collect();
        let mut located: Vec<(RemoteLoc, usize)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            match self.pack_location(id, false) {
                Some(l) => located.push((l, i)),
                None => {
                    out[i] = Some(
                        self.fetch_chunk(id, None)
                            .map(|a| Arc::try_unwrap(a).unwrap_or_else(|a| a.as_ref().clone())),
                    )
                }
            }
        }
        located.sort_by_key(|(l, _)| (l.pack, l.offset));
        for run in runs(&located) {
            let (first, _) = run[0];
            let (last, _) = run[run.len() - 1];
            let end = last.offset + u64::from(last.len);
            let got =
                self.fetch_range(first.pack, first.offset, end - first.offset, |url, body| {
                    run.iter()
                        .map(|(l, i)| {
                            let at = (l.offset - first.offset) as usize;
                            decode_checked(&ids[*i], url, &body[at..at + l.len as usize], None)
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()
                });
            match got {
                Ok(datas) => {
                    self.counters
                        .chunks_fetched
                        .fetch_add(datas.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    for ((_, i), d) in run.iter().zip(datas) {
                        out[*i] = Some(Ok(d));
                    }
                }
                Err(e) => {
                    for (_, i) in run {
                        out[*i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every chunk was fetched"))
            .collect()
    }
}

use std::sync::Arc;

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

/// Decodes record `rec` of chunk `id` fetched from `url` and checks its length.
fn decode_checked(
    id: &ChunkId,
    url: &str,
    rec: &[u8],
    len: Option<usize>,
) -> std::result::Result<Vec<u8>, HttpError> {
    let corrupt = |reason: String| HttpError::Corrupt {
        id: *id,
        url: url.into(),
        reason,
    };
    let data = codec::decode(id, rec).map_err(|e| match e {
        crate::store::StoreError::Corrupt { reason, .. } => corrupt(reason),
        e => corrupt(e.to_string()),
    })?;
    match len {
        Some(l) if l != data.len() => Err(corrupt(format!(
            "chunk is {} bytes, expected {l}",
            data.len()
        ))),
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
