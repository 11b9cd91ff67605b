//! Restore measurements of a snapshot: in-process (`build_from_snapshot`, lazy and eager,
//! warm and with the page cache dropped), memory only through the library, and
//! process-level (`vmm restore --paused`: spawn → log line, spawn → API answer).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm::builder::Console;
use vmm::builder::{RestoreOptions, build_from_snapshot, snapshot_files};
use vmm::snapshot::manifest::{MemoryManifest, ZeroChunks, restore_memory};
use vmm::store::local::{LocalStore, LocalStoreOptions};
use vmm::vmm::Vmm;
use vmm::vstate::memory::create_anonymous;

use crate::memory::{Content, regions_mut, scan};
use crate::support::bench::{Csv, drop_caches, env_or, f, load1, min_median, ms};
use crate::support::env::vmm_bin;
use crate::support::process::Running;

/// `build_from_snapshot` (paused): time to the VM being ready and, for a lazy restore,
/// to the background fill having placed every stored chunk.
pub fn restore_in_process(dir: &Path, eager: bool) -> (Duration, Option<Duration>, Vmm) {
    let (state, memory) = snapshot_files(dir);
    let opts = RestoreOptions {
        console: Console::Writer(Box::new(std::io::sink())),
        blocks: None,
        nets: Vec::new(),
        force: false,
        start_paused: true,
        eager_memory: eager,
        clock: Default::default(),
    };
    let t = Instant::now();
    let vmm = build_from_snapshot(&state, &memory, opts).expect("build_from_snapshot");
    let ready = t.elapsed();
    let filled = vmm.machine.lazy.as_ref().map(|l| {
        assert!(
            l.wait_complete(Duration::from_secs(300)),
            "lazy memory fill did not complete"
        );
        t.elapsed()
    });
    (ready, filled, vmm)
}

/// Memory only, through the library: manifest read + store open + fresh mapping +
/// `restore_memory` (what `build_from_snapshot` does for memory).
fn restore_memory_only(dir: &Path, store_dir: &Path) -> Duration {
    let (_, memory) = snapshot_files(dir);
    let t = Instant::now();
    let manifest = MemoryManifest::read_from(&memory).expect("read manifest");
    let store = LocalStore::open(store_dir, LocalStoreOptions::default()).expect("open store");
    let regions: Vec<(vm_memory::GuestAddress, usize)> = manifest
        .regions
        .iter()
        .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = create_anonymous(&regions).expect("map memory");
    // SAFETY: a fresh mapping nobody else sees.
    let mut views = unsafe { regions_mut(&mem) };
    restore_memory(&manifest, &mut views, &store, ZeroChunks::AlreadyZero).expect("restore");
    let d = t.elapsed();
    drop(views);
    drop(mem);
    d
}

struct ProcRestore {
    log_ms: f64,
    api_ms: f64,
    reported_ms: f64,
    reported_mem_ms: f64,
}

/// `vmm restore DIR --paused --api-sock S`: spawn → log line, spawn → `GET /vm` answered.
fn restore_process(dir: &Path, sock: &Path, eager: bool) -> Result<ProcRestore, String> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(dir)
        .arg("--paused")
        .arg("--api-sock")
        .arg(sock)
        .env("RUST_LOG", "info");
    if eager {
        cmd.arg("--eager-memory");
    }
    let mut p = Running::try_spawn(&mut cmd).map_err(|e| format!("spawn vmm: {e}"))?;
    let target = vmm::api::ApiTarget::Unix(sock.to_path_buf());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut api_ms = None;
    let mut log = None;
    while api_ms.is_none() || log.is_none() {
        if Instant::now() > deadline {
            return Err(format!("restore timed out\n{}", p.output()));
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            p.kill_and_drain();
            return Err(format!("vmm restore exited: {st}\n{}", p.output()));
        }
        if api_ms.is_none()
            && sock.exists()
            && let Ok((200, _)) =
                vmm::api::request_with_timeout(&target, "GET", "/vm", None, Duration::from_secs(5))
        {
            api_ms = Some(ms(p.started.elapsed()));
        }
        if log.is_none()
            && let Some(l) = p.find_line("restored ")
        {
            log = Some((ms(l.at - p.started), l.text.clone()));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    p.kill();
    let (log_ms, text) = log.unwrap();
    // "… restored PATH in X ms (memory Y ms)"
    let num_after = |pat: &str| -> f64 {
        text.rfind(pat)
            .and_then(|i| {
                text[i + pat.len()..]
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(f64::NAN)
    };
    Ok(ProcRestore {
        log_ms,
        api_ms: api_ms.unwrap(),
        reported_ms: num_after(" in "),
        reported_mem_ms: num_after("(memory "),
    })
}

/// The restore measurements, appended to `restore.csv`.
pub struct Restores {
    /// The bench run.
    pub run: u64,
    /// `restore.csv`.
    pub csv: Csv,
}

/// The snapshot being measured.
struct Subject<'a> {
    guest: &'a str,
    mem_mib: u64,
    dir: &'a Path,
    /// Measured runs of each kind.
    reps: usize,
}

const NAN2: (f64, f64) = (f64::NAN, f64::NAN);

impl Restores {
    fn row(&self, s: &Subject, method: &str, i: usize, v: f64, extra: (f64, f64)) {
        self.csv.row(&[
            self.run.to_string(),
            s.guest.into(),
            s.mem_mib.to_string(),
            method.into(),
            i.to_string(),
            f(v),
            f(extra.0),
            f(extra.1),
            f(load1()),
        ]);
    }

    /// All restore measurements of the snapshot in `dir`; checks the restored memory.
    pub fn measure(&self, guest: &str, mem_mib: u64, dir: &Path, store: &Path, want: &Content) {
        let s = Subject {
            guest,
            mem_mib,
            dir,
            reps: env_or("SNAPSHOT_BENCH_REPS", 3usize),
        };
        let mut summary = Vec::new();
        for (eager, mode) in [(false, "lazy"), (true, "eager")] {
            summary.push(self.in_process(&s, want, eager, mode));
        }
        summary.push(self.memory_only(&s, store));
        let sock = dir.with_extension("sock");
        for (eager, mode) in [(false, "lazy"), (true, "eager")] {
            summary.push(self.process(&s, &sock, eager, mode));
        }
        let _ = fs::remove_file(&sock);
        println!("  restore {guest} {mem_mib} MiB:");
        for l in summary {
            println!("    {l}");
        }
    }

    /// In-process restores: a first one checked against `want`, `reps` warm ones, and one
    /// with the page cache dropped (unless `SNAPSHOT_BENCH_DROP_CACHES=0` or not allowed).
    fn in_process(&self, s: &Subject, want: &Content, eager: bool, mode: &str) -> String {
        let (mut ready, mut filled) = (Vec::new(), Vec::new());
        for i in 0..=s.reps {
            let (d, fill, vm) = restore_in_process(s.dir, eager);
            if i == 0 {
                // First run: page-cache warm-up, and the correctness check (a lazy
                // restore's memory is read through its fault handler).
                let got = scan(&vm.machine.mem);
                assert_eq!(
                    (got.nonzero_chunks, got.digest),
                    (want.nonzero_chunks, want.digest),
                    "{mode} restore: memory differs from the snapshotted memory"
                );
                continue;
            }
            drop(vm);
            ready.push(ms(d));
            self.row(s, &format!("in_process_{mode}_warm"), i, ms(d), NAN2);
            if let Some(fd) = fill {
                filled.push(ms(fd));
                let m = format!("in_process_{mode}_warm_filled");
                self.row(s, &m, i, ms(fd), NAN2);
            }
        }
        let (rmin, rmed) = min_median(&ready);
        let mut line = format!("in-process {mode} warm: ready min {rmin:.1} / median {rmed:.1} ms");
        if !filled.is_empty() {
            let (fmin, fmed) = min_median(&filled);
            line += &format!(", memory filled min {fmin:.1} / median {fmed:.1} ms");
        }
        if std::env::var("SNAPSHOT_BENCH_DROP_CACHES").as_deref() != Ok("0") && drop_caches() {
            let (d, fill, vm) = restore_in_process(s.dir, eager);
            drop(vm);
            self.row(s, &format!("in_process_{mode}_cold"), 1, ms(d), NAN2);
            line += &format!("; cold: ready {:.1} ms", ms(d));
            if let Some(fd) = fill {
                let m = format!("in_process_{mode}_cold_filled");
                self.row(s, &m, 1, ms(fd), NAN2);
                line += &format!(", filled {:.1} ms", ms(fd));
            }
        }
        line
    }

    /// Memory-only restores through the library.
    fn memory_only(&self, s: &Subject, store: &Path) -> String {
        let mut mem_only = Vec::new();
        for i in 1..=s.reps {
            let d = ms(restore_memory_only(s.dir, store));
            mem_only.push(d);
            self.row(s, "memory_only_warm", i, d, NAN2);
        }
        let (mmin, mmed) = min_median(&mem_only);
        format!("memory only (library, eager): min {mmin:.1} / median {mmed:.1} ms")
    }

    /// `vmm restore --paused` processes.
    fn process(&self, s: &Subject, sock: &Path, eager: bool, mode: &str) -> String {
        let (mut logs, mut apis) = (Vec::new(), Vec::new());
        let mut reported = NAN2;
        for i in 1..=s.reps {
            match restore_process(s.dir, sock, eager) {
                Ok(r) => {
                    logs.push(r.log_ms);
                    apis.push(r.api_ms);
                    reported = (r.reported_ms, r.reported_mem_ms);
                    let m = format!("process_{mode}_log");
                    self.row(s, &m, i, r.log_ms, reported);
                    let m = format!("process_{mode}_api");
                    self.row(s, &m, i, r.api_ms, reported);
                }
                Err(e) => eprintln!("process restore ({mode}) failed: {e}"),
            }
        }
        let (lmin, lmed) = min_median(&logs);
        let (amin, amed) = min_median(&apis);
        format!(
            "`vmm restore --paused`{}: spawn → log line min {lmin:.1} / median {lmed:.1} ms \
             (vmm says {:.1} ms, memory {:.1} ms), spawn → GET /vm min {amin:.1} / median \
             {amed:.1} ms",
            if eager { " --eager-memory" } else { "" },
            reported.0,
            reported.1
        )
    }
}
