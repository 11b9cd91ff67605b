//! Lazy guest memory restore: page faults on guest memory served from a memory
//! manifest and a chunk store with userfaultfd.
//!
//! [`LazyMemory::start`] registers fresh anonymous guest memory with a userfaultfd in
//! missing mode and starts one handler thread, `uffd-handler`. The first access to a
//! page, by a vCPU (KVM faults on the guest's behalf, which are kernel-mode accesses)
//! or by the VMM itself (virtio devices, snapshot code), blocks until the handler has
//! put the page's whole chunk in place:
//!
//! - a [`ChunkEntry::Zero`] chunk is mapped to the zero page (`UFFDIO_ZEROPAGE`);
//! - a stored chunk is handed to one of a few fetch workers (`uffd-fetch-<i>`,
//!   [`LazyOptions::fetch_threads`]), which reads it with [`ChunkRead::get_into`]
//!   (which checks its hash) into its own buffer, then copies it in atomically
//!   (`UFFDIO_COPY`, which wakes every thread waiting on it). Several faults, on
//!   different chunks, are thus served at once; faults on a chunk being fetched just
//!   wait for its copy.
//!
//! So restore costs time proportional to the number of regions, not memory size, and
//! only the chunks the guest touches are ever read. The handler thread never touches
//! guest memory itself (it would fault on it and wait for itself): all its writes go
//! through the userfaultfd ioctls. [`LazyMemory::fill_in_background`] optionally
//! fetches every remaining chunk, with at most half the workers, so faults find a free one.
//!
//! # When a chunk cannot be fetched
//!
//! If the store fails for a chunk (missing, corrupt, unreadable), the fetch is retried
//! a few times with exponential backoff ([`LazyOptions`]), unless the store retries
//! itself ([`ChunkRead::retries`]: the HTTP store), whose errors are final. If it still
//! fails, the
//! fault is **left unresolved** and a fatal error is recorded
//! ([`LazyMemory::fatal_error`], [`LazyMemory::fatal_event`]): the accessing thread
//! stays blocked rather than reading zeros or stale data, because silently corrupted
//! guest memory is worse than a stopped VM. The VMM is expected to notice the fatal
//! error and exit with it. Other chunks are still served meanwhile. After a fatal
//! error, [`LazyMemory::stop`] keeps the userfaultfd open (leaks it) so the blocked
//! threads never resume with wrong memory.
//!
//! # Limits
//!
//! - Guest memory must not be discarded (`MADV_DONTNEED`, balloon, free page
//!   reporting) while chunks are still missing: a discarded page of an unfetched
//!   chunk would be filled from the snapshot again. (Pages discarded after their chunk
//!   was placed correctly read back as zeros.)
//! - After [`LazyMemory::stop`] the ranges are no longer served: missing pages then
//!   read as zeros. Stop only once the guest and devices will not touch the memory
//!   again, or after [`LazyMemory::wait_complete`].

mod fetch;
mod region;
mod shared;
mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vmm_sys_util::eventfd::EventFd;

use self::region::{ChunkState, Region, validate};
pub use self::shared::{LazyOptions, UffdError};
use self::shared::{Origin, Shared};
use self::sys::{PAGE_SIZE, Uffd, UffdMsg};
use crate::store::ChunkRead;
use crate::vstate::memory::{ChunkEntry, RegionManifest};

/// Events read from the userfaultfd per `read`.
const MSGS_PER_READ: usize = 64;

/// Counters of a [`LazyMemory`] since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LazyStats {
    /// Page-fault events received.
    pub faults: u64,
    /// Faults on pages of chunks already placed (several threads faulting on one
    /// chunk at once, or a fault queued while its chunk was placed).
    pub repeat_faults: u64,
    /// Stored chunks read from the store and copied in (faults and background fill).
    pub chunks_fetched: u64,
    /// Of `chunks_fetched`, those fetched by the background fill.
    pub chunks_prefetched: u64,
    /// Zero chunks mapped to the zero page.
    pub chunks_zero: u64,
    /// Bytes copied into guest memory.
    pub bytes_copied: u64,
    /// Failed store reads (every try counts) and failed userfaultfd operations.
    pub errors: u64,
    /// Stored (non-zero) chunks in the manifest.
    pub data_chunks_total: u64,
    /// Stored chunks not yet placed in guest memory.
    pub data_chunks_remaining: u64,
    /// Total time the handler spent serving faults, in nanoseconds (from reading the
    /// event to the waking copy).
    pub fault_service_ns: u64,
}

/// Serves page faults on guest memory regions from a memory manifest and a chunk
/// store (see the [module documentation](self)).
#[derive(Debug)]
pub struct LazyMemory {
    shared: Arc<Shared>,
    /// Wakes the handler to look at `shared.stop` / `shared.fill`.
    ctl: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl LazyMemory {
    /// Starts serving faults on `regions`: for each guest memory region, its host
    /// address, its length and the [`RegionManifest`] of its contents, in chunks of
    /// `chunk_size` bytes from `store`. Uses [`LazyOptions::default`].
    ///
    /// Whatever the ranges held is discarded first; they are then registered with a
    /// userfaultfd in missing mode and a handler thread, `uffd-handler`, is started.
    /// Takes time proportional to the number of regions, not their size.
    ///
    /// # Safety
    ///
    /// Each range must be a private anonymous mapping (`MAP_PRIVATE |
    /// MAP_ANONYMOUS`) owned by the caller, that stays mapped while the returned
    /// value lives, and into which no Rust reference is held while its contents
    /// change (they are dropped here, then filled in on first access).
    pub unsafe fn start(
        regions: Vec<(usize, usize, RegionManifest)>,
        chunk_size: usize,
        store: Arc<dyn ChunkRead>,
    ) -> Result<Self, UffdError> {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { Self::start_with_options(regions, chunk_size, store, LazyOptions::default()) }
    }

    /// [`start`](Self::start) with explicit [`LazyOptions`].
    ///
    /// # Safety
    ///
    /// As for [`start`](Self::start).
    pub unsafe fn start_with_options(
        regions: Vec<(usize, usize, RegionManifest)>,
        chunk_size: usize,
        store: Arc<dyn ChunkRead>,
        options: LazyOptions,
    ) -> Result<Self, UffdError> {
        let regions = validate(regions, chunk_size)?;
        let uffd = Uffd::open().map_err(UffdError::Open)?;
        uffd.api().map_err(UffdError::Api)?;
        for r in &regions {
            // SAFETY: the caller guarantees the range is its own anonymous mapping
            // with no reference into it, so its contents may be dropped.
            unsafe { sys::discard(r.host, r.len) }.map_err(|source| UffdError::Discard {
                host_addr: r.host,
                len: r.len,
                source,
            })?;
            let ioctls =
                uffd.register_missing(r.host, r.len)
                    .map_err(|source| UffdError::Register {
                        host_addr: r.host,
                        len: r.len,
                        source,
                    })?;
            if ioctls & sys::NEEDED_RANGE_IOCTLS != sys::NEEDED_RANGE_IOCTLS {
                return Err(UffdError::MissingIoctls {
                    host_addr: r.host,
                    ioctls,
                });
            }
        }
        let data_chunks = regions
            .iter()
            .flat_map(|r| &r.chunks)
            .filter(|c| matches!(c, ChunkEntry::Chunk(_)))
            .count() as u64;
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(UffdError::EventFd);
        let shared = Arc::new(Shared {
            faults: AtomicU64::new(0),
            repeat_faults: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            chunks_prefetched: AtomicU64::new(0),
            chunks_zero: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            data_chunks_total: data_chunks,
            data_chunks_remaining: AtomicU64::new(data_chunks),
            fault_service_ns: AtomicU64::new(0),
            fatal: Mutex::new(None),
            fatal_evt: new_evt()?,
            stop: AtomicBool::new(false),
            fill: AtomicBool::new(false),
        });
        let ctl = new_evt()?;
        let uffd = Arc::new(uffd);
        let pool = fetch::Pool::start(
            options.fetch_threads,
            Arc::clone(&uffd),
            store,
            Arc::clone(&shared),
            options,
            chunk_size,
        )
        .map_err(UffdError::Spawn)?;
        let handler = Handler {
            uffd: Some(uffd),
            ctl: ctl.try_clone().map_err(UffdError::EventFd)?,
            regions,
            chunk_size,
            pool,
            shared: Arc::clone(&shared),
            fill_limit: options.fetch_threads.div_ceil(2).max(1),
            fills_in_flight: 0,
            fill_cursor: (0, 0),
            fill_exhausted: false,
        };
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || handler.run())
            .map_err(UffdError::Spawn)?;
        Ok(LazyMemory {
            shared,
            ctl,
            thread: Some(thread),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> LazyStats {
        stats_of(&self.shared)
    }

    /// A handle that reads the counters and starts the background fill from another
    /// thread (e.g. once a prefetcher has warmed a local chunk cache).
    pub fn handle(&self) -> Result<LazyHandle, UffdError> {
        Ok(LazyHandle {
            shared: Arc::clone(&self.shared),
            ctl: self.ctl.try_clone().map_err(UffdError::EventFd)?,
        })
    }

    /// The first fatal error, if any: a chunk that could not be fetched (its fault
    /// is left unresolved) or a failed userfaultfd operation. The VMM should stop
    /// the VM and exit with this message.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An eventfd that becomes readable when a fatal error is recorded, for the
    /// VMM's event loop.
    pub fn fatal_event(&self) -> &EventFd {
        &self.shared.fatal_evt
    }

    /// Asks the handler to fetch every stored chunk not yet placed, with at most half
    /// the fetch workers (faults keep the others). Zero chunks need no
    /// filling: once every stored chunk is placed, the memory reads correctly even
    /// without the handler.
    pub fn fill_in_background(&self) {
        self.shared.fill.store(true, Ordering::Release);
        self.kick();
    }

    /// Whether every stored chunk is in guest memory (then [`stop`](Self::stop)
    /// loses nothing).
    pub fn is_complete(&self) -> bool {
        self.shared.data_chunks_remaining.load(Ordering::Acquire) == 0
    }

    /// Waits until [`is_complete`](Self::is_complete), a fatal error, or `timeout`;
    /// returns whether it is complete.
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_complete() {
                return true;
            }
            if self.shared.is_fatal() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the handler thread and waits for it; returns the final counters.
    ///
    /// The registrations end with it (pages still missing then read as zeros),
    /// except after a fatal error: the userfaultfd is then leaked so that threads
    /// blocked on the failed chunk stay blocked until the process exits.
    pub fn stop(mut self) -> LazyStats {
        self.shutdown();
        self.stats()
    }

    fn kick(&self) {
        if let Err(e) = self.ctl.write(1) {
            error!("cannot wake the userfaultfd handler: {e}");
        }
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.shared.stop.store(true, Ordering::Release);
            self.kick();
            if thread.join().is_err() {
                error!("the userfaultfd handler thread panicked");
            }
        }
    }
}

/// The counters of `s` so far.
fn stats_of(s: &Shared) -> LazyStats {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    LazyStats {
        faults: get(&s.faults),
        repeat_faults: get(&s.repeat_faults),
        chunks_fetched: get(&s.chunks_fetched),
        chunks_prefetched: get(&s.chunks_prefetched),
        chunks_zero: get(&s.chunks_zero),
        bytes_copied: get(&s.bytes_copied),
        errors: get(&s.errors),
        data_chunks_total: s.data_chunks_total,
        data_chunks_remaining: get(&s.data_chunks_remaining),
        fault_service_ns: get(&s.fault_service_ns),
    }
}

/// Reads a [`LazyMemory`]'s counters and starts its background fill from any thread
/// ([`LazyMemory::handle`]).
#[derive(Debug)]
pub struct LazyHandle {
    shared: Arc<Shared>,
    ctl: EventFd,
}

impl LazyHandle {
    /// The counters so far.
    pub fn stats(&self) -> LazyStats {
        stats_of(&self.shared)
    }

    /// Same as [`LazyMemory::fill_in_background`].
    pub fn fill_in_background(&self) {
        self.shared.fill.store(true, Ordering::Release);
        if let Err(e) = self.ctl.write(1) {
            error!("cannot wake the userfaultfd handler: {e}");
        }
    }

    /// Whether every stored chunk is in guest memory.
    pub fn is_complete(&self) -> bool {
        self.shared.data_chunks_remaining.load(Ordering::Acquire) == 0
    }
}

impl Drop for LazyMemory {
    /// Stops the handler like [`LazyMemory::stop`].
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The handler thread's state.
struct Handler {
    /// `None` only once leaked or closed in `Drop`. Shared with the fetch workers.
    uffd: Option<Arc<Uffd>>,
    ctl: EventFd,
    regions: Vec<Region>,
    chunk_size: usize,
    /// Fetch workers: the handler never writes guest memory itself.
    pool: fetch::Pool,
    shared: Arc<Shared>,
    /// Background-fill chunks allowed in the workers at once (the rest of the workers
    /// stay free for faults).
    fill_limit: usize,
    fills_in_flight: usize,
    /// Next (region, chunk) the background fill looks at.
    fill_cursor: (usize, usize),
    fill_exhausted: bool,
}

impl Drop for Handler {
    /// Closes the userfaultfd, or leaks it after a fatal error or a panic so that
    /// threads blocked on unresolved faults never resume with wrong memory.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared
                .set_fatal("the userfaultfd handler thread panicked".into());
        }
        // The workers finish first: none may still copy into guest memory.
        self.pool.shutdown();
        if let Some(uffd) = self.uffd.take()
            && self.shared.is_fatal()
        {
            // Never closed: the registrations stay. The workers are gone, so this
            // is the only reference.
            match Arc::try_unwrap(uffd) {
                Ok(uffd) => uffd.leak(),
                Err(shared) => std::mem::forget(shared),
            }
        }
    }
}

impl Handler {
    fn uffd(&self) -> &Uffd {
        self.uffd
            .as_ref()
            .expect("the userfaultfd is open while running")
    }

    fn run(mut self) {
        let mut msgs = [UffdMsg::default(); MSGS_PER_READ];
        while !self.shared.stop.load(Ordering::Acquire) {
            let filling = !self.fill_exhausted
                && self.fills_in_flight < self.fill_limit
                && self.shared.fill.load(Ordering::Acquire);
            let ready = sys::poll_readable(
                [
                    self.uffd().raw_fd(),
                    self.ctl.as_raw_fd(),
                    fetch::done_fd(&self.pool),
                ],
                if filling { 0 } else { -1 },
            );
            let [faults, ctl, done] = match ready {
                Ok(r) => r,
                Err(e) => {
                    self.shared
                        .set_fatal(format!("cannot poll the userfaultfd: {e}"));
                    return;
                }
            };
            if ctl {
                // Only a wake-up: the flags in `shared` say what to do.
                let _ = self.ctl.read();
            }
            if done {
                let _ = self.pool.done_evt.read();
                self.finish_jobs();
            }
            if faults {
                if let Err(e) = self.drain(&mut msgs) {
                    self.shared
                        .set_fatal(format!("cannot read userfaultfd events: {e}"));
                    return;
                }
            } else if filling {
                self.fill_one();
            }
        }
    }

    /// Serves every pending event.
    fn drain(&mut self, msgs: &mut [UffdMsg]) -> io::Result<()> {
        loop {
            let n = self.uffd().read_events(msgs)?;
            if n == 0 {
                return Ok(());
            }
            for msg in &msgs[..n] {
                if msg.event == sys::UFFD_EVENT_PAGEFAULT {
                    self.fault(msg.arg1 as usize, msg.arg0);
                } else {
                    warn!("ignoring unexpected userfaultfd event {:#x}", msg.event);
                }
            }
        }
    }

    /// The region and chunk index of host address `addr`.
    fn locate(&self, addr: usize) -> Option<(usize, usize)> {
        let i = self
            .regions
            .partition_point(|r| r.host <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        (addr - r.host < r.len).then(|| (i, (addr - r.host) / self.chunk_size))
    }

    fn fault(&mut self, addr: usize, flags: u64) {
        let started = Instant::now();
        Shared::add(&self.shared.faults, 1);
        let Some((ri, ci)) = self.locate(addr) else {
            Shared::add(&self.shared.errors, 1);
            error!("userfaultfd fault at {addr:#x} outside every registered region");
            return;
        };
        match self.regions[ri].state[ci] {
            ChunkState::Pending => self.place_chunk(ri, ci, Origin::Fault),
            ChunkState::Fetching => Shared::add(&self.shared.repeat_faults, 1),
            ChunkState::Placed => {
                // Usually the page is there and the faulting thread only needs a
                // wake-up; if it was discarded since, the zero page is right.
                Shared::add(&self.shared.repeat_faults, 1);
                let page = addr & !(PAGE_SIZE - 1);
                if let Err(e) = self.uffd().place(page, PAGE_SIZE, None) {
                    self.io_error(e, page, ri, ci);
                }
            }
            ChunkState::Failed => {
                debug!("fault at {addr:#x} (flags {flags:#x}) on a chunk that failed: left blocked")
            }
        }
        let ns = started.elapsed().as_nanos() as u64;
        Shared::add(&self.shared.fault_service_ns, ns);
    }

    /// Puts chunk `ci` of region `ri` in place: a zero chunk here and now, a stored
    /// one through a fetch worker.
    fn place_chunk(&mut self, ri: usize, ci: usize, origin: Origin) {
        let r = &self.regions[ri];
        let off = ci * self.chunk_size;
        let len = self.chunk_size.min(r.len - off);
        let dst = r.host + off;
        let gpa = r.gpa + off as u64;
        match r.chunks[ci] {
            ChunkEntry::Zero => {
                Shared::add(&self.shared.chunks_zero, 1);
                match self.uffd().place(dst, len, None) {
                    Ok(_) => self.regions[ri].state[ci] = ChunkState::Placed,
                    Err(e) => self.io_error(e, dst, ri, ci),
                }
            }
            ChunkEntry::Chunk(id) => {
                self.regions[ri].state[ci] = ChunkState::Fetching;
                if origin == Origin::Fill {
                    self.fills_in_flight += 1;
                }
                self.pool.submit(fetch::Job {
                    ri,
                    ci,
                    id,
                    dst,
                    len,
                    gpa,
                    origin,
                });
            }
        }
    }

    /// Records the chunks the workers have finished.
    fn finish_jobs(&mut self) {
        while let Some(done) = self.pool.try_done() {
            if done.origin == Origin::Fill {
                self.fills_in_flight = self.fills_in_flight.saturating_sub(1);
            }
            match done.result {
                Ok(()) => self.regions[done.ri].state[done.ci] = ChunkState::Placed,
                Err(fetch::Failure::Fetch(msg)) => {
                    self.regions[done.ri].state[done.ci] = ChunkState::Failed;
                    self.shared.set_fatal(msg);
                }
                Err(fetch::Failure::Place(e)) => self.io_error(e, done.dst, done.ri, done.ci),
            }
        }
    }

    /// Handles a failed copy or zero-page ioctl at `dst` in chunk `ci` of `ri`.
    fn io_error(&mut self, e: io::Error, dst: usize, ri: usize, ci: usize) {
        Shared::add(&self.shared.errors, 1);
        if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) {
            // The mapping or the process is going away: nothing can wait on it.
            warn!("guest memory at {dst:#x} is gone ({e}); background fill stopped");
            self.regions[ri].state[ci] = ChunkState::Failed;
            self.fill_exhausted = true;
            return;
        }
        self.regions[ri].state[ci] = ChunkState::Failed;
        self.shared.set_fatal(format!(
            "cannot place guest memory at host address {dst:#x} (guest {:#x}): {e}",
            self.regions[ri].gpa + (dst - self.regions[ri].host) as u64
        ));
    }

    /// Places the next stored chunk not yet placed, if any.
    fn fill_one(&mut self) {
        let (mut ri, mut ci) = self.fill_cursor;
        while ri < self.regions.len() {
            let r = &self.regions[ri];
            if ci >= r.chunks.len() {
                ri += 1;
                ci = 0;
                continue;
            }
            let todo =
                matches!(r.chunks[ci], ChunkEntry::Chunk(_)) && r.state[ci] == ChunkState::Pending;
            ci += 1;
            if todo {
                self.fill_cursor = (ri, ci);
                self.place_chunk(ri, ci - 1, Origin::Fill);
                return;
            }
        }
        self.fill_cursor = (ri, ci);
        self.fill_exhausted = true;
    }
}
