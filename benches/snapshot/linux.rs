//! The project's Linux guest (idle): a snapshot through the CLI with the same restore
//! measurements as the synthetic ones, and ten snapshots of it running idle
//! (`idle_series.csv`). Skipped without the guest artifacts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm::snapshot::manifest::SaveStats;
use vmm::vmm::SnapshotReport;

use crate::create::Creates;
use crate::incremental::IDLE_HEADER;
use crate::memory::scan;
use crate::restore::{Restores, restore_in_process};
use crate::support::bench::{Csv, env_or, f, ms};
use crate::support::env::{Artifacts, artifacts, vmm_bin};
use crate::support::files::dir_bytes;
use crate::support::linux::kernel_arg;
use crate::support::process::Running;

/// Starts the project's Linux guest (idle, `vmmtest.info`) on a copy of its root
/// filesystem, with the API on `ROOT/NAME.sock`.
fn spawn_linux(art: &Artifacts, root: &Path, name: &str, mib: u64) -> (Running, PathBuf) {
    let rootfs = root.join(format!("{name}-rootfs.ext4"));
    fs::copy(art.rootfs(), &rootfs).expect("copy rootfs");
    let sock = root.join(format!("{name}.sock"));
    let p = Running::try_spawn(
        Command::new(vmm_bin())
            .arg("--kernel")
            .arg(kernel_arg(art, "init=/idle vmmtest.info"))
            .arg("--memory")
            .arg(format!("size_mib={mib}"))
            .arg("--block")
            .arg(format!("path={},root=true", rootfs.display()))
            .arg("--api-sock")
            .arg(&sock),
    )
    .expect("spawn vmm")
    .echo("vmmtest:");
    (p, sock)
}

/// The project's Linux guest, idle at 1 GiB: ten `vmm snapshot create --store` 2 s apart
/// into one store (the VM runs on between them); storage against the first snapshot.
pub fn linux_idle_series(run: u64, root: &Path) {
    let Ok(art) = artifacts() else {
        println!("linux idle series: skipped (no guest artifacts)");
        return;
    };
    let mib: u64 = env_or("SNAPSHOT_BENCH_LINUX_IDLE_MIB", 1024);
    let store = root.join("idle-linux-store");
    let (mut p, sock) = spawn_linux(&art, root, "idle", mib);
    if p.wait_for_index("vmmtest: info", Duration::from_secs(420))
        .is_none()
    {
        println!(
            "linux idle series: no `vmmtest: info` line; skipped\n{}",
            p.output()
        );
        return;
    }
    let csv = Csv::new("idle_series", IDLE_HEADER);
    println!("linux idle series, {mib} MiB, 10 snapshots 2 s apart into one store:");
    let mut first = 0u64;
    for i in 1..=10 {
        std::thread::sleep(Duration::from_secs(2));
        let out = Command::new(vmm_bin())
            .args(["snapshot", "create", "--api-sock"])
            .arg(&sock)
            .arg("--store")
            .arg(&store)
            .arg(root.join(format!("idle-linux-{i}")))
            .output()
            .expect("vmm snapshot create");
        if !out.status.success() {
            println!(
                "  snapshot {i} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            break;
        }
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        let sb = dir_bytes(&store);
        if i == 1 {
            first = sb;
        }
        let ratio = sb as f64 / first as f64;
        println!(
            "  snapshot {i:>2}: {:.1} ms ({}), +{} bytes, store {:.2} MiB ({ratio:.4}x the first)",
            rep["total_ms"].as_f64().unwrap_or(f64::NAN),
            rep["dirty_method"].as_str().unwrap_or("?"),
            rep["memory"]["bytes_written"],
            sb as f64 / 1048576.0
        );
        csv.row(&[
            run.to_string(),
            "linux".into(),
            mib.to_string(),
            i.to_string(),
            f(rep["total_ms"].as_f64().unwrap_or(f64::NAN)),
            rep["memory"]["bytes_written"]
                .as_u64()
                .unwrap_or(0)
                .to_string(),
            sb.to_string(),
            format!("{ratio:.4}"),
        ]);
    }
    p.kill();
    let _ = fs::remove_dir_all(&store);
}

/// The project's Linux guest, idle at 256 MiB: boot, `vmm snapshot create` through the
/// API socket, then the same restore measurements.
pub fn linux_guest(root: &Path, creates: &Creates, restores: &Restores) {
    let Ok(art) = artifacts() else {
        println!("linux guest: skipped (no guest artifacts; run resources/build-guest.sh)");
        return;
    };
    let mib = 256;
    let snap = root.join("linux-snap");
    let (mut p, sock) = spawn_linux(&art, root, "linux", mib);
    let Some(i) = p.wait_for_index("vmmtest: info", Duration::from_secs(420)) else {
        println!(
            "linux guest: no `vmmtest: info` line; skipped\n{}",
            p.output()
        );
        return;
    };
    println!(
        "linux guest, {mib} MiB, idle (booted to `vmmtest: info` in {:.1} s):",
        p.secs_to(i)
    );
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let out = Command::new(vmm_bin())
        .args(["snapshot", "create", "--leave-paused", "--api-sock"])
        .arg(&sock)
        .arg(&snap)
        .output()
        .expect("vmm snapshot create");
    let cli_ms = ms(t.elapsed());
    p.kill();
    if !out.status.success() {
        println!(
            "linux guest: snapshot create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let rep = report_from_json(&rep, &snap);
    // What the guest's memory holds: restore it once and scan.
    let (_, _, vm) = restore_in_process(&snap, true);
    let content = scan(&vm.machine.mem);
    drop(vm);
    println!("  `vmm snapshot create` CLI wall time {cli_ms:.1} ms");
    creates.row("linux", mib, &content, &rep, dir_bytes(&snap));
    restores.measure("linux", mib, &snap, &snap, &content);
}

/// The library's report of a `vmm snapshot create` JSON report (of the snapshot `snap`).
fn report_from_json(rep: &serde_json::Value, snap: &Path) -> SnapshotReport {
    SnapshotReport {
        path: snap.to_path_buf(),
        store: snap.to_path_buf(),
        state_ms: rep["state_ms"].as_f64().unwrap_or(f64::NAN),
        memory_ms: rep["memory_ms"].as_f64().unwrap_or(f64::NAN),
        total_ms: rep["total_ms"].as_f64().unwrap_or(f64::NAN),
        memory: {
            let m = &rep["memory"];
            let g = |k: &str| m[k].as_u64().unwrap_or(0);
            SaveStats {
                chunks_total: g("chunks_total"),
                chunks_zero: g("chunks_zero"),
                chunks_reused: g("chunks_reused"),
                chunks_new: g("chunks_new"),
                chunks_deduped: g("chunks_deduped"),
                bytes_new: g("bytes_new"),
                bytes_written: g("bytes_written"),
            }
        },
        dirty_method: if rep["dirty_method"] == "kvm-log" {
            vmm::vstate::dirty::DirtyMethod::KvmLog
        } else {
            vmm::vstate::dirty::DirtyMethod::Rehash
        },
        incremental: rep["incremental"].as_bool().unwrap_or(false),
        overlays: Vec::new(),
    }
}
