//! Linux boot from a lazy remote root image (harness = false; runs only under `cargo bench`,
//! it boots guests and takes minutes).
//!
//! Imports `rootfs.ext4` into a temp archive (`vmm image import`), serves it with Debian's
//! nginx on a free loopback port and boots the project's `vmlinux` (`init=/idle
//! vmmtest.info vmmtest.poweroff`) three ways: `cold` (remote root, empty cache), `warm`
//! (remote root, the cache the cold boot filled, fresh overlay) and `local` (a copy of the
//! image as a plain file). Measures process start → `VFS: Mounted root` and → exit, and
//! reads `bytes_fetched` / `bytes_read_by_guest` from the `remote disk: {json}` log line.
//! Writes `docs/bench/remote_boot.csv` and `docs/bench/remote_boot.svg`.
//! `REMOTE_BOOT_RUNS` (default 1) repeats each mode; the CSV has one row per boot.
//!
//! On PVM-style nested hosts early boot is emulated, so absolute times mean little;
//! compare them as ratios. The bytes fetched are the meaningful figure.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use support::bench::*;
use support::env::{Artifacts, artifacts, have_kvm, vmm_bin};
use support::linux::{BOOT_TIMEOUT, kernel_arg};
use support::nginx::{NGINX, Nginx, NginxConfig};
use support::process::Running;

const ROOT_MOUNTED: &str = "VFS: Mounted root";

/// One boot's figures.
struct Row {
    mode: &'static str,
    iter: usize,
    root_s: f64,
    exit_s: f64,
    fetched: Option<u64>,
    read: Option<u64>,
}

/// (bytes_fetched, bytes_read_by_guest) of disk 0 from the `remote disk: {json}` line.
fn remote_stats(p: &Running) -> (Option<u64>, Option<u64>) {
    p.lines()
        .iter()
        .filter(|l| l.text.contains("remote disk:") && l.text.contains("\"disk\":0"))
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.text[l.text.find('{')?..]).ok()?;
            Some((
                v["bytes_fetched"].as_u64(),
                v["bytes_read_by_guest"].as_u64(),
            ))
        })
        .unwrap_or((None, None))
}

/// Boots once with `block` as the root disk.
fn boot(art: &Artifacts, mode: &'static str, iter: usize, block: &str) -> Result<Row, String> {
    println!("[remote_boot] {mode} #{iter}: --block {block}");
    let mut p = Running::try_spawn(
        Command::new(vmm_bin())
            .env("RUST_LOG", "info")
            .arg("--kernel")
            .arg(kernel_arg(art, "init=/idle vmmtest.info vmmtest.poweroff"))
            .arg("--block")
            .arg(block),
    )
    .map_err(|e| format!("spawn {}: {e}", vmm_bin()))?
    .echo("vmmtest:");
    let Some(i) = p.wait_for_index(ROOT_MOUNTED, BOOT_TIMEOUT) else {
        p.kill_and_drain();
        return Err(format!("{mode}: no `{ROOT_MOUNTED}` line\n{}", p.output()));
    };
    let root_s = p.secs_to(i);
    let (code, at) = p.wait_exit_at(BOOT_TIMEOUT);
    if code != Some(0) {
        return Err(format!("{mode}: vmm exit {code:?}\n{}", p.output()));
    }
    let exit_s = (at - p.started).as_secs_f64();
    let (fetched, read) = remote_stats(&p);
    println!(
        "[remote_boot] {mode} #{iter}: root mounted {root_s:.2} s, exit {exit_s:.2} s, \
         fetched {fetched:?}, read by guest {read:?}"
    );
    Ok(Row {
        mode,
        iter,
        root_s,
        exit_s,
        fetched,
        read,
    })
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// `1000 B`, `47.0 KiB`, `1.00 MiB`.
fn human(b: u64) -> String {
    if b < 10 << 10 {
        format!("{b} B")
    } else if b < 1 << 20 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{:.2} MiB", mib(b))
    }
}

fn write_csv(path: &Path, rows: &[Row], image_bytes: u64) -> std::io::Result<()> {
    let mut s = String::from(
        "mode,iter,seconds_to_root_mounted,seconds_to_exit,bytes_fetched,bytes_read_by_guest,\
         read_amplification,image_bytes\n",
    );
    for r in rows {
        let amp = match (r.fetched, r.read) {
            (Some(fe), Some(rd)) if rd > 0 => format!("{:.3}", fe as f64 / rd as f64),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{amp},{image_bytes}",
            r.mode,
            r.iter,
            f(r.root_s),
            f(r.exit_s),
            opt(r.fetched),
            opt(r.read)
        );
    }
    fs::write(path, s)
}

/// A grouped bar chart: per boot, seconds to root mounted and to exit, annotated with the
/// bytes fetched.
fn write_svg(path: &Path, rows: &[Row], image_bytes: u64) -> std::io::Result<()> {
    let w = (110.0 * rows.len() as f64 + 80.0).max(640.0);
    let h = 380.0_f64;
    let (left, right, top, bottom) = (60.0, 20.0, 50.0, 70.0);
    let max_t = rows.iter().map(|r| r.exit_s).fold(1.0_f64, f64::max) * 1.15;
    let y = |t: f64| top + (h - top - bottom) * (1.0 - t / max_t);
    let group = (w - left - right) / rows.len().max(1) as f64;
    let bar = group * 0.3;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">Linux boot from a lazy \
         remote root image ({:.0} MiB image)</text>",
        w / 2.0,
        mib(image_bytes)
    );
    // Axis and ticks.
    let step = if max_t > 100.0 { 20.0 } else { 10.0 };
    let mut t = 0.0;
    while t <= max_t {
        let yy = y(t);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{t:.0}</text>",
            w - right,
            left - 5.0,
            yy + 4.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"15\" y=\"{:.1}\" transform=\"rotate(-90 15 {:.1})\" \
         text-anchor=\"middle\">seconds since vmm start</text>",
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    for (i, r) in rows.iter().enumerate() {
        let x0 = left + group * i as f64 + group * 0.2;
        for (k, (v, color)) in [(r.root_s, "#4e79a7"), (r.exit_s, "#f28e2b")]
            .into_iter()
            .enumerate()
        {
            let x = x0 + k as f64 * bar;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" \
                 fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                 font-size=\"10\">{v:.1}</text>",
                y(v),
                y(0.0) - y(v),
                x + bar / 2.0,
                y(v) - 3.0
            );
        }
        let cx = x0 + bar;
        let fetched = match r.fetched {
            Some(b) => format!("fetched {}", human(b)),
            None => "local file".into(),
        };
        let label = if rows.iter().filter(|o| o.mode == r.mode).count() > 1 {
            format!("{} #{}", r.mode, r.iter)
        } else {
            r.mode.to_string()
        };
        let _ = writeln!(
            s,
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>\
             <text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" \
             fill=\"#555\">{fetched}</text>",
            h - bottom + 16.0,
            h - bottom + 31.0
        );
    }
    let ly = h - 18.0;
    let _ = writeln!(
        s,
        "<rect x=\"{left}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"#4e79a7\"/>\
         <text x=\"{}\" y=\"{ly:.1}\">to `VFS: Mounted root`</text>\
         <rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"#f28e2b\"/>\
         <text x=\"{}\" y=\"{ly:.1}\">to vmm exit</text>\n</svg>",
        ly - 10.0,
        left + 16.0,
        left + 200.0,
        ly - 10.0,
        left + 216.0
    );
    fs::write(path, s)
}

fn run() -> Result<(), String> {
    let art = artifacts()?;
    let rootfs = art.rootfs();
    if !rootfs.exists() {
        return Err(format!("{} is missing", rootfs.display()));
    }
    if !have_kvm() {
        return Err("/dev/kvm cannot be opened".into());
    }
    if !Path::new(NGINX).exists() {
        return Err(format!("{NGINX} is missing (apt-get install nginx)"));
    }
    let runs: usize = env_or("REMOTE_BOOT_RUNS", 1);
    let image_bytes = fs::metadata(&rootfs).map_err(|e| e.to_string())?.len();
    print_host("remote_boot");
    let dir = bench_dir("remote_boot");
    let archive = dir.join("archive");
    let out = Command::new(vmm_bin())
        .args(["image", "import"])
        .arg(&rootfs)
        .arg(&archive)
        .args(["--name", "rootfs"])
        .output()
        .map_err(|e| format!("vmm image import: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "vmm image import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let nginx = Nginx::try_start(&archive, NginxConfig::BENCH)?;
    let url = format!("{}/images/rootfs", nginx.url());

    let mut rows = Vec::new();
    for iter in 1..=runs {
        let cache = dir.join(format!("cache-{iter}"));
        fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
        for mode in ["cold", "warm"] {
            let overlay = dir.join(format!("{mode}-{iter}.overlay"));
            let block = format!(
                "url={url},root=true,cache={},overlay={}",
                cache.display(),
                overlay.display()
            );
            rows.push(boot(&art, mode, iter, &block)?);
        }
        let copy = dir.join(format!("rootfs-{iter}.ext4"));
        fs::copy(&rootfs, &copy).map_err(|e| format!("copy rootfs: {e}"))?;
        rows.push(boot(
            &art,
            "local",
            iter,
            &format!("path={},root=true", copy.display()),
        )?);
    }
    drop(nginx);
    // Group by mode for the outputs.
    rows.sort_by_key(|r| {
        (
            ["cold", "warm", "local"].iter().position(|m| *m == r.mode),
            r.iter,
        )
    });

    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/bench");
    fs::create_dir_all(&docs).map_err(|e| e.to_string())?;
    let csv = docs.join("remote_boot.csv");
    let svg = docs.join("remote_boot.svg");
    write_csv(&csv, &rows, image_bytes).map_err(|e| format!("{}: {e}", csv.display()))?;
    write_svg(&svg, &rows, image_bytes).map_err(|e| format!("{}: {e}", svg.display()))?;
    println!(
        "[remote_boot] wrote {} and {}; loadavg {}",
        csv.display(),
        svg.display(),
        loadavg()
    );
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> ExitCode {
    if !bench_mode("remote_boot") {
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remote_boot bench: {e}");
            ExitCode::FAILURE
        }
    }
}
