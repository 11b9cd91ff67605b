//! What the parts of lazy memory restore share: the errors of starting it, its options, and
//! the state shared by `LazyMemory`, its handler thread and the fetch workers.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use log::error;
use vmm_sys_util::eventfd::EventFd;

use super::sys::PAGE_SIZE;
use crate::store::MAX_CHUNK_LEN;
use crate::util::lock;

/// Errors of starting lazy memory restore.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No userfaultfd could be opened (neither the system call nor
    /// `/dev/userfaultfd`).
    #[error("cannot open a userfaultfd")]
    Open(#[source] io::Error),
    /// The `UFFDIO_API` handshake failed.
    #[error("userfaultfd API handshake failed")]
    Api(#[source] io::Error),
    /// The chunk size is not usable.
    #[error(
        "chunk size {size} is invalid: it must be a non-zero multiple of {PAGE_SIZE} \
         and at most {MAX_CHUNK_LEN}"
    )]
    InvalidChunkSize {
        /// The rejected size.
        size: usize,
    },
    /// A region is malformed, overlaps another, or does not match its manifest.
    #[error("guest memory region {index} at host address {host_addr:#x}: {detail}")]
    InvalidRegion {
        /// Index of the region in the list given to `LazyMemory::start`.
        index: usize,
        /// Its host address.
        host_addr: usize,
        /// What is wrong.
        detail: String,
    },
    /// Dropping the previous contents of a region failed.
    #[error("cannot discard the contents of {len:#x} bytes at host address {host_addr:#x}")]
    Discard {
        /// Start of the range.
        host_addr: usize,
        /// Its length.
        len: usize,
        /// The `madvise` error.
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_REGISTER` failed (for instance on memory that is not anonymous).
    #[error("cannot register {len:#x} bytes at host address {host_addr:#x} with userfaultfd")]
    Register {
        /// Start of the range.
        host_addr: usize,
        /// Its length.
        len: usize,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },
    /// The kernel does not offer copy, zero-page and wake on a registered range.
    #[error(
        "userfaultfd range at host address {host_addr:#x} lacks copy/zeropage/wake \
         (ioctls {ioctls:#x})"
    )]
    MissingIoctls {
        /// Start of the range.
        host_addr: usize,
        /// The ioctl bits the kernel reported.
        ioctls: u64,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The handler thread could not be started.
    #[error("cannot start the userfaultfd handler thread")]
    Spawn(#[source] io::Error),
}

/// Tuning of `LazyMemory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LazyOptions {
    /// Tries per chunk before a fetch error becomes fatal (at least 1); one try when the
    /// store retries itself (`ChunkRead::retries`).
    pub fetch_attempts: u32,
    /// Wait before the second try; doubled before each further one.
    pub retry_backoff: Duration,
    /// Chunks fetched and placed at once (worker threads); at least 1.
    pub fetch_threads: usize,
}

impl Default for LazyOptions {
    /// 4 tries, 20 + 40 + 80 ms of waiting: rides out transient store errors, gives
    /// up on a missing chunk in well under a second.
    fn default() -> Self {
        LazyOptions {
            fetch_attempts: 4,
            retry_backoff: Duration::from_millis(20),
            fetch_threads: 4,
        }
    }
}

/// State shared by `LazyMemory`, its handler thread and the fetch workers.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) faults: AtomicU64,
    pub(super) repeat_faults: AtomicU64,
    pub(super) chunks_fetched: AtomicU64,
    pub(super) chunks_prefetched: AtomicU64,
    pub(super) chunks_zero: AtomicU64,
    pub(super) bytes_copied: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) data_chunks_total: u64,
    pub(super) data_chunks_remaining: AtomicU64,
    pub(super) fault_service_ns: AtomicU64,
    /// The first fatal error.
    pub(super) fatal: Mutex<Option<String>>,
    /// Signalled when `fatal` is set.
    pub(super) fatal_evt: EventFd,
    /// The handler must exit.
    pub(super) stop: AtomicBool,
    /// The handler should fill remaining chunks when idle.
    pub(super) fill: AtomicBool,
}

impl Shared {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn is_fatal(&self) -> bool {
        lock(&self.fatal).is_some()
    }

    /// Records `msg` as the fatal error, unless one is already recorded.
    pub(super) fn set_fatal(&self, msg: String) {
        error!("lazy memory restore: {msg}");
        let mut fatal = lock(&self.fatal);
        if fatal.is_none() {
            *fatal = Some(msg);
            if let Err(e) = self.fatal_evt.write(1) {
                error!("cannot signal the lazy memory fatal error eventfd: {e}");
            }
        }
    }
}

/// Why a chunk is being placed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Fault,
    Fill,
}
