//! Archived VMs resumed over HTTP from a real nginx, with the tiny guest: push + restore
//! (the guest continues, guest memory is exact, little is fetched before the first
//! instruction), working-set record + prefetch, the server going down, an altered chunk,
//! and two clones at once sharing the local chunk cache (`vmm restore http://…`).

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::env::{TempDir, temp_dir};
use support::nginx::{Nginx, nginx_available};
use support::tiny;
use support::tiny::archive::{PagePattern, snapshot_with_pattern};
use support::tiny::harness::{check_ticks, deadline, ensure};
use support::tiny::{Scenario, Spec, TinyVm, guest};
use vmm::archive::restore::ArchiveSession;
use vmm::archive::workingset::FillRate;
use vmm::snapshot::{ChunkEntry, MemoryManifest};
use vmm::store::http::HttpStoreOptions;
use vmm::util::error_chain;
use vmm::vstate::exit::ExitReason;

/// Guest memory of the archived VMs.
const MEM_MIB: u64 = 256;
/// Host-written pattern: one distinct qword per 4 KiB page in [PAT_BASE, PAT_BASE + PAT_LEN).
const PAT_BASE: u64 = 16 << 20;
const PAT_LEN: u64 = 16 << 20;
const PAT_XOR: u64 = 0x5eed_f00d_0bad_cafe;
const PATTERN: PagePattern = PagePattern {
    base: PAT_BASE,
    len: PAT_LEN,
    xor: PAT_XOR,
};

/// [`tiny::harness::check`], also skipped without nginx, with the VMM's logs shown.
fn check(name: &str, body: impl FnOnce() -> Result<(), String>) {
    if !nginx_available() {
        return;
    }
    let _ = env_logger::builder().is_test(true).try_init();
    tiny::harness::check(name, body);
}

/// A VM archived at `archive/vms/NAME`, and what it looked like at the snapshot.
struct Archived {
    archive: PathBuf,
    /// Console up to the snapshot.
    pre: String,
}

/// Boots `scenario` with [`MEM_MIB`], waits for `ready`, pauses, writes the pattern, snapshots
/// and pushes it as `name`.
fn archive_vm(
    tmp: &TempDir,
    scenario: Scenario,
    ready: &str,
    name: &str,
) -> Result<Archived, String> {
    let snap = tmp.join("snap");
    let pre = snapshot_with_pattern(scenario, MEM_MIB, ready, &PATTERN, &snap)?;
    let archive = tmp.join("archive");
    let r = vmm::archive::push::push(&snap, &archive, name).map_err(|e| error_chain(&e))?;
    eprintln!("  {r}");
    ensure(
        r.chunks_copied == r.chunks_total && r.chunks_total >= PAT_LEN / (64 << 10),
        || format!("unexpected first push: {r:?}"),
    )?;
    let again = vmm::archive::push::push(&snap, &archive, name).map_err(|e| error_chain(&e))?;
    ensure(
        again.chunks_copied == 0 && again.chunks_present == r.chunks_total,
        || format!("a second push copied chunks again: {again:?}"),
    )?;
    Ok(Archived { archive, pre })
}

/// For resumes that must succeed: the default retries and timeouts, which a loaded host
/// does not exhaust.
fn patient_http() -> HttpStoreOptions {
    HttpStoreOptions::default()
}

/// For resumes whose server is taken away: give up quickly.
fn quick_http() -> HttpStoreOptions {
    HttpStoreOptions {
        attempts: 2,
        first_backoff: Duration::from_millis(50),
        budget: Duration::from_millis(400),
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..HttpStoreOptions::default()
    }
}

fn resume(
    url: &str,
    cache: &Path,
    fill: FillRate,
    http: HttpStoreOptions,
) -> Result<(TinyVm, ArchiveSession), String> {
    tiny::archive::resume(url, cache, fill, |o| o.http = http)
}

/// Archive → nginx → resume over HTTP: the ticks continue from the snapshot, guest memory
/// is exact, far less than the memory is fetched before the first instruction; a working
/// set recorded with `vmm archive record-workingset` is prefetched by the next resume.
#[test]
fn push_and_resume_over_http() {
    check("push_and_resume_over_http", || {
        let tmp = temp_dir("archive-http");
        let a = archive_vm(&tmp, Scenario::SnapTicks, "tick 3\n", "ticks")?;
        let pre_last = check_ticks(&a.pre)?;
        let nginx = Nginx::start(&a.archive);
        let url = format!("{}/vms/ticks", nginx.url());
        let (mut vm, s) = resume(&url, &tmp.join("cache"), FillRate::Off, patient_http())?;
        let b = s.before_first_instruction;
        eprintln!(
            "  before the first instruction: {} bytes ({} metadata, {} memory), running after {:?} ms",
            b.total_bytes, b.metadata_bytes, b.memory_http_bytes, s.running_after_ms
        );
        let mem = MEM_MIB << 20;
        ensure(b.total_bytes < mem / 100, || {
            format!("fetched {b:?} before the first instruction")
        })?;
        let target = pre_last + 3;
        vm.wait_console(deadline(), &format!("tick {target}"), |c| {
            check_ticks(&format!("{}{c}", a.pre)).map_or(true, |n| n >= target)
        })?;
        check_ticks(&format!("{}{}", a.pre, vm.console.text()))?;
        ensure(!vm.console.text().contains("serial set"), || {
            "the guest rebooted".into()
        })?;
        vm.pause()?;
        let fetched_running = s.now();
        for addr in PATTERN.pages(97) {
            let v = vm.read_u64(addr)?;
            ensure(v == PATTERN.value(addr), || {
                format!("guest memory at {addr:#x} is {v:#x}")
            })?;
        }
        let after = s.now();
        eprintln!(
            "  while running: {} memory bytes; after reading the pattern: {} ({} faults)",
            fetched_running.memory_http_bytes, after.memory_http_bytes, after.faults
        );
        ensure(after.demand_bytes > fetched_running.demand_bytes, || {
            "reading the pattern fetched nothing".into()
        })?;
        drop(vm);
        drop(s);

        // Record a working set from the local archive, then resume with prefetch.
        let out = std::process::Command::new(support::env::vmm_bin())
            .args(["archive", "record-workingset"])
            .arg(a.archive.join("vms/ticks"))
            .args(["--seconds", "0.5"])
            .output()
            .map_err(|e| e.to_string())?;
        ensure(out.status.success(), || {
            format!(
                "record-workingset: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        eprintln!("  {}", String::from_utf8_lossy(&out.stdout).trim());
        let ws = vmm::archive::workingset::WorkingSet::read_from(
            &a.archive.join("vms/ticks/workingset"),
        )
        .map_err(|e| error_chain(&e))?;
        ensure(!ws.chunks.is_empty(), || "empty working set".into())?;
        let (vm, s) = resume(
            &url,
            &tmp.join("cache2"),
            FillRate::Unlimited,
            patient_http(),
        )?;
        let end = deadline();
        while s.prefetch().and_then(|p| p.fill_ms).is_none() {
            ensure(Instant::now() < end, || {
                format!("prefetch did not finish: {:?}", s.prefetch())
            })?;
            std::thread::sleep(Duration::from_millis(10));
        }
        let p = s.prefetch().unwrap_or_default();
        ensure(
            p.working_set_total == ws.chunks.len() as u64 && !p.failed,
            || format!("{p:?}"),
        )?;
        eprintln!("  prefetch: {p:?}; cache {:?}", s.store().stats());
        vm.wait_console(deadline(), "tick", |c| {
            c.contains(&format!("tick {}\n", pre_last + 2))
        })?;
        Ok(())
    });
}

/// The manifest's chunk id for guest address `gpa` (region 0).
fn chunk_of(archive: &Path, name: &str, gpa: u64) -> Result<String, String> {
    let m = MemoryManifest::read_from(archive.join("vms").join(name).join("memory"))
        .map_err(|e| error_chain(&e))?;
    match &m.regions[0].chunks[(gpa / m.chunk_size) as usize] {
        ChunkEntry::Chunk(id) => Ok(id.to_string()),
        ChunkEntry::Zero => Err(format!("{gpa:#x} is a zero chunk")),
    }
}

/// Has the (dirty-scenario) guest write to `addr`: a fault on a chunk not fetched yet.
fn guest_touch(vm: &TinyVm, addr: u64) -> Result<(), String> {
    vm.write(guest::MB_CMD_LIST, addr)?;
    vm.write(guest::MB_CMD_COUNT, 1u32)?;
    vm.write(guest::MB_CMD_SEQ, 1u32)
}

/// The archive's server goes away after the resume: the guest's next fault on an unfetched
/// chunk is retried, then the VM stops with a clear error (exit code 6), never runs on
/// wrong memory; an altered chunk in the archive is rejected naming the chunk, and is not
/// cached.
#[test]
fn server_down_and_altered_chunk_stop_the_vm_cleanly() {
    check("server_down_and_altered_chunk_stop_the_vm_cleanly", || {
        let tmp = temp_dir("archive-faults");
        let a = archive_vm(&tmp, Scenario::SnapDirty, "dirty: ready\n", "dirty")?;
        let mut nginx = Nginx::start(&a.archive);
        let url = format!("{}/vms/dirty", nginx.url());

        // 1. Server down.
        let (mut vm, s) = resume(&url, &tmp.join("cache"), FillRate::Off, quick_http())?;
        std::thread::sleep(Duration::from_millis(100));
        nginx.stop();
        guest_touch(&vm, PAT_BASE + 5 * 4096)?;
        let t = Instant::now();
        let reason = tiny::run_for(&mut vm, Duration::from_secs(120))?;
        eprintln!("  server down: {reason:?} after {:?}", t.elapsed());
        match &reason {
            ExitReason::MemoryUnavailable { message }
                if message.contains("gave up") || message.contains("refused") => {}
            other => {
                return Err(format!(
                    "expected MemoryUnavailable after retries, got {other:?}"
                ));
            }
        }
        ensure(reason.exit_code() == 6, || "exit code".into())?;
        drop(vm);
        drop(s);

        // 2. Altered chunk.
        nginx.restart();
        let addr = PAT_BASE + 40 * 4096;
        let id = chunk_of(&a.archive, "dirty", addr)?;
        // The chunk's record in its pack keeps its header, its body is replaced: a raw
        // body is then only caught by the hash check, a zstd one by decoding.
        let store = vmm::store::LocalStore::open(&a.archive, Default::default())
            .map_err(|e| e.to_string())?;
        let cid: vmm::store::ChunkId = id.parse().map_err(|e| format!("{e}"))?;
        let loc = store
            .location(&cid)
            .map_err(|e| e.to_string())?
            .ok_or("the chunk is not in the archive")?;
        let mut bytes = std::fs::read(&loc.path).map_err(|e| e.to_string())?;
        bytes[(loc.offset + 8) as usize..(loc.offset + loc.len) as usize].fill(0xab);
        std::fs::write(&loc.path, bytes).map_err(|e| e.to_string())?;
        let (mut vm, s) = resume(&url, &tmp.join("cache-b"), FillRate::Off, quick_http())?;
        guest_touch(&vm, addr)?;
        let reason = tiny::run_for(&mut vm, Duration::from_secs(120))?;
        eprintln!("  altered chunk: {reason:?}");
        match &reason {
            ExitReason::MemoryUnavailable { message }
                if message.contains(&id) && message.contains("corrupt") => {}
            other => {
                return Err(format!(
                    "expected MemoryUnavailable naming {id}, got {other:?}"
                ));
            }
        }
        ensure(
            !tmp.join("cache/chunks/chunks")
                .join(&id[..2])
                .join(&id)
                .exists(),
            || "the altered chunk was cached".into(),
        )?;
        drop(vm);
        drop(s);
        Ok(())
    });
}

fn spawn_clone(url: &str, cache: &Path, fill: &str) -> support::process::Running {
    spawn_clone_with(url, cache, fill, &[])
}

fn spawn_clone_with(
    url: &str,
    cache: &Path,
    fill: &str,
    extra: &[String],
) -> support::process::Running {
    let mut args: Vec<String> = vec![
        "restore".into(),
        url.into(),
        "--cache".into(),
        cache.display().to_string(),
        "--fill-rate".into(),
        fill.into(),
    ];
    args.extend_from_slice(extra);
    support::process::Running::spawn(&args)
}

fn wait_tick(r: &mut support::process::Running, pre: &str, target: u32) -> Result<u32, String> {
    let end = deadline();
    loop {
        let c = r.console();
        let n = check_ticks(&format!("{pre}{c}")).map_err(|e| format!("{e}\n{}", r.output()))?;
        if n >= target {
            return Ok(n);
        }
        if Instant::now() > end {
            return Err(format!("no tick {target}:\n{}", r.output()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two `vmm restore http://…` processes resumed at once from the same archive with one
/// cache both run on; a third, started once the first has filled the cache, fetches no
/// memory from the server.
#[test]
fn two_clones_at_once_share_the_cache() {
    check("two_clones_at_once_share_the_cache", || {
        let tmp = temp_dir("archive-clones");
        let a = archive_vm(&tmp, Scenario::SnapTicks, "tick 3\n", "ticks")?;
        let pre_last = check_ticks(&a.pre)?;
        let nginx = Nginx::start(&a.archive);
        let url = format!("{}/vms/ticks", nginx.url());
        let cache = tmp.join("cache");
        let mut c1 = spawn_clone(&url, &cache, "max");
        let mut c2 = spawn_clone(&url, &cache, "max");
        let n1 = wait_tick(&mut c1, &a.pre, pre_last + 3)?;
        let n2 = wait_tick(&mut c2, &a.pre, pre_last + 3)?;
        eprintln!("  clone 1 at tick {n1}, clone 2 at tick {n2}");
        c1.wait_for("background fill cached all", Duration::from_secs(120))
            .ok_or_else(|| format!("clone 1 did not finish its fill:\n{}", c1.output()))?;
        let sock = tmp.join("c3.sock");
        let mut c3 = spawn_clone_with(
            &url,
            &cache,
            "off",
            &["--api-sock".into(), sock.display().to_string()],
        );
        wait_tick(&mut c3, &a.pre, pre_last + 2)?;
        // The fetch report is in GET /vm too.
        let (status, body) =
            vmm::api::request(&vmm::api::ApiTarget::Unix(sock), "GET", "/vm", None)
                .map_err(|e| format!("GET /vm: {e}"))?;
        let vm: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        ensure(
            status == 200 && vm["archive"]["before_first_instruction"].is_object(),
            || format!("GET /vm has no archive fetch report: {status} {body}"),
        )?;
        let line = c3
            .wait_for("first second", Duration::from_secs(120))
            .ok_or_else(|| format!("no first-second report:\n{}", c3.output()))?;
        eprintln!("  clone 3: {line}");
        ensure(line.contains("memory 0 in 0 requests"), || {
            format!("clone 3 fetched memory although the cache was full: {line}")
        })?;
        for c in [&mut c1, &mut c2, &mut c3] {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        Ok(())
    });
}

/// A VM with a local disk, pushed (the disk becomes an image in the archive) and resumed
/// from the archive *directory*: the image is read from there (`file://`), the disk reads
/// as at push time, and the instance gets its own writable overlay.
#[test]
fn a_local_archive_with_a_disk_resumes_from_the_directory() {
    check(
        "a_local_archive_with_a_disk_resumes_from_the_directory",
        || {
            use vmm::disk::BlockBackend as _;
            let tmp = temp_dir("archive-local-disk");
            let disk = tmp.join("disk.img");
            let content = support::rng::random_bytes(99, 1 << 20);
            std::fs::write(&disk, &content).map_err(|e| e.to_string())?;
            let cfg = vmm::config::BlockConfig {
                path: disk.clone(),
                ..Default::default()
            };
            let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), vec![cfg])?;
            support::tiny::snap::wait_dirty_ready(&mut vm, deadline())?;
            let snap = tmp.join("snap");
            vm.snapshot(&snap, None)?;
            drop(vm);
            let archive = tmp.join("archive");
            vmm::archive::push::push(&snap, &archive, "withdisk").map_err(|e| error_chain(&e))?;
            std::fs::remove_file(&disk).map_err(|e| e.to_string())?;

            let vm_dir = archive.join("vms/withdisk");
            let (vm, _s) = resume(
                &vm_dir.display().to_string(),
                &tmp.join("cache"),
                FillRate::Unlimited,
                patient_http(),
            )?;
            ensure(vm.vmm.machine.remote.len() == 1, || {
                format!(
                    "{} remote disks attached, expected 1",
                    vm.vmm.machine.remote.len()
                )
            })?;
            let mut got = vec![0u8; content.len()];
            vm.vmm.machine.remote[0]
                .1
                .read_at(&mut got, 0)
                .map_err(|e| error_chain(&e))?;
            ensure(got == content, || {
                "the archived disk reads differently".into()
            })?;
            Ok(())
        },
    );
}
