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
    /// Held by Linux-guest tests (see [`guest_env`]) for as long as they use the artifacts.
    _lock: Option<SlotLock>,
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
        Ok(Artifacts { dir, _lock: None })
    } else {
        Err(format!(
            "guest artifacts missing in {} (run resources/build-guest.sh)",
            dir.display()
        ))
    }
}

/// Skips (returns None after printing why) unless KVM and the guest artifacts exist.
/// In CI (CI=true) missing artifacts are a failure, not a skip.
///
/// The artifacts returned hold the machine-wide Linux guest lock ([`linux_guest_lock`]) until
/// they are dropped, i.e. for the whole test: Linux guests of different tests (threads of one
/// test binary, or other test binaries and worktrees on the machine) never run at once, so
/// a test's waits cannot be starved by another test's boot.
pub fn guest_env() -> Option<Artifacts> {
    if let Some(r) = kvm_missing() {
        println!("SKIP: {r}");
        return None;
    }
    match artifacts() {
        Ok(mut a) => {
            a._lock = Some(linux_guest_lock());
            Some(a)
        }
        Err(e) if std::env::var("CI").is_ok() => panic!("{e}"),
        Err(e) => {
            println!("SKIP: {e}");
            None
        }
    }
}

/// Directory of the test locks: `$VMM_TEST_LOCK_DIR`, by default `/tmp/vmm-test-locks`
/// (machine-wide on purpose: the host's cores are shared by every worktree and CI run).
pub fn lock_dir() -> PathBuf {
    std::env::var_os("VMM_TEST_LOCK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("vmm-test-locks"))
}

/// One of a few interchangeable slots, held (an exclusive `flock` on its file) until dropped.
/// The lock belongs to the open file, so it is released when the test process ends however it
/// ends, and it is not inherited by the `vmm` children (files are opened close-on-exec).
pub struct SlotLock {
    file: std::fs::File,
    path: PathBuf,
}

impl std::fmt::Debug for SlotLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotLock({})", self.path.display())
    }
}

impl Drop for SlotLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this struct owns; closing the file would release the
        // lock anyway, this only makes the release explicit and immediate.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Takes one of `slots` slots named `name` (e.g. 1 slot: a mutex across processes), waiting
/// as long as it takes. Prints who held it when it had to wait.
pub fn slot_lock(name: &str, slots: usize) -> SlotLock {
    use std::io::{Seek, Write};
    use std::os::fd::AsRawFd;
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let files: Vec<(PathBuf, std::fs::File)> = (0..slots.max(1))
        .map(|i| {
            let path = dir.join(format!("{name}.{i}.lock"));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, file)
        })
        .collect();
    let me = format!(
        "pid {} ({})",
        std::process::id(),
        std::thread::current().name().unwrap_or("?")
    );
    let start = Instant::now();
    let mut told = false;
    loop {
        for (path, file) in &files {
            // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                let mut file = file.try_clone().expect("dup lock file");
                let _ = file.set_len(0);
                let _ = file.rewind();
                let _ = writeln!(file, "{me}");
                if told {
                    println!(
                        "{name}: got {} after {:.0} s",
                        path.display(),
                        start.elapsed().as_secs_f64()
                    );
                }
                return SlotLock {
                    file,
                    path: path.clone(),
                };
            }
        }
        if !told {
            let holders: Vec<String> = files
                .iter()
                .map(|(p, _)| std::fs::read_to_string(p).unwrap_or_default())
                .map(|h| h.trim().to_string())
                .collect();
            println!("{name}: {me} waits for a slot; held by {holders:?}");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The Linux guest lock: one Linux guest test at a time on this machine. On these hosts a
/// Linux boot keeps a core busy for a minute or more; two at once on two shared cores
/// starve each other (and the timeouts of both tests).
pub fn linux_guest_lock() -> SlotLock {
    slot_lock("linux-guest", 1)
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
    readers: Arc<Readers>,
    /// Duplicates of the read ends of the stdout/stderr pipes, to ask how much is unread.
    pipes: Vec<std::os::fd::OwnedFd>,
}

/// Progress of the two threads reading the child's stdout and stderr.
#[derive(Default)]
struct Readers {
    /// Readers that got bytes from a pipe and have not yet published them.
    busy: std::sync::atomic::AtomicUsize,
    /// Bytes published so far (both streams).
    bytes: std::sync::atomic::AtomicUsize,
    /// Readers that saw end of file.
    done: std::sync::atomic::AtomicUsize,
}

/// Bytes waiting unread in a pipe (FIONREAD).
fn unread(fd: &std::os::fd::OwnedFd) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points at `n`; the descriptor
    // is owned by `fd` and open for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 { n.max(0) as usize } else { 0 }
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
        use std::os::fd::AsFd;
        use std::sync::atomic::Ordering::SeqCst;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let readers = Arc::new(Readers::default());
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let pipes = vec![
            out.as_fd().try_clone_to_owned().expect("dup stdout pipe"),
            err.as_fd().try_clone_to_owned().expect("dup stderr pipe"),
        ];
        for (src, tag) in [
            (Box::new(out) as Box<dyn Read + Send>, ""),
            (Box::new(err), "[stderr] "),
        ] {
            let tx = tx.clone();
            let log = log.clone();
            let readers = readers.clone();
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
                        Ok(n) => {
                            readers.busy.fetch_add(1, SeqCst);
                            n
                        }
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
                        readers.done.fetch_add(1, SeqCst);
                        break;
                    }
                    readers.bytes.fetch_add(n, SeqCst);
                    readers.busy.fetch_sub(1, SeqCst);
                }
            });
        }
        Running {
            child,
            lines: rx,
            log,
            raw,
            started: Instant::now(),
            readers,
            pipes,
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

    /// Waits until both output pipes reached end of file and everything read is published
    /// (after the process ended; ceiling 60 s, in case a grandchild kept a pipe open).
    fn drain_eof(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.readers.done.load(std::sync::atomic::Ordering::SeqCst) < 2
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; kills it after `timeout`. Returns the exit code
    /// (None when killed or ended by a signal). Everything it printed is collected on return.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.drain_eof();
                return st.code();
            }
            if Instant::now() > deadline {
                self.kill_and_drain();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process and returns once everything it printed has been collected, so
    /// [`Running::console`] then ends exactly where the process stopped printing.
    pub fn kill_and_drain(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain_eof();
    }

    /// The guest console once `vmm`'s output has settled: nothing unread in its pipes and
    /// nothing read but unpublished, twice in a row 100 ms apart. For a VM that prints no
    /// more (e.g. paused) while the process lives on; a process that ended needs
    /// [`Running::wait_exit`] or [`Running::kill_and_drain`] instead, which are exact.
    pub fn settled_console(&self) -> String {
        use std::sync::atomic::Ordering::SeqCst;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            let quiet =
                self.pipes.iter().all(|p| unread(p) == 0) && self.readers.busy.load(SeqCst) == 0;
            let now = quiet.then(|| self.readers.bytes.load(SeqCst));
            if now.is_some() && now == last {
                break;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(100));
        }
        self.console()
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

/// How long one Linux boot may take: about a minute on an idle PVM host, several minutes on
/// a loaded one. A ceiling, not an expectation: a passing test never waits for it.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// Ceiling for an event a running (or just restored) Linux guest produces, e.g. the next
/// few counter ticks, on a loaded host. Again a ceiling: passing tests return at the event.
pub const GUEST_EVENT_TIMEOUT: Duration = Duration::from_secs(600);

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
