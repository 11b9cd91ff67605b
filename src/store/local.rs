//! [`LocalStore`]: chunks kept in a directory, in one of two layouts (see
//! `docs/SNAPSHOT_FORMAT.md`):
//!
//! ```text
//! <root>/packs/<pack id>.pack + .idx         Layout::Packs (store layout version 2)
//! <root>/chunks/<2 hex digits>/<64 hex>      Layout::Files (version 1)
//! ```
//!
//! Reading serves both layouts, whatever the store was opened to write: packs through an
//! in-memory map of every pack index (loaded at open, reloaded when a chunk is not found,
//! so chunks another process wrote meanwhile are found) read with `pread`, then chunk
//! files. The layout option says how new chunks are written:
//!
//! * **Packs**: the chunks of one batch (everything `put` before [`LocalStore::sync`]) are
//!   appended to one pack (a new one every [`MAX_PACK_LEN`](pack::MAX_PACK_LEN)); `sync`
//!   `fdatasync`s each pack, writes its index (temp name, `fdatasync`, rename) and fsyncs
//!   `packs/` once: a constant number of flushes and renames per batch. Until then the new
//!   chunks are visible to this store instance only; dropped without `sync`, its packs are
//!   deleted.
//! * **Files**: one file per chunk, written to `.<hex>.tmp.<pid>.<n>`, fsynced and renamed
//!   into place; `sync` fsyncs the fan-out directories that got entries. The chunk cache
//!   (`store::cache`) and image import keep this layout: a file per chunk is what their
//!   readers (eviction by file age, per-chunk HTTP GETs) need.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::codec::{self, ChunkHeader, Compression, Encoding, HEADER_LEN};
use super::pack::{self, Location, PackSet, PackWriter};
use super::{
    ChunkId, ChunkRead, ChunkWrite, MAX_CHUNK_LEN, PutOutcome, Result, StoreError, verify,
};

use crate::util::fs::{Staged, fsync_dir};
use crate::util::lock;

/// How a [`LocalStore`] writes new chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// One file per chunk, `chunks/xx/<id>` (store layout version 1).
    #[default]
    Files,
    /// Packs with an index, `packs/<pack id>.{pack,idx}` (store layout version 2).
    Packs,
}

/// Options of a [`LocalStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalStoreOptions {
    /// Compression of newly written chunks. Reading handles both encodings whatever
    /// this says.
    pub compression: Compression,
    /// How new chunks are written (reading serves both layouts).
    pub layout: Layout,
    /// With [`Layout::Packs`]: also add every new pack to `packs/list` at `sync`, so that
    /// HTTP readers, which cannot list a directory, find them (archives).
    pub publish_list: bool,
}

impl Default for LocalStoreOptions {
    /// zstd level 1: fast, and guest memory pages that compress at all mostly
    /// compress well at that level. One file per chunk.
    fn default() -> Self {
        LocalStoreOptions {
            compression: Compression::Zstd { level: 1 },
            layout: Layout::Files,
            publish_list: false,
        }
    }
}

impl LocalStoreOptions {
    /// The options of a store written in packs (zstd level 1).
    pub fn packs() -> Self {
        LocalStoreOptions {
            layout: Layout::Packs,
            ..Default::default()
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
    /// Bytes of chunk records written (headers included, after compression): the
    /// disk space added.
    pub bytes_written: u64,
    /// Uncompressed bytes of the chunks written.
    pub raw_bytes_written: u64,
}

/// Where a chunk's record is stored, for tools and tests that look at the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLocation {
    /// The file: a chunk file, or a pack.
    pub path: PathBuf,
    /// Offset of the record in it (0 for a chunk file).
    pub offset: u64,
    /// Length of the record (chunk header + body).
    pub len: u64,
}

/// Packs being written by this store instance, published at the next `sync`.
#[derive(Debug, Default)]
struct Writing {
    current: Option<PackWriter>,
    full: Vec<PackWriter>,
}

/// A [`ChunkWrite`] store in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    chunks_dir: PathBuf,
    packs_dir: PathBuf,
    options: LocalStoreOptions,
    /// Fan-out directories known to exist.
    made: [AtomicBool; 256],
    /// Fan-out directories with entries not yet fsynced.
    dirty: [AtomicBool; 256],
    /// `chunks/` has new fan-out directories not yet fsynced.
    chunks_dir_dirty: AtomicBool,
    /// Whether `chunks/` existed (or was made) at open: else no chunk file is looked for.
    has_files: AtomicBool,
    /// The chunks of every complete pack, and of the packs this instance is writing.
    packs: RwLock<PackSet>,
    /// Packs being written (`Layout::Packs`).
    writing: Mutex<Writing>,
    chunks_written: AtomicU64,
    chunks_deduped: AtomicU64,
    bytes_written: AtomicU64,
    raw_bytes_written: AtomicU64,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    crate::util::io_err(op, path)
}

impl Drop for LocalStore {
    /// Packs written but never synced are deleted (dropping their writers): nothing
    /// durable refers to them.
    fn drop(&mut self) {
        let w = std::mem::take(&mut *lock(&self.writing));
        let n = w.full.len() + usize::from(w.current.is_some());
        if n > 0 {
            log::warn!(
                "chunk store {}: {n} packs written but never synced are discarded",
                self.root.display()
            );
        }
    }
}

impl LocalStore {
    /// Opens the store rooted at `root`, creating the directory new chunks go to
    /// (`chunks/` or `packs/`) if needed, and loads the pack indexes.
    pub fn open(root: impl AsRef<Path>, options: LocalStoreOptions) -> Result<Self> {
        Self::open_inner(root.as_ref(), options, true)
    }

    /// Opens the store rooted at `root` for reading, creating nothing (a store on
    /// read-only media, a snapshot directory restored from): whichever of `chunks/` and
    /// `packs/` exist are read. Nothing may be written through it.
    pub fn open_read(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(root.as_ref(), LocalStoreOptions::default(), false)
    }

    /// Whether `root` holds a chunk store (a `chunks/` or a `packs/` directory).
    pub fn exists(root: impl AsRef<Path>) -> bool {
        let root = root.as_ref();
        root.join("chunks").is_dir() || root.join(pack::PACKS_DIR).is_dir()
    }

    fn open_inner(root: &Path, options: LocalStoreOptions, create: bool) -> Result<Self> {
        let root = root.to_path_buf();
        let chunks_dir = root.join("chunks");
        let packs_dir = root.join(pack::PACKS_DIR);
        let write_dir = match options.layout {
            Layout::Files => &chunks_dir,
            Layout::Packs => &packs_dir,
        };
        let existed = write_dir.is_dir();
        if create && !existed {
            fs::create_dir_all(write_dir).map_err(io_err("create directory", write_dir))?;
            fsync_dir(&root)?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                fsync_dir(parent)?;
            }
        }
        let mut packs = PackSet::default();
        packs.load(&packs_dir)?;
        Ok(LocalStore {
            has_files: AtomicBool::new(chunks_dir.is_dir()),
            root,
            chunks_dir,
            packs_dir,
            options,
            made: std::array::from_fn(|_| AtomicBool::new(false)),
            dirty: std::array::from_fn(|_| AtomicBool::new(false)),
            chunks_dir_dirty: AtomicBool::new(false),
            packs: RwLock::new(packs),
            writing: Mutex::new(Writing::default()),
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

    /// Path of the file that holds (or would hold) chunk `id` in the `Files` layout.
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

    fn packs_read(&self) -> std::sync::RwLockReadGuard<'_, PackSet> {
        self.packs.read().unwrap_or_else(|e| e.into_inner())
    }

    fn packs_write(&self) -> std::sync::RwLockWriteGuard<'_, PackSet> {
        self.packs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Where chunk `id` is in a pack, loading new pack indexes first if `reload`.
    fn pack_location(&self, id: &ChunkId, reload: Reload) -> Result<Option<Location>> {
        if let Some(l) = self.packs_read().get(id) {
            return Ok(Some(l.clone()));
        }
        let mut set = self.packs_write();
        match reload {
            Reload::No => {}
            Reload::IfChanged => {
                set.reload_if_changed(&self.packs_dir)?;
            }
            Reload::Always => set.load(&self.packs_dir)?,
        }
        Ok(set.get(id).cloned())
    }

    /// Where chunk `id`'s record is (a pack first, then a chunk file), if present.
    pub fn location(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        if let Some(l) = self.pack_location(id, Reload::Always)? {
            return Ok(Some(ChunkLocation {
                path: l.pack.path.clone(),
                offset: l.offset,
                len: u64::from(l.len),
            }));
        }
        let path = self.chunk_path(id);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ChunkLocation {
                path,
                offset: 0,
                len: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Bytes chunk `id` takes on disk (its record), `None` when it is not stored.
    pub fn stored_len(&self, id: &ChunkId) -> Result<Option<u64>> {
        Ok(self.location(id)?.map(|l| l.len))
    }

    /// Chunk `id` as stored: its record in the chunk file format (header + raw or zstd
    /// body), checked to decode to `id` — what copying a chunk between stores moves.
    pub fn read_stored(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let bytes = self.read_record(id)?;
        codec::decode(id, &bytes)?;
        Ok(bytes)
    }

    /// The record of chunk `id`, unchecked beyond its length cap.
    fn read_record(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(l) = self.pack_location(id, Reload::No)? {
            return l.read_record(id);
        }
        match self.open_chunk(id) {
            Ok((mut f, path)) => Self::read_capped(id, &mut f, &path, HEADER_LEN + MAX_CHUNK_LEN),
            Err(StoreError::NotFound { .. }) => match self.pack_location(id, Reload::Always)? {
                Some(l) => l.read_record(id),
                None => Err(StoreError::NotFound { id: *id }),
            },
            Err(e) => Err(e),
        }
    }

    /// Stores chunk `id` from its record `bytes` (chunk file format, e.g. from
    /// [`read_stored`](Self::read_stored) of another store) as it is, after checking that
    /// it decodes to `id`.
    pub fn put_stored(&self, id: &ChunkId, bytes: &[u8]) -> Result<PutOutcome> {
        if self.contains(id)? {
            self.chunks_deduped.fetch_add(1, Ordering::Relaxed);
            return Ok(PutOutcome::Present);
        }
        let data = codec::decode(id, bytes)?;
        let (header, body) = bytes.split_at(HEADER_LEN);
        self.write_record(id, header, body, data.len())
    }

    /// Like [`put_stored`](Self::put_stored), but a chunk only counts as present when a
    /// pack holds it (a chunk file does not): what moving chunk files into packs needs.
    pub fn put_stored_in_pack(&self, id: &ChunkId, bytes: &[u8]) -> Result<PutOutcome> {
        if self.pack_location(id, Reload::IfChanged)?.is_some() {
            self.chunks_deduped.fetch_add(1, Ordering::Relaxed);
            return Ok(PutOutcome::Present);
        }
        let data = codec::decode(id, bytes)?;
        let (header, body) = bytes.split_at(HEADER_LEN);
        self.write_record(id, header, body, data.len())
    }

    /// Makes the chunks written so far durable. Call once after a whole snapshot.
    /// Packs: `fdatasync` of each pack, its index written (temp name, `fdatasync`,
    /// rename), the list updated if asked, one fsync of `packs/`. Files: an fsync of every
    /// directory that received new entries.
    pub fn sync(&self) -> Result<()> {
        self.sync_packs()?;
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

    fn sync_packs(&self) -> Result<()> {
        let mut w = lock(&self.writing);
        let mut packs = std::mem::take(&mut w.full);
        packs.extend(w.current.take());
        if packs.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::new();
        for p in packs {
            // A failure drops the remaining writers, deleting their packs: the batch
            // fails as a whole, and nothing refers to its chunks.
            let ix = p.finish()?;
            ids.push(ix.pack);
        }
        drop(w);
        if self.options.publish_list {
            pack::publish_list(&self.packs_dir, &ids)?;
        }
        fsync_dir(&self.packs_dir)?;
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

    /// Writes the record `header` + `body` of chunk `id` (of `raw_len` bytes decoded) in
    /// the store's layout.
    fn write_record(
        &self,
        id: &ChunkId,
        header: &[u8],
        body: &[u8],
        raw_len: usize,
    ) -> Result<PutOutcome> {
        match self.options.layout {
            Layout::Files => {
                let idx = id.as_bytes()[0] as usize;
                self.ensure_fanout_dir(idx)?;
                let dest = self.chunk_path(id);
                let mut staged = Staged::write(&dest, true, |f| {
                    f.write_all(header)?;
                    f.write_all(body)
                })?;
                staged.commit()?;
                self.dirty[idx].store(true, Ordering::Release);
            }
            Layout::Packs => {
                let mut w = lock(&self.writing);
                // Another thread of this instance may have appended it meanwhile.
                if self.packs_read().get(id).is_some() {
                    self.chunks_deduped.fetch_add(1, Ordering::Relaxed);
                    return Ok(PutOutcome::Present);
                }
                let rec = (header.len() + body.len()) as u64;
                if w.current
                    .as_ref()
                    .is_some_and(|p| !p.is_empty() && p.len() + rec > pack::MAX_PACK_LEN)
                {
                    let full = w.current.take().expect("checked above");
                    w.full.push(full);
                }
                if w.current.is_none() {
                    w.current = Some(PackWriter::create(&self.packs_dir)?);
                }
                let p = w.current.as_mut().expect("set above");
                let loc = p.append(id, header, body)?;
                self.packs_write().insert(*id, loc);
            }
        }
        let stored_bytes = (header.len() + body.len()) as u64;
        self.chunks_written.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(stored_bytes, Ordering::Relaxed);
        self.raw_bytes_written
            .fetch_add(raw_len as u64, Ordering::Relaxed);
        Ok(PutOutcome::Written { stored_bytes })
    }

    fn open_chunk(&self, id: &ChunkId) -> Result<(File, PathBuf)> {
        let path = self.chunk_path(id);
        match File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound { id: *id }),
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

    /// `get_into` from a chunk file.
    fn file_get_into(&self, id: &ChunkId, mut f: File, path: &Path, buf: &mut [u8]) -> Result<()> {
        let mut hbuf = [0u8; HEADER_LEN];
        let got = read_full(&mut f, &mut hbuf).map_err(io_err("read", path))?;
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
                let got = read_full(&mut f, buf).map_err(io_err("read", path))?;
                let mut extra = [0u8; 1];
                let more = read_full(&mut f, &mut extra).map_err(io_err("read", path))?;
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
                let body = Self::read_capped(id, &mut f, path, MAX_CHUNK_LEN)?;
                codec::decode_body(id, &header, &body, buf)
            }
        }
    }

    /// `get_into` from a pack record: a raw body is read straight into `buf`.
    fn pack_get_into(&self, id: &ChunkId, l: &Location, buf: &mut [u8]) -> Result<()> {
        let mut hbuf = [0u8; HEADER_LEN];
        if (l.len as usize) < HEADER_LEN {
            return Err(StoreError::Corrupt {
                id: *id,
                reason: "pack record shorter than a chunk header".into(),
            });
        }
        l.pack.read_at(l.offset, &mut hbuf)?;
        let header = ChunkHeader::parse(id, &hbuf)?;
        if header.len != buf.len() {
            return Err(StoreError::LengthMismatch {
                id: *id,
                expected: buf.len(),
                actual: header.len,
            });
        }
        let body_len = l.len as usize - HEADER_LEN;
        let body_off = l.offset + HEADER_LEN as u64;
        match header.encoding {
            Encoding::Raw if body_len == buf.len() => {
                l.pack.read_at(body_off, buf)?;
                verify(id, buf)
            }
            Encoding::Raw => Err(StoreError::Corrupt {
                id: *id,
                reason: format!("raw body is {body_len} bytes, header says {}", buf.len()),
            }),
            Encoding::Zstd => {
                let mut body = vec![0u8; body_len];
                l.pack.read_at(body_off, &mut body)?;
                codec::decode_body(id, &header, &body, buf)
            }
        }
    }
}

/// Whether a lookup that misses loads new pack indexes first.
#[derive(Clone, Copy)]
enum Reload {
    No,
    IfChanged,
    Always,
}

impl ChunkRead for LocalStore {
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let rec = self.read_record(id)?;
        codec::decode(id, &rec)
    }

    fn get_into(&self, id: &ChunkId, buf: &mut [u8]) -> Result<()> {
        if let Some(l) = self.pack_location(id, Reload::No)? {
            return self.pack_get_into(id, &l, buf);
        }
        match self.open_chunk(id) {
            Ok((f, path)) => self.file_get_into(id, f, &path, buf),
            Err(StoreError::NotFound { .. }) => match self.pack_location(id, Reload::Always)? {
                Some(l) => self.pack_get_into(id, &l, buf),
                None => Err(StoreError::NotFound { id: *id }),
            },
            Err(e) => Err(e),
        }
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self.packs_read().get(id).is_some() {
            return Ok(true);
        }
        if self.has_files.load(Ordering::Relaxed) {
            let path = self.chunk_path(id);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("stat", &path)(e)),
            }
        }
        Ok(self.pack_location(id, Reload::IfChanged)?.is_some())
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
        let encoded = codec::encode(id, data, self.options.compression)?;
        self.write_record(id, &encoded.header, &encoded.body, data.len())
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
mod tests;
