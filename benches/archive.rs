//! Archive benchmark (harness = false; runs only under `cargo bench`): snapshot → push →
//! resume over HTTP from a real nginx on loopback, against local restores.
//!
//! Guest: the tiny freestanding test guest (`tests/support/tiny`, tick scenario: timer interrupts
//! and serial output) with `ARCHIVE_BENCH_SIZES` MiB of RAM (default 256,1024,4096), paused
//! after 3 ticks, its memory filled by the host with a synthetic pattern: 20 % of the
//! 64 KiB chunks non-zero, half of them text-like (compressible), half random. A synthetic
//! **workload** stands for what a resumed guest touches first: one read in each of 5 % of
//! the non-zero chunks (a fixed pseudo-random set), done by the host through guest memory
//! right after the resume, so it faults through userfaultfd exactly as a vCPU would.
//!
//! Per size:
//! 1. snapshot create (time, bytes stored), `archive push` (time), storage per snapshot,
//!    a second snapshot after 1 % of the chunks changed (shared store) pushed as a second VM;
//! 2. a working set recorded from the local archive (resume with recording, workload);
//! 3. restores, each measured to "vCPUs running" and then through the workload: eager
//!    local, lazy local, eager HTTP, lazy HTTP without prefetch, lazy HTTP with the
//!    working-set prefetch (fresh cache each; no background fill, so the bytes are the
//!    guest's alone), plus bytes fetched before the first instruction and in the first
//!    second;
//! 4. at 1 GiB, bytes fetched over time for 4 s (every 25 ms) with the fill at 64 MiB/s,
//!    with and without prefetch.
//!
//! CSV: `target/bench/archive_{create,restore,storage,timeline}.csv`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::bench::*;
use support::env::have_kvm;
use support::files::dir_bytes;
use support::nginx::{Nginx, nginx_available};
use support::rng::Rng;
use support::tiny;
use vm_memory::{Bytes, GuestAddress};
use vmm::archive::Source;
use vmm::archive::restore::{ArchiveRestoreOptions, ArchiveSession, restore};
use vmm::archive::workingset::FillRate;
use vmm::builder::Console;
use vmm::builder::{RestoreOptions, build_from_snapshot, snapshot_files};
use vmm::snapshot::{ChunkEntry, MemoryManifest};
use vmm::vmm::Vmm;

const CHUNK: u64 = 64 << 10;

/// Fills 20 % of the chunks above 4 MiB (half text-like, half random).
fn fill(vm: &Vmm, mib: u64) -> u64 {
    let mut rng = Rng::new(0x5eed ^ mib);
    let words: &[&[u8]] = &[
        b"vmm ",
        b"chunk ",
        b"archive ",
        b"memory ",
        b"lazy ",
        b"page ",
    ];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut nonzero = 0;
    let regions = vmm::arch::x86_64::layout::arch_memory_regions(mib << 20);
    for (start, len) in regions {
        let mut a = start.0.max(4 << 20);
        while a + CHUNK <= start.0 + len as u64 {
            if rng.next().is_multiple_of(5) {
                if rng.next().is_multiple_of(2) {
                    let mut i = 0;
                    while i < buf.len() {
                        let w = words[(rng.next() % words.len() as u64) as usize];
                        let n = w.len().min(buf.len() - i);
                        buf[i..i + n].copy_from_slice(&w[..n]);
                        i += n;
                    }
                    buf[..8].copy_from_slice(&a.to_le_bytes());
                } else {
                    for c in buf.chunks_mut(8) {
                        c.copy_from_slice(&rng.next().to_le_bytes());
                    }
                }
                vm.machine
                    .mem
                    .write_slice(&buf, GuestAddress(a))
                    .expect("fill guest memory");
                nonzero += CHUNK;
            }
            a += CHUNK;
        }
    }
    nonzero
}

/// Guest addresses of 5 % of the non-zero chunks, fixed pseudo-random choice.
fn workload_set(dir: &Path) -> Vec<u64> {
    let m = MemoryManifest::read_from(dir.join("memory")).expect("manifest");
    let mut rng = Rng::new(0xfeed_beef);
    let mut set = Vec::new();
    for r in &m.regions {
        for (i, c) in r.chunks.iter().enumerate() {
            let a = r.guest_addr + i as u64 * m.chunk_size;
            if matches!(c, ChunkEntry::Chunk(_)) && a >= 4 << 20 && rng.next().is_multiple_of(20) {
                set.push(a);
            }
        }
    }
    set
}

fn workload(vm: &Vmm, set: &[u64], mut each: impl FnMut()) -> Duration {
    let t = Instant::now();
    for &a in set {
        let _: u64 = vm.machine.mem.read_obj(GuestAddress(a + 8)).expect("read");
        each();
    }
    t.elapsed()
}

fn sink() -> Console {
    Console::Writer(Box::new(std::io::sink()))
}

fn local(dir: &Path, eager: bool) -> (f64, Vmm) {
    let (s, m) = snapshot_files(dir);
    let opts = RestoreOptions {
        console: sink(),
        blocks: None,
        nets: Vec::new(),
        force: false,
        start_paused: false,
        eager_memory: eager,
        clock: Default::default(),
    };
    let t = Instant::now();
    let vm = build_from_snapshot(&s, &m, opts).expect("local restore");
    (ms(t.elapsed()), vm)
}

fn http_opts(cache: &Path, prefetch: bool, fill: FillRate, eager: bool) -> ArchiveRestoreOptions {
    let mut o = ArchiveRestoreOptions::new(sink());
    let _ = std::fs::remove_dir_all(cache);
    o.cache_root = Some(cache.to_path_buf());
    o.prefetch = prefetch;
    o.fill = fill;
    o.eager_memory = eager;
    o
}

fn over_http(url: &str, o: ArchiveRestoreOptions) -> (f64, Vmm, ArchiveSession) {
    let t = Instant::now();
    let (vm, s) = restore(&Source::parse(url), o).expect("restore over HTTP");
    (ms(t.elapsed()), vm, s)
}

const RESTORE_HEADER: &str = "run,mem_mib,mode,restore_ms,running_after_ms,before_first_bytes,\
workload_chunks,workload_ms,bytes_after_workload,first_second_bytes,load1";

/// The bench's CSV files.
struct Outputs {
    create: Csv,
    storage: Csv,
    restore: Csv,
    timeline: Csv,
}

/// One guest size of one run.
struct Ctx<'a> {
    out: &'a Outputs,
    run: u64,
    mib: u64,
    /// Where this size's snapshots and archive live.
    root: &'a Path,
}

/// The modes the restore phase measures.
const MODES: [&str; 5] = [
    "eager local",
    "lazy local",
    "eager http",
    "lazy http",
    "lazy http + prefetch",
];

fn main() {
    if !bench_mode("archive") || !have_kvm() || !nginx_available() {
        return;
    }
    let _ = env_logger::builder()
        .parse_filters(&std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    print_host("archive");
    let run = run_id();
    let sizes: Vec<u64> = std::env::var("ARCHIVE_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let out = Outputs {
        create: Csv::new(
            "archive_create",
            "run,mem_mib,nonzero_bytes,create_ms,stored_bytes,push_ms,archive_bytes,load1",
        ),
        storage: Csv::new(
            "archive_storage",
            "run,mem_mib,snapshot,chunks_new,bytes_new,manifest_bytes,state_bytes",
        ),
        restore: Csv::new("archive_restore", RESTORE_HEADER),
        timeline: Csv::new(
            "archive_timeline",
            "run,mem_mib,mode,t_ms,total_bytes,demand_bytes,prefetch_bytes,fill_bytes",
        ),
    };
    for &mib in &sizes {
        let root = bench_dir(&format!("archive-{mib}"));
        let cx = Ctx {
            out: &out,
            run,
            mib,
            root: &root,
        };
        let (snap, archive) = snapshot_and_push(&cx);
        let set = workload_set(&snap);
        record_working_set(&archive, &set);
        let nginx = Nginx::start(&archive);
        let url = format!("{}/vms/vm", nginx.url());
        let cache = root.join("cache");
        let reps: usize = env_or("ARCHIVE_BENCH_REPS", 2);
        for _ in 0..reps {
            for mode in MODES {
                restore_once(&cx, mode, &snap, &url, &set);
            }
        }
        if mib == 1024 {
            timeline(&cx, &url, &cache, &set);
        }
        drop(nginx);
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// Size of the file at `p` (0 if missing).
fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Phase 1: snapshot, push, storage; then a second snapshot after 1 % of the non-zero
/// chunks and 1 s of guest time, into the same store, pushed as a second VM: what a later
/// snapshot costs. Returns the first snapshot's directory and the archive.
fn snapshot_and_push(cx: &Ctx) -> (PathBuf, PathBuf) {
    let (run, mib) = (cx.run, cx.mib);
    let mut spec = tiny::Spec::new(tiny::Scenario::SnapTicks);
    spec.mem_mib = mib;
    let mut vm = tiny::boot(spec, Vec::new()).expect("boot");
    vm.wait_for(Instant::now() + Duration::from_secs(30), "tick 3\n")
        .expect("ticks");
    vm.pause().expect("pause");
    let nonzero = fill(&vm.vmm, mib);
    let snap = cx.root.join("snap");
    let t = Instant::now();
    let rep = vm.snapshot(&snap, None).expect("snapshot");
    let create = ms(t.elapsed());
    let stored = dir_bytes(&snap.join("chunks"));
    let archive = cx.root.join("archive");
    let t = Instant::now();
    let p = vmm::archive::push::push(&snap, &archive, "vm").expect("push");
    let push_ms = ms(t.elapsed());
    cx.out.create.row(&[
        run.to_string(),
        mib.to_string(),
        nonzero.to_string(),
        f(create),
        stored.to_string(),
        f(push_ms),
        dir_bytes(&archive).to_string(),
        f(load1()),
    ]);
    storage_row(cx, "full", &p, &snap);
    println!(
        "{mib} MiB: {} non-zero MiB, create {create:.0} ms ({} chunks new), stored {} MiB, push {push_ms:.0} ms",
        nonzero >> 20,
        rep.memory.chunks_total,
        stored >> 20
    );
    vm.resume().expect("resume");
    std::thread::sleep(Duration::from_secs(1));
    vm.pause().expect("pause");
    for a in workload_set(&snap).iter().step_by(5) {
        vm.write(*a + 16, 0xdead_beef_u64).expect("dirty");
    }
    let snap2 = cx.root.join("snap2");
    vm.snapshot(&snap2, Some(&snap)).expect("second snapshot");
    drop(vm);
    let p2 = vmm::archive::push::push(&snap2, &archive, "vm2").expect("push 2");
    storage_row(cx, "second (1 % of chunks changed)", &p2, &snap2);
    (snap, archive)
}

/// One `archive_storage.csv` row: what pushing the snapshot in `snap` added.
fn storage_row(cx: &Ctx, what: &str, p: &vmm::archive::push::PushReport, snap: &Path) {
    cx.out.storage.row(&[
        cx.run.to_string(),
        cx.mib.to_string(),
        what.into(),
        p.chunks_copied.to_string(),
        p.bytes_copied.to_string(),
        size(&snap.join("memory")).to_string(),
        size(&snap.join("state")).to_string(),
    ]);
}

/// Phase 2: the working set of the workload, recorded from the local archive.
fn record_working_set(archive: &Path, set: &[u64]) {
    let mut o = ArchiveRestoreOptions::new(sink());
    o.record = true;
    o.fill = FillRate::Off;
    let (vm, s) = restore(
        &Source::parse(&archive.join("vms/vm").display().to_string()),
        o,
    )
    .expect("record");
    workload(&vm, set, || {});
    let ws = s.take_working_set();
    drop(vm);
    drop(s);
    ws.write_to(&archive.join("vms/vm/workingset"))
        .expect("write the working set");
    println!("  working set: {} chunks", ws.chunks.len());
}

/// Phase 3: one restore in `mode`, the workload after it, and what was fetched when.
fn restore_once(cx: &Ctx, mode: &str, snap: &Path, url: &str, set: &[u64]) {
    let cache = cx.root.join("cache");
    let (restore_ms, vm, session) = match mode {
        "eager local" | "lazy local" => {
            let (t, vm) = local(snap, mode.starts_with("eager"));
            (t, vm, None)
        }
        _ => {
            let o = http_opts(
                &cache,
                mode.ends_with("prefetch"),
                FillRate::Off,
                mode.starts_with("eager"),
            );
            let (t, vm, s) = over_http(url, o);
            (t, vm, Some(s))
        }
    };
    let before = session
        .as_ref()
        .map(|s| s.before_first_instruction.total_bytes);
    let running = session.as_ref().and_then(|s| s.running_after_ms);
    let wl = ms(workload(&vm, set, || {}));
    let after = session.as_ref().map(|s| s.now().total_bytes);
    let mut first = None;
    if let Some(s) = &session {
        let end = Instant::now() + Duration::from_secs(3);
        while s.first_second().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        first = s.first_second().map(|x| x.total_bytes);
    }
    let o = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    println!(
        "  {mode:22} restore {restore_ms:7.1} ms, workload ({} chunks) {wl:7.1} ms, before first instruction {} B, after workload {} B, first second {} B",
        set.len(),
        o(before),
        o(after),
        o(first)
    );
    cx.out.restore.row(&[
        cx.run.to_string(),
        cx.mib.to_string(),
        mode.into(),
        f(restore_ms),
        o(running),
        o(before),
        set.len().to_string(),
        f(wl),
        o(after),
        o(first),
        f(load1()),
    ]);
    drop(vm);
    drop(session);
}

/// Phase 4: bytes fetched over time (every 25 ms for 4 s) with the fill at 64 MiB/s, with
/// and without prefetch.
fn timeline(cx: &Ctx, url: &str, cache: &Path, set: &[u64]) {
    for (mode, prefetch) in [("fill 64 MiB/s", false), ("prefetch + fill 64 MiB/s", true)] {
        let o = http_opts(cache, prefetch, FillRate::BytesPerSec(64 << 20), false);
        let t0 = Instant::now();
        let (_, vm, s) = over_http(url, o);
        let mut next = Duration::ZERO;
        let mut sample = |s: &ArchiveSession, force: bool| {
            let el = t0.elapsed();
            if el >= next || force {
                let n = s.now();
                cx.out.timeline.row(&[
                    cx.run.to_string(),
                    cx.mib.to_string(),
                    mode.into(),
                    f(ms(el)),
                    n.total_bytes.to_string(),
                    n.demand_bytes.to_string(),
                    n.prefetch_bytes.to_string(),
                    n.fill_bytes.to_string(),
                ]);
                next = el + Duration::from_millis(25);
            }
        };
        sample(&s, true);
        workload(&vm, set, || sample(&s, false));
        while t0.elapsed() < Duration::from_secs(4) {
            sample(&s, false);
            std::thread::sleep(Duration::from_millis(5));
        }
        println!("  timeline {mode}: {:?}", s.now());
        drop(vm);
        drop(s);
    }
}
