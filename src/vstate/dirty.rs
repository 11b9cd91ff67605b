//! Which guest memory changed since the last snapshot: the input of incremental
//! snapshots.
//!
//! Two methods:
//!
//! - [`DirtyMethod::KvmLog`]: memory slots carry `KVM_MEM_LOG_DIRTY_PAGES`; a snapshot
//!   reads `KVM_GET_DIRTY_LOG` (guest writes) and the guest memory's own bitmap
//!   (writes by the VMM: virtio used rings and data, through vm-memory), then re-hashes
//!   only chunks containing a dirty page.
//! - [`DirtyMethod::Rehash`]: every chunk is re-read and re-hashed; storage stays
//!   incremental because unchanged chunks hash to ids already in the store, so only
//!   changed chunks are written.
//!
//! The KVM log is trusted only after two checks, and re-checked after:
//!
//! 1. [`kvm_dirty_log_selftest`] (once per process): a throw-away VM runs a few bytes of
//!    64-bit code that write 64 known pages, twice, and every write must show up in
//!    the log both times;
//! 2. the VM's first [`REQUIRED_PASSES`] snapshots are full ([`LogState::Unverified`]),
//!    and each checks that every chunk that differs from what memory held before (zeros
//!    after boot, the snapshot after a restore, the previous snapshot) contains a page of
//!    the log — the second check covers pages written again after the log was read. A
//!    log that misses writes is not used for that VM again ([`LogState::Broken`]);
//! 3. every incremental snapshot re-hashes a sample of 64 chunks the log calls clean;
//!    a mismatch turns the log off for the VM and that snapshot re-hashes everything.
//!
//! Trusting a log that misses writes would silently lose data; re-hashing only costs
//! time. `VMM_DIRTY_METHOD=rehash` disables the log.

use std::sync::OnceLock;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

use crate::vstate::memory::{ChunkEntry, GuestMemory, RegionManifest};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A KVM call failed.
    #[error("{what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory for the self-test could not be mapped.
    #[error("mapping self-test memory")]
    Map(#[source] std::io::Error),
    /// The self-test vCPU could not be set up.
    #[error("setting up the self-test vCPU")]
    Setup(#[source] crate::arch::x86_64::regs::RegsError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DirtyError {
    move |source| DirtyError::Kvm { what, source }
}

/// How a VM finds the memory that changed since its last snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyMethod {
    /// KVM's dirty page log plus the VMM's own write bitmap.
    KvmLog,
    /// Re-hash all memory; dedup keeps storage incremental.
    Rehash,
}

impl std::fmt::Display for DirtyMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DirtyMethod::KvmLog => "kvm-dirty-log",
            DirtyMethod::Rehash => "rehash",
        })
    }
}

/// Pages written by the self-test guest.
const SELFTEST_PAGES: usize = 64;
/// Guest physical address of the first page it writes.
const SELFTEST_TARGET: u64 = 0x20_0000;
/// Where its code is loaded.
const SELFTEST_CODE_AT: u64 = 0x10_0000;
/// Self-test guest memory: 4 MiB at guest address 0.
const SELFTEST_MEM: usize = 4 << 20;

/// 64-bit code, run with interrupts enabled (how a guest kernel's ordinary writes run):
/// writes one byte into each of the [`SELFTEST_PAGES`] pages from [`SELFTEST_TARGET`],
/// then halts.
const SELFTEST_CODE: [u8; 27] = [
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x20, 0x00, // mov rdi, 0x200000
    0xb9, 0x40, 0x00, 0x00, 0x00, // mov ecx, 64
    0xc6, 0x07, 0x01, // l: mov byte [rdi], 1
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0xff, 0xc9, // dec ecx
    0x75, 0xf2, // jnz l
    0xf4, // hlt
];

/// Runs the self-test guest from its first instruction to `hlt`; false if it did not
/// get there.
fn run_selftest_guest(vcpu: &mut kvm_ioctls::VcpuFd) -> Result<bool, DirtyError> {
    use crate::arch::x86_64::regs;
    regs::setup_regs(vcpu, SELFTEST_CODE_AT, 0).map_err(DirtyError::Setup)?;
    let mut r = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    r.rflags = 0x202;
    vcpu.set_regs(&r).map_err(kvm_err("KVM_SET_REGS"))?;
    for _ in 0..16 {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => return Ok(true),
            Ok(exit) => {
                log::debug!("dirty-log self-test: unexpected exit {exit:?}");
                return Ok(false);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                log::debug!("dirty-log self-test: KVM_RUN failed: {e}");
                return Ok(false);
            }
        }
    }
    Ok(false)
}

/// Runs the dirty-log self-test: true if KVM's dirty log reported every page the
/// self-test guest wrote, both on first touch and when writing the same pages again
/// after the log was read (what an incremental snapshot relies on).
pub fn kvm_dirty_log_selftest(kvm: &Kvm) -> Result<bool, DirtyError> {
    use crate::arch::x86_64::regs;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SELFTEST_MEM)])
        .map_err(|e| DirtyError::Map(std::io::Error::other(e.to_string())))?;
    mem.write_slice(&SELFTEST_CODE, GuestAddress(SELFTEST_CODE_AT))
        .map_err(|e| DirtyError::Map(std::io::Error::other(e.to_string())))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| DirtyError::Map(std::io::Error::other(e.to_string())))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    let mut region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SELFTEST_MEM as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` is one mapping of SELFTEST_MEM bytes at `host`; it outlives `vm`
    // (declared before it, so dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    region.flags = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
    // SAFETY: as above; only the flags change.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    regs::setup_fpu(&vcpu).map_err(DirtyError::Setup)?;
    regs::setup_sregs(&mem, &vcpu).map_err(DirtyError::Setup)?;
    let first = (SELFTEST_TARGET / 4096) as usize;
    for pass in 1..=2 {
        vm.get_dirty_log(0, SELFTEST_MEM)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        if !run_selftest_guest(&mut vcpu)? {
            return Ok(false);
        }
        let log = vm
            .get_dirty_log(0, SELFTEST_MEM)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let seen = (first..first + SELFTEST_PAGES)
            .filter(|p| log.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0))
            .count();
        log::debug!(
            "dirty-log self-test pass {pass}: {seen} of {SELFTEST_PAGES} written pages reported"
        );
        if seen != SELFTEST_PAGES {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where a VM's dirty log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogState {
    /// Slots do not log dirty pages.
    Off,
    /// Logging, not yet trusted: full snapshots check it against this guest's real
    /// writes until [`REQUIRED_PASSES`] checks in a row found every changed chunk in it.
    Unverified {
        /// The log (with the VMM's own bitmap) has covered every write since guest
        /// memory held its reference content (zeros at boot, the snapshot base after a
        /// restore or a snapshot), so the next full snapshot can check it.
        since_start: bool,
        /// Checks passed so far.
        passes: u8,
    },
    /// [`REQUIRED_PASSES`] full snapshots found every changed chunk in the log:
    /// incremental snapshots use it.
    Trusted,
    /// The log missed writes: this VM re-hashes memory.
    Broken,
}

/// Full-snapshot checks the log must pass before incremental snapshots use it: the
/// first sees writes to pages touched for the first time, the second writes to pages
/// written before the log was last read (a different path in KVM, and the one nested
/// hosts get wrong).
pub const REQUIRED_PASSES: u8 = 2;

impl LogState {
    /// A log just turned on over memory whose content is known.
    pub fn fresh() -> Self {
        LogState::Unverified {
            since_start: true,
            passes: 0,
        }
    }

    /// A log just turned on over restored memory, whose content is not known yet: it
    /// cannot be checked until [`from_known_base`](Self::from_known_base) says it can.
    pub fn restored(self) -> Self {
        match self {
            LogState::Unverified { .. } => LogState::Unverified {
                since_start: false,
                passes: 0,
            },
            other => other,
        }
    }

    /// The restored memory is exactly a known snapshot's (the VM's snapshot base), and the
    /// log has run since it was: the next full snapshot may check it.
    pub fn from_known_base(self) -> Self {
        match self {
            LogState::Unverified { .. } => LogState::fresh(),
            other => other,
        }
    }

    /// Whether a full save is to check the log: it is unverified and has covered every
    /// write since memory held its reference content.
    pub fn needs_check(self) -> bool {
        matches!(
            self,
            LogState::Unverified {
                since_start: true,
                ..
            }
        )
    }

    /// Whether a snapshot reads (and so restarts) the log.
    pub fn is_logging(self) -> bool {
        matches!(self, LogState::Unverified { .. } | LogState::Trusted)
    }

    /// The state while a snapshot is taken, once it has read (and so restarted) the log:
    /// until the snapshot completes, nothing may be checked against the log or build on it.
    pub fn while_snapshotting(self) -> Self {
        match self {
            LogState::Unverified { passes, .. } => LogState::Unverified {
                since_start: false,
                passes,
            },
            other => other,
        }
    }

    /// After a full save that could be compared with what memory held before (`self` is
    /// the state when the snapshot began): `missed` changed chunks were not in the log.
    /// Only an unverified log that covered every write since its reference is judged.
    pub fn after_check(self, missed: usize, selftest_passed: impl FnOnce() -> bool) -> Self {
        let LogState::Unverified {
            since_start: true,
            passes,
        } = self
        else {
            return self;
        };
        if missed > 0 || !selftest_passed() {
            log::info!(
                "dirty tracking: re-hashing memory (the KVM dirty log missed {missed} changed \
                 chunks on this host)"
            );
            return LogState::Broken;
        }
        if passes + 1 >= REQUIRED_PASSES {
            log::info!(
                "dirty tracking: the KVM dirty log saw every change {} times; next \
                 snapshots are incremental",
                passes + 1
            );
            LogState::Trusted
        } else {
            LogState::Unverified {
                since_start: true,
                passes: passes + 1,
            }
        }
    }

    /// The state once a snapshot is written: memory now holds the snapshot's content,
    /// which the log (restarted when the snapshot read it) counts from.
    pub fn after_snapshot(self) -> Self {
        match self {
            LogState::Unverified { passes, .. } => LogState::Unverified {
                since_start: true,
                passes,
            },
            other => other,
        }
    }
}

/// Whether this host's KVM dirty log passes [`kvm_dirty_log_selftest`] (run once per
/// process). `VMM_DIRTY_METHOD=rehash` forces false.
pub fn selftest_passed(kvm: &Kvm) -> bool {
    static PASSED: OnceLock<bool> = OnceLock::new();
    *PASSED.get_or_init(|| {
        if std::env::var("VMM_DIRTY_METHOD").as_deref() == Ok("rehash") {
            log::info!("dirty tracking: rehash forced by VMM_DIRTY_METHOD");
            return false;
        }
        match kvm_dirty_log_selftest(kvm) {
            Ok(ok) => ok,
            Err(e) => {
                log::info!(
                    "dirty-log self-test could not run: {}",
                    crate::util::error_chain(&e)
                );
                false
            }
        }
    })
}

/// Turns on dirty logging for every slot of `mem` (slot = region index), registered
/// before without flags.
pub fn enable_kvm_log(vm: &kvm_ioctls::VmFd, mem: &GuestMemory) -> Result<(), DirtyError> {
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: same slot, same host mapping as registered by `Vm::register_memory`;
        // only the flags change. The mapping lives as long as the VM.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
    }
    Ok(())
}

/// Per region, one bit per page (4 KiB) written since the previous call, by the guest
/// (KVM log) or by the VMM (guest memory bitmap); both are reset. Only meaningful with
/// [`DirtyMethod::KvmLog`] enabled on the slots.
pub fn take_dirty_pages(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemory,
) -> Result<Vec<Vec<u64>>, DirtyError> {
    let mut out = Vec::new();
    for (slot, r) in mem.iter().enumerate() {
        let mut log = vm
            .get_dirty_log(slot as u32, r.len() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let own = std::ops::Deref::deref(r).bitmap().get_and_reset();
        for (w, o) in log.iter_mut().zip(own) {
            *w |= o;
        }
        out.push(log);
    }
    Ok(out)
}

/// Whether chunk `chunk` (of `chunk_size` bytes) has a page set in `pages`.
pub fn chunk_dirty(pages: &[u64], chunk: usize, chunk_size: usize) -> bool {
    let per = chunk_size / 4096;
    (chunk * per..(chunk + 1) * per)
        .any(|p| pages.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0))
}

/// Chunks of a full save that differ from `reference` (zeros if `None`) but have no
/// page in the dirty log.
pub fn check_log(
    saved: &[RegionManifest],
    reference: Option<&[RegionManifest]>,
    dirty: &dyn Fn(usize, usize) -> bool,
) -> usize {
    let mut missed = 0;
    for (r, m) in saved.iter().enumerate() {
        for (c, e) in m.chunks.iter().enumerate() {
            let before = reference
                .and_then(|b| b.get(r))
                .and_then(|b| b.chunks.get(c))
                .copied()
                .unwrap_or(ChunkEntry::Zero);
            if *e != before && !dirty(r, c) {
                missed += 1;
            }
        }
    }
    missed
}

/// Spot check of the KVM dirty log: up to this many chunks it calls clean are
/// re-hashed and compared with the parent's ids.
const LOG_SPOT_CHECKS: usize = 64;

/// Chunk (region, index) pairs the log calls clean but whose content differs from the
/// parent's (`parent`, in chunks of `chunk` bytes), among a sample.
pub fn spot_check_log(
    regions: &[(u64, &[u8])],
    parent: &[RegionManifest],
    chunk: usize,
    dirty: &dyn Fn(usize, usize) -> bool,
) -> usize {
    let clean: Vec<(usize, usize)> = parent
        .iter()
        .enumerate()
        .flat_map(|(r, m)| (0..m.chunks.len()).map(move |c| (r, c)))
        .filter(|&(r, c)| !dirty(r, c))
        .collect();
    if clean.is_empty() {
        return 0;
    }
    let step = clean.len().div_ceil(LOG_SPOT_CHECKS).max(1);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0);
    clean
        .iter()
        .skip(seed % step)
        .step_by(step)
        .filter(|&&(r, c)| {
            let data = regions[r].1.chunks(chunk).nth(c).unwrap_or(&[]);
            let now = if data.iter().all(|&b| b == 0) {
                ChunkEntry::Zero
            } else {
                ChunkEntry::Chunk(crate::store::ChunkId::of(data))
            };
            now != parent[r].chunks[c]
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_dirty_looks_at_the_chunks_pages_only() {
        let mut pages = vec![0u64; 2];
        pages[1] = 1 << 3; // page 67
        assert!(!chunk_dirty(&pages, 0, 64 << 10));
        assert!(chunk_dirty(&pages, 4, 64 << 10)); // pages 64..80
        assert!(!chunk_dirty(&pages, 5, 64 << 10));
        assert!(!chunk_dirty(&pages, 100, 64 << 10)); // beyond the log: clean
    }

    #[test]
    fn selftest_runs_and_gives_an_answer() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        // On PVM hosts this passes (the self-test guest is emulated, and emulated
        // writes are logged) although Linux guests' writes are not: that is caught by
        // the first full snapshot's check, tested in tests/tiny_incremental.rs.
        let ok = kvm_dirty_log_selftest(&kvm).expect("self-test runs");
        eprintln!("dirty log self-test: {ok}");
    }

    #[test]
    fn log_state_transitions() {
        let u = |since_start, passes| LogState::Unverified {
            since_start,
            passes,
        };
        // Restore: not checkable until the base is known.
        assert_eq!(LogState::fresh().restored(), u(false, 0));
        assert_eq!(u(false, 0).from_known_base(), LogState::fresh());
        assert_eq!(LogState::Off.restored(), LogState::Off);
        assert_eq!(LogState::Broken.from_known_base(), LogState::Broken);
        // A snapshot reads the log: nothing checks it until the snapshot is written.
        assert!(u(true, 1).is_logging() && LogState::Trusted.is_logging());
        assert!(!LogState::Off.is_logging() && !LogState::Broken.is_logging());
        assert_eq!(u(true, 1).while_snapshotting(), u(false, 1));
        assert_eq!(LogState::Trusted.while_snapshotting(), LogState::Trusted);
        assert_eq!(u(false, 1).after_snapshot(), u(true, 1));
        // Checks: REQUIRED_PASSES clean ones trust it, one miss breaks it.
        assert!(u(true, 0).needs_check() && !u(false, 0).needs_check());
        assert_eq!(u(true, 0).after_check(0, || true), u(true, 1));
        assert_eq!(u(true, 1).after_check(0, || true), LogState::Trusted);
        assert_eq!(u(true, 1).after_check(3, || true), LogState::Broken);
        assert_eq!(u(true, 0).after_check(0, || false), LogState::Broken);
        let not_asked = || -> bool { panic!("selftest run without a clean check") };
        assert_eq!(u(true, 0).after_check(1, not_asked), LogState::Broken);
        assert_eq!(u(false, 1).after_check(5, not_asked), u(false, 1));
    }
}
