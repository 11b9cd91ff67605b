//! Snapshot helpers for tiny-guest tests: manifests, the `SnapDirty` guest's write
//! command.

use std::path::Path;
use std::time::{Duration, Instant};

use vmm::snapshot::MemoryManifest;

use super::{TinyVm, guest};

/// Guest addresses of the chunks whose entries differ between `a` and `b`.
pub fn changed_chunks(a: &MemoryManifest, b: &MemoryManifest) -> Vec<u64> {
    let mut out = Vec::new();
    for (ra, rb) in a.regions.iter().zip(&b.regions) {
        for (i, (ca, cb)) in ra.chunks.iter().zip(&rb.chunks).enumerate() {
            if ca != cb {
                out.push(ra.guest_addr + i as u64 * a.chunk_size);
            }
        }
    }
    out
}

/// The memory manifest of the snapshot in `dir`.
pub fn manifest(dir: &Path) -> Result<MemoryManifest, String> {
    MemoryManifest::read_from(dir.join("memory")).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Waits until the `SnapDirty` guest has printed its ready line and is parked waiting for
/// commands (past the serial lock, so a snapshot taken now always holds the same bytes),
/// then pauses it.
pub fn wait_dirty_ready(vm: &mut TinyVm, end: Instant) -> Result<(), String> {
    vm.wait_for(end, "dirty: ready\n")?;
    while vm.read_u32(guest::MB_CMD_ACK)? != guest::DIRTY_READY {
        if Instant::now() >= end {
            return Err("the dirty guest printed ready but did not park".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause()
}

/// Has the `SnapDirty` guest write `seq << 32 | addr` at each of `addrs`, then pauses it
/// again.
pub fn dirty(vm: &mut TinyVm, seq: u32, addrs: &[u64]) -> Result<(), String> {
    for (i, &a) in addrs.iter().enumerate() {
        vm.write(guest::MB_CMD_LIST + 8 * i as u64, a)?;
    }
    vm.write(guest::MB_CMD_COUNT, addrs.len() as u32)?;
    vm.write(guest::MB_CMD_SEQ, seq)?;
    vm.resume()?;
    let end = super::harness::deadline();
    while vm.read_u32(guest::MB_CMD_ACK)? != seq {
        if Instant::now() >= end {
            return Err(format!("the guest did not do command {seq}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause()
}
