//! Packs: the chunks of one write batch appended to one file, with an index.
//!
//! ```text
//! STORE/packs/<pack id>.pack   16-byte header, then chunk records (chunk file format)
//! STORE/packs/<pack id>.idx    checksummed container (VMMPIDX\0): chunk id -> offset,
//!                              length, encoding; the pack's complete length
//! STORE/packs/list             (archives only) the pack ids, one per line, for HTTP readers
//! ```
//!
//! A pack is written under its final name (nothing refers to it yet); the index is written
//! to a temp name, `fdatasync`ed and renamed last, after the pack's own `fdatasync`. A chunk
//! is present once its index is durable; a pack without an index, or an index whose pack is
//! missing or shorter than the index says, is ignored by readers and removed by `repo gc`.
//! The byte layout is in docs/SNAPSHOT_FORMAT.md ("Packs").

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::codec::{ChunkHeader, HEADER_LEN};
use super::{ChunkId, MAX_CHUNK_LEN, Result, StoreError};
use crate::formats::file::{self, StateFileError};
use crate::formats::{PACK_INDEX_KIND, PACK_VERSION};
use crate::util::IoError;
use crate::util::fs::Staged;

/// Directory of packs under a store root.
pub const PACKS_DIR: &str = "packs";
/// The list of pack ids an archive publishes for HTTP readers (`packs/list`).
pub const LIST_FILE: &str = "list";
/// First 8 bytes of every pack file.
pub const PACK_MAGIC: [u8; 8] = *b"VMMPACK\0";
/// Length of the pack file header (magic, version u32, reserved u32).
pub const PACK_HEADER_LEN: u64 = 16;
/// A writer starts a new pack once its current one reaches this length.
pub const MAX_PACK_LEN: u64 = 1 << 30;

/// Errors of reading pack indexes.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The index file is damaged, truncated or of another version.
    #[error("pack index {}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: StateFileError,
    },
    /// The index is readable but describes an impossible pack.
    #[error("pack index {}: {reason}", path.display())]
    Invalid {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file system operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Name of a pack: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A fresh random id (`getrandom`; the clock, pid and a counter hashed if that fails),
    /// so concurrent writers, in one process or several, never pick the same name.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        // SAFETY: getrandom writes at most `b.len()` bytes into the valid buffer `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            use std::sync::atomic::{AtomicU64, Ordering};
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let t = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let seed = format!(
                "{t}.{}.{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
        }
        PackId(b)
    }

    /// Parses 32 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
            b[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(PackId(b))
    }

    /// `packs/<id>.pack`, relative to the store root (`/`-separated: also a URL suffix).
    pub fn pack_rel(&self) -> String {
        format!("{PACKS_DIR}/{self}.pack")
    }

    /// `packs/<id>.idx`, relative to the store root.
    pub fn index_rel(&self) -> String {
        format!("{PACKS_DIR}/{self}.idx")
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

/// One chunk of a pack, as its index records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of its record (chunk file header + body) in the pack.
    pub offset: u64,
    /// Length of the record.
    pub len: u32,
    /// Length of the chunk once decoded.
    pub raw_len: u32,
    /// Encoding of the body: 0 raw, 1 zstd (as in the record's own header).
    pub encoding: u8,
}

/// Payload of a pack index file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    /// The pack it describes (must match the file names).
    pub pack: PackId,
    /// Length of the complete pack file.
    pub pack_len: u64,
    /// Its chunks, sorted by offset.
    pub entries: Vec<PackEntry>,
}

impl PackIndex {
    /// Checks that the entries lie inside the pack, after its header, without overlap.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut end = PACK_HEADER_LEN;
        for e in &self.entries {
            if e.offset < end {
                return Err(format!("chunk {} overlaps the one before it", e.id));
            }
            if (e.len as usize) < HEADER_LEN || e.len as usize > HEADER_LEN + MAX_CHUNK_LEN {
                return Err(format!("chunk {} has a record of {} bytes", e.id, e.len));
            }
            if e.raw_len as usize > MAX_CHUNK_LEN || e.encoding > 1 {
                return Err(format!("chunk {} has an invalid length or encoding", e.id));
            }
            end = e.offset + u64::from(e.len);
        }
        if end > self.pack_len {
            return Err(format!(
                "entries end at {end}, beyond the pack's {} bytes",
                self.pack_len
            ));
        }
        Ok(())
    }
}

/// Reads and checks the index at `path`.
pub fn read_index(path: &Path) -> std::result::Result<PackIndex, PackError> {
    let ix: PackIndex = file::read_file(path, &PACK_INDEX_KIND).map_err(|source| match source {
        StateFileError::Io(e) => PackError::Io(e),
        source => PackError::Index {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let invalid = |reason: String| PackError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if PackId::parse(stem) != Some(ix.pack) {
        return Err(invalid(format!("describes pack {}", ix.pack)));
    }
    ix.validate().map_err(invalid)?;
    Ok(ix)
}

/// The pack file header.
pub fn pack_header() -> [u8; PACK_HEADER_LEN as usize] {
    let mut h = [0u8; PACK_HEADER_LEN as usize];
    h[..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h
}

/// An open pack file, read by offset.
#[derive(Debug)]
pub struct PackFile {
    /// Its id.
    pub id: PackId,
    /// Its path.
    pub path: PathBuf,
    file: File,
}

impl PackFile {
    /// Reads `len` bytes at `offset` (`pread`), failing on a short read.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| IoError::new("read", &self.path, e).into())
    }
}

/// Where a chunk is: its pack and record.
#[derive(Clone, Debug)]
pub struct Location {
    /// The pack.
    pub pack: Arc<PackFile>,
    /// Offset of the record.
    pub offset: u64,
    /// Length of the record.
    pub len: u32,
}

impl Location {
    /// The record's bytes (chunk file format), checked to be a record of `id` of a
    /// plausible length; the caller decodes and verifies it.
    pub fn read_record(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len as usize];
        self.pack.read_at(self.offset, &mut v)?;
        ChunkHeader::parse(id, &v)?;
        Ok(v)
    }
}

/// The chunks of every complete pack of a store, read from their indexes.
#[derive(Debug, Default)]
pub struct PackSet {
    loaded: HashSet<PackId>,
    map: HashMap<ChunkId, Location>,
    dir_mtime: Option<SystemTime>,
}

impl PackSet {
    /// Where chunk `id` is, if a loaded pack holds it.
    pub fn get(&self, id: &ChunkId) -> Option<&Location> {
        self.map.get(id)
    }

    /// Records a chunk (of a pack being written by this process).
    pub fn insert(&mut self, id: ChunkId, loc: Location) {
        self.map.entry(id).or_insert(loc);
    }

    /// Number of chunks known.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no chunk is known.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Loads the indexes of `dir` not loaded yet (a missing directory holds none).
    /// Damaged indexes and incomplete packs are skipped with a warning.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        self.dir_mtime = fs::metadata(dir).and_then(|m| m.modified()).ok();
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(IoError::new("read directory", dir, e).into()),
        };
        for e in rd {
            let e = e.map_err(|e| IoError::new("read directory", dir, e))?;
            let name = e.file_name();
            let Some(pack) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".idx"))
                .and_then(PackId::parse)
            else {
                continue;
            };
            if self.loaded.contains(&pack) {
                continue;
            }
            match open_complete(dir, pack) {
                Ok(Some((ix, file))) => {
                    let file = Arc::new(file);
                    for en in ix.entries {
                        self.insert(
                            en.id,
                            Location {
                                pack: Arc::clone(&file),
                                offset: en.offset,
                                len: en.len,
                            },
                        );
                    }
                    self.loaded.insert(pack);
                }
                // Damage never heals: not looked at again by this instance.
                Ok(None) => {
                    self.loaded.insert(pack);
                }
                // Removed meanwhile (gc), or unreadable now: looked at again next time.
                Err(PackError::Io(e)) => log::warn!("{}", crate::util::error_chain(&e)),
                Err(e) => {
                    log::warn!("ignoring {}", crate::util::error_chain(&e));
                    self.loaded.insert(pack);
                }
            }
        }
        Ok(())
    }

    /// Loads new indexes if the directory changed since the last load.
    pub fn reload_if_changed(&mut self, dir: &Path) -> Result<bool> {
        let now = fs::metadata(dir).and_then(|m| m.modified()).ok();
        if now.is_some() && now == self.dir_mtime {
            return Ok(false);
        }
        self.load(dir)?;
        Ok(true)
    }
}

/// Reads pack `id`'s index in `dir` and opens the pack; `None` (with a warning) when the
/// pack is missing or shorter than the index says (a crash between the two, or damage).
pub fn open_complete(
    dir: &Path,
    id: PackId,
) -> std::result::Result<Option<(PackIndex, PackFile)>, PackError> {
    let idx_path = dir.join(format!("{id}.idx"));
    let ix = read_index(&idx_path)?;
    let path = dir.join(format!("{id}.pack"));
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::warn!("ignoring pack index {}: no pack", idx_path.display());
            return Ok(None);
        }
        Err(e) => return Err(IoError::new("open", &path, e).into()),
    };
    let len = file
        .metadata()
        .map_err(|e| IoError::new("stat", &path, e))?
        .len();
    if len < ix.pack_len {
        log::warn!(
            "ignoring pack {}: {len} bytes, its index says {}",
            path.display(),
            ix.pack_len
        );
        return Ok(None);
    }
    Ok(Some((ix, PackFile { id, path, file })))
}

/// A pack being written: records appended at the end, the index kept in memory until
/// [`finish`](Self::finish). Dropped unfinished, the pack file is removed.
#[derive(Debug)]
pub struct PackWriter {
    id: PackId,
    path: PathBuf,
    file: File,
    reader: Arc<PackFile>,
    len: u64,
    entries: Vec<PackEntry>,
    finished: bool,
}

impl PackWriter {
    /// Creates a new pack in `dir` (which must exist).
    pub fn create(dir: &Path) -> Result<Self> {
        let id = PackId::random();
        let path = dir.join(format!("{id}.pack"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| IoError::new("create", &path, e))?;
        // A pack that cannot even be started is removed at once.
        let started = file
            .write_all(&pack_header())
            .map_err(|e| IoError::new("write", &path, e))
            .and_then(|()| file.try_clone().map_err(|e| IoError::new("open", &path, e)));
        let read = match started {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e.into());
            }
        };
        Ok(PackWriter {
            id,
            reader: Arc::new(PackFile {
                id,
                path: path.clone(),
                file: read,
            }),
            path,
            file,
            len: PACK_HEADER_LEN,
            entries: Vec::new(),
            finished: false,
        })
    }

    /// The pack's id.
    pub fn id(&self) -> PackId {
        self.id
    }

    /// Bytes written so far (header included).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no chunk was appended.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the record `header` + `body` of chunk `id`; returns where it is.
    pub fn append(&mut self, id: &ChunkId, header: &[u8], body: &[u8]) -> Result<Location> {
        let h = ChunkHeader::parse(id, header)?;
        let len = header.len() + body.len();
        let offset = self.len;
        let w = self
            .file
            .write_all_at(header, offset)
            .and_then(|()| self.file.write_all_at(body, offset + header.len() as u64));
        w.map_err(|e| IoError::new("write", &self.path, e))?;
        self.len += len as u64;
        self.entries.push(PackEntry {
            id: *id,
            offset,
            len: len as u32,
            raw_len: h.len as u32,
            encoding: h.encoding as u8,
        });
        Ok(Location {
            pack: Arc::clone(&self.reader),
            offset,
            len: len as u32,
        })
    }

    /// Makes the pack durable (`fdatasync`), then writes its index to a temp name,
    /// `fdatasync`s and renames it. The caller fsyncs the directory afterwards (once for
    /// all the packs of a batch).
    pub fn finish(mut self) -> Result<PackIndex> {
        self.file
            .sync_data()
            .map_err(|e| IoError::new("fdatasync", &self.path, e))?;
        let ix = PackIndex {
            pack: self.id,
            pack_len: self.len,
            entries: std::mem::take(&mut self.entries),
        };
        let idx_path = self.path.with_extension("idx");
        let bytes = file::encode(&PACK_INDEX_KIND, &ix).map_err(|e| StoreError::Corrupt {
            id: ChunkId::from_bytes([0; 32]),
            reason: format!("cannot encode pack index: {e}"),
        })?;
        let (mut staged, mut f) = Staged::create(&idx_path)?;
        let tmp = staged.tmp().to_path_buf();
        f.write_all(&bytes)
            .and_then(|()| f.sync_data())
            .map_err(|e| IoError::new("write", &tmp, e))?;
        drop(f);
        staged.commit()?;
        self.finished = true;
        Ok(ix)
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Adds `ids` to the archive's pack list `dir/list` (one id per line), under an `flock`
/// on `dir/.list.lock` so concurrent writers do not lose each other's packs: the new list
/// goes to a temp name, is `fdatasync`ed and renamed. The caller fsyncs `dir`.
pub fn publish_list(dir: &Path, ids: &[PackId]) -> Result<()> {
    let lock_path = dir.join(".list.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| IoError::new("open", &lock_path, e))?;
    // SAFETY: flock on a valid open descriptor; no memory is passed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(IoError::new("lock", &lock_path, io::Error::last_os_error()).into());
    }
    let path = dir.join(LIST_FILE);
    let mut list = match fs::read_to_string(&path) {
        Ok(s) => parse_list(&s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(IoError::new("read", &path, e).into()),
    };
    for id in ids {
        if !list.contains(id) {
            list.push(*id);
        }
    }
    let text: String = list.iter().map(|id| format!("{id}\n")).collect();
    let (mut staged, mut f) = Staged::create(&path)?;
    let tmp = staged.tmp().to_path_buf();
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(|e| IoError::new("write", &tmp, e))?;
    drop(f);
    staged.commit()?;
    drop(lock);
    Ok(())
}

/// The pack ids of a list file's text (lines that are not ids are skipped).
pub fn parse_list(text: &str) -> Vec<PackId> {
    text.lines()
        .filter_map(|l| PackId::parse(l.trim()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::{self, Compression};
    use crate::util::testutil::TempDir;

    fn record(data: &[u8]) -> (ChunkId, Vec<u8>, Vec<u8>) {
        let id = ChunkId::of(data);
        let e = codec::encode(&id, data, Compression::Zstd { level: 1 }).unwrap();
        (id, e.header.to_vec(), e.body.into_owned())
    }

    #[test]
    fn pack_id_text_round_trip() {
        let id = PackId::random();
        assert_ne!(id, PackId::random());
        assert_eq!(PackId::parse(&id.to_string()), Some(id));
        assert_eq!(PackId::parse("xyz"), None);
        assert_eq!(PackId::parse(&"g".repeat(32)), None);
    }

    #[test]
    fn written_pack_is_loaded_and_read_back() {
        let dir = TempDir::new("pack-rt");
        let mut w = PackWriter::create(dir.path()).unwrap();
        let datas: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 4096 * (i as usize + 1)]).collect();
        let mut ids = Vec::new();
        for d in &datas {
            let (id, h, b) = record(d);
            let loc = w.append(&id, &h, &b).unwrap();
            assert_eq!(
                codec::decode(&id, &loc.read_record(&id).unwrap()).unwrap(),
                *d
            );
            ids.push(id);
        }
        let pack = w.id();
        let ix = w.finish().unwrap();
        assert_eq!(ix.entries.len(), 5);
        let mut set = PackSet::default();
        set.load(dir.path()).unwrap();
        assert_eq!(set.len(), 5);
        for (id, d) in ids.iter().zip(&datas) {
            let loc = set.get(id).unwrap();
            assert_eq!(loc.pack.id, pack);
            assert_eq!(
                codec::decode(id, &loc.read_record(id).unwrap()).unwrap(),
                *d
            );
        }
    }

    #[test]
    fn incomplete_packs_and_damaged_indexes_are_ignored() {
        let dir = TempDir::new("pack-bad");
        // A pack without an index (a writer killed before finishing).
        let mut w = PackWriter::create(dir.path()).unwrap();
        let (id, h, b) = record(&[7u8; 8192]);
        w.append(&id, &h, &b).unwrap();
        std::mem::forget(w);
        let mut set = PackSet::default();
        set.load(dir.path()).unwrap();
        assert!(set.is_empty());

        // An index whose pack was truncated.
        let mut w = PackWriter::create(dir.path()).unwrap();
        w.append(&id, &h, &b).unwrap();
        let pack = w.id();
        w.finish().unwrap();
        let pack_path = dir.path().join(format!("{pack}.pack"));
        let full = fs::read(&pack_path).unwrap();
        fs::write(&pack_path, &full[..full.len() - 1]).unwrap();
        let mut set = PackSet::default();
        set.load(dir.path()).unwrap();
        assert!(set.is_empty());
        fs::write(&pack_path, &full).unwrap();

        // A damaged index.
        let idx = dir.path().join(format!("{pack}.idx"));
        let good = fs::read(&idx).unwrap();
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 40] ^= 1;
        fs::write(&idx, &bad).unwrap();
        assert!(matches!(read_index(&idx), Err(PackError::Index { .. })));
        let mut set = PackSet::default();
        set.load(dir.path()).unwrap();
        assert!(set.is_empty());
        fs::write(&idx, &good).unwrap();
        let mut set = PackSet::default();
        set.load(dir.path()).unwrap();
        assert_eq!(set.len(), 1);

        // An index renamed to another pack's name.
        let other = dir.path().join(format!("{}.idx", PackId::random()));
        fs::rename(&idx, &other).unwrap();
        assert!(matches!(read_index(&other), Err(PackError::Invalid { .. })));
    }

    #[test]
    fn index_validation_refuses_impossible_entries() {
        let id = ChunkId::of(b"x");
        let e = |offset, len| PackEntry {
            id,
            offset,
            len,
            raw_len: 1,
            encoding: 0,
        };
        let ix = |entries: Vec<PackEntry>, pack_len| PackIndex {
            pack: PackId::random(),
            pack_len,
            entries,
        };
        assert!(ix(vec![e(16, 9)], 25).validate().is_ok());
        assert!(ix(vec![e(0, 9)], 25).validate().is_err());
        assert!(ix(vec![e(16, 9)], 24).validate().is_err());
        assert!(ix(vec![e(16, 9), e(20, 9)], 100).validate().is_err());
        assert!(ix(vec![e(16, 3)], 100).validate().is_err());
    }

    #[test]
    fn the_list_accumulates_pack_ids() {
        let dir = TempDir::new("pack-list");
        let (a, b) = (PackId::random(), PackId::random());
        publish_list(dir.path(), &[a]).unwrap();
        publish_list(dir.path(), &[b, a]).unwrap();
        let text = fs::read_to_string(dir.path().join(LIST_FILE)).unwrap();
        assert_eq!(parse_list(&text), vec![a, b]);
    }
}
