//! Helpers shared by the hand-written (harness = false) benches: the `--bench` guard,
//! CSV output under `target/bench/`, machine load, running `vmm` with timestamped lines.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// True when run by `cargo bench` (which passes `--bench`). Otherwise (e.g. `cargo test
/// --all-targets`) prints why nothing happens and returns false.
pub fn bench_mode(name: &str) -> bool {
    if std::env::args().any(|a| a == "--bench") {
        return true;
    }
    println!(
        "{name}: not run (it boots guests / takes minutes); use `cargo bench --bench {name}` \
         or scripts/bench.sh"
    );
    false
}

/// The cargo target directory (parent of `CARGO_TARGET_TMPDIR`).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// `target/bench/`, created.
pub fn out_dir() -> PathBuf {
    let d = target_dir().join("bench");
    fs::create_dir_all(&d).expect("create target/bench");
    d
}

/// A fresh scratch directory `target/tmp/bench-<name>`, or under `$BENCH_DIR` if set.
pub fn scratch(name: &str) -> PathBuf {
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let d = base.join(format!("bench-{name}"));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create the bench scratch directory");
    d
}

/// Appends rows to a CSV file, writing the header first when the file is new or empty.
pub struct Csv {
    path: PathBuf,
    header: &'static str,
}

impl Csv {
    /// `target/bench/<name>.csv` with `header` (comma-separated column names).
    pub fn new(name: &str, header: &'static str) -> Self {
        Self {
            path: out_dir().join(format!("{name}.csv")),
            header,
        }
    }

    /// Appends one row (fields with commas or quotes are quoted, RFC 4180).
    pub fn row(&self, fields: &[String]) {
        let fields: Vec<String> = fields
            .iter()
            .map(|v| {
                if v.contains([',', '"', '\n']) {
                    format!("\"{}\"", v.replace('"', "\"\""))
                } else {
                    v.clone()
                }
            })
            .collect();
        debug_assert_eq!(
            fields.len(),
            self.header.split(',').count(),
            "{}",
            self.header
        );
        let new = fs::metadata(&self.path)
            .map(|m| m.len() == 0)
            .unwrap_or(true);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .expect("open CSV");
        if new {
            writeln!(f, "{}", self.header).expect("write CSV header");
        }
        writeln!(f, "{}", fields.join(",")).expect("write CSV row");
    }
}

/// Formats a float for a CSV field.
pub fn f(v: f64) -> String {
    format!("{v:.3}")
}

/// Seconds since 1970: identifies one bench run in the CSV files.
pub fn run_id() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `/proc/loadavg` as is (without the newline).
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// (min, median) of `v` (NaN for an empty slice).
pub fn min_median(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (s[0], med)
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// An env var parsed as `T`, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `vmm` binary cargo built for this bench (the release profile: target/release/vmm).
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// The guest artifacts directory (`$VMM_GUEST_DIR` or `resources/out`), if it has a vmlinux.
pub fn artifacts() -> Option<PathBuf> {
    let dir = std::env::var_os("VMM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/out"));
    dir.join("vmlinux").exists().then_some(dir)
}

/// True when /dev/kvm can be opened.
pub fn have_kvm() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false if not permitted.
pub fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Name of the file system holding `path` (from statfs's f_type).
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        other => format!("0x{other:x}"),
    }
}

/// Total size of the regular files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => total += dir_bytes(&e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// The printk timestamp of a console line (`[   27.633631] …`), in seconds.
pub fn printk_secs(line: &str) -> Option<f64> {
    let s = &line[line.find('[')? + 1..];
    s[..s.find(']')?].trim().parse().ok()
}

/// A line a child printed, with when it arrived.
pub struct Line {
    /// Arrival time.
    pub at: Instant,
    /// From stderr (else stdout).
    pub stderr: bool,
    /// The text, without line end or carriage returns.
    pub text: String,
}

/// A child process whose stdout and stderr lines arrive timestamped on a channel.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// When it was spawned.
    pub started: Instant,
    rx: mpsc::Receiver<Line>,
    /// Every line received so far.
    pub log: Vec<Line>,
}

impl Proc {
    /// Spawns `cmd` (stdin from /dev/null, stdout and stderr piped).
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Proc> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let t2 = tx.clone();
        std::thread::spawn(move || pump(out, false, t2));
        std::thread::spawn(move || pump(err, true, tx));
        Ok(Proc {
            child,
            started,
            rx,
            log: Vec::new(),
        })
    }

    /// Waits up to `timeout` for a line containing `pat`; returns its index in `log`.
    /// Lines containing `vmmtest:` are echoed (with seconds since spawn) as they arrive.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Option<usize> {
        if let Some(i) = self.log.iter().position(|l| l.text.contains(pat)) {
            return Some(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.text.contains(pat);
                    if l.text.contains("vmmtest:") {
                        println!(
                            "    +{:7.2} s  {}",
                            (l.at - self.started).as_secs_f64(),
                            l.text
                        );
                    }
                    self.log.push(l);
                    if hit {
                        return Some(self.log.len() - 1);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Takes the lines that arrived so far without waiting.
    pub fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.log.push(l);
        }
    }

    /// Waits for the exit (killing the child after `timeout`); returns the exit code and
    /// when the exit was seen.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                let at = Instant::now();
                std::thread::sleep(Duration::from_millis(50));
                self.drain();
                return (st.code(), at);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.drain();
                return (None, Instant::now());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Seconds from spawn to line `i`.
    pub fn secs_to(&self, i: usize) -> f64 {
        (self.log[i].at - self.started).as_secs_f64()
    }

    /// Everything so far, stderr lines tagged.
    pub fn output(&self) -> String {
        self.log
            .iter()
            .map(|l| {
                if l.stderr {
                    format!("[stderr] {}", l.text)
                } else {
                    l.text.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills the child (ours) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pump(src: impl std::io::Read, stderr: bool, tx: mpsc::Sender<Line>) {
    let mut r = BufReader::new(src);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .replace('\r', "");
                let line = Line {
                    at: Instant::now(),
                    stderr,
                    text,
                };
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
    }
}

/// The guest command line base of the Linux benches (the vmm appends the PVM quirks).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Prints a one-line description of the host and its load.
pub fn print_host(tag: &str) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("[{tag}] host: {cores} cores, {cpu}; loadavg {}", loadavg());
}
