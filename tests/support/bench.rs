//! What only the hand-written (harness = false) benches need: the `--bench` guard, CSV
//! output under `target/bench/`, the host's load and file systems, small statistics.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::env::{Artifacts, artifacts, fresh_dir, have_kvm, target_dir};

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

/// The start of a bench that boots the Linux guest: its artifacts, or None (after saying
/// why) unless run by `cargo bench`, the guest artifacts exist and /dev/kvm opens.
pub fn linux_bench(name: &str) -> Option<Artifacts> {
    if !bench_mode(name) {
        return None;
    }
    let Ok(art) = artifacts() else {
        println!("{name} bench: no guest artifacts (run resources/build-guest.sh); skipped");
        return None;
    };
    kvm_bench(name).then_some(art)
}

/// True when /dev/kvm opens; otherwise says that the bench `name` is skipped.
pub fn kvm_bench(name: &str) -> bool {
    if have_kvm() {
        return true;
    }
    println!("{name} bench: /dev/kvm unavailable; skipped");
    false
}

/// `target/bench/`, created.
pub fn out_dir() -> PathBuf {
    let d = target_dir().join("bench");
    fs::create_dir_all(&d).expect("create target/bench");
    d
}

/// A fresh scratch directory `target/tmp/bench-<name>`, or under `$BENCH_DIR` if set.
pub fn bench_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    let d = base.join(format!("bench-{name}"));
    fresh_dir(&d);
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

/// The printk timestamp of a console line (`[   27.633631] …`), in seconds.
pub fn printk_secs(line: &str) -> Option<f64> {
    let s = &line[line.find('[')? + 1..];
    s[..s.find(']')?].trim().parse().ok()
}

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
