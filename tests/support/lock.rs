//! Machine-wide test locks: `flock`ed files under [`lock_dir`], shared by every worktree
//! and CI run on the machine (their cores are shared). docs/TESTING.md, "Locking".

use std::path::PathBuf;
use std::time::{Duration, Instant};

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
