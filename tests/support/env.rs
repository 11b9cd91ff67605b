//! What a test needs from the machine: /dev/kvm, the guest artifacts built by
//! `resources/build-guest.sh`, the `vmm` binary, scratch and temporary directories.
//! Missing prerequisites skip a test (it prints `SKIP:` and passes), except under `CI=true`,
//! where missing artifacts or programs are a failure.

use std::path::{Path, PathBuf};

use super::lock::{SlotLock, linux_guest_lock};

/// Returns a reason to skip KVM tests, or None when /dev/kvm can be opened.
pub fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
    }
}

/// True when /dev/kvm can be opened (prints nothing).
pub fn have_kvm() -> bool {
    kvm_missing().is_none()
}

/// True when /dev/kvm can be opened; otherwise prints `SKIP: <reason>` and returns false.
pub fn kvm_or_skip() -> bool {
    match kvm_missing() {
        None => true,
        Some(why) => {
            println!("SKIP: {why}");
            false
        }
    }
}

/// A prerequisite other than KVM is missing: under `CI=true` that fails the test (panics
/// with `msg`); otherwise prints `SKIP: <msg>`.
pub fn skip_unless_ci(msg: &str) {
    if std::env::var("CI").is_ok() {
        panic!("{msg}");
    }
    println!("SKIP: {msg}");
}

/// True on PVM-style nested KVM hosts (guest user space cannot make system calls there).
pub fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Path of the `vmm` binary cargo built for this test or bench.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// The guest artifacts built by resources/build-guest.sh (`resources/out`, or
/// `$VMM_GUEST_DIR`): `vmlinux`, `bzImage`, `initramfs.cpio.gz`, `idle.cpio.gz`,
/// `rootfs.ext4`, `disk.img`.
pub struct Artifacts {
    /// The directory holding them.
    pub dir: PathBuf,
    /// Held by Linux-guest tests (see [`guest_env`]) for as long as they use the artifacts.
    _lock: Option<SlotLock>,
}

impl Artifacts {
    /// The artifact `name`, e.g. `rootfs.ext4`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The uncompressed kernel.
    pub fn vmlinux(&self) -> PathBuf {
        self.file("vmlinux")
    }

    /// The ext4 root filesystem image (tests boot a copy of it).
    pub fn rootfs(&self) -> PathBuf {
        self.file("rootfs.ext4")
    }

    /// The 1 MiB data disk image.
    pub fn disk(&self) -> PathBuf {
        self.file("disk.img")
    }

    /// The initramfs whose `/idle` loops without system calls.
    pub fn idle_initrd(&self) -> PathBuf {
        self.file("idle.cpio.gz")
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
    if !kvm_or_skip() {
        return None;
    }
    match artifacts() {
        Ok(mut a) => {
            a._lock = Some(linux_guest_lock());
            Some(a)
        }
        Err(e) => {
            skip_unless_ci(&e);
            None
        }
    }
}

/// The cargo target directory (parent of `CARGO_TARGET_TMPDIR`).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Removes `d` if it exists and creates it empty.
pub fn fresh_dir(d: &Path) {
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
}

/// A scratch directory `<target>/tmp/<name>-<pid>`, removed and recreated; it stays after
/// the test (for a look at what a failed Linux-guest test left).
pub fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    fresh_dir(&d);
    d
}

pub use vmm::util::testutil::TempDir;

/// A fresh, empty directory `<target>/tmp/tests/<name>-<pid>-<n>-<ns>` (on the disk the
/// build is on, not tmpfs), removed when dropped (kept when `VMM_TEST_KEEP_TMP` is set).
pub fn temp_dir(name: &str) -> TempDir {
    TempDir::new_in(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("tests"), name)
}
