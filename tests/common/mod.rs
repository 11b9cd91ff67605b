//! Helpers shared by the guest tests: locating guest artifacts, running `vmm` with a
//! timeout while streaming its console, and skipping when KVM is missing.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Returns a reason to skip KVM tests, or None when /dev/kvm can be opened.
pub fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm unavailable: {e}")),
    }
}

/// Guest artifacts built by resources/build-guest.sh (symlinked at resources/out).
pub struct Artifacts {
    pub dir: PathBuf,
}

impl Artifacts {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The guest artifacts, or a reason they are missing.
pub fn artifacts() -> Result<Artifacts, String> {
    let dir = std::env::var_os("VMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/out"));
    if dir.join("vmlinux").exists() {
        Ok(Artifacts { dir })
    } else {
        Err(format!(
            "guest artifacts missing in {} (run resources/build-guest.sh)",
            dir.display()
        ))
    }
}

/// Skips (returns None after printing why) unless KVM and the guest artifacts exist.
/// In CI (CI=true) missing artifacts are a failure, not a skip.
pub fn guest_env() -> Option<Artifacts> {
    if let Some(r) = kvm_missing() {
        println!("SKIP: {r}");
        return None;
    }
    match artifacts() {
        Ok(a) => Some(a),
        Err(e) if std::env::var("CI").is_ok() => panic!("{e}"),
        Err(e) => {
            println!("SKIP: {e}");
            None
        }
    }
}

/// True on PVM-style nested KVM hosts (guest user space cannot make system calls there).
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Path of the built `vmm` binary.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// A running `vmm` process whose stdout and stderr are collected line by line.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Raw stdout bytes: the guest's serial console stream.
    pub raw: Arc<Mutex<Vec<u8>>>,
    started: Instant,
}

impl Running {
    /// Starts `vmm` with `args`.
    pub fn spawn(args: &[String]) -> Running {
        Self::spawn_cmd(Command::new(vmm_bin()).args(args))
    }

    /// Starts a prepared command with stdin from /dev/null.
    pub fn spawn_cmd(cmd: &mut Command) -> Running {
        Self::spawn_cmd_stdin(cmd.stdin(Stdio::null()))
    }

    /// Starts a prepared command whose stdin the caller already set up.
    pub fn spawn_cmd_stdin(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for (src, tag) in [
            (Box::new(out) as Box<dyn Read + Send>, ""),
            (Box::new(err), "[stderr] "),
        ] {
            let tx = tx.clone();
            let log = log.clone();
            let raw = if tag.is_empty() {
                Some(raw.clone())
            } else {
                None
            };
            std::thread::spawn(move || {
                let mut src = src;
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match src.read(&mut buf) {
                        Ok(0) | Err(_) => 0,
                        Ok(n) => n,
                    };
                    if let Some(r) = &raw {
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=i).collect();
                        let line =
                            String::from_utf8_lossy(&line[..line.len() - 1]).replace('\r', "");
                        log.lock().unwrap().push(format!("{tag}{line}"));
                        let _ = tx.send(format!("{tag}{line}"));
                    }
                    if n == 0 {
                        if !pending.is_empty() {
                            let line = String::from_utf8_lossy(&pending).replace('\r', "");
                            log.lock().unwrap().push(format!("{tag}{line}"));
                            let _ = tx.send(format!("{tag}{line}"));
                        }
                        break;
                    }
                }
            });
        }
        Running {
            child,
            lines: rx,
            log,
            raw,
            started: Instant::now(),
        }
    }

    /// Waits for a line containing `pat`; returns it, or None on timeout / process end.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(pat) => return Some(l),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for the process to exit; kills it after `timeout`. Returns the exit code
    /// (None when killed or ended by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader threads drain.
                std::thread::sleep(Duration::from_millis(100));
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The guest console (stdout) so far, as text.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).replace('\r', "")
    }

    /// Seconds since start.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics with the console log attached.
pub fn fail(r: &Running, msg: &str) -> ! {
    panic!(
        "{msg}\n----- vmm output -----\n{}\n----------------------",
        r.output()
    );
}

/// How long one Linux boot may take here (about a minute on PVM hosts).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// A scratch directory under the target dir, removed and recreated.
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// md5 of a file, as lowercase hex, via md5sum(1).
pub fn md5_file(p: &Path) -> String {
    let out = Command::new("md5sum").arg(p).output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The guest command line base used by the Linux tests.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// `--kernel` argument for the project's vmlinux with `extra` appended to the base cmdline.
pub fn kernel_arg(a: &Artifacts, extra: &str) -> String {
    format!(
        "path={},cmdline=\"{BASE_CMDLINE} {extra}\"",
        a.file("vmlinux").display()
    )
}

/// Parses `vmmtest: tick TOKEN N` lines of `console` (complete lines only), in order.
pub fn ticks(console: &str, token: &str) -> Vec<u64> {
    let pat = format!("vmmtest: tick {token} ");
    console
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

/// `vmm snapshot create --leave-paused` of the VM `r` (API on `sock`) into `snap`; fails
/// the test (with the VM's output) if it does not succeed. Returns the JSON report.
pub fn snapshot_leave_paused(r: &Running, sock: &Path, snap: &Path) -> serde_json::Value {
    let out = Command::new(vmm_bin())
        .args(["snapshot", "create", "--leave-paused", "--api-sock"])
        .arg(sock)
        .arg(snap)
        .output()
        .unwrap();
    if !out.status.success() {
        fail(
            r,
            &format!(
                "snapshot create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
    }
    serde_json::from_slice(&out.stdout).expect("JSON report")
}
