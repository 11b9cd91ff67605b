//! Test helpers for the unit tests of every module, and (with the `test-utils` feature,
//! which the crate's dev-dependency on itself turns on) for the integration tests and
//! benches: a temp directory removed on drop, a deterministic byte generator and an
//! anonymous memory mapping.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh, empty directory, removed on drop (kept when `VMM_TEST_KEEP_TMP` is set).
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh empty directory under the system temp dir whose name contains `tag`.
    pub fn new(tag: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// Creates a fresh empty directory under `base` (created if needed) whose name
    /// contains `tag`.
    pub fn new_in(base: &Path, tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!(
            "vmm-test-{tag}-{}-{n}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("VMM_TEST_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The deterministic generator of the unit tests, integration tests and benches:
/// xorshift64* (Vigna), enough for test data and random kill points, reproducible from its
/// seed (`x ^= x >> 12; x ^= x << 25; x ^= x >> 27`, output `x * 0x2545f4914f6cdd1d`).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose state starts at `seed | 1` (the state must not be zero).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Seeded from the environment variable `var` if set, else from the clock; prints the
    /// seed as `var=SEED` (with `what`), so that a failing run can be replayed.
    pub fn from_env_or_clock(var: &str, what: &str) -> Self {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            })
            | 1;
        eprintln!("  {what}: {var}={seed}");
        Rng(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A duration uniformly in [0, max), in whole microseconds.
    pub fn duration_below(&mut self, max: std::time::Duration) -> std::time::Duration {
        let us = max.as_micros().max(1) as u64;
        std::time::Duration::from_micros(self.next() % us)
    }

    /// Fills `buf` with the next numbers, little-endian; one more number is drawn for the
    /// tail (cut to fit, and drawn even when there is no tail: the sequence the recorded
    /// seeds of the tests replay).
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut it = buf.chunks_exact_mut(8);
        for w in &mut it {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
        let rem = it.into_remainder();
        let v = self.next().to_le_bytes();
        let n = rem.len();
        rem.copy_from_slice(&v[..n]);
    }

    /// `len` bytes of [`Rng::fill`].
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// `len` random bytes for `seed`; nearby seeds (0, 1, 2 …) give unrelated bytes (the seed
/// is multiplied by the golden ratio first).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).bytes(len)
}

/// `len` bytes of private anonymous memory (`MAP_NORESERVE`), untouched until used (its
/// first touch costs a page fault), unmapped when dropped.
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes; panics if mmap fails.
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {len} bytes");
        Mapping {
            addr: p as usize,
            len,
        }
    }

    /// Its host address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: mmap refuses an empty mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole mapping.
    pub fn slice(&mut self) -> &mut [u8] {
        // SAFETY: we own the mapping of that length, and `&mut self` makes this the
        // only reference into it.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// Keeps the mapping forever (a thread may stay blocked on it).
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
