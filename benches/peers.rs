//! `vmm` and Firecracker side by side, in the same run (harness = false; runs only under
//! `cargo bench`, it boots two Linux guests).
//!
//! Both run the project's `vmlinux` with the idle initramfs and the test agent's counter
//! (`rdinit=/idle vmmtest.counter`), 256 MiB, 1 vCPU, on the same host. Firecracker gets
//! exactly the command line `vmm` gave its guest (read back from `GET /vm`, so the PVM
//! workarounds of docs/PVM_HOSTS.md are the same), with its own tick token. Measured:
//!
//! - boot: process spawn → the counter's first tick line (one boot each);
//! - pause: `PATCH /vm {"state":"Paused"}` → answered (`PEERS_PAUSES`, default 5, each);
//! - full snapshot create of the paused VM (`PUT /snapshot/create`) → answered, and its
//!   bytes on disk (du: allocated blocks) — `vmm`'s snapshot directory, Firecracker's
//!   state file + memory file;
//! - ten snapshots 1 s apart (pause, create, resume): `vmm` into one shared store;
//!   Firecracker ten full snapshots, and one full + nine diff snapshots
//!   (`track_dirty_pages` is on in its machine config) — their storage;
//! - restore, spawn → running: `vmm restore DIR --api-sock S` until `GET /vm` answers
//!   `Running`; Firecracker spawned (`--api-sock S --no-seccomp`) and `PUT /snapshot/load`
//!   (`resume_vm: true`) until answered; `PEERS_RESTORES` (default 10) interleaved runs each,
//!   p50 / min / max; each restored guest must print a tick (checked, not timed);
//! - fan-out: `PEERS_CLONES` (default 4) restores of one snapshot started at once: time from
//!   the first spawn until all are running, and the sum of their PSS
//!   (`/proc/PID/smaps_rollup`) once every clone has ticked.
//!
//! Firecracker: `$FIRECRACKER`, else `../shared/peers/firecracker` next to the repository
//! (for a git worktree under `wt/`, `../../shared/peers/firecracker`). Without one the bench
//! says "firecracker not found: skipped …" and measures `vmm` alone.
//!
//! Prints one table (ratio = vmm / Firecracker: below 1 means `vmm` is faster or smaller),
//! appends it to `target/bench/peers.csv` (the raw samples to `peers_samples.csv`) and prints
//! it as markdown for docs/BENCHMARKS.md. Scratch files go under `$BENCH_DIR` (default
//! `target/tmp`) and are removed at the end; every process is killed when its guard drops.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::api::{ApiTarget, ClientError, request_with_timeout};
use vmm::util::error_chain;

use support::bench::*;
use support::env::{Artifacts, vmm_bin};
use support::linux::{BASE_CMDLINE, BOOT_TIMEOUT, wait_tick};
use support::process::Running;

/// Guest memory of both VMs.
const MEM_MIB: u64 = 256;
/// Ceiling for one API request (a snapshot of a loaded host's VM included).
const API_TIMEOUT: Duration = Duration::from_secs(600);
/// Ceiling for a restored VM to come up.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Ceiling for a restored guest's next tick (a ceiling: the wait returns at the tick).
const TICK_TIMEOUT: Duration = Duration::from_secs(120);

/// Which VMM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Vmm,
    Firecracker,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::Firecracker => "firecracker",
        }
    }
}

/// A running VM: its process (killed when dropped) and API socket.
struct Vm {
    proc: Running,
    sock: PathBuf,
    token: String,
}

/// A snapshot to restore.
#[derive(Clone)]
enum Snap {
    /// A `vmm` snapshot directory.
    Vmm(PathBuf),
    /// Firecracker's state file and memory file.
    Firecracker { state: PathBuf, mem: PathBuf },
}

impl Snap {
    fn kind(&self) -> Kind {
        match self {
            Snap::Vmm(_) => Kind::Vmm,
            Snap::Firecracker { .. } => Kind::Firecracker,
        }
    }

    /// Bytes on disk (du).
    fn du(&self) -> u64 {
        match self {
            Snap::Vmm(d) => du(d),
            Snap::Firecracker { state, mem } => du(state) + du(mem),
        }
    }
}

/// Allocated bytes of `p` (a file, or a directory tree), like `du`.
fn du(p: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(p) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir()
        && let Ok(rd) = fs::read_dir(p)
    {
        total += rd.flatten().map(|e| du(&e.path())).sum::<u64>();
    }
    total
}

/// The Firecracker binary, or why there is none.
fn firecracker() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FIRECRACKER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("$FIRECRACKER={} does not exist", p.display()))
        };
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tried = [
        repo.join("../shared/peers/firecracker"),
        repo.join("../../shared/peers/firecracker"),
    ];
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "no $FIRECRACKER and no {}",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )
    })
}

/// One request to the API on `sock`.
fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), String> {
    request_with_timeout(
        &ApiTarget::Unix(sock.to_path_buf()),
        method,
        path,
        body,
        API_TIMEOUT,
    )
    .map_err(|e| format!("{method} {path} on {}: {}", sock.display(), error_chain(&e)))
}

/// A request that must succeed (2xx); returns its round trip in ms.
fn call(sock: &Path, method: &str, path: &str, body: &serde_json::Value) -> Result<f64, String> {
    let t = Instant::now();
    let (status, answer) = api(sock, method, path, Some(&body.to_string()))?;
    let d = ms(t.elapsed());
    if !(200..300).contains(&status) {
        return Err(format!("{method} {path}: {status} {answer}"));
    }
    Ok(d)
}

/// `PATCH /vm` to `state` (same body for both VMMs); its round trip in ms.
fn set_state(vm: &Vm, state: &str) -> Result<f64, String> {
    call(&vm.sock, "PATCH", "/vm", &json!({ "state": state }))
}

/// Spawns `cmd` as a VM process; waits for its first tick line. Returns it and the seconds
/// from the spawn to that line.
fn boot(mut cmd: Command, sock: PathBuf, token: &str, what: &str) -> Result<(Vm, f64), String> {
    let _ = fs::remove_file(&sock);
    let mut proc = Running::try_spawn(&mut cmd)
        .map_err(|e| format!("spawn {what}: {e}"))?
        .echo("vmmtest:");
    let Some(i) = proc.wait_for_index(&format!("vmmtest: tick {token} 0 "), BOOT_TIMEOUT) else {
        return Err(format!("{what}: no first tick\n{}", proc.output()));
    };
    let secs = proc.secs_to(i);
    let vm = Vm {
        proc,
        sock,
        token: token.to_string(),
    };
    Ok((vm, secs))
}

/// Boots the `vmm` counter guest; returns it, its boot time and the full guest command line
/// `vmm` gave it (with the host workarounds).
fn boot_vmm(art: &Artifacts, dir: &Path, token: &str) -> Result<(Vm, f64, String), String> {
    let cmdline = format!("{BASE_CMDLINE} rdinit=/idle vmmtest.counter vmmtest.token={token}");
    let sock = dir.join("vmm-boot.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel")
        .arg(format!(
            "path={},cmdline=\"{cmdline}\"",
            art.vmlinux().display()
        ))
        .arg("--initrd")
        .arg(art.idle_initrd())
        .args([
            "--memory",
            &format!("size_mib={MEM_MIB}"),
            "--vcpu",
            "num=1",
        ])
        .arg("--api-sock")
        .arg(&sock);
    let (vm, secs) = boot(cmd, sock, token, "vmm")?;
    let (_, body) = api(&vm.sock, "GET", "/vm", None)?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("GET /vm: {e}: {body}"))?;
    let full = v["cmdline"]
        .as_str()
        .ok_or_else(|| format!("GET /vm has no cmdline: {body}"))?
        .to_string();
    Ok((vm, secs, full))
}

/// Boots the same guest under Firecracker with `cmdline`.
fn boot_fc(
    fc: &Path,
    art: &Artifacts,
    dir: &Path,
    cmdline: &str,
    token: &str,
) -> Result<(Vm, f64), String> {
    let config = json!({
        "boot-source": {
            "kernel_image_path": art.vmlinux(),
            "initrd_path": art.idle_initrd(),
            "boot_args": cmdline,
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": MEM_MIB,
            "track_dirty_pages": true,
        },
    });
    let cfg = dir.join("fc-config.json");
    fs::write(&cfg, config.to_string()).map_err(|e| format!("write {}: {e}", cfg.display()))?;
    let sock = dir.join("fc-boot.sock");
    let mut cmd = Command::new(fc);
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .arg("--no-seccomp");
    boot(cmd, sock, token, "firecracker")
}

/// Takes a snapshot of the paused `vm` into `to` (for `vmm`, a directory; with `store`, a
/// shared chunk store); `diff` asks Firecracker for a diff snapshot. Returns it and the
/// request's round trip in ms.
fn create(
    vm: &Vm,
    kind: Kind,
    to: &Path,
    store: Option<&Path>,
    diff: bool,
) -> Result<(Snap, f64), String> {
    match kind {
        Kind::Vmm => {
            let mut body = json!({ "path": to });
            if let Some(s) = store {
                body["store"] = json!(s);
            }
            let d = call(&vm.sock, "PUT", "/snapshot/create", &body)?;
            Ok((Snap::Vmm(to.to_path_buf()), d))
        }
        Kind::Firecracker => {
            let (state, mem) = (to.with_extension("state"), to.with_extension("mem"));
            let body = json!({
                "snapshot_type": if diff { "Diff" } else { "Full" },
                "snapshot_path": state,
                "mem_file_path": mem,
            });
            let d = call(&vm.sock, "PUT", "/snapshot/create", &body)?;
            Ok((Snap::Firecracker { state, mem }, d))
        }
    }
}

/// Pause, snapshot, resume; the snapshot request's round trip in ms.
fn snapshot_running(
    vm: &Vm,
    kind: Kind,
    to: &Path,
    store: Option<&Path>,
    diff: bool,
) -> Result<(Snap, f64), String> {
    set_state(vm, "Paused")?;
    let r = create(vm, kind, to, store, diff);
    set_state(vm, "Resumed")?;
    r
}

/// Restores `snap` in a new process with its API on `sock`: spawn → running, in ms.
fn restore(bin: &Path, snap: &Snap, sock: &Path, token: &str) -> Result<(Vm, f64), String> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(bin);
    match snap {
        Snap::Vmm(dir) => cmd.arg("restore").arg(dir).arg("--api-sock").arg(sock),
        Snap::Firecracker { .. } => cmd.arg("--api-sock").arg(sock).arg("--no-seccomp"),
    };
    let mut proc = Running::try_spawn(&mut cmd).map_err(|e| format!("spawn: {e}"))?;
    let target = ApiTarget::Unix(sock.to_path_buf());
    let deadline = proc.started + START_TIMEOUT;
    loop {
        if let Ok(Some(st)) = proc.child.try_wait() {
            proc.kill_and_drain();
            return Err(format!("exited during restore: {st}\n{}", proc.output()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not running after {START_TIMEOUT:?}\n{}",
                proc.output()
            ));
        }
        let answer = match snap {
            Snap::Vmm(_) if sock.exists() => {
                request_with_timeout(&target, "GET", "/vm", None, API_TIMEOUT)
            }
            Snap::Vmm(_) => Err(ClientError::BadResponse("no socket yet".into())),
            Snap::Firecracker { state, mem } => {
                let body = json!({
                    "snapshot_path": state,
                    "mem_backend": { "backend_type": "File", "backend_path": mem },
                    "resume_vm": true,
                });
                request_with_timeout(
                    &target,
                    "PUT",
                    "/snapshot/load",
                    Some(&body.to_string()),
                    API_TIMEOUT,
                )
            }
        };
        match answer {
            Ok((200, body)) if matches!(snap, Snap::Vmm(_)) => {
                if body.contains("\"Running\"") {
                    break;
                }
            }
            Ok((s, _)) if (200..300).contains(&s) && matches!(snap, Snap::Firecracker { .. }) => {
                break;
            }
            Ok((s, body)) => {
                return Err(format!("restore answered {s}: {body}\n{}", proc.output()));
            }
            // Not listening yet.
            Err(ClientError::Connect { .. }) | Err(ClientError::BadResponse(_)) => {}
            Err(e) => return Err(format!("restore: {}", error_chain(&e))),
        }
        thread::sleep(Duration::from_micros(200));
    }
    let d = ms(proc.started.elapsed());
    let vm = Vm {
        proc,
        sock: sock.to_path_buf(),
        token: token.to_string(),
    };
    Ok((vm, d))
}

/// Waits for the restored guest's next tick (ceiling [`TICK_TIMEOUT`]); returns it.
fn next_tick(vm: &mut Vm) -> Option<u64> {
    wait_tick(&mut vm.proc, &vm.token.clone(), 0, TICK_TIMEOUT)
}

/// The highest tick `vm` printed so far.
fn last_tick(vm: &Vm) -> Option<u64> {
    support::linux::ticks(&vm.proc.console(), &vm.token)
        .last()
        .copied()
}

/// Proportional set size of process `pid`, in bytes.
fn pss(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let l = s.lines().find(|l| l.starts_with("Pss:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// (p50, min, max) of `v`.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let (min, med) = min_median(v);
    (med, min, v.iter().copied().fold(f64::NAN, f64::max))
}

/// One line of the result table: the same figure for both VMMs.
struct Row {
    metric: String,
    unit: &'static str,
    vmm: Option<f64>,
    fc: Option<f64>,
}

/// The result table, its CSVs and the raw samples.
struct Table {
    run: u64,
    rows: Vec<Row>,
    samples: Csv,
}

impl Table {
    fn add(
        &mut self,
        metric: impl Into<String>,
        unit: &'static str,
        vmm: Option<f64>,
        fc: Option<f64>,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            unit,
            vmm,
            fc,
        });
    }

    /// A raw sample for `peers_samples.csv`.
    fn sample(&self, kind: Kind, what: &str, iter: usize, value: f64) {
        let fields = [
            self.run.to_string(),
            kind.name().into(),
            what.into(),
            iter.to_string(),
            f(value),
            f(load1()),
        ];
        self.samples.row(&fields);
    }

    /// Prints the table (plain and markdown) and appends it to `peers.csv`.
    fn finish(&self, fc_note: &str) {
        let csv = Csv::new("peers", "run,metric,unit,vmm,firecracker,ratio,load1");
        let cell = |v: Option<f64>| v.map_or("—".to_string(), fmt_num);
        let ratio = |r: &Row| match (r.vmm, r.fc) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        println!("\npeers: vmm vs firecracker, same run ({fc_note}); ratio = vmm / firecracker");
        println!(
            "{:<46} {:>12} {:>12} {:>8}",
            "metric", "vmm", "firecracker", "ratio"
        );
        let mut md =
            String::from("| Metric | vmm | Firecracker | vmm / FC |\n|---|---:|---:|---:|\n");
        for r in &self.rows {
            let q = ratio(r).map_or("—".to_string(), |q| format!("{q:.2}×"));
            let m = format!("{} ({})", r.metric, r.unit);
            println!("{m:<46} {:>12} {:>12} {q:>8}", cell(r.vmm), cell(r.fc));
            md += &format!("| {m} | {} | {} | {q} |\n", cell(r.vmm), cell(r.fc));
            let opt = |v: Option<f64>| v.map_or(String::new(), f);
            csv.row(&[
                self.run.to_string(),
                r.metric.clone(),
                r.unit.into(),
                opt(r.vmm),
                opt(r.fc),
                opt(ratio(r)),
                f(load1()),
            ]);
        }
        println!("\nmarkdown:\n\n{md}");
    }
}

/// A number with a sensible number of digits.
fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Runs `f` for Firecracker if there is one; reports (and swallows) its error.
fn fc_part<T>(
    fc: Option<&Path>,
    what: &str,
    f: impl FnOnce(&Path) -> Result<T, String>,
) -> Option<T> {
    let fc = fc?;
    f(fc)
        .map_err(|e| println!("firecracker {what} failed: {e}"))
        .ok()
}

fn main() {
    let Some(art) = linux_bench("peers") else {
        return;
    };
    let fc = match firecracker() {
        Ok(p) => Some(p),
        Err(why) => {
            println!("firecracker not found: skipped ({why}); measuring vmm alone");
            None
        }
    };
    let fc_note = match &fc {
        Some(p) => format!("firecracker {}", p.display()),
        None => "firecracker not found: its column skipped".into(),
    };
    print_host("peers");
    let dir = bench_dir("peers");
    let mut t = Table {
        run: run_id(),
        rows: Vec::new(),
        samples: Csv::new("peers_samples", "run,peer,what,iter,value,load1"),
    };
    if let Err(e) = run(&art, fc.as_deref(), &dir, &mut t) {
        println!("peers bench: {e}");
    }
    t.finish(&fc_note);
    println!("loadavg at the end: {}", loadavg());
    let _ = fs::remove_dir_all(&dir);
}

/// The whole comparison; a `vmm` failure ends it, a Firecracker one leaves its cells empty.
fn run(art: &Artifacts, fc: Option<&Path>, dir: &Path, t: &mut Table) -> Result<(), String> {
    let pid = std::process::id();
    let (vtok, ftok) = (format!("pv{pid}"), format!("pf{pid}"));
    let (v, vboot, cmdline) = boot_vmm(art, dir, &vtok)?;
    println!("vmm: first tick after {vboot:.1} s; guest command line: {cmdline}");
    let fcmd = cmdline.replace(
        &format!("vmmtest.token={vtok}"),
        &format!("vmmtest.token={ftok}"),
    );
    let fboot = fc_part(fc, "boot", |fc| boot_fc(fc, art, dir, &fcmd, &ftok));
    let fboot_s = fboot.as_ref().map(|x| x.1);
    if let Some(s) = fboot_s {
        println!("firecracker: first tick after {s:.1} s");
    }
    t.add("boot to the first counter line", "s", Some(vboot), fboot_s);
    let f = fboot.map(|x| x.0);

    // Pause → answered, interleaved.
    let (mut vp, mut fp) = (Vec::new(), Vec::new());
    for i in 1..=env_or("PEERS_PAUSES", 5usize) {
        thread::sleep(Duration::from_millis(500));
        vp.push(set_state(&v, "Paused")?);
        set_state(&v, "Resumed")?;
        t.sample(Kind::Vmm, "pause_ms", i, *vp.last().unwrap());
        if let Some(fv) = &f {
            match set_state(fv, "Paused").and_then(|d| set_state(fv, "Resumed").map(|_| d)) {
                Ok(d) => {
                    fp.push(d);
                    t.sample(Kind::Firecracker, "pause_ms", i, d);
                }
                Err(e) => println!("firecracker pause failed: {e}"),
            }
        }
    }
    let p50 = |v: &[f64]| (!v.is_empty()).then(|| spread(v).0);
    t.add("pause, request → answered, p50", "ms", p50(&vp), p50(&fp));

    // Full snapshot of the paused VM.
    set_state(&v, "Paused")?;
    let (vfull, vms) = create(&v, Kind::Vmm, &dir.join("vmm-full"), None, false)?;
    set_state(&v, "Resumed")?;
    let ffull = f.as_ref().and_then(|fv| {
        fc_part(fc, "full snapshot", |_| {
            set_state(fv, "Paused")?;
            let r = create(fv, Kind::Firecracker, &dir.join("fc-full"), None, false);
            set_state(fv, "Resumed")?;
            r
        })
    });
    let vlast = last_tick(&v).unwrap_or(0);
    let flast = f.as_ref().and_then(last_tick).unwrap_or(0);
    t.add(
        "full snapshot create (paused VM)",
        "ms",
        Some(vms),
        ffull.as_ref().map(|x| x.1),
    );
    t.add(
        "full snapshot, bytes on disk (du)",
        "MB",
        Some(mb(vfull.du())),
        ffull.as_ref().map(|x| mb(x.0.du())),
    );

    ten_snapshots(&v, f.as_ref(), fc, dir, t)?;
    // The originals go; everything from here on restores the full snapshots.
    drop(v);
    drop(f);
    let ffull = ffull.map(|x| x.0);
    println!("restoring (ticks at the snapshot: vmm {vlast}, firecracker {flast})");
    restores(&vfull, ffull.as_ref(), fc, dir, (&vtok, &ftok), t)?;
    fanout(&vfull, ffull.as_ref(), fc, dir, (&vtok, &ftok), t)
}

/// Ten snapshots 1 s apart of the running VMs: `vmm` into one store; Firecracker ten full,
/// then one full and nine diff.
fn ten_snapshots(
    v: &Vm,
    f: Option<&Vm>,
    fc: Option<&Path>,
    dir: &Path,
    t: &mut Table,
) -> Result<(), String> {
    let store = dir.join("vmm-store");
    let (mut vt, mut vdirs, mut ft, mut fbytes) = (Vec::new(), Vec::new(), Vec::new(), 0u64);
    let mut ffail = f.is_none();
    for i in 1..=10 {
        thread::sleep(Duration::from_secs(1));
        let to = dir.join(format!("vmm-series-{i}"));
        let (_, d) = snapshot_running(v, Kind::Vmm, &to, Some(&store), false)?;
        vt.push(d);
        vdirs.push(to);
        t.sample(Kind::Vmm, "series_create_ms", i, d);
        if let (Some(fv), false) = (f, ffail) {
            let to = dir.join(format!("fc-series-{i}"));
            match snapshot_running(fv, Kind::Firecracker, &to, None, false) {
                Ok((s, d)) => {
                    ft.push(d);
                    fbytes += s.du();
                    t.sample(Kind::Firecracker, "series_full_create_ms", i, d);
                    // Counted; the files go (2.5 GB for ten).
                    if let Snap::Firecracker { state, mem } = s {
                        let _ = fs::remove_file(state);
                        let _ = fs::remove_file(mem);
                    }
                }
                Err(e) => {
                    println!("firecracker snapshot {i} failed: {e}");
                    ffail = true;
                }
            }
        }
    }
    let vbytes = du(&store) + vdirs.iter().map(|d| du(d)).sum::<u64>();
    let fok = !ffail;
    t.add(
        "ten snapshots 1 s apart: create, p50",
        "ms",
        Some(spread(&vt).0),
        fok.then(|| spread(&ft).0),
    );
    t.add(
        "ten snapshots' storage (vmm: one store; FC: full)",
        "MB",
        Some(mb(vbytes)),
        fok.then_some(mb(fbytes)),
    );
    let diff = f.and_then(|fv| fc_part(fc, "diff snapshots", |_| diff_series(fv, dir, t)));
    t.add(
        "ten snapshots' storage (FC: 1 full + 9 diff)",
        "MB",
        Some(mb(vbytes)),
        diff.map(|(b, _)| mb(b)),
    );
    t.add(
        "FC diff snapshot create, p50",
        "ms",
        None,
        diff.map(|(_, d)| d),
    );
    Ok(())
}

/// Firecracker: one full then nine diff snapshots 1 s apart; (bytes on disk, diff p50 ms).
fn diff_series(fv: &Vm, dir: &Path, t: &Table) -> Result<(u64, f64), String> {
    let (mut bytes, mut times) = (0, Vec::new());
    for i in 1..=10 {
        thread::sleep(Duration::from_secs(1));
        let to = dir.join(format!("fc-diff-{i}"));
        let (s, d) = snapshot_running(fv, Kind::Firecracker, &to, None, i > 1)?;
        bytes += s.du();
        if i > 1 {
            times.push(d);
            t.sample(Kind::Firecracker, "series_diff_create_ms", i, d);
        }
    }
    Ok((bytes, spread(&times).0))
}

/// `PEERS_RESTORES` interleaved restores of each full snapshot.
fn restores(
    vs: &Snap,
    fs_: Option<&Snap>,
    fc: Option<&Path>,
    dir: &Path,
    tok: (&str, &str),
    t: &mut Table,
) -> Result<(), String> {
    let n: usize = env_or("PEERS_RESTORES", 10);
    let (mut vr, mut fr) = (Vec::new(), Vec::new());
    let (mut vticks, mut fticks) = (0, 0);
    for i in 1..=n {
        let (mut vm, d) = restore(Path::new(vmm_bin()), vs, &dir.join("vmm-r.sock"), tok.0)
            .map_err(|e| format!("vmm restore {i}: {e}"))?;
        vr.push(d);
        t.sample(Kind::Vmm, "restore_ms", i, d);
        vticks += usize::from(next_tick(&mut vm).is_some());
        drop(vm);
        if let (Some(s), Some(bin)) = (fs_, fc) {
            match restore(bin, s, &dir.join("fc-r.sock"), tok.1) {
                Ok((mut vm, d)) => {
                    fr.push(d);
                    t.sample(Kind::Firecracker, "restore_ms", i, d);
                    fticks += usize::from(next_tick(&mut vm).is_some());
                }
                Err(e) => println!("firecracker restore {i} failed: {e}"),
            }
        }
    }
    println!(
        "restores: vmm {} of {n} ticked after the restore, firecracker {} of {}",
        vticks,
        fticks,
        fr.len()
    );
    let (v, f) = (spread(&vr), (!fr.is_empty()).then(|| spread(&fr)));
    t.add(
        format!("restore spawn → running, p50 of {n}"),
        "ms",
        Some(v.0),
        f.map(|x| x.0),
    );
    t.add(
        "restore spawn → running, min",
        "ms",
        Some(v.1),
        f.map(|x| x.1),
    );
    t.add(
        "restore spawn → running, max",
        "ms",
        Some(v.2),
        f.map(|x| x.2),
    );
    Ok(())
}

/// `n` restores of `snap` started at once: ms from the first spawn until all run, and the
/// clones (still running).
fn clones(
    bin: &Path,
    snap: &Snap,
    dir: &Path,
    token: &str,
    n: usize,
) -> Result<(f64, Vec<Vm>), String> {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (bin, snap, token) = (bin.to_path_buf(), snap.clone(), token.to_string());
            let sock = dir.join(format!("{}-clone-{i}.sock", snap.kind().name()));
            thread::spawn(move || {
                restore(&bin, &snap, &sock, &token).map(|(vm, _)| (vm, t0.elapsed()))
            })
        })
        .collect();
    let mut vms = Vec::new();
    let mut all = Duration::ZERO;
    for h in handles {
        let (vm, at) = h
            .join()
            .map_err(|_| "clone thread panicked".to_string())??;
        all = all.max(at);
        vms.push(vm);
    }
    Ok((ms(all), vms))
}

/// Waits for every clone's next tick; then the sum of their PSS in bytes (None if one did
/// not tick).
fn clones_pss(vms: &mut [Vm], what: &str) -> Option<u64> {
    let mut ok = true;
    for (i, vm) in vms.iter_mut().enumerate() {
        if next_tick(vm).is_none() {
            println!("{what} clone {i}: no tick within {TICK_TIMEOUT:?}");
            ok = false;
        }
    }
    let sum = vms
        .iter()
        .map(|vm| pss(vm.proc.child.id()).unwrap_or(0))
        .sum();
    ok.then_some(sum)
}

/// The N-clone fan-out of both VMMs.
fn fanout(
    vs: &Snap,
    fs_: Option<&Snap>,
    fc: Option<&Path>,
    dir: &Path,
    tok: (&str, &str),
    t: &mut Table,
) -> Result<(), String> {
    let n: usize = env_or("PEERS_CLONES", 4);
    let (vms, mut vvms) = clones(Path::new(vmm_bin()), vs, dir, tok.0, n)?;
    let vpss = clones_pss(&mut vvms, "vmm");
    drop(vvms);
    let fres = match (fs_, fc) {
        (Some(s), Some(bin)) => match clones(bin, s, dir, tok.1, n) {
            Ok((d, mut vms)) => Some((d, clones_pss(&mut vms, "firecracker"))),
            Err(e) => {
                println!("firecracker fan-out failed: {e}");
                None
            }
        },
        _ => None,
    };
    t.sample(Kind::Vmm, "fanout_all_running_ms", n, vms);
    if let Some((d, _)) = fres {
        t.sample(Kind::Firecracker, "fanout_all_running_ms", n, d);
    }
    t.add(
        format!("{n} clones at once: all running"),
        "ms",
        Some(vms),
        fres.map(|x| x.0),
    );
    t.add(
        format!("{n} clones: sum of PSS after a tick each"),
        "MiB",
        vpss.map(|b| b as f64 / 1048576.0),
        fres.and_then(|x| x.1).map(|b| b as f64 / 1048576.0),
    );
    Ok(())
}
