//! Incremental snapshots and dirty tracking with the tiny guest: an incremental snapshot
//! equals a full save of the same memory and restores the guest's writes; writes the
//! dirty log cannot see (made behind its back) are caught — before the first snapshot by
//! the full-snapshot check, later by the spot check — and the VM then re-hashes.
//!
//! Each test skips, printing `SKIP:`, only when /dev/kvm cannot be opened.

mod tiny;

use std::path::Path;
use std::time::{Duration, Instant};

use vmm::snapshot::create::{SnapshotReport, memory_slices, memory_slices_mut};
use vmm::snapshot::{MemoryManifest, save_memory};
use vmm::store::local::{LocalStore, LocalStoreOptions};
use vmm::vstate::dirty::{DirtyMethod, LogState};

use tiny::snap::{changed_chunks, dirty, manifest};
use tiny::{Scenario, Spec, TempDir, TinyVm};

fn check(name: &str, body: impl FnOnce() -> Result<(), String>) {
    if !tiny::have_kvm() {
        return;
    }
    let t = Instant::now();
    let res = body();
    eprintln!("{name}: {:?}", t.elapsed());
    if let Err(e) = res {
        panic!("{name} failed: {e}");
    }
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg()) }
}

fn boot(mem_mib: u64) -> Result<TinyVm, String> {
    let mut spec = Spec::new(Scenario::SnapDirty);
    spec.mem_mib = mem_mib;
    let mut vm = tiny::boot(spec, Vec::new())?;
    vm.wait_for(Instant::now() + Duration::from_secs(30), "dirty: ready\n")?;
    vm.pause()?;
    Ok(vm)
}

/// A full save of the paused VM's memory into a scratch store: what any snapshot of it
/// must record.
fn full_manifest(vm: &TinyVm, scratch: &Path, chunk: usize) -> Result<MemoryManifest, String> {
    let store =
        LocalStore::open(scratch, LocalStoreOptions::default()).map_err(|e| e.to_string())?;
    // SAFETY: the VM is paused and its devices run on this thread.
    let regions = unsafe { memory_slices(&vm.vmm.mem) };
    save_memory(&regions, chunk, &store)
        .map(|(m, _)| m)
        .map_err(|e| e.to_string())
}

/// Writes `byte` at guest address `gpa` through the host mapping: neither KVM's dirty
/// log nor the VMM's write bitmap sees it.
fn write_behind_the_logs_back(vm: &TinyVm, gpa: u64, byte: u8) {
    // SAFETY: the VM is paused and no device is active; the slices are dropped at once.
    let mut regions = unsafe { memory_slices_mut(&vm.vmm.mem) };
    for (start, mem) in regions.iter_mut() {
        if gpa >= *start && gpa < *start + mem.len() as u64 {
            mem[(gpa - *start) as usize] = byte;
        }
    }
}

fn snap(vm: &mut TinyVm, dir: &Path, store: &Path) -> Result<SnapshotReport, String> {
    let r = vm.snapshot(dir, Some(store))?;
    eprintln!(
        "  {}: {:?} incremental={} {:?} log={:?}",
        dir.display(),
        r.dirty_method,
        r.incremental,
        r.memory,
        vm.vmm.dirty_log
    );
    Ok(r)
}

#[test]
fn incremental_snapshots_equal_full_saves_and_restore() {
    check("incremental_snapshots_equal_full_saves_and_restore", || {
        let tmp = TempDir::new("incr");
        let store = tmp.join("store");
        let mut vm = boot(64)?;
        let s1 = snap(&mut vm, &tmp.join("s1"), &store)?;
        ensure(!s1.incremental, || {
            "the first snapshot cannot be incremental".into()
        })?;
        let addrs = [0x50_0000, 0x50_0ff8, 0x5a_0000, 0x1f0_0000, 0x3f0_0000];
        let mut last = manifest(&tmp.join("s1"))?;
        for seq in 1..=4u32 {
            let a: Vec<u64> = addrs.iter().map(|a| a + u64::from(seq) * 0x1000).collect();
            dirty(&mut vm, seq, &a)?;
            let dir = tmp.join(format!("s{}", seq + 1));
            let trusted = vm.vmm.dirty_log == LogState::Trusted;
            let r = snap(&mut vm, &dir, &store)?;
            let m = manifest(&dir)?;
            let full = full_manifest(&vm, &tmp.join("scratch"), m.chunk_size as usize)?;
            ensure(m == full, || {
                format!(
                    "snapshot {} ({:?}, incremental={}) differs from a full save in chunks {:x?}",
                    seq + 1,
                    r.dirty_method,
                    r.incremental,
                    changed_chunks(&m, &full)
                )
            })?;
            // What the log found changed is what did change: the written chunks and
            // the mailbox (and on first touch the page-table chunk).
            let changed = changed_chunks(&last, &m);
            ensure(r.memory.chunks_new as usize <= changed.len(), || {
                format!(
                    "{} chunks added but {} changed",
                    r.memory.chunks_new,
                    changed.len()
                )
            })?;
            if trusted {
                ensure(
                    r.incremental && r.dirty_method == DirtyMethod::KvmLog,
                    || format!("trusted log but a non-incremental snapshot: {r:?}"),
                )?;
                ensure(
                    r.memory.chunks_reused >= r.memory.chunks_total - 2 * addrs.len() as u64 - 2,
                    || format!("an incremental snapshot re-read too much: {:?}", r.memory),
                )?;
            }
            last = m;
        }
        drop(vm);
        // Every snapshot of the chain restores its own moment.
        for seq in 1..=4u32 {
            let r = tiny::restore(&tmp.join(format!("s{}", seq + 1)), None, true)?;
            for a in addrs.iter().map(|a| a + u64::from(seq) * 0x1000) {
                let got = vm_memory::Bytes::read_obj::<u64>(&r.vmm.mem, vm_memory::GuestAddress(a))
                    .map_err(|e| e.to_string())?;
                ensure(got == u64::from(seq) << 32 | a, || {
                    format!("s{}: {got:#x} at {a:#x}", seq + 1)
                })?;
            }
        }
        Ok(())
    });
}

/// A restored VM's first snapshot into the snapshot's own store builds on it.
#[test]
fn a_restored_vm_snapshots_incrementally_against_its_snapshot() {
    check(
        "a_restored_vm_snapshots_incrementally_against_its_snapshot",
        || {
            let tmp = TempDir::new("incr-restored");
            let store = tmp.join("store");
            let mut vm = boot(64)?;
            snap(&mut vm, &tmp.join("s1"), &store)?;
            drop(vm);
            let mut vm = tiny::restore(&tmp.join("s1"), None, true)?;
            dirty(&mut vm, 1, &[0x60_0000])?;
            let r = snap(&mut vm, &tmp.join("s2"), &store)?;
            let m = manifest(&tmp.join("s2"))?;
            let full = full_manifest(&vm, &tmp.join("scratch"), m.chunk_size as usize)?;
            ensure(m == full, || "s2 differs from a full save".into())?;
            ensure(r.memory.chunks_new <= 3, || {
                format!("s2 added too much: {:?}", r.memory)
            })?;
            Ok(())
        },
    );
}

/// A write the log cannot see, made before the first snapshot: the first (full)
/// snapshot's check finds a changed chunk outside the log and the VM re-hashes after.
#[test]
fn a_log_that_missed_writes_is_not_used() {
    check("a_log_that_missed_writes_is_not_used", || {
        let tmp = TempDir::new("incr-missed");
        let store = tmp.join("store");
        let mut vm = boot(64)?;
        if vm.vmm.dirty_log == LogState::Off {
            eprintln!("SKIP: dirty logging is off on this host");
            return Ok(());
        }
        write_behind_the_logs_back(&vm, 0x70_0000, 0x5a);
        snap(&mut vm, &tmp.join("s1"), &store)?;
        ensure(vm.vmm.dirty_log == LogState::Broken, || {
            format!("log state after a missed write: {:?}", vm.vmm.dirty_log)
        })?;
        dirty(&mut vm, 1, &[0x50_0000])?;
        write_behind_the_logs_back(&vm, 0x74_0000, 0xa5);
        let r = snap(&mut vm, &tmp.join("s2"), &store)?;
        ensure(
            !r.incremental && r.dirty_method == DirtyMethod::Rehash,
            || format!("snapshot with a broken log: {r:?}"),
        )?;
        let m = manifest(&tmp.join("s2"))?;
        let full = full_manifest(&vm, &tmp.join("scratch"), m.chunk_size as usize)?;
        ensure(m == full, || "s2 differs from a full save".into())?;
        Ok(())
    });
}

/// Writes the log cannot see in every chunk after it was trusted: the spot check of the
/// next incremental snapshot catches them and that snapshot re-hashes everything.
#[test]
fn the_spot_check_catches_a_log_that_starts_missing_writes() {
    check(
        "the_spot_check_catches_a_log_that_starts_missing_writes",
        || {
            let tmp = TempDir::new("incr-spot");
            let store = tmp.join("store");
            let mut vm = boot(16)?;
            snap(&mut vm, &tmp.join("s1"), &store)?;
            if vm.vmm.dirty_log != LogState::Trusted {
                eprintln!(
                    "SKIP: the dirty log is not trusted here ({:?})",
                    vm.vmm.dirty_log
                );
                return Ok(());
            }
            for chunk in 0..(16u64 << 20) / (64 << 10) {
                write_behind_the_logs_back(&vm, chunk * (64 << 10) + 0x800, 0x33);
            }
            let r = snap(&mut vm, &tmp.join("s2"), &store)?;
            ensure(
                !r.incremental && vm.vmm.dirty_log == LogState::Broken,
                || {
                    format!(
                        "after unlogged writes everywhere: {r:?}, log {:?}",
                        vm.vmm.dirty_log
                    )
                },
            )?;
            let m = manifest(&tmp.join("s2"))?;
            let full = full_manifest(&vm, &tmp.join("scratch"), m.chunk_size as usize)?;
            ensure(m == full, || "s2 differs from a full save".into())?;
            Ok(())
        },
    );
}
