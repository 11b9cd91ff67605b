//! The handler's fetch workers: several stored chunks fetched and placed at once, so a
//! slow store (HTTP) serves faults from several vCPUs, and the background fill, in
//! parallel. The handler thread keeps reading fault events and hands each missing chunk
//! to a worker; the worker reads the chunk from the store (with retries), copies it in
//! with `UFFDIO_COPY` (which wakes every thread waiting on the chunk) and reports back.

use std::io;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};
use vmm_sys_util::eventfd::EventFd;

use super::shared::{LazyOptions, Origin, Shared};
use super::sys::Uffd;
use crate::store::{ChunkId, ChunkRead};
use crate::util::error_chain;

/// A chunk to fetch and place.
pub(super) struct Job {
    pub ri: usize,
    pub ci: usize,
    pub id: ChunkId,
    pub dst: usize,
    pub len: usize,
    pub gpa: u64,
    pub origin: Origin,
}

/// Why a job failed.
pub(super) enum Failure {
    /// The store did not deliver the chunk after every try: the message for the fatal
    /// error.
    Fetch(String),
    /// The copy ioctl failed.
    Place(io::Error),
}

/// A finished job.
pub(super) struct Done {
    pub ri: usize,
    pub ci: usize,
    pub dst: usize,
    pub origin: Origin,
    pub result: Result<(), Failure>,
}

/// The workers and their queues.
pub(super) struct Pool {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// Readable when a job has finished.
    pub done_evt: EventFd,
    threads: Vec<JoinHandle<()>>,
}

/// What every worker shares.
struct Ctx {
    uffd: Arc<Uffd>,
    store: Arc<dyn ChunkRead>,
    shared: Arc<Shared>,
    options: LazyOptions,
    chunk_size: usize,
    jobs: Mutex<Receiver<Job>>,
    done: Sender<Done>,
    done_evt: EventFd,
}

impl Pool {
    /// Starts `n` (at least 1) workers named `uffd-fetch-<i>`.
    pub fn start(
        n: usize,
        uffd: Arc<Uffd>,
        store: Arc<dyn ChunkRead>,
        shared: Arc<Shared>,
        options: LazyOptions,
        chunk_size: usize,
    ) -> io::Result<Pool> {
        let (job_tx, job_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let done_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let ctx = Arc::new(Ctx {
            uffd,
            store,
            shared,
            options,
            chunk_size,
            jobs: Mutex::new(job_rx),
            done: done_tx,
            done_evt: done_evt.try_clone()?,
        });
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let ctx = Arc::clone(&ctx);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("uffd-fetch-{i}"))
                    .spawn(move || worker(&ctx))?,
            );
        }
        Ok(Pool {
            jobs: Some(job_tx),
            done: done_rx,
            done_evt,
            threads,
        })
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) {
        if let Some(tx) = &self.jobs
            && tx.send(job).is_err()
        {
            error!("the userfaultfd fetch workers are gone");
        }
    }

    /// Takes the next finished job, if any.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }

    /// Lets the workers finish their current job and waits for them.
    pub fn shutdown(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("a userfaultfd fetch worker panicked");
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(ctx: &Ctx) {
    let mut buf = vec![0u8; ctx.chunk_size];
    loop {
        let job = {
            let rx = ctx.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let result = run_job(ctx, &job, &mut buf[..job.len]);
        let done = Done {
            ri: job.ri,
            ci: job.ci,
            dst: job.dst,
            origin: job.origin,
            result,
        };
        if ctx.done.send(done).is_err() {
            return;
        }
        if let Err(e) = ctx.done_evt.write(1) {
            error!("cannot signal a finished chunk fetch: {e}");
        }
    }
}

fn run_job(ctx: &Ctx, job: &Job, buf: &mut [u8]) -> Result<(), Failure> {
    let s = &ctx.shared;
    fetch(ctx, &job.id, buf).map_err(|e| {
        Failure::Fetch(format!(
            "cannot fetch chunk {} for guest address {:#x} (host {:#x}): {e}",
            job.id, job.gpa, job.dst
        ))
    })?;
    // Counters are updated before the ioctl that wakes the faulting thread, so that
    // thread sees them.
    Shared::add(&s.chunks_fetched, 1);
    if job.origin == Origin::Fill {
        Shared::add(&s.chunks_prefetched, 1);
    }
    s.data_chunks_remaining.fetch_sub(1, Ordering::AcqRel);
    Shared::add(&s.bytes_copied, job.len as u64);
    let placed = ctx.uffd.place(job.dst, job.len, Some(buf));
    let bytes = *placed.as_ref().unwrap_or(&0);
    // Pages found already present were not copied.
    s.bytes_copied
        .fetch_sub((job.len - bytes) as u64, Ordering::Relaxed);
    placed.map(|_| ()).map_err(Failure::Place)
}

/// Reads chunk `id` into `buf`, retrying with backoff unless the store retries itself
/// (one retrying layer: docs/DESIGN.md); the error message carries the last error's chain.
fn fetch(ctx: &Ctx, id: &ChunkId, buf: &mut [u8]) -> Result<(), String> {
    let attempts = if ctx.store.retries() {
        1
    } else {
        ctx.options.fetch_attempts.max(1)
    };
    let mut delay = ctx.options.retry_backoff;
    let mut attempt = 1;
    loop {
        match ctx.store.get_into(id, buf) {
            Ok(()) => return Ok(()),
            Err(e) => {
                Shared::add(&ctx.shared.errors, 1);
                warn!("fetching chunk {id} failed (try {attempt}/{attempts}): {e}");
                if attempt >= attempts || ctx.shared.stop.load(Ordering::Acquire) {
                    return Err(error_chain(&e));
                }
            }
        }
        // Sleep in small steps, to stop early.
        let until = Instant::now() + delay;
        while Instant::now() < until && !ctx.shared.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5).min(delay));
        }
        delay = delay.saturating_mul(2);
        attempt += 1;
    }
}

/// The descriptor to poll for finished jobs.
pub(super) fn done_fd(pool: &Pool) -> libc::c_int {
    pool.done_evt.as_raw_fd()
}
