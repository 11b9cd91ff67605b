//! Guest sequential read throughput vs host `dd` of the same file (harness = false; runs
//! only under `cargo bench`).
//!
//! Boots the project's `vmlinux` (root = a copy of `rootfs.ext4`, `init=/idle`) with two
//! read-only data disks: `/dev/vdb` = `disk.img` (1 MiB) and `/dev/vdc` = a generated
//! `GUEST_DISK_MIB` MiB file (default 2). The in-kernel test agent reads each disk whole
//! (raw bios, 64 KiB each) and prints its md5 (`vmmtest.disk=/dev/vdb,/dev/vdc`). The
//! guest-side time of each disk is the difference of the printk timestamps of the line
//! before it and its own line. Two sizes give a fixed cost and a marginal rate.
//!
//! The host side: `dd if=FILE of=/dev/null bs=1M` with the page cache dropped, again
//! warm, with `iflag=direct`, and `md5sum` of the file (the guest figure includes its md5).
//! Appends to `target/bench/guest_disk.csv`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::bench::*;
use support::env::{Artifacts, vmm_bin};
use support::files::md5_file;
use support::linux::kernel_arg;
use support::process::Running;
use support::rng::Rng;

/// Runs `dd if=file of=/dev/null bs=1M [extra]`; returns (seconds, MB/s) from its stderr.
fn dd(file: &Path, extra: &[&str]) -> (f64, f64) {
    let out = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["of=/dev/null", "bs=1M"])
        .args(extra)
        .output()
        .expect("run dd");
    let err = String::from_utf8_lossy(&out.stderr);
    // "4194304 bytes (4.2 MB, 4.0 MiB) copied, 0.00123 s, 3.4 GB/s"
    let line = err.lines().find(|l| l.contains("copied")).unwrap_or("");
    let bytes: f64 = line
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let secs: f64 = line
        .split(", ")
        .find(|p| p.ends_with(" s"))
        .and_then(|p| p.trim_end_matches(" s").trim().parse().ok())
        .unwrap_or(f64::NAN);
    (secs, bytes / secs / 1e6)
}

/// md5sum of `p` and how long md5sum took, in seconds.
fn md5(p: &Path) -> (String, f64) {
    let t = Instant::now();
    let sum = md5_file(p);
    (sum, t.elapsed().as_secs_f64())
}

/// One run's output: `guest_disk.csv` rows tagged with the run.
struct Out {
    run: u64,
    csv: Csv,
}

impl Out {
    fn row(
        &self,
        side: &str,
        what: String,
        bytes: String,
        secs: String,
        mbps: f64,
        detail: String,
    ) {
        self.csv.row(&[
            self.run.to_string(),
            side.into(),
            what,
            bytes,
            secs,
            f(mbps),
            detail,
            f(load1()),
        ]);
    }
}

/// What the guest run printed: its lines, the index of `vmmtest: info`, and the 1-minute
/// load before the boot and after the exit.
struct GuestRun {
    vm: Running,
    info: usize,
    load: (f64, f64),
}

/// Boots the guest with `disks` read-only beside its root; None (after saying why) if the
/// agent did not finish.
fn boot(art: &Artifacts, root: &Path, disks: &[(&str, &PathBuf)], mib: usize) -> Option<GuestRun> {
    let cmdline = "init=/idle vmmtest.info vmmtest.disk=/dev/vdb,/dev/vdc vmmtest.poweroff";
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel")
        .arg(kernel_arg(art, cmdline))
        .arg("--memory")
        .arg("size_mib=256")
        .arg("--block")
        .arg(format!("path={},root=true", root.display()));
    for (_, f) in disks {
        cmd.arg("--block")
            .arg(format!("path={},read_only=true", f.display()));
    }
    let load_before = load1();
    let mut p = Running::try_spawn(&mut cmd)
        .expect("spawn vmm")
        .echo("vmmtest:");
    let timeout = Duration::from_secs(420 + 60 * mib as u64);
    let info = p.wait_for_index("vmmtest: info", Duration::from_secs(420));
    let done = p.wait_for_index("vmmtest: done", timeout);
    let (code, _) = p.wait_exit_at(Duration::from_secs(120));
    let (Some(info), Some(_)) = (info, done) else {
        println!(
            "guest_disk: the agent did not finish (exit {code:?})\n{}",
            p.output()
        );
        return None;
    };
    println!(
        "guest booted to `vmmtest: info` in {:.1} s; exit {code:?}",
        p.secs_to(info)
    );
    Some(GuestRun {
        vm: p,
        info,
        load: (load_before, load1()),
    })
}

/// The guest side of each disk (from the printk times of the agent's lines) and the host's
/// md5sum of it; then the guest's marginal rate. False if a disk has no line.
fn guest_rows(out: &Out, g: &GuestRun, disks: &[(&str, &PathBuf)]) -> bool {
    let lines = g.vm.lines();
    let mut prev = printk_secs(&lines[g.info].text).unwrap_or(f64::NAN);
    let mut guest = Vec::new();
    for (dev, file) in disks {
        let pat = format!("vmmtest: disk {dev} ");
        let Some(line) = lines.iter().find(|l| l.text.contains(&pat)) else {
            println!("guest_disk: no line for {dev}\n{}", g.vm.output());
            return false;
        };
        let t = printk_secs(&line.text).unwrap_or(f64::NAN);
        let bytes: f64 = line
            .text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        let (want, host_md5_s) = md5(file);
        let ok = line.text.contains(&format!("md5={want}"));
        let secs = t - prev;
        prev = t;
        println!(
            "  guest {dev}: {bytes} bytes in {secs:.3} s (printk) = {:.3} MB/s, md5 {}; host md5sum \
             {host_md5_s:.4} s",
            bytes / secs / 1e6,
            if ok { "ok" } else { "WRONG" }
        );
        guest.push((bytes, secs));
        out.csv.row(&[
            out.run.to_string(),
            "guest".into(),
            format!("read+md5 {dev}"),
            f(bytes),
            f(secs),
            f(bytes / secs / 1e6),
            if ok { "md5 ok" } else { "md5 WRONG" }.into(),
            f(g.load.1.max(g.load.0)),
        ]);
        let detail = "page cache warm; includes process start".to_string();
        let what = format!("md5sum {dev}");
        out.row(
            "host",
            what,
            f(bytes),
            f(host_md5_s),
            bytes / host_md5_s / 1e6,
            detail,
        );
    }
    if let [(b1, s1), (b2, s2)] = guest[..] {
        let marginal = (b2 - b1) / (s2 - s1) / 1e6;
        let fixed = s1 - b1 / (marginal * 1e6);
        println!("  guest marginal rate {marginal:.3} MB/s, fixed cost {fixed:.3} s per disk");
        let what = "marginal read+md5".to_string();
        out.row(
            "guest",
            what,
            f(b2 - b1),
            f(s2 - s1),
            marginal,
            format!("fixed cost {fixed:.3} s"),
        );
    }
    true
}

/// The host side: `dd` of the big disk with the page cache dropped, warm, and direct.
fn host_rows(out: &Out, big: &Path, mib: usize, dir: &Path) {
    for (what, extra, drop) in [
        ("dd cold", &[][..], true),
        ("dd warm", &[][..], false),
        ("dd iflag=direct", &["iflag=direct"][..], false),
    ] {
        let dropped = drop && drop_caches();
        let (secs, mbps) = dd(big, extra);
        println!("  host {what}: {} MiB in {secs:.5} s = {mbps:.0} MB/s", mib);
        let detail = if drop && !dropped {
            "page cache NOT dropped".into()
        } else {
            format!("{} on {}", big.display(), fs_type(dir))
        };
        let bytes = (mib << 20).to_string();
        out.row(
            "host",
            what.into(),
            bytes,
            format!("{secs:.6}"),
            mbps,
            detail,
        );
    }
}

fn main() {
    let Some(art) = linux_bench("guest_disk") else {
        return;
    };
    let run = run_id();
    print_host("guest_disk");
    let mib: usize = env_or("GUEST_DISK_MIB", 2);
    let dir = bench_dir("guest-disk");
    let root = dir.join("rootfs.ext4");
    fs::copy(art.rootfs(), &root).expect("copy rootfs");
    let small = dir.join("disk1.img");
    fs::copy(art.disk(), &small).expect("copy disk.img");
    let big = dir.join(format!("disk{mib}.img"));
    // Deterministic pseudo-random data.
    let data = Rng::new(0x9e37_79b9_7f4a_7c15).bytes(mib << 20);
    fs::write(&big, data).expect("write data disk");
    let disks = [("/dev/vdb", &small), ("/dev/vdc", &big)];
    let Some(g) = boot(&art, &root, &disks, mib) else {
        return;
    };
    let out = Out {
        run,
        csv: Csv::new(
            "guest_disk",
            "run,side,what,bytes,seconds,mb_per_s,detail,load1",
        ),
    };
    if !guest_rows(&out, &g, &disks) {
        return;
    }
    host_rows(&out, &big, mib, &dir);
    println!("guest_disk done; loadavg {}", loadavg());
    let _ = fs::remove_dir_all(&dir);
}
