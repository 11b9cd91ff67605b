//! Fault injection for the `faults_*` tests (docs/FAULTS.md): a small tmpfs for `ENOSPC`,
//! a fault-injecting FUSE file system for `EIO`, an HTTP fault proxy, and the helpers of
//! the SIGKILL tests (random kill points, running `vmm` subcommands).

pub mod fusefs;
pub mod proxy;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::vmm_cli_ok;

/// True when running as root (mounting tmpfs and FUSE needs it); otherwise prints why the
/// test is skipped.
pub fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    println!("SKIP: {what} needs root (it mounts a file system)");
    false
}

/// A tmpfs of a fixed size mounted for a test; unmounted when dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `dir` (created if missing).
    pub fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("vmm-faults")
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs at {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes still free.
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return 0;
        }
        st.f_bavail * st.f_frsize
    }

    /// Fills the file system up to `leave` free bytes with a ballast file; returns its
    /// path (delete it to free the space).
    pub fn fill_to(&self, leave: u64) -> PathBuf {
        let p = self.dir.join("ballast");
        let have = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        let free = self.free();
        let want = (have + free).saturating_sub(leave);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        use std::os::fd::AsRawFd as _;
        if want > 0 {
            // SAFETY: fallocate on an open file; tmpfs allocates the pages at once.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, want as libc::off_t) };
            assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
        }
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a valid C string; errors (not mounted) are ignored.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// How a killed run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Killed {
    /// SIGKILL landed while it ran.
    Yes,
    /// It had finished already (with this exit code).
    Finished(i32),
}

/// Starts `vmm ARGS`, sends SIGKILL after `after`, and reaps it.
pub fn run_and_kill(args: &[&str], after: Duration) -> Killed {
    let mut child = Command::new(super::env::vmm_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmm");
    std::thread::sleep(after);
    let r = match child.try_wait() {
        Ok(Some(st)) => Killed::Finished(st.code().unwrap_or(-1)),
        _ => {
            let _ = child.kill();
            Killed::Yes
        }
    };
    let _ = child.wait();
    r
}

/// How long `vmm ARGS` takes when left alone (it must succeed), after `prepare`: the
/// shorter of two runs (the first may pay for a cold page cache), less a tenth, so that
/// kill points fall inside the run.
pub fn time_ok(
    args: &[&str],
    mut prepare: impl FnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    let mut best = Duration::MAX;
    for _ in 0..2 {
        prepare()?;
        let t = Instant::now();
        vmm_cli_ok(args)?;
        best = best.min(t.elapsed());
    }
    Ok(best * 9 / 10)
}

/// Files under `dir` (recursively) whose name contains `.tmp.` — temp files a killed
/// writer may leave.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains(".tmp.") {
                out.push(p);
            }
        }
    }
    out
}
