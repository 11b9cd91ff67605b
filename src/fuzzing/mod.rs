//! Fuzz harnesses: one function per parser of untrusted bytes, shared by the cargo-fuzz
//! targets in `fuzz/` (nightly, coverage-guided) and the corpus replay test
//! `tests/fuzz_corpus.rs` (stable, `cargo test`).
//!
//! Every harness takes arbitrary bytes and panics only when a property of the code under
//! test is violated — never because the input is malformed. Beyond "does not panic" they
//! check what the parser promises: a file that decodes re-encodes to the same bytes,
//! decoded chunks hash to their id, the virtio device writes guest memory only inside
//! the buffers the driver made device-writable, and so on (see each function).
//! Allocation limits are enforced by the fuzzer (`-malloc_limit_mb=64`, docs/TESTING.md).
//!
//! [`TARGETS`] lists them by the name of their fuzz target and corpus directory.

mod api;
mod files;
mod repo;
pub mod seeds;
mod virtio;

pub use api::api_http;
pub use files::{chunk_codec, image_index, memory_manifest, state_file, working_set};
pub use repo::{repo_catalogue, repo_export};
pub use virtio::{virtio_blk, virtio_mmio};

/// A harness: feeds one input to the code under test and checks its properties.
pub type Harness = fn(&[u8]);

/// Every fuzz target: (name, harness). The name is that of the cargo-fuzz target and of
/// its corpus directory `fuzz/corpus/<name>`.
pub const TARGETS: &[(&str, Harness)] = &[
    ("virtio_blk", virtio_blk),
    ("virtio_mmio", virtio_mmio),
    ("state_file", state_file),
    ("memory_manifest", memory_manifest),
    ("chunk_codec", chunk_codec),
    ("image_index", image_index),
    ("repo_catalogue", repo_catalogue),
    ("repo_export", repo_export),
    ("working_set", working_set),
    ("api_http", api_http),
];

/// Reads fuzz input as a stream of fields; past the end every field reads as zero.
pub(crate) struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// The next `n` bytes (fewer at the end).
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A part of the input prefixed by its u16 length.
    pub(crate) fn part(&mut self) -> &'a [u8] {
        let n = self.u16();
        self.bytes(n.into())
    }
}

/// Frames `payload` as a checksummed container of `kind`, so that harnesses reach the
/// payload decoder past the checksum (which random bytes never match).
pub(crate) fn frame(kind: &crate::formats::FileKind, payload: &[u8]) -> Vec<u8> {
    let mut out = kind.magic.to_vec();
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    out
}
