//! Disk image archives: importing a disk image as content-addressed chunks plus an index,
//! in a directory any static web server can serve as is.
//!
//! ```text
//! ARCHIVE/images/NAME                     image index (checksummed container, kind VMMIMG\0\0)
//! ARCHIVE/chunks/<2 hex>/<64 hex>         chunk files, same layout as snapshot memory chunks
//! ```
//!
//! [`import_image`] cuts a raw image (qcow2 and vmdk are converted to raw with `qemu-img`
//! first) into fixed-size chunks named by their BLAKE3 hash. All-zero chunks are marked in
//! the index and not stored; chunks already in the archive (from another image, or earlier
//! in the same one) are reused. Chunks are stored **raw** (uncompressed) so that a server
//! can hand them out as plain files and a reader needs no decompression on the read path.
//!
//! The index is read back with [`ImageIndex::decode`] / [`read_index`]; its [`ImageId`]
//! (the BLAKE3 hash of the index payload) names the image's content and keys local caches.
//! The format is described byte by byte in `docs/REMOTE_IMAGES.md`.

use std::fs::File;
use std::io::{self, IsTerminal, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::formats::INDEX_KIND;
use crate::formats::file::{self, StateFileError};
use crate::store::local::read_full;
use crate::store::{
    ChunkId, ChunkWrite, Compression, LocalStore, LocalStoreOptions, MAX_CHUNK_LEN, PutOutcome,
    StoreError,
};
use crate::util::IoError;

/// Default chunk size of imported images: 256 KiB (see `docs/REMOTE_IMAGES.md` for the
/// measurement behind the choice).
pub const DEFAULT_IMAGE_CHUNK_SIZE: u32 = 256 << 10;
/// Smallest chunk size accepted (and granularity of chunk sizes): 4 KiB.
pub const MIN_IMAGE_CHUNK_SIZE: u32 = 4096;
/// Disk sector size; image sizes are whole sectors (imports are padded with zeros).
const SECTOR: u64 = 512;

/// Identity of an image's content: the BLAKE3 hash of its index payload (which is also
/// the checksum at the end of the index file). Two imports of the same bytes with the
/// same chunk size have the same id.
pub type ImageId = ChunkId;

/// Errors of image import and index handling.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The archive's layout is one this build does not write.
    #[error("archive")]
    Archive(#[source] crate::formats::MarkerError),
    /// The image name is not usable as a single URL-safe file name.
    #[error(
        "invalid image name {name:?}: use 1-128 characters of A-Z a-z 0-9 . _ - not starting with '.'"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// The chunk size is out of range.
    #[error(
        "invalid chunk size {size}: must be a multiple of {MIN_IMAGE_CHUNK_SIZE} between {MIN_IMAGE_CHUNK_SIZE} and {MAX_CHUNK_LEN} bytes"
    )]
    InvalidChunkSize {
        /// The rejected size.
        size: u64,
    },
    /// The source image is empty.
    #[error("source image {} is empty", path.display())]
    EmptySource {
        /// The source.
        path: PathBuf,
    },
    /// `qemu-img` is needed to convert the source but could not be run.
    #[error("{format} image {} needs `qemu-img` (Debian package qemu-utils) to import", path.display())]
    QemuImgMissing {
        /// Detected source format.
        format: &'static str,
        /// The source.
        path: PathBuf,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// `qemu-img convert` failed.
    #[error("qemu-img convert of {format} image {} failed: {stderr}", path.display())]
    Convert {
        /// Detected source format.
        format: &'static str,
        /// The source.
        path: PathBuf,
        /// What qemu-img printed.
        stderr: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Storing a chunk failed.
    #[error("cannot store chunk of the image")]
    Store(#[source] StoreError),
    /// The index file could not be written, read or decoded.
    #[error("image index")]
    IndexFile(#[source] StateFileError),
    /// The index decoded but is inconsistent.
    #[error("invalid image index: {reason}")]
    InvalidIndex {
        /// What is wrong.
        reason: String,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ImageError>;

/// One chunk of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageEntry {
    /// All zero bytes; nothing is stored or fetched.
    Zero,
    /// The chunk with this id.
    Chunk(ChunkId),
}

/// The index of an imported image: its size, chunk size and the chunk of every slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// Image size in bytes (a multiple of 512).
    pub size: u64,
    /// Chunk size in bytes; every chunk but the last is this long.
    pub chunk_size: u32,
    /// One entry per chunk: `size.div_ceil(chunk_size)` of them.
    pub entries: Vec<ImageEntry>,
}

impl ImageIndex {
    /// Encodes the index as a complete index file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        file::encode(&INDEX_KIND, self).map_err(ImageError::IndexFile)
    }

    /// Checks and decodes a complete index file, then validates it ([`Self::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let index: ImageIndex = file::decode(&INDEX_KIND, bytes).map_err(ImageError::IndexFile)?;
        index.validate()?;
        Ok(index)
    }

    /// Checks the fields agree: chunk size in range, size a whole number of sectors,
    /// one entry per chunk.
    pub fn validate(&self) -> Result<()> {
        check_chunk_size(u64::from(self.chunk_size))?;
        let invalid = |reason: String| Err(ImageError::InvalidIndex { reason });
        if self.size == 0 || !self.size.is_multiple_of(SECTOR) {
            return invalid(format!(
                "image size {} is not a positive multiple of 512",
                self.size
            ));
        }
        let want = self.size.div_ceil(u64::from(self.chunk_size));
        if self.entries.len() as u64 != want {
            return invalid(format!(
                "{} entries for a {}-byte image of {}-byte chunks (expected {want})",
                self.entries.len(),
                self.size,
                self.chunk_size
            ));
        }
        Ok(())
    }

    /// The image's content id: BLAKE3 of the index payload.
    pub fn id(&self) -> ImageId {
        // Serializing a validated index cannot fail; an error would only come from a limit.
        let payload = bincode::serialize(self).unwrap_or_default();
        ChunkId::of(&payload)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.entries.len()
    }

    /// Byte offset of chunk `idx`.
    pub fn chunk_offset(&self, idx: usize) -> u64 {
        idx as u64 * u64::from(self.chunk_size)
    }

    /// Length of chunk `idx` (the last one may be short).
    pub fn chunk_len(&self, idx: usize) -> usize {
        let start = self.chunk_offset(idx);
        (self.size - start).min(u64::from(self.chunk_size)) as usize
    }
}

/// Reads, checks and validates the index file at `path`.
pub fn read_index(path: &Path) -> Result<ImageIndex> {
    let index: ImageIndex = file::read_file(path, &INDEX_KIND).map_err(ImageError::IndexFile)?;
    index.validate()?;
    Ok(index)
}

/// Path of image `name`'s index in `archive_dir`.
pub fn index_path(archive_dir: &Path, name: &str) -> PathBuf {
    archive_dir.join("images").join(name)
}

/// Checks that `name` can be an image name: 1-128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName { name: name.into() })
    }
}

fn check_chunk_size(size: u64) -> Result<()> {
    if size < u64::from(MIN_IMAGE_CHUNK_SIZE)
        || size > MAX_CHUNK_LEN as u64
        || !size.is_multiple_of(u64::from(MIN_IMAGE_CHUNK_SIZE))
    {
        return Err(ImageError::InvalidChunkSize { size });
    }
    Ok(())
}

/// Format of an import source, detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// A raw disk image (anything not recognized below).
    Raw,
    /// QEMU qcow/qcow2 (magic `QFI\xfb`).
    Qcow2,
    /// VMware vmdk (sparse extent magic `KDMV`, or a `# Disk DescriptorFile` text header).
    Vmdk,
}

impl SourceFormat {
    /// The `qemu-img -f` name.
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
        }
    }

    /// Detects the format from the first bytes of a file.
    pub fn detect(head: &[u8]) -> Self {
        if head.starts_with(b"QFI\xfb") {
            SourceFormat::Qcow2
        } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
            SourceFormat::Vmdk
        } else {
            SourceFormat::Raw
        }
    }
}

/// Options of [`import_image_with`].
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Chunk size in bytes (multiple of 4 KiB, at most 16 MiB).
    pub chunk_size: u32,
    /// Print a progress percentage on stderr; `None` = only when stderr is a terminal.
    pub progress: Option<bool>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            chunk_size: DEFAULT_IMAGE_CHUNK_SIZE,
            progress: None,
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// The image name.
    pub name: String,
    /// Where the index was written.
    pub index_path: PathBuf,
    /// The image's content id.
    pub image_id: ImageId,
    /// The source's format.
    pub format: SourceFormat,
    /// Image size in bytes (the raw size, padded to a whole sector).
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks in the image, zero chunks included.
    pub chunks_total: u64,
    /// All-zero chunks (not stored).
    pub chunks_zero: u64,
    /// Chunks written to the archive by this import.
    pub chunks_new: u64,
    /// Non-zero chunks that were already in the archive (or repeated within the image).
    pub chunks_reused: u64,
    /// Bytes of chunk files written (headers included).
    pub bytes_written: u64,
    /// Wall time of the import, conversion included.
    pub elapsed: Duration,
}

impl std::fmt::Display for ImportReport {
    /// One line: name, size, chunks (new, reused, zero), bytes written, time, image id.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "imported {} ({}, {} bytes) as {}: {} chunks of {} KiB: {} new, {} reused, {} zero; \
             {} bytes written in {:.2} s; image id {}",
            self.name,
            self.format.name(),
            self.size,
            self.index_path.display(),
            self.chunks_total,
            self.chunk_size >> 10,
            self.chunks_new,
            self.chunks_reused,
            self.chunks_zero,
            self.bytes_written,
            self.elapsed.as_secs_f64(),
            self.image_id
        )
    }
}

/// Imports `src` into `archive_dir` as image `name` with `chunk_size`-byte chunks; progress
/// is shown when stderr is a terminal. See [`import_image_with`].
pub fn import_image(
    src: &Path,
    archive_dir: &Path,
    name: &str,
    chunk_size: u32,
) -> Result<ImportReport> {
    let opts = ImportOptions {
        chunk_size,
        ..ImportOptions::default()
    };
    import_image_with(src, archive_dir, name, &opts)
}

/// Imports `src` into `archive_dir` as image `name`.
///
/// qcow2 and vmdk sources are first converted to a raw temp file in `archive_dir/images/`
/// with `qemu-img convert` (removed afterwards). Chunks are stored raw with [`LocalStore`]
/// under `archive_dir/chunks/` and made durable before the index is written (atomically),
/// so a served index never names a chunk that is not there. Re-importing under the same
/// name replaces the index.
pub fn import_image_with(
    src: &Path,
    archive_dir: &Path,
    name: &str,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    let start = Instant::now();
    check_name(name)?;
    check_chunk_size(u64::from(opts.chunk_size))?;
    crate::formats::prepare_archive(archive_dir).map_err(ImageError::Archive)?;
    let io = IoError::at;
    let images_dir = archive_dir.join("images");
    std::fs::create_dir_all(&images_dir).map_err(io("create directory", &images_dir))?;

    let mut head = [0u8; 32];
    let n = File::open(src)
        .and_then(|mut f| read_full(&mut f, &mut head))
        .map_err(io("read", src))?;
    let format = SourceFormat::detect(&head[..n]);
    let converted = match format {
        SourceFormat::Raw => None,
        _ => Some(convert_to_raw(src, format, &images_dir, name)?),
    };
    let raw_path = converted.as_ref().map_or(src, |t| t.0.as_path());
    let progress = opts.progress.unwrap_or_else(|| io::stderr().is_terminal());

    let store = LocalStore::open(
        archive_dir,
        LocalStoreOptions {
            compression: Compression::None,
            ..Default::default()
        },
    )
    .map_err(ImageError::Store)?;
    let (index, counts) = chunk_file(raw_path, &store, opts.chunk_size, progress, name)?;
    store.sync().map_err(ImageError::Store)?;
    drop(converted);

    let index_path = index_path(archive_dir, name);
    file::write_file(&index_path, &INDEX_KIND, &index).map_err(ImageError::IndexFile)?;
    Ok(ImportReport {
        name: name.into(),
        index_path,
        image_id: index.id(),
        format,
        size: index.size,
        chunk_size: index.chunk_size,
        chunks_total: index.entries.len() as u64,
        chunks_zero: counts.zero,
        chunks_new: counts.new,
        chunks_reused: counts.reused,
        bytes_written: counts.bytes_written,
        elapsed: start.elapsed(),
    })
}

/// A temp file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn convert_to_raw(src: &Path, format: SourceFormat, dir: &Path, name: &str) -> Result<TempFile> {
    let tmp = TempFile(dir.join(format!(".{name}.raw.tmp.{}", std::process::id())));
    log::info!(
        "converting {} image {} to raw with qemu-img",
        format.name(),
        src.display()
    );
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", format.name(), "-O", "raw"])
        .arg(src)
        .arg(&tmp.0)
        .output()
        .map_err(|source| ImageError::QemuImgMissing {
            format: format.name(),
            path: src.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(ImageError::Convert {
            format: format.name(),
            path: src.to_path_buf(),
            stderr: format!("{} ({})", stderr.trim(), out.status),
        });
    }
    Ok(tmp)
}

#[derive(Default)]
struct Counts {
    zero: u64,
    new: u64,
    reused: u64,
    bytes_written: u64,
}

/// Cuts the raw image at `path` into chunks stored in `store`.
fn chunk_file(
    path: &Path,
    store: &LocalStore,
    chunk_size: u32,
    progress: bool,
    name: &str,
) -> Result<(ImageIndex, Counts)> {
    let io = |op| IoError::at(op, path);
    let mut f = File::open(path).map_err(io("open"))?;
    // Seeking to the end also sizes block devices, whose metadata length is 0.
    let raw_size = f.seek(SeekFrom::End(0)).map_err(io("seek"))?;
    f.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
    if raw_size == 0 {
        return Err(ImageError::EmptySource { path: path.into() });
    }
    let size = raw_size.div_ceil(SECTOR) * SECTOR;
    let count = size.div_ceil(u64::from(chunk_size));
    let mut entries = Vec::with_capacity(count.min(1 << 24) as usize);
    let mut counts = Counts::default();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut last_pct = u64::MAX;
    for idx in 0..count {
        let len = (size - idx * u64::from(chunk_size)).min(u64::from(chunk_size)) as usize;
        let chunk = &mut buf[..len];
        let got = read_full(&mut f, chunk).map_err(io("read"))?;
        // Past the end of the raw file (the sector padding) is zeros.
        chunk[got..].fill(0);
        if is_zero(chunk) {
            counts.zero += 1;
            entries.push(ImageEntry::Zero);
        } else {
            let id = ChunkId::of(chunk);
            match store.put_hashed(&id, chunk).map_err(ImageError::Store)? {
                PutOutcome::Present => counts.reused += 1,
                PutOutcome::Written { stored_bytes } => {
                    counts.new += 1;
                    counts.bytes_written += stored_bytes;
                }
            }
            entries.push(ImageEntry::Chunk(id));
        }
        if progress {
            let pct = (idx + 1) * 100 / count;
            if pct != last_pct {
                last_pct = pct;
                let mut err = io::stderr().lock();
                let _ = write!(err, "\rimporting {name}: {pct:3}%");
                if idx + 1 == count {
                    let _ = writeln!(err);
                }
            }
        }
    }
    let index = ImageIndex {
        size,
        chunk_size,
        entries,
    };
    index.validate()?;
    Ok((index, counts))
}

/// Whether `buf` is all zero bytes.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChunkRead;
    use crate::util::testutil::{Rng, TempDir};

    fn write_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; size];
        Rng::new(seed).fill(&mut data);
        // Zero regions: the second 64 KiB chunk-sized block and the tail quarter.
        data[65536..131072].fill(0);
        data[size - size / 4..].fill(0);
        std::fs::write(path, &data).unwrap();
        data
    }

    #[test]
    fn import_dedups_and_marks_zero_chunks() {
        let dir = TempDir::new("img-import");
        let src = dir.path().join("a.img");
        let data = write_image(&src, 1 << 20, 5);
        let archive = dir.path().join("archive");
        let opts = ImportOptions {
            chunk_size: 65536,
            progress: Some(false),
        };
        let r = import_image_with(&src, &archive, "a", &opts).unwrap();
        assert_eq!((r.size, r.chunks_total), (1 << 20, 16));
        assert_eq!(r.chunks_zero, 1 + 4);
        assert_eq!((r.chunks_new, r.chunks_reused), (11, 0));
        let index = read_index(&r.index_path).unwrap();
        assert_eq!(index.id(), r.image_id);
        assert_eq!(index.entries[1], ImageEntry::Zero);
        let store = LocalStore::open(&archive, LocalStoreOptions::default()).unwrap();
        for (i, e) in index.entries.iter().enumerate() {
            let want = &data[i * 65536..(i + 1) * 65536];
            match e {
                ImageEntry::Zero => assert!(is_zero(want)),
                ImageEntry::Chunk(id) => assert_eq!(store.get(id).unwrap(), want),
            }
        }
        // A similar image (one chunk changed) reuses the rest.
        let mut b = data.clone();
        b[3] ^= 1;
        let src_b = dir.path().join("b.img");
        std::fs::write(&src_b, &b).unwrap();
        let rb = import_image_with(&src_b, &archive, "b", &opts).unwrap();
        assert_eq!((rb.chunks_new, rb.chunks_reused), (1, 10));
        assert_ne!(rb.image_id, r.image_id);
        // Same content again: same id.
        let ra = import_image_with(&src, &archive, "a2", &opts).unwrap();
        assert_eq!(ra.image_id, r.image_id);
        assert_eq!(ra.chunks_new, 0);
    }

    #[test]
    fn odd_sizes_are_padded_and_bad_input_refused() {
        let dir = TempDir::new("img-odd");
        let src = dir.path().join("odd.img");
        std::fs::write(&src, vec![7u8; 1000]).unwrap();
        let archive = dir.path().join("ar");
        let r = import_image(&src, &archive, "odd", 4096).unwrap();
        assert_eq!((r.size, r.chunks_total), (1024, 1));
        for bad in ["", ".x", "a/b", "a b", "..", &"x".repeat(129)] {
            assert!(matches!(
                import_image(&src, &archive, bad, 4096),
                Err(ImageError::InvalidName { .. })
            ));
        }
        for cs in [0, 512, 4097, 32 << 20] {
            assert!(matches!(
                import_image(&src, &archive, "x", cs),
                Err(ImageError::InvalidChunkSize { .. })
            ));
        }
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            import_image(&empty, &archive, "e", 4096),
            Err(ImageError::EmptySource { .. })
        ));
        let e = import_image(&dir.path().join("nope"), &archive, "n", 4096).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn index_decode_rejects_inconsistent_or_corrupt_files() {
        let good = ImageIndex {
            size: 8192,
            chunk_size: 4096,
            entries: vec![ImageEntry::Zero, ImageEntry::Chunk(ChunkId::of(b"x"))],
        };
        let bytes = good.encode().unwrap();
        assert_eq!(ImageIndex::decode(&bytes).unwrap(), good);
        assert_eq!(&bytes[bytes.len() - 32..], good.id().as_bytes());
        for len in 0..bytes.len() {
            assert!(ImageIndex::decode(&bytes[..len]).is_err());
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(ImageIndex::decode(&bad).is_err(), "flip at {i}");
        }
        let mut wrong = good.clone();
        wrong.entries.pop();
        let e = ImageIndex::decode(&wrong.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("entries"), "{e}");
        wrong = good.clone();
        wrong.chunk_size = 100;
        assert!(ImageIndex::decode(&wrong.encode().unwrap()).is_err());
        wrong = good;
        wrong.size = 8000;
        assert!(ImageIndex::decode(&wrong.encode().unwrap()).is_err());
    }

    #[test]
    fn index_byte_layout_is_as_documented() {
        let id = ChunkId::of(b"x");
        let index = ImageIndex {
            size: 8192,
            chunk_size: 4096,
            entries: vec![ImageEntry::Zero, ImageEntry::Chunk(id)],
        };
        let b = index.encode().unwrap();
        let n = 8 + 4 + 8 + 4 + (4 + 32);
        assert_eq!(b.len(), 20 + n + 32);
        assert_eq!(&b[..8], b"VMMIMG\0\0");
        assert_eq!(b[8..12], 1u32.to_le_bytes());
        assert_eq!(b[12..20], (n as u64).to_le_bytes());
        let p = &b[20..20 + n];
        assert_eq!(p[0..8], 8192u64.to_le_bytes());
        assert_eq!(p[8..12], 4096u32.to_le_bytes());
        assert_eq!(p[12..20], 2u64.to_le_bytes());
        assert_eq!(p[20..24], 0u32.to_le_bytes());
        assert_eq!(p[24..28], 1u32.to_le_bytes());
        assert_eq!(p[28..60], id.as_bytes()[..]);
        assert_eq!(b[20 + n..], blake3::hash(p).as_bytes()[..]);
        assert_eq!(index.id().as_bytes()[..], b[20 + n..]);
    }

    #[test]
    fn format_detection_and_zero_check() {
        assert_eq!(
            SourceFormat::detect(b"QFI\xfb\0\0\0\x03"),
            SourceFormat::Qcow2
        );
        assert_eq!(SourceFormat::detect(b"KDMV\x01"), SourceFormat::Vmdk);
        assert_eq!(
            SourceFormat::detect(b"# Disk DescriptorFile\n"),
            SourceFormat::Vmdk
        );
        assert_eq!(SourceFormat::detect(b"\0\0"), SourceFormat::Raw);
        assert_eq!(SourceFormat::detect(b""), SourceFormat::Raw);
        assert!(is_zero(&[0; 33]));
        assert!(!is_zero(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
        let mut v = vec![0u8; 4096];
        v[4000] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
