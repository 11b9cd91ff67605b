//! Writing a snapshot of a paused [`Vmm`] into a snapshot directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

use crate::arch::x86_64::{msrs, vcpu_state, vm_state};
use crate::devices::bus::lock;
use crate::snapshot::manifest::{self, DEFAULT_CHUNK_SIZE, SaveStats};
use crate::snapshot::microvm::{BlockSnapshot, MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::snapshot::{Persist, file};
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::vmm::Vmm;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::RunState;

/// Errors while creating a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The VM is not paused.
    #[error("the VM must be paused to snapshot it (it is {0:?})")]
    NotPaused(RunState),
    /// The snapshot directory could not be created.
    #[error("cannot create snapshot directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk could not be flushed.
    #[error("flushing disk {index} before the snapshot")]
    Flush {
        /// Disk index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::disk::DiskError,
    },
    /// The MSR list could not be read.
    #[error("reading the list of MSRs to save")]
    Msrs(#[source] crate::arch::x86_64::msrs::MsrError),
    /// The vCPU thread did not answer.
    #[error("vcpu{0} did not answer")]
    Vcpu(u8, #[source] crate::vstate::vcpu::VcpuError),
    /// Saving a vCPU's state failed.
    #[error("saving vcpu{0}")]
    VcpuState(u8, #[source] vcpu_state::VcpuStateError),
    /// Saving the VM state failed.
    #[error("saving the VM state")]
    VmState(#[source] vm_state::VmStateError),
    /// The chunk store could not be opened.
    #[error("opening chunk store {path}")]
    Store {
        /// Store directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: crate::store::StoreError,
    },
    /// Saving memory failed.
    #[error("saving guest memory")]
    Memory(#[source] manifest::ManifestError),
    /// Writing the state file failed.
    #[error("writing the state file")]
    StateFile(#[source] file::StateFileError),
}

/// What a snapshot cost, reported to the caller.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotReport {
    /// Snapshot directory.
    pub path: PathBuf,
    /// Chunk store directory.
    pub store: PathBuf,
    /// Milliseconds spent on vCPU, VM and device state.
    pub state_ms: f64,
    /// Milliseconds spent on memory (hash, compress, write, fsync).
    pub memory_ms: f64,
    /// Total milliseconds.
    pub total_ms: f64,
    /// Memory statistics.
    pub memory: SaveStats,
}

/// Host views of every guest memory region, as (guest address, bytes).
///
/// # Safety
/// The caller must make sure nothing writes guest memory while the slices live: the vCPUs
/// are paused and device emulation runs on the calling thread.
pub unsafe fn memory_slices(mem: &GuestMemory) -> Vec<(u64, &[u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len()` bytes at `as_ptr()` for as long as `mem`
            // lives; the caller guarantees no concurrent writers.
            let s =
                unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u8, r.len() as usize) };
            (r.start_addr().0, s)
        })
        .collect()
}

/// Mutable host views of every guest memory region, as (guest address, bytes).
///
/// # Safety
/// The caller must make sure nothing else reads or writes guest memory while the slices
/// live (no vCPU runs, no device is active).
#[allow(clippy::mut_from_ref)]
pub unsafe fn memory_slices_mut(mem: &GuestMemory) -> Vec<(u64, &mut [u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len()` bytes at `as_ptr()` for as long as `mem`
            // lives; regions are disjoint and the caller guarantees exclusive access.
            let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
            (r.start_addr().0, s)
        })
        .collect()
}

/// Writes a snapshot of the paused `vmm` into `dir`, memory chunks into `store`
/// (default: `dir` itself).
pub fn create_snapshot(
    vmm: &mut Vmm,
    dir: &Path,
    store: Option<&Path>,
) -> Result<SnapshotReport, CreateError> {
    if vmm.state != RunState::Paused {
        return Err(CreateError::NotPaused(vmm.state));
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| CreateError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;

    // Devices first: requests are processed synchronously on this thread, so none is in
    // flight; make what the guest wrote durable.
    let mut blocks = Vec::new();
    for (index, b) in vmm.blocks.iter().enumerate() {
        // The transport locks the device itself: never hold both locks.
        let transport = lock(&b.transport).save_state();
        let device = {
            let dev = lock(&b.device);
            dev.backend()
                .flush()
                .map_err(|source| CreateError::Flush { index, source })?;
            dev.save_state()
        };
        blocks.push(BlockSnapshot {
            base: b.base,
            gsi: b.gsi,
            transport,
            device,
            overlay: None,
        });
    }

    let msr_list = msrs::msrs_to_save(vmm.vm.kvm()).map_err(CreateError::Msrs)?;
    let mut vcpus = Vec::new();
    for v in &vmm.vcpus {
        let kvm = vmm.vm.kvm().clone();
        let list = msr_list.clone();
        let st = v
            .with(move |fd| {
                let list = msrs::readable_msrs(fd, &list).unwrap_or(list);
                vcpu_state::save_vcpu(fd, &kvm, &list)
            })
            .map_err(|e| CreateError::Vcpu(v.id(), e))?
            .map_err(|e| CreateError::VcpuState(v.id(), e))?;
        vcpus.push(st);
    }
    let vm = vm_state::save_vm(vmm.vm.fd()).map_err(CreateError::VmState)?;
    let serial = lock(&vmm.serial).save();
    let state_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let store_dir = store.unwrap_or(dir).to_path_buf();
    let chunk_store =
        LocalStore::open(&store_dir, LocalStoreOptions::default()).map_err(|source| {
            CreateError::Store {
                path: store_dir.clone(),
                source,
            }
        })?;
    // SAFETY: the VM is paused (checked above) and devices run on this thread.
    let regions = unsafe { memory_slices(&vmm.mem) };
    let (manifest, stats) = manifest::save_memory(&regions, DEFAULT_CHUNK_SIZE, &chunk_store)
        .map_err(CreateError::Memory)?;
    manifest
        .write_to(dir.join(MEMORY_FILE))
        .map_err(CreateError::Memory)?;
    let memory_ms = t1.elapsed().as_secs_f64() * 1e3;

    let state = MicrovmState {
        config: vmm.config.clone(),
        cmdline: vmm.cmdline.clone(),
        memory_regions: regions.iter().map(|(a, s)| (*a, s.len() as u64)).collect(),
        vcpus,
        vm,
        serial,
        blocks,
        store: store.map(|s| std::fs::canonicalize(s).unwrap_or_else(|_| s.to_path_buf())),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    file::write_state_file(dir.join(STATE_FILE), &state).map_err(CreateError::StateFile)?;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    log::info!(
        "snapshot {}: state {state_ms:.1} ms, memory {memory_ms:.1} ms ({} chunks, {} zero, {} new, {} bytes written), total {total_ms:.1} ms",
        dir.display(),
        stats.chunks_total,
        stats.chunks_zero,
        stats.chunks_new,
        stats.bytes_written
    );
    Ok(SnapshotReport {
        path: dir.to_path_buf(),
        store: store_dir,
        state_ms,
        memory_ms,
        total_ms,
        memory: stats,
    })
}
