//! Incremental snapshots, dirty tracking and deduplication with the tiny guest: an
//! incremental snapshot equals a full save of the same memory and restores the guest's
//! writes; writes the dirty log cannot see (made behind its back) are caught — before the
//! first snapshot by the full-snapshot check, later by the spot check — and the VM then
//! re-hashes; snapshots sharing a store add exactly the changed chunks; an idle 1 GiB
//! guest's snapshot stores no more than its non-zero memory.
//!
//! Each test skips, printing `SKIP:`, only when /dev/kvm cannot be opened.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::Bytes;
use vmm::snapshot::{ChunkEntry, MemoryManifest, save_memory};
use vmm::store::local::{LocalStore, LocalStoreOptions};
use vmm::vmm::SnapshotReport;
use vmm::vstate::dirty::{DirtyMethod, LogState};
use vmm::vstate::memory::{memory_slices, memory_slices_mut};

use support::env::temp_dir;
use support::tiny;
use support::tiny::harness::{check, deadline, ensure};
use support::tiny::snap::{changed_chunks, dirty, manifest};
use support::tiny::{Scenario, Spec, TinyVm, guest};

fn boot(mem_mib: u64) -> Result<TinyVm, String> {
    let mut spec = Spec::new(Scenario::SnapDirty);
    spec.mem_mib = mem_mib;
    let mut vm = tiny::boot(spec, Vec::new())?;
    support::tiny::snap::wait_dirty_ready(&mut vm, Instant::now() + Duration::from_secs(120))?;
    Ok(vm)
}

/// A full save of the paused VM's memory into a scratch store: what any snapshot of it
/// must record.
fn full_manifest(vm: &TinyVm, scratch: &Path, chunk: usize) -> Result<MemoryManifest, String> {
    let store =
        LocalStore::open(scratch, LocalStoreOptions::default()).map_err(|e| e.to_string())?;
    // SAFETY: the VM is paused and its devices run on this thread.
    let regions = unsafe { memory_slices(&vm.vmm.machine.mem) };
    save_memory(&regions, chunk, &store)
        .map(|(m, _)| m)
        .map_err(|e| e.to_string())
}

/// Writes `byte` at guest address `gpa` through the host mapping: neither KVM's dirty
/// log nor the VMM's write bitmap sees it.
fn write_behind_the_logs_back(vm: &TinyVm, gpa: u64, byte: u8) {
    // SAFETY: the VM is paused and no device is active; the slices are dropped at once.
    let mut regions = unsafe { memory_slices_mut(&vm.vmm.machine.mem) };
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
        vm.vmm.machine.dirty_log
    );
    Ok(r)
}

#[test]
fn incremental_snapshots_equal_full_saves_and_restore() {
    check("incremental_snapshots_equal_full_saves_and_restore", || {
        let tmp = temp_dir("incr");
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
            let trusted = vm.vmm.machine.dirty_log == LogState::Trusted;
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
                let got = vm_memory::Bytes::read_obj::<u64>(
                    &r.vmm.machine.mem,
                    vm_memory::GuestAddress(a),
                )
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
            let tmp = temp_dir("incr-restored");
            let store = tmp.join("store");
            let mut vm = boot(64)?;
            snap(&mut vm, &tmp.join("s1"), &store)?;
            let log_after_boot_check = vm.vmm.machine.dirty_log;
            drop(vm);
            let mut vm = tiny::restore(&tmp.join("s1"), None, true)?;
            dirty(&mut vm, 1, &[0x60_0000])?;
            let r = snap(&mut vm, &tmp.join("s2"), &store)?;
            let m = manifest(&tmp.join("s2"))?;
            let full = full_manifest(&vm, &tmp.join("scratch"), m.chunk_size as usize)?;
            ensure(m == full, || "s2 differs from a full save".into())?;
            // The guest wrote one chunk and the mailbox; the page-table/stack chunk may
            // change too. Anything else is unexplained: name the chunks.
            let changed = changed_chunks(&manifest(&tmp.join("s1"))?, &m);
            eprintln!("  s1 -> s2 changed chunks {changed:x?}");
            ensure(r.memory.chunks_new <= 3, || {
                format!("s2 added too much: {:?}, changed {changed:x?}", r.memory)
            })?;
            // Restored again, snapshotted into another store: nothing to copy entries
            // from, but the restored snapshot is still what the log is checked against
            // (a log that works is not distrusted for it), and the snapshot is complete.
            drop(vm);
            let mut vm = tiny::restore(&tmp.join("s2"), None, true)?;
            dirty(&mut vm, 2, &[0x62_0000])?;
            let r = snap(&mut vm, &tmp.join("s3"), &tmp.join("store2"))?;
            let m = manifest(&tmp.join("s3"))?;
            let full = full_manifest(&vm, &tmp.join("scratch"), m.chunk_size as usize)?;
            ensure(m == full && !r.incremental, || {
                format!("s3 into a new store: {r:?}")
            })?;
            // Distrusting the log is only right if it really misses writes here, which
            // the booted VM's check would have found too.
            ensure(
                vm.vmm.machine.dirty_log != LogState::Broken
                    || log_after_boot_check == LogState::Broken,
                || "the log was distrusted after a restore into another store".into(),
            )?;
            Ok(())
        },
    );
}

/// A write the log cannot see, made before the first snapshot: the first (full)
/// snapshot's check finds a changed chunk outside the log and the VM re-hashes after.
#[test]
fn a_log_that_missed_writes_is_not_used() {
    check("a_log_that_missed_writes_is_not_used", || {
        let tmp = temp_dir("incr-missed");
        let store = tmp.join("store");
        let mut vm = boot(64)?;
        if vm.vmm.machine.dirty_log == LogState::Off {
            eprintln!("SKIP: dirty logging is off on this host");
            return Ok(());
        }
        write_behind_the_logs_back(&vm, 0x70_0000, 0x5a);
        snap(&mut vm, &tmp.join("s1"), &store)?;
        ensure(vm.vmm.machine.dirty_log == LogState::Broken, || {
            format!(
                "log state after a missed write: {:?}",
                vm.vmm.machine.dirty_log
            )
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
            let tmp = temp_dir("incr-spot");
            let store = tmp.join("store");
            let mut vm = boot(16)?;
            snap(&mut vm, &tmp.join("s1"), &store)?;
            if vm.vmm.machine.dirty_log != LogState::Trusted {
                eprintln!(
                    "SKIP: the dirty log is not trusted here ({:?})",
                    vm.vmm.machine.dirty_log
                );
                return Ok(());
            }
            for chunk in 0..(16u64 << 20) / (64 << 10) {
                write_behind_the_logs_back(&vm, chunk * (64 << 10) + 0x800, 0x33);
            }
            let r = snap(&mut vm, &tmp.join("s2"), &store)?;
            ensure(
                !r.incremental && vm.vmm.machine.dirty_log == LogState::Broken,
                || {
                    format!(
                        "after unlogged writes everywhere: {r:?}, log {:?}",
                        vm.vmm.machine.dirty_log
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

// ---------------------------------------------------------------------------------------
// 5: chunk deduplication in a shared store.

/// Guest addresses of the manifest entries that differ between `a` and `b`.
/// Two snapshots of the same paused VM into one store: the second adds nothing. After the
/// guest writes to three 64 KiB chunks (and the host to the mailbox chunk), a snapshot adds
/// exactly those four chunks (plus, the first time, the page-table chunk whose accessed and
/// dirty bits the CPU set); after a mailbox-only change, one.
#[test]
fn snapshots_in_a_shared_store_dedup_unchanged_chunks() {
    check("snapshots_in_a_shared_store_dedup_unchanged_chunks", || {
        let tmp = temp_dir("dedup");
        let store = tmp.join("store");
        let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new())?;
        support::tiny::snap::wait_dirty_ready(&mut vm, deadline())?;
        let s1 = vm.snapshot(&tmp.join("s1"), Some(&store))?.memory;
        let s2 = vm.snapshot(&tmp.join("s2"), Some(&store))?.memory;
        eprintln!("  s1 {s1:?}\n  s2 {s2:?}");
        ensure(s1.chunks_new > 0 && s1.bytes_written > 0, || {
            format!("the first snapshot stored nothing: {s1:?}")
        })?;
        ensure(
            s2.chunks_new == 0
                && s2.bytes_written == 0
                // Unchanged chunks are re-hashed and found in the store (deduped), or
                // taken from s1 unread when the dirty log is trusted (reused).
                && s2.chunks_deduped + s2.chunks_reused + s2.chunks_zero == s1.chunks_total,
            || format!("the second snapshot of the unchanged VM: {s2:?} (first {s1:?})"),
        )?;
        let (m1, m2) = (manifest(&tmp.join("s1"))?, manifest(&tmp.join("s2"))?);
        ensure(m1 == m2, || "the manifests of s1 and s2 differ".into())?;

        let chunk = m1.chunk_size;
        let mailbox = guest::MAILBOX / chunk * chunk;
        let addrs = [0x50_0000, 0x50_0ff8, 0x5a_0000, 0x1f0_0000];
        let mut expected = vec![0x50_0000, 0x5a_0000, 0x1f0_0000, mailbox];
        expected.sort();
        // First touch of these 2 MiB pages: the CPU also sets the accessed and dirty bits
        // of their page-directory entries, in the identity page tables in chunk 0.
        dirty(&mut vm, 1, &addrs)?;
        let s3 = vm.snapshot(&tmp.join("s3"), Some(&store))?.memory;
        let m3 = manifest(&tmp.join("s3"))?;
        let changed = changed_chunks(&m1, &m3);
        eprintln!("  s3 {s3:?}, changed {changed:x?}");
        let with_pt = [vec![0], expected.clone()].concat();
        ensure(changed == expected || changed == with_pt, || {
            format!(
                "chunks changed by the guest's first writes: {changed:x?}, expected {expected:x?} (and maybe 0)"
            )
        })?;
        ensure(s3.chunks_new == changed.len() as u64, || {
            format!(
                "s3 added {} chunks, {} changed: {s3:?}",
                s3.chunks_new,
                changed.len()
            )
        })?;

        // The same pages again, new values: exactly the three data chunks and the mailbox.
        dirty(&mut vm, 2, &addrs)?;
        let s4 = vm.snapshot(&tmp.join("s4"), Some(&store))?.memory;
        let m4 = manifest(&tmp.join("s4"))?;
        let changed = changed_chunks(&m3, &m4);
        eprintln!("  s4 {s4:?}, changed {changed:x?}");
        ensure(changed == expected, || {
            format!("chunks changed by the guest: {changed:x?}, expected {expected:x?}")
        })?;
        ensure(s4.chunks_new == expected.len() as u64, || {
            format!(
                "s4 added {} chunks, expected {}: {s4:?}",
                s4.chunks_new,
                expected.len()
            )
        })?;

        // A command that writes nothing: only the mailbox chunk changes.
        dirty(&mut vm, 3, &[])?;
        let s5 = vm.snapshot(&tmp.join("s5"), Some(&store))?.memory;
        let changed = changed_chunks(&m4, &manifest(&tmp.join("s5"))?);
        ensure(s5.chunks_new == 1 && changed == vec![mailbox], || {
            format!("s5 (mailbox only): {s5:?}, changed {changed:x?}")
        })?;
        drop(vm);

        // s4 restores from the shared store with the guest's writes.
        let r = tiny::restore(&tmp.join("s4"), None, true)?;
        for &a in &addrs {
            let got =
                vm_memory::Bytes::read_obj::<u64>(&r.vmm.machine.mem, vm_memory::GuestAddress(a))
                    .map_err(|e| e.to_string())?;
            ensure(got == 2 << 32 | a, || {
                format!(
                    "restored s4 has {got:#x} at {a:#x}, expected {:#x}",
                    2u64 << 32 | a
                )
            })?;
        }
        let zero_chunks = m3.regions[0]
            .chunks
            .iter()
            .filter(|c| **c == ChunkEntry::Zero)
            .count() as u64;
        // An incremental save copies clean entries (zero ones included) unread: those
        // count as reused, not as zero.
        let zero_ok = if s3.chunks_reused == 0 {
            zero_chunks == s3.chunks_zero
        } else {
            s3.chunks_zero <= zero_chunks
        };
        ensure(zero_ok, || {
            format!(
                "{zero_chunks} zero entries in the s3 manifest, stats say {} ({} reused)",
                s3.chunks_zero, s3.chunks_reused
            )
        })?;
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// An idle 1 GiB guest: the snapshot stores no more than the guest's non-zero memory.

#[test]
fn idle_1gib_snapshot_stores_at_most_the_nonzero_memory() {
    check(
        "idle_1gib_snapshot_stores_at_most_the_nonzero_memory",
        || {
            let tmp = temp_dir("idle1g");
            let mut spec = Spec::new(Scenario::SnapDirty);
            spec.mem_mib = 1024;
            let mut vm = tiny::boot(spec, Vec::new())?;
            support::tiny::snap::wait_dirty_ready(&mut vm, deadline())?;
            // Count the guest's non-zero bytes, 4 KiB page by page, from the host.
            let mut nonzero_pages = 0u64;
            let mut page = vec![0u8; 4096];
            let mut addr = 0u64;
            while addr < 1024 << 20 {
                vm.vmm
                    .machine
                    .mem
                    .read_slice(&mut page, vm_memory::GuestAddress(addr))
                    .map_err(|e| format!("read {addr:#x}: {e}"))?;
                if page.iter().any(|&b| b != 0) {
                    nonzero_pages += 1;
                }
                addr += 4096;
            }
            let nonzero = nonzero_pages * 4096;
            let s = vm.snapshot(&tmp.join("s"), None)?.memory;
            let stored: u64 = walk_size(&tmp.join("s").join("chunks"));
            eprintln!("  nonzero {nonzero} bytes, stored {stored} bytes on disk, {s:?}");
            ensure(nonzero > 0, || "the guest has no non-zero memory?".into())?;
            ensure(
                s.bytes_written <= nonzero && stored <= nonzero + 4096 * s.chunks_new,
                || {
                    format!(
                        "stored {} bytes ({stored} on disk) for {nonzero} non-zero bytes",
                        s.bytes_written
                    )
                },
            )?;
            ensure(
                s.chunks_zero + s.chunks_new + s.chunks_deduped == s.chunks_total,
                || format!("chunk counts do not add up: {s:?}"),
            )?;
            Ok(())
        },
    );
}

/// Sum of the sizes of the regular files under `dir`.
fn walk_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += walk_size(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}
