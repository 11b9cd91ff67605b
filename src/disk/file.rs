//! A raw disk image in a local file or block device, accessed with pread/pwrite.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{BackendIdentity, BlockBackend, DiskError, Result, SECTOR_SIZE, check_range};

/// Alignment of offsets, lengths and memory buffers for `O_DIRECT` I/O.
pub const DIRECT_ALIGN: usize = 4096;
/// Largest single I/O issued through the `O_DIRECT` bounce buffer.
const DIRECT_CHUNK: usize = 1 << 20;

/// A raw disk image file (or block device).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Bounce buffer for `O_DIRECT` I/O; `None` for buffered I/O.
    direct: Option<Mutex<AlignedBuf>>,
    /// Stamp taken at open, used if a later `fstat` fails.
    open_stamp: String,
}

impl FileBackend {
    /// Opens the raw image at `path`.
    ///
    /// With `direct`, the file is opened with `O_DIRECT` (bypassing the host page cache) and
    /// its size must be a multiple of [`DIRECT_ALIGN`]; I/O then goes through an aligned
    /// bounce buffer. Errors are one-line messages naming the path.
    pub fn open(path: impl AsRef<Path>, read_only: bool, direct: bool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let open_err = |source: std::io::Error| DiskError::Open {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DiskError::NotFound { path: path.clone() }
            } else {
                open_err(e)
            }
        })?;
        if meta.is_dir() {
            return Err(DiskError::IsDirectory { path });
        }
        let ft = meta.file_type();
        if !ft.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&ft) {
            return Err(DiskError::NotAFile { path });
        }

        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(&path).map_err(open_err)?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let multiple = if direct {
            DIRECT_ALIGN as u64
        } else {
            SECTOR_SIZE
        };
        if !size.is_multiple_of(multiple) {
            return Err(DiskError::BadSize {
                path,
                size,
                multiple,
            });
        }
        let open_stamp = stamp_of(&file.metadata().map_err(open_err)?);
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        Ok(Self {
            file,
            path,
            size,
            read_only,
            direct: direct.then(|| Mutex::new(AlignedBuf::default())),
            open_stamp,
        })
    }

    /// The (canonicalized) path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn direct_read(&self, bounce: &Mutex<AlignedBuf>, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut bounce = bounce.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = 0;
        while done < buf.len() {
            let (start, skip, want, span) = direct_span(offset + done as u64, buf.len() - done);
            let b = bounce.get(span);
            self.file.read_exact_at(b, start).map_err(io_err("read"))?;
            buf[done..done + want].copy_from_slice(&b[skip..skip + want]);
            done += want;
        }
        Ok(())
    }

    fn direct_write(&self, bounce: &Mutex<AlignedBuf>, buf: &[u8], offset: u64) -> Result<()> {
        let mut bounce = bounce.lock().unwrap_or_else(|e| e.into_inner());
        let mut done = 0;
        while done < buf.len() {
            let (start, skip, want, span) = direct_span(offset + done as u64, buf.len() - done);
            let b = bounce.get(span);
            // Read-modify-write the partially covered blocks at either edge.
            if skip != 0 {
                self.file
                    .read_exact_at(&mut b[..DIRECT_ALIGN], start)
                    .map_err(io_err("read"))?;
            }
            if !(skip + want).is_multiple_of(DIRECT_ALIGN) && (span > DIRECT_ALIGN || skip == 0) {
                let last = span - DIRECT_ALIGN;
                self.file
                    .read_exact_at(&mut b[last..], start + last as u64)
                    .map_err(io_err("read"))?;
            }
            b[skip..skip + want].copy_from_slice(&buf[done..done + want]);
            self.file.write_all_at(b, start).map_err(io_err("write"))?;
            done += want;
        }
        Ok(())
    }
}

/// Splits the next direct-I/O step of an access at `pos` with `remaining` bytes into
/// (aligned start, skip into the block, bytes of the access covered, aligned span length).
fn direct_span(pos: u64, remaining: usize) -> (u64, usize, usize, usize) {
    let align = DIRECT_ALIGN as u64;
    let start = pos - pos % align;
    let skip = (pos - start) as usize;
    let want = remaining.min(DIRECT_CHUNK - skip);
    let span = (skip + want).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    (start, skip, want, span)
}

fn io_err(op: &'static str) -> impl Fn(std::io::Error) -> DiskError {
    move |source| DiskError::Io { op, source }
}

fn stamp_of(meta: &std::fs::Metadata) -> String {
    format!(
        "dev={}:ino={}:mtime={}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.size)?;
        match &self.direct {
            Some(bounce) => self.direct_read(bounce, buf, offset),
            None => self.file.read_exact_at(buf, offset).map_err(io_err("read")),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len(), self.size)?;
        match &self.direct {
            Some(bounce) => self.direct_write(bounce, buf, offset),
            None => self.file.write_all_at(buf, offset).map_err(io_err("write")),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(io_err("flush"))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn identity(&self) -> BackendIdentity {
        let stamp = self
            .file
            .metadata()
            .map(|m| stamp_of(&m))
            .unwrap_or_else(|_| self.open_stamp.clone());
        BackendIdentity {
            kind: "file".into(),
            location: self.path.display().to_string(),
            size: self.size,
            stamp: Some(stamp),
            inner: None,
        }
    }
}

/// One `DIRECT_ALIGN`-aligned block of memory.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct AlignedBlock([u8; DIRECT_ALIGN]);

/// A growable buffer whose start is `DIRECT_ALIGN`-aligned, as `O_DIRECT` requires.
#[derive(Default)]
struct AlignedBuf(Vec<AlignedBlock>);

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} blocks)", self.0.len())
    }
}

impl AlignedBuf {
    /// The first `len` bytes (a multiple of `DIRECT_ALIGN`), growing the buffer if needed.
    fn get(&mut self, len: usize) -> &mut [u8] {
        let blocks = len.div_ceil(DIRECT_ALIGN);
        if self.0.len() < blocks {
            self.0.resize(blocks, AlignedBlock([0; DIRECT_ALIGN]));
        }
        let total = self.0.len() * DIRECT_ALIGN;
        // SAFETY: `AlignedBlock` is `repr(C)` around a `u8` array of exactly its size
        // (4096-byte alignment, 4096-byte size: no padding), so the vector's storage is
        // `total` initialized, contiguous bytes. The slice borrows `self` mutably, so no other
        // access aliases it while it lives.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), total) };
        &mut bytes[..len.min(total)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn image(dir: &TempDir, name: &str, size: usize) -> PathBuf {
        let p = dir.as_path().join(name);
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = TempDir::new().unwrap();
        let missing = dir.as_path().join("missing.img");
        let e = FileBackend::open(&missing, true, false).unwrap_err();
        assert!(matches!(e, DiskError::NotFound { .. }));
        assert!(e.to_string().contains("missing.img"), "{e}");

        let e = FileBackend::open(dir.as_path(), true, false).unwrap_err();
        assert!(matches!(e, DiskError::IsDirectory { .. }), "{e}");

        let odd = image(&dir, "odd.img", 1000);
        let e = FileBackend::open(&odd, false, false).unwrap_err();
        assert!(matches!(e, DiskError::BadSize { size: 1000, .. }), "{e}");
        assert!(e.to_string().contains("odd.img") && !e.to_string().contains('\n'));
    }

    #[test]
    fn buffered_read_write_flush_identity() {
        let dir = TempDir::new().unwrap();
        let p = image(&dir, "d.img", 4096);
        let f = FileBackend::open(&p, false, false).unwrap();
        assert_eq!(f.size(), 4096);
        let mut b = [0u8; 4];
        f.read_at(&mut b, 251).unwrap();
        assert_eq!(b, [0, 1, 2, 3]);
        f.write_at(&[9; 4], 1000).unwrap();
        f.flush().unwrap();
        f.read_at(&mut b, 1000).unwrap();
        assert_eq!(b, [9; 4]);
        assert!(matches!(
            f.read_at(&mut b, 4094),
            Err(DiskError::OutOfRange { .. })
        ));
        let id = f.identity();
        assert_eq!((id.kind.as_str(), id.size), ("file", 4096));
        assert!(id.stamp.as_deref().unwrap().starts_with("dev="));
        assert_eq!(f.identity(), id, "stable while unchanged");

        let ro = FileBackend::open(&p, true, false).unwrap();
        assert!(ro.read_only());
        assert!(matches!(ro.write_at(&b, 0), Err(DiskError::ReadOnly)));
        ro.flush().unwrap();
    }

    #[test]
    fn direct_io_unaligned_access() {
        let dir = TempDir::new().unwrap();
        let p = image(&dir, "direct.img", 3 * DIRECT_ALIGN + DIRECT_CHUNK);
        let f = match FileBackend::open(&p, false, true) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipping: O_DIRECT unavailable here: {e}");
                return;
            }
        };
        let mut shadow = std::fs::read(&p).unwrap();
        // Unaligned start and end, spanning blocks, and one longer than a chunk.
        for &(off, len) in &[
            (512usize, 512usize),
            (4000, 200),
            (100, DIRECT_CHUNK + 5000),
            (0, 4096),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + off) as u8).collect();
            f.write_at(&data, off as u64).unwrap();
            shadow[off..off + len].copy_from_slice(&data);
            let mut back = vec![0u8; len];
            f.read_at(&mut back, off as u64).unwrap();
            assert_eq!(back, data, "at {off}+{len}");
        }
        let mut all = vec![0u8; shadow.len()];
        f.read_at(&mut all, 0).unwrap();
        assert!(all == shadow, "whole image matches");

        let bad = image(&dir, "bad-direct.img", 512);
        let e = FileBackend::open(&bad, true, true).unwrap_err();
        assert!(
            matches!(e, DiskError::BadSize { multiple: 4096, .. }),
            "{e}"
        );
    }

    #[test]
    fn direct_span_math() {
        assert_eq!(direct_span(0, 4096), (0, 0, 4096, 4096));
        assert_eq!(direct_span(4097, 10), (4096, 1, 10, 4096));
        assert_eq!(direct_span(4000, 200), (0, 4000, 200, 8192));
        let (_, skip, want, span) = direct_span(100, 2 * DIRECT_CHUNK);
        assert_eq!((skip, want, span), (100, DIRECT_CHUNK - 100, DIRECT_CHUNK));
    }
}
