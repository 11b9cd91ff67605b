//! Linux-guest helpers: ceilings for boots and guest events, the guest command line, the
//! test agent's tick lines (`resources/kernel/vmmtest/vmmtest.c`), `vmm snapshot create`,
//! and the counter guest that `snapshot_linux`, `repo_linux`, `archive_linux` and the kept
//! snapshot test boot.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::env::{Artifacts, scratch, vmm_bin};
use super::process::{Running, fail};

/// How long one Linux boot may take: about a minute on an idle PVM host, several minutes on
/// a loaded one. A ceiling, not an expectation: a passing test never waits for it.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// Ceiling for an event a running (or just restored) Linux guest produces, e.g. the next
/// few counter ticks, on a loaded host. Again a ceiling: passing tests return at the event.
pub const GUEST_EVENT_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest command line base of the Linux tests and benches (the vmm appends the PVM
/// quirks).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// `--kernel` argument for the project's vmlinux with `extra` appended to the base cmdline.
pub fn kernel_arg(a: &Artifacts, extra: &str) -> String {
    format!(
        "path={},cmdline=\"{BASE_CMDLINE} {extra}\"",
        a.vmlinux().display()
    )
}

/// Parses `vmmtest: tick TOKEN N` lines of `console` (complete lines only), in order.
pub fn ticks(console: &str, token: &str) -> Vec<u64> {
    let pat = format!("vmmtest: tick {token} ");
    // A console read while the guest runs (or of a killed process) may end in the middle of
    // a line, e.g. "tick T 1" of "tick T 17": drop the incomplete last line.
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(&pat)? + pat.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Checks that the ticks in `console` count 0, 1, 2, … with no gap and no repeat and
/// returns the last one.
pub fn check_consecutive(console: &str, token: &str, what: &str) -> u64 {
    let t = ticks(console, token);
    assert!(!t.is_empty(), "{what}: no ticks\n{console}");
    for (i, n) in t.iter().enumerate() {
        assert_eq!(
            *n, i as u64,
            "{what}: tick sequence broken at index {i}: {t:?}\n{console}"
        );
    }
    *t.last().unwrap()
}

/// Waits until the counter of `r` prints a tick of at least `n`; returns it.
pub fn wait_tick(r: &mut Running, token: &str, n: u64, timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    let pat = format!("vmmtest: tick {token} ");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = r.wait_for(&pat, left)?;
        let rest = &line[line.find(&pat)? + pat.len()..];
        if let Some(t) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            && t >= n
        {
            return Some(t);
        }
    }
}

/// `vmm snapshot create --leave-paused --api-sock SOCK ARGS…` of the VM `r`; fails the
/// test (with the VM's output, prefixed `what`) if it does not succeed. Returns the JSON
/// report.
pub fn snapshot_create(r: &Running, sock: &Path, args: &[&OsStr], what: &str) -> serde_json::Value {
    let out = Command::new(vmm_bin())
        .args(["snapshot", "create", "--leave-paused", "--api-sock"])
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        fail(
            r,
            &format!(
                "{what}: snapshot create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

/// `vmm snapshot create --leave-paused` of the VM `r` (API on `sock`) into `snap`; fails
/// the test (with the VM's output) if it does not succeed. Returns the JSON report.
pub fn snapshot_leave_paused(r: &Running, sock: &Path, snap: &Path) -> serde_json::Value {
    snapshot_create(r, sock, &[snap.as_os_str()], "snapshot")
}

/// How to boot the test agent's counter guest (`vmmtest.counter`: one tick line a second,
/// `vmmtest: tick TOKEN N …`, counting from 0).
pub struct CounterSpec {
    /// Name of the scratch directory ([`scratch`]).
    pub name: &'static str,
    /// Starts the tick token (the process id follows), so that each test's ticks differ.
    pub token_prefix: &'static str,
    /// Root filesystem on a copy of `rootfs.ext4` (`init=/idle`); without it the guest runs
    /// from the idle initramfs (`rdinit=/idle`).
    pub root_disk: bool,
    /// A copy of `disk.img` as `/dev/vdb`, read and rewritten on every tick
    /// (`vmmtest.counter_disk`).
    pub data_disk: bool,
    /// Guest RAM (`--memory size_mib=`); the vmm's default when None.
    pub mem_mib: Option<u64>,
    /// More of the kernel command line, after the counter's.
    pub extra: &'static str,
}

impl CounterSpec {
    /// A counter guest with a root disk, no data disk, default memory, nothing extra.
    pub fn new(name: &'static str, token_prefix: &'static str) -> Self {
        Self {
            name,
            token_prefix,
            root_disk: true,
            data_disk: false,
            mem_mib: None,
            extra: "",
        }
    }
}

/// A booting (or booted) counter guest with its API socket.
pub struct CounterGuest {
    /// Its scratch directory.
    pub dir: PathBuf,
    /// The copy of `rootfs.ext4` it runs on, if any.
    pub root: Option<PathBuf>,
    /// The copy of `disk.img` it rewrites, if any.
    pub data: Option<PathBuf>,
    /// The API socket.
    pub sock: PathBuf,
    /// The tick token.
    pub token: String,
    /// The `vmm` process.
    pub vm: Running,
}

impl CounterGuest {
    /// Starts the guest (returns at once; see [`CounterGuest::boot_to_tick`]).
    pub fn start(a: &Artifacts, spec: &CounterSpec) -> Self {
        let dir = scratch(spec.name);
        let token = format!("{}{}", spec.token_prefix, std::process::id());
        let init = if spec.root_disk { "init" } else { "rdinit" };
        let mut cmdline = format!("{init}=/idle vmmtest.counter vmmtest.token={token}");
        if spec.data_disk {
            cmdline += " vmmtest.counter_disk=/dev/vdb";
        }
        if !spec.extra.is_empty() {
            cmdline += " ";
            cmdline += spec.extra;
        }
        let mut args = vec!["--kernel".to_string(), kernel_arg(a, &cmdline)];
        if let Some(mib) = spec.mem_mib {
            args.extend(["--memory".into(), format!("size_mib={mib}")]);
        }
        if !spec.root_disk {
            args.extend(["--initrd".into(), a.idle_initrd().display().to_string()]);
        }
        let copy = |from: PathBuf, name: &str, extra: &str, args: &mut Vec<String>| {
            let to = dir.join(name);
            std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            args.extend(["--block".into(), format!("path={}{extra}", to.display())]);
            to
        };
        let root = spec
            .root_disk
            .then(|| copy(a.rootfs(), "rootfs.ext4", ",root=true", &mut args));
        let data = spec
            .data_disk
            .then(|| copy(a.disk(), "data.img", "", &mut args));
        let sock = dir.join("api.sock");
        args.extend(["--api-sock".into(), sock.display().to_string()]);
        let vm = Running::spawn(&args);
        Self {
            dir,
            root,
            data,
            sock,
            token,
            vm,
        }
    }

    /// Starts the guest and waits (up to [`BOOT_TIMEOUT`]) for tick `n`; fails the test
    /// without it.
    pub fn boot_to_tick(a: &Artifacts, spec: &CounterSpec, n: u64) -> Self {
        let mut g = Self::start(a, spec);
        g.expect_tick(n, BOOT_TIMEOUT);
        g
    }

    /// Waits for exactly tick `n` (its line); fails the test without it.
    pub fn expect_tick(&mut self, n: u64, timeout: Duration) {
        let pat = format!("vmmtest: tick {} {n} ", self.token);
        if self.vm.wait_for(&pat, timeout).is_none() {
            fail(&self.vm, &format!("the counter did not reach {n}"));
        }
    }

    /// Waits for a tick of at least `n`; returns it.
    pub fn wait_tick(&mut self, n: u64, timeout: Duration) -> Option<u64> {
        wait_tick(&mut self.vm, &self.token, n, timeout)
    }

    /// Snapshots the VM into `snap` (`--leave-paused`), kills it and returns the report
    /// and the console, which then ends exactly at the snapshot.
    pub fn snapshot_and_stop(&mut self, snap: &Path) -> (serde_json::Value, String) {
        let report = snapshot_leave_paused(&self.vm, &self.sock, snap);
        self.vm.kill_and_drain();
        (report, self.vm.console())
    }
}
