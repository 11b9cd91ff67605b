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
#[path = "peers/table.rs"]
mod table;
#[path = "peers/vm.rs"]
mod vm;

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use support::bench::*;
use support::env::{Artifacts, vmm_bin};
use table::{Table, spread};
use vm::*;

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
        Some(p) => format!(
            "firecracker {}",
            p.canonicalize().unwrap_or(p.clone()).display()
        ),
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
