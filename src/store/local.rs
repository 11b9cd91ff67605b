//! [`LocalStore`]: chunks kept as files in a directory.
//!
//! Layout under the store root (see `docs/SNAPSHOT_FORMAT.md`):
//!
//! ```text
//! <root>/chunks/<first 2 hex digits of id>/<64 hex digits of id>
//! ```
//!
//! Each file is one chunk in the [`codec`](super::codec) format. The path depends on
//! the id alone ([`ChunkId::relative_path`]), so any reader of the same tree (a web
//! server, for instance) can find a chunk without an index.
//!
//! Writes go to `.<hex>.tmp.<pid>.<n>` in the same directory, are fsynced, then
//! renamed into place, so a chunk file is either absent or complete. Directory
//! fsyncs are batched: call [`LocalStore::sync`] once after a whole snapshot.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::codec::{self, ChunkHeader, Compression, Encoding, HEADER_LEN};
use super::{
    ChunkId, ChunkRead, ChunkWrite, MAX_CHUNK_LEN, PutOutcome, Result, StoreError, verify,
};

use crate::util::fs::{Staged, fsync_dir};
use crate::util::lock;

/// Options of a [`LocalStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalStoreOptions {
    /// Compression of newly written chunks. Reading handles both encodings whatever
    /// this says.
    pub compression: Compression,
    /// Make chunks durable in one batch at [`ChunkWrite::sync`] instead of one fsync
    /// per chunk: `put` writes a temp file and returns; `sync` flushes the file system
    /// once (`syncfs`), then renames every temp file to its chunk name and fsyncs the
    /// directories. Until `sync`, new chunks are visible to this store instance only
    /// (through their temp files), and a store dropped without `sync` deletes them.
    /// For writers that end with `sync` anyway (snapshot creation).
    pub batch_durability: bool,
}

impl Default for LocalStoreOptions {
    /// zstd level 1: fast, and guest memory pages that compress at all mostly
    /// compress well at that level.
    fn default() -> Self {
        LocalStoreOptions {
            compression: Compression::Zstd { level: 1 },
            batch_durability: false,
        }
    }
}

/// Running totals of a [`LocalStore`] since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks newly written by `put`.
    pub chunks_written: u64,
    /// `put` calls that found the chunk already stored.
    pub chunks_deduped: u64,
    /// Bytes of chunk files written (headers included, after compression): the
    /// disk space added.
    pub bytes_written: u64,
    /// Uncompressed bytes of the chunks written.
    pub raw_bytes_written: u64,
}

/// A [`ChunkWrite`] store in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    chunks_dir: PathBuf,
    options: LocalStoreOptions,
    /// Fan-out directories known to exist.
    made: [AtomicBool; 256],
    /// Fan-out directories with entries not yet fsynced.
    dirty: [AtomicBool; 256],
    /// `chunks/` has new fan-out directories not yet fsynced.
    chunks_dir_dirty: AtomicBool,
    /// With `batch_durability`: chunks written to temp files, not yet renamed.
    pending: Mutex<HashMap<ChunkId, Pending>>,
    chunks_written: AtomicU64,
    chunks_deduped: AtomicU64,
    bytes_written: AtomicU64,
    raw_bytes_written: AtomicU64,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    crate::util::io_err(op, path)
}

/// A chunk written to a temp file, renamed at the next `sync` (`batch_durability`).
#[derive(Debug)]
struct Pending {
    staged: Staged,
    idx: usize,
}

impl Drop for LocalStore {
    /// Deletes pending chunks never synced (dropping them removes their temp files):
    /// nothing durable refers to them.
    fn drop(&mut self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        if !pending.is_empty() {
            log::warn!(
                "chunk store {}: {} chunks written but never synced are discarded",
                self.root.display(),
                pending.len()
            );
        }
    }
}

/// Flushes the file system holding `path` (`syncfs`): what batched writers call once
/// before renaming their temp files into place.
pub(crate) fn syncfs(path: &Path) -> io::Result<()> {
    let d = File::open(path)?;
    // SAFETY: syncfs on a valid, open file descriptor; no memory is passed.
    if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl LocalStore {
    /// Opens the store rooted at `root`, creating `root/chunks` if needed.
    pub fn open(root: impl AsRef<Path>, options: LocalStoreOptions) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let chunks_dir = root.join("chunks");
        let existed = chunks_dir.is_dir();
        fs::create_dir_all(&chunks_dir).map_err(io_err("create directory", &chunks_dir))?;
        if !existed {
            fsync_dir(&root)?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        Ok(LocalStore {
            root,
            chunks_dir,
            options,
            made: std::array::from_fn(|_| AtomicBool::new(false)),
            dirty: std::array::from_fn(|_| AtomicBool::new(false)),
            chunks_dir_dirty: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            chunks_written: AtomicU64::new(0),
            chunks_deduped: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            raw_bytes_written: AtomicU64::new(0),
        })
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The options the store was opened with.
    pub fn options(&self) -> LocalStoreOptions {
        self.options
    }

    /// Path of the file that holds (or would hold) chunk `id`.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.root.join(id.relative_path())
    }

    /// Totals since the store was opened.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            chunks_written: self.chunks_written.load(Ordering::Relaxed),
            chunks_deduped: self.chunks_deduped.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            raw_bytes_written: self.raw_bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Fsyncs every directory that received new entries since the last call, making
    /// the chunks written so far durable. Call once after a whole snapshot. With
    /// `batch_durability`, first flushes the file system and renames the pending chunks.
    pub fn sync(&self) -> Result<()> {
        let pending: Vec<(ChunkId, Pending)> = lock(&self.pending).drain().collect();
        if !pending.is_empty() {
            if let Err(e) = syncfs(&self.chunks_dir) {
                lock(&self.pending).extend(pending);
                return Err(io_err("syncfs", &self.chunks_dir)(e));
            }
            let mut iter = pending.into_iter();
            while let Some((id, mut p)) = iter.next() {
                if let Err(e) = p.staged.commit() {
                    let mut left = lock(&self.pending);
                    left.insert(id, p);
                    left.extend(iter);
                    return Err(e.into());
                }
                self.dirty[p.idx].store(true, Ordering::Release);
            }
        }
        for idx in 0..256 {
            if self.dirty[idx].swap(false, Ordering::AcqRel)
                && let Err(e) = fsync_dir(&self.fanout_dir(idx))
            {
                self.dirty[idx].store(true, Ordering::Release);
                return Err(e.into());
            }
        }
        if self.chunks_dir_dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = fsync_dir(&self.chunks_dir)
        {
            self.chunks_dir_dirty.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    fn fanout_dir(&self, idx: usize) -> PathBuf {
        self.chunks_dir.join(format!("{idx:02x}"))
    }

    fn ensure_fanout_dir(&self, idx: usize) -> Result<PathBuf> {
        let dir = self.fanout_dir(idx);
        if !self.made[idx].load(Ordering::Acquire) {
            match fs::create_dir(&dir) {
                Ok(()) => self.chunks_dir_dirty.store(true, Ordering::Release),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(io_err("create directory", &dir)(e)),
            }
            self.made[idx].store(true, Ordering::Release);
        }
        Ok(dir)
    }

    /// Writes `header` + `body` to a temp file beside `dest`, fsyncs it and renames it to
    /// `dest` — or, with `batch_durability`, leaves it pending for [`sync`](Self::sync).
    fn write_file(
        &self,
        id: &ChunkId,
        idx: usize,
        dest: &Path,
        header: &[u8],
        body: &[u8],
    ) -> Result<()> {
        let batch = self.options.batch_durability;
        let mut staged = Staged::write(dest, !batch, |f| {
            f.write_all(header)?;
            f.write_all(body)
        })?;
        if batch {
            lock(&self.pending).insert(*id, Pending { staged, idx });
            return Ok(());
        }
        staged.commit()?;
        self.dirty[idx].store(true, Ordering::Release);
        Ok(())
    }

    fn open_chunk(&self, id: &ChunkId) -> Result<(File, PathBuf)> {
        let path = self.chunk_path(id);
        match File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tmp = lock(&self.pending)
                    .get(id)
                    .map(|p| p.staged.tmp().to_path_buf());
                match tmp {
                    Some(tmp) => File::open(&tmp)
                        .map(|f| (f, tmp.clone()))
                        .map_err(io_err("open", &tmp)),
                    None => Err(StoreError::NotFound { id: *id }),
                }
            }
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    /// Reads the rest of `f` into a vector, refusing more than `max` bytes.
    fn read_capped(id: &ChunkId, f: &mut File, path: &Path, max: usize) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        f.take(max as u64 + 1)
            .read_to_end(&mut v)
            .map_err(io_err("read", path))?;
        if v.len() > max {
            return Err(StoreError::Corrupt {
                id: *id,
                reason: format!("file is larger than the largest valid chunk file ({max} bytes)"),
            });
        }
        Ok(v)
    }
}

impl ChunkRead for LocalStore {
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (mut f, path) = self.open_chunk(id)?;
        let file = Self::read_capped(id, &mut f, &path, HEADER_LEN + MAX_CHUNK_LEN)?;
        codec::decode(id, &file)
    }

    fn get_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        let (mut f, path) = self.open_chunk(id)?;
        let mut hbuf = [0u8; HEADER_LEN];
        let got = read_full(&mut f, &mut hbuf).map_err(io_err("read", &path))?;
        let header = ChunkHeader::parse(id, &hbuf[..got])?;
        if header.len != buf.len() {
            return Err(StoreError::LengthMismatch {
                id: *id,
                expected: buf.len(),
                actual: header.len,
            });
        }
        match header.encoding {
            Encoding::Raw => {
                // Read straight into the destination, then make sure nothing follows.
                let got = read_full(&mut f, buf).map_err(io_err("read", &path))?;
                let mut extra = [0u8; 1];
                let more = read_full(&mut f, &mut extra).map_err(io_err("read", &path))?;
                if got != buf.len() || more != 0 {
                    return Err(StoreError::Corrupt {
                        id: *id,
                        reason: format!(
                            "raw body is {} bytes, header says {}",
                            got + more,
                            buf.len()
                        ),
                    });
                }
                verify(id, buf)
            }
            Encoding::Zstd => {
                let body = Self::read_capped(id, &mut f, &path, MAX_CHUNK_LEN)?;
                codec::decode_body(id, &header, &body, buf)
            }
        }
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        if lock(&self.pending).contains_key(id) {
            return Ok(true);
        }
        let path = self.chunk_path(id);
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }
}

impl ChunkWrite for LocalStore {
    fn put(&self, data: &[u8]) -> Result<ChunkId> {
        if data.len() > MAX_CHUNK_LEN {
            return Err(StoreError::TooLarge {
                len: data.len(),
                max: MAX_CHUNK_LEN,
            });
        }
        let id = ChunkId::of(data);
        self.put_hashed(&id, data)?;
        Ok(id)
    }

    fn put_hashed(&self, id: &ChunkId, data: &[u8]) -> Result<PutOutcome> {
        debug_assert_eq!(*id, ChunkId::of(data));
        if self.contains(id)? {
            self.chunks_deduped.fetch_add(1, Ordering::Relaxed);
            return Ok(PutOutcome::Present);
        }
        let idx = id.as_bytes()[0] as usize;
        self.ensure_fanout_dir(idx)?;
        let encoded = codec::encode(id, data, self.options.compression)?;
        let dest = self.chunk_path(id);
        self.write_file(id, idx, &dest, &encoded.header, &encoded.body)?;
        let stored_bytes = encoded.file_len() as u64;
        self.chunks_written.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(stored_bytes, Ordering::Relaxed);
        self.raw_bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(PutOutcome::Written { stored_bytes })
    }

    fn sync(&self) -> Result<()> {
        LocalStore::sync(self)
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
pub(crate) fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testutil::{Rng, TempDir};

    fn open(dir: &TempDir, compression: Compression) -> LocalStore {
        LocalStore::open(
            dir.path().join("store"),
            LocalStoreOptions {
                compression,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn samples() -> Vec<Vec<u8>> {
        let mut random = vec![0u8; 16384];
        Rng::new(11).fill(&mut random);
        let text: Vec<u8> = b"guest kernel text "
            .iter()
            .cycle()
            .take(16384)
            .copied()
            .collect();
        vec![random, text, vec![1u8; 4096], Vec::new()]
    }

    #[test]
    fn put_get_round_trip_both_encodings() {
        let dir = TempDir::new("local-rt");
        for compression in [Compression::None, Compression::Zstd { level: 3 }] {
            let store = open(&dir, compression);
            for data in samples() {
                let id = store.put(&data).unwrap();
                assert_eq!(id, ChunkId::of(&data));
                assert!(store.contains(&id).unwrap());
                assert!(store.chunk_path(&id).ends_with(id.relative_path()));
                assert_eq!(store.get(&id).unwrap(), data);
                let mut buf = vec![0xAAu8; data.len()];
                store.get_into(&id, &mut buf).unwrap();
                assert_eq!(buf, data);
            }
            store.sync().unwrap();
            let _ = fs::remove_dir_all(store.root());
        }
    }

    #[test]
    fn compression_is_used_only_when_it_pays() {
        let dir = TempDir::new("local-comp");
        let store = open(&dir, Compression::Zstd { level: 1 });
        let s = samples();
        let random = store.put(&s[0]).unwrap();
        let text = store.put(&s[1]).unwrap();
        let head = |id: &ChunkId| {
            let f = fs::read(store.chunk_path(id)).unwrap();
            ChunkHeader::parse(id, &f).unwrap().encoding
        };
        assert_eq!(head(&random), Encoding::Raw);
        assert_eq!(head(&text), Encoding::Zstd);
        let st = store.stats();
        assert_eq!(st.chunks_written, 2);
        assert_eq!(st.raw_bytes_written, 32768);
        assert!(st.bytes_written < 16384 + 16 + 2000, "{st:?}");
    }

    #[test]
    fn put_is_idempotent_and_counted() {
        let dir = TempDir::new("local-dedup");
        let store = open(&dir, Compression::None);
        let data = vec![5u8; 8192];
        let id = store.put(&data).unwrap();
        let mtime = fs::metadata(store.chunk_path(&id))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(store.put(&data).unwrap(), id);
        assert_eq!(
            fs::metadata(store.chunk_path(&id))
                .unwrap()
                .modified()
                .unwrap(),
            mtime
        );
        assert_eq!(
            store.stats(),
            StoreStats {
                chunks_written: 1,
                chunks_deduped: 1,
                bytes_written: 8192 + HEADER_LEN as u64,
                raw_bytes_written: 8192,
            }
        );
        // No temp files are left behind.
        let dir_entries: Vec<_> = fs::read_dir(store.chunk_path(&id).parent().unwrap())
            .unwrap()
            .collect();
        assert_eq!(dir_entries.len(), 1);
        // Reopening sees the chunk.
        let again = open(&dir, Compression::None);
        assert!(again.contains(&id).unwrap());
        assert_eq!(again.get(&id).unwrap(), data);
    }

    #[test]
    fn missing_corrupt_and_truncated_chunks_are_errors() {
        let dir = TempDir::new("local-bad");
        for compression in [Compression::None, Compression::Zstd { level: 3 }] {
            let store = open(&dir, compression);
            for data in &samples()[..3] {
                let id = store.put(data).unwrap();
                let path = store.chunk_path(&id);
                let good = fs::read(&path).unwrap();
                let check = |what: &str| {
                    let e1 = store.get(&id).unwrap_err();
                    let mut buf = vec![0u8; data.len()];
                    let e2 = store.get_into(&id, &mut buf).unwrap_err();
                    for e in [e1, e2] {
                        assert!(e.to_string().contains(&id.to_hex()), "{what}: {e}");
                    }
                };
                // Flip a selection of bytes (every header byte, then a stride).
                let stride = (good.len() / 64).max(1);
                for i in (0..HEADER_LEN).chain((HEADER_LEN..good.len()).step_by(stride)) {
                    let mut bad = good.clone();
                    bad[i] ^= 0x80;
                    fs::write(&path, &bad).unwrap();
                    check(&format!("flip {i}"));
                }
                for len in [0, 3, HEADER_LEN, good.len() / 2, good.len() - 1] {
                    fs::write(&path, &good[..len]).unwrap();
                    check(&format!("truncate {len}"));
                }
                let mut longer = good.clone();
                longer.extend_from_slice(b"junk");
                fs::write(&path, &longer).unwrap();
                check("trailing junk");
                fs::remove_file(&path).unwrap();
                assert!(matches!(store.get(&id), Err(StoreError::NotFound { .. })));
                assert!(!store.contains(&id).unwrap());
                check("missing");
                fs::write(&path, &good).unwrap();
                assert_eq!(&store.get(&id).unwrap(), data);
            }
            let _ = fs::remove_dir_all(store.root());
        }
    }

    #[test]
    fn get_into_wrong_length_is_refused() {
        let dir = TempDir::new("local-len");
        let store = open(&dir, Compression::None);
        let id = store.put(b"abcd").unwrap();
        let mut buf = [0u8; 5];
        assert!(matches!(
            store.get_into(&id, &mut buf),
            Err(StoreError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn concurrent_puts_of_the_same_chunk() {
        let dir = TempDir::new("local-conc");
        let store = open(&dir, Compression::Zstd { level: 1 });
        let data = vec![9u8; 65536];
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20 {
                        store.put(&data).unwrap();
                    }
                });
            }
        });
        store.sync().unwrap();
        assert_eq!(store.get(&ChunkId::of(&data)).unwrap(), data);
        let st = store.stats();
        assert_eq!(st.chunks_written + st.chunks_deduped, 80);
    }

    #[test]
    fn batch_durability_renames_at_sync_and_discards_unsynced_chunks() {
        let dir = TempDir::new("store-batch");
        let opts = LocalStoreOptions {
            batch_durability: true,
            ..Default::default()
        };
        let mut data = vec![0u8; 65536];
        Rng::new(5).fill(&mut data);
        let store = LocalStore::open(dir.path().join("s"), opts).unwrap();
        let id = store.put(&data).unwrap();
        // Pending: visible to this instance through its temp file, not under its name.
        assert!(store.contains(&id).unwrap());
        assert_eq!(store.get(&id).unwrap(), data);
        assert!(!store.chunk_path(&id).exists());
        assert_eq!(
            store.put_hashed(&id, &data).unwrap(),
            PutOutcome::Present,
            "a pending chunk is not written twice"
        );
        store.sync().unwrap();
        assert!(store.chunk_path(&id).is_file());
        let other = LocalStore::open(dir.path().join("s"), LocalStoreOptions::default()).unwrap();
        assert_eq!(other.get(&id).unwrap(), data);

        // Dropped without sync: the chunk and its temp file are gone.
        data[0] ^= 1;
        let store = LocalStore::open(dir.path().join("s"), opts).unwrap();
        let id2 = store.put(&data).unwrap();
        let fanout = store.chunk_path(&id2).parent().unwrap().to_path_buf();
        drop(store);
        assert!(!other.contains(&id2).unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(&fanout)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }
}
