//! Writing a snapshot of a paused [`Vmm`] into a snapshot directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

use super::Vmm;
use crate::arch::x86_64::vcpu_state::VcpuState;
use crate::arch::x86_64::vm_state::VmState;
use crate::devices::legacy::SerialDeviceState;
use crate::disk::overlay_capture::{self, CaptureStats, OverlayManifest};
use crate::formats::{Persist, file};
use crate::snapshot::manifest::{self, DEFAULT_CHUNK_SIZE, MemoryManifest, SaveStats};
use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::snapshot::{BlockSnapshot, NetSnapshot, SnapshotBase};
use crate::store::local::{LocalStore, LocalStoreOptions};
use crate::util::lock;
use crate::vstate::dirty::{self, DirtyMethod, LogState};
use crate::vstate::memory::memory_slices;
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
    /// The vCPU thread did not answer.
    #[error("vcpu{0} did not answer")]
    Vcpu(u8, #[source] crate::vstate::vcpu::VcpuError),
    /// Saving a vCPU's state failed.
    #[error("saving vcpu{0}")]
    VcpuState(u8, #[source] crate::vstate::vcpu::VcpuPersistError),
    /// Saving the VM state failed.
    #[error("saving the VM state")]
    VmState(#[source] crate::arch::x86_64::vm_state::VmStateError),
    /// Saving a disk's transport failed.
    #[error("saving the transport of disk {index}")]
    Transport {
        /// Disk index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::devices::virtio::mmio::MmioError,
    },
    /// Saving a disk's device state failed.
    #[error("saving the state of disk {index}")]
    Block {
        /// Disk index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::devices::virtio::block::BlockError,
    },
    /// Saving a network interface failed.
    #[error("saving network interface {index}")]
    Net {
        /// Interface index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::devices::virtio::net::NetError,
    },
    /// Saving a network interface's transport failed.
    #[error("saving the transport of network interface {index}")]
    NetTransport {
        /// Interface index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::devices::virtio::mmio::MmioError,
    },
    /// Saving the serial port failed.
    #[error("saving the serial port")]
    Serial(#[source] crate::devices::legacy::SerialError),
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
    /// Encoding the state file failed.
    #[error("encoding the state file")]
    StateFile(#[source] file::StateFileError),
    /// Writing the memory manifest and state file failed (an earlier snapshot in the
    /// directory is left as it was).
    #[error("writing the memory manifest and state file")]
    Files(#[source] crate::util::IoError),
    /// Reading the dirty page log failed.
    #[error("reading the dirty page log")]
    Dirty(#[source] crate::vstate::dirty::DirtyError),
    /// Capturing a disk overlay failed.
    #[error("capturing the overlay of disk {index}")]
    Overlay {
        /// Disk index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::disk::overlay_capture::CaptureError,
    },
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
    /// How changed memory was found: `kvm-dirty-log` or `rehash`.
    pub dirty_method: DirtyMethod,
    /// Whether unchanged chunks were taken from the previous snapshot unread.
    pub incremental: bool,
    /// Disk overlay captures, by disk index (`null` for disks without an overlay).
    pub overlays: Vec<Option<CaptureStats>>,
}

/// `VMM_DIRTY_AUDIT=1`: every incremental snapshot is compared with a full hash of the
/// same memory (a debugging aid for hosts whose dirty log is in doubt; costs a rehash).
fn audit_enabled() -> bool {
    std::env::var("VMM_DIRTY_AUDIT").as_deref() == Ok("1")
}

/// Entries that differ between two manifests of the same layout.
fn audit_mismatches(a: &manifest::MemoryManifest, b: &manifest::MemoryManifest) -> usize {
    a.regions
        .iter()
        .zip(&b.regions)
        .map(|(x, y)| {
            x.chunks
                .iter()
                .zip(&y.chunks)
                .filter(|(p, q)| p != q)
                .count()
        })
        .sum()
}

/// A chunk "store" that only hashes: for comparing manifests without writing.
struct HashOnly;

impl crate::store::ChunkRead for HashOnly {
    fn get(&self, id: &crate::store::ChunkId) -> crate::store::Result<Vec<u8>> {
        Err(crate::store::StoreError::NotFound { id: *id })
    }

    fn contains(&self, _id: &crate::store::ChunkId) -> crate::store::Result<bool> {
        Ok(false)
    }
}

impl crate::store::ChunkWrite for HashOnly {
    fn put(&self, data: &[u8]) -> crate::store::Result<crate::store::ChunkId> {
        Ok(crate::store::ChunkId::of(data))
    }
}

/// Saves the devices' states. The VM is paused, so every disk's I/O gate is held: its
/// worker writes no guest memory until resume. A request still in a backend call (a remote
/// disk retrying) is not waited for: the saved queue counts it as not yet consumed, so a
/// restore runs it again (`VirtioDevice::queue_states`). What the guest wrote is made
/// durable.
fn save_devices(vmm: &Vmm) -> Result<(Vec<BlockSnapshot>, SerialDeviceState), CreateError> {
    let mut blocks = Vec::new();
    for (index, b) in vmm.machine.blocks.iter().enumerate() {
        // The transport locks the device itself: never hold both locks.
        let transport = lock(&b.transport)
            .save()
            .map_err(|source| CreateError::Transport { index, source })?;
        let device = {
            let dev = lock(&b.device);
            dev.backend()
                .flush()
                .map_err(|source| CreateError::Flush { index, source })?;
            dev.save()
                .map_err(|source| CreateError::Block { index, source })?
        };
        blocks.push(BlockSnapshot {
            base: b.base,
            gsi: b.gsi,
            transport,
            device,
            overlay: None,
        });
    }
    let serial = lock(&vmm.machine.serial)
        .save()
        .map_err(CreateError::Serial)?;
    Ok((blocks, serial))
}

/// Saves every network interface: transport (queues, interrupt status) and device.
fn save_nets(vmm: &Vmm) -> Result<Vec<NetSnapshot>, CreateError> {
    let mut nets = Vec::new();
    for (index, n) in vmm.machine.nets.iter().enumerate() {
        // The transport locks the device itself: never hold both locks.
        let transport = lock(&n.transport)
            .save()
            .map_err(|source| CreateError::NetTransport { index, source })?;
        let device = lock(&n.device)
            .save()
            .map_err(|source| CreateError::Net { index, source })?;
        nets.push(NetSnapshot {
            base: n.base,
            gsi: n.gsi,
            transport,
            device,
        });
    }
    Ok(nets)
}

/// Saves every vCPU's state (each on its own thread) and the VM-wide KVM state.
fn save_kvm_state(vmm: &Vmm) -> Result<(Vec<VcpuState>, VmState), CreateError> {
    let mut vcpus = Vec::new();
    for v in &vmm.machine.vcpus {
        let st = v
            .with_vcpu(|kvm_vcpu| kvm_vcpu.save())
            .map_err(|e| CreateError::Vcpu(v.id(), e))?
            .map_err(|e| CreateError::VcpuState(v.id(), e))?;
        vcpus.push(st);
    }
    let vm = vmm
        .machine
        .vm
        .in_kernel_devices()
        .save()
        .map_err(CreateError::VmState)?;
    Ok((vcpus, vm))
}

/// Opens the chunk store at `dir` writing packs: the new chunks of the snapshot go to one
/// pack, made durable with a constant number of flushes; nothing refers to them before
/// `sync` (called by the memory and overlay saves) returns.
fn open_store(dir: &Path) -> Result<LocalStore, CreateError> {
    LocalStore::open(dir, LocalStoreOptions::packs()).map_err(|source| CreateError::Store {
        path: dir.to_path_buf(),
        source,
    })
}

/// Guest memory as saved.
struct SavedMemory {
    manifest: MemoryManifest,
    stats: SaveStats,
    /// Whether unchanged chunks were taken from the base unread.
    incremental: bool,
    /// Where the dirty log stands once the snapshot is written.
    log_state: LogState,
}

/// An incremental save against `base` using the (trusted) dirty log, after a spot check
/// of the log; falls back to a full save (and distrusts the log) when the spot check or
/// the `VMM_DIRTY_AUDIT` comparison finds a change the log missed.
fn save_incremental(
    regions: &[(u64, &[u8])],
    store: &LocalStore,
    base: &MemoryManifest,
    is_dirty: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Result<SavedMemory, CreateError> {
    let chunk = base.chunk_size as usize;
    let full = |why: &str| -> Result<SavedMemory, CreateError> {
        log::error!("{why}");
        let (manifest, stats) =
            manifest::save_memory(regions, chunk, store).map_err(CreateError::Memory)?;
        Ok(SavedMemory {
            manifest,
            stats,
            incremental: false,
            log_state: LogState::Broken,
        })
    };
    let wrong = dirty::spot_check_log(regions, &base.regions, chunk, is_dirty);
    if wrong > 0 {
        return full(&format!(
            "the KVM dirty log missed writes to {wrong} sampled chunks: no longer trusting \
             it for this VM; re-hashing all memory"
        ));
    }
    let (manifest, stats) = manifest::save_memory_incremental(regions, store, base, is_dirty)
        .map_err(CreateError::Memory)?;
    if audit_enabled() {
        // Debugging aid: compare with a full hash of the same memory.
        let full_hash = manifest::save_memory(regions, chunk, &HashOnly)
            .map_err(CreateError::Memory)?
            .0;
        let wrong = audit_mismatches(&manifest, &full_hash);
        if wrong > 0 {
            return full(&format!(
                "dirty-log audit: the incremental snapshot differs from a full hash in \
                 {wrong} chunks; no longer trusting the log; re-hashing"
            ));
        }
        log::info!("dirty-log audit: incremental snapshot matches a full hash");
    }
    Ok(SavedMemory {
        manifest,
        stats,
        incremental: true,
        log_state: LogState::Trusted,
    })
}

/// Saves guest memory into `store`: incrementally against `base` when the dirty log is
/// trusted, otherwise in full (then checking an unverified log against `reference`, what
/// memory held when the log last restarted). Reads, and so restarts, the dirty log.
fn save_guest_memory(
    vmm: &mut Vmm,
    store: &LocalStore,
    reference: Option<&SnapshotBase>,
    base: Option<&SnapshotBase>,
) -> Result<SavedMemory, CreateError> {
    let log_state = vmm.machine.dirty_log;
    let pages = if log_state.is_logging() {
        vmm.machine.dirty_log = log_state.while_snapshotting();
        Some(
            dirty::take_dirty_pages(vmm.machine.vm.fd(), &vmm.machine.mem)
                .map_err(CreateError::Dirty)?,
        )
    } else {
        None
    };
    // SAFETY: the VM is paused (checked by the caller) and devices run on this thread.
    let regions = unsafe { memory_slices(&vmm.machine.mem) };
    let chunk = base.map_or(DEFAULT_CHUNK_SIZE, |b| b.memory.chunk_size as usize);
    let is_dirty = |r: usize, c: usize| {
        pages
            .as_ref()
            .and_then(|p| p.get(r))
            .is_none_or(|p| dirty::chunk_dirty(p, c, chunk))
    };
    if let (Some(b), LogState::Trusted) = (base, log_state) {
        return save_incremental(&regions, store, &b.memory, &is_dirty);
    }
    let (manifest, stats) =
        manifest::save_memory(&regions, chunk, store).map_err(CreateError::Memory)?;
    let comparable = reference.is_none_or(|r| r.memory.chunk_size == manifest.chunk_size);
    let mut new_state = log_state;
    if log_state.needs_check() && comparable {
        // A full save saw every chunk: each that differs from what memory held before
        // (the base, or zeros after boot) must be in the log.
        let before = reference.map(|b| b.memory.regions.as_slice());
        let missed = dirty::check_log(&manifest.regions, before, &is_dirty);
        new_state = log_state.after_check(missed, || dirty::selftest_passed(vmm.machine.vm.kvm()));
    }
    Ok(SavedMemory {
        manifest,
        stats,
        incremental: false,
        log_state: new_state,
    })
}

/// Overlays as captured: statistics and manifests by disk index, and what each capture
/// took (to clear once the snapshot is written).
type CapturedOverlays = (
    Vec<Option<CaptureStats>>,
    Vec<Option<OverlayManifest>>,
    Vec<(usize, Vec<u64>)>,
);

/// Captures every disk overlay into `store`, incrementally against `base`'s.
fn capture_overlays(
    vmm: &Vmm,
    store: &LocalStore,
    base: Option<&SnapshotBase>,
) -> Result<CapturedOverlays, CreateError> {
    let (mut stats, mut manifests, mut touched) = (Vec::new(), Vec::new(), Vec::new());
    for (index, ov) in vmm.machine.overlays.iter().enumerate() {
        let Some(ov) = ov else {
            stats.push(None);
            manifests.push(None);
            continue;
        };
        let parent = base.and_then(|b| b.overlays.get(index).cloned().flatten());
        let (m, t, st) = overlay_capture::capture(ov, store, parent.as_ref())
            .map_err(|source| CreateError::Overlay { index, source })?;
        stats.push(Some(st));
        manifests.push(Some(m));
        touched.push((index, t));
    }
    Ok((stats, manifests, touched))
}

/// Writes the memory manifest and the state file into `dir`; over an existing snapshot,
/// never the new manifest beside the old state.
fn write_files(
    dir: &Path,
    manifest: &MemoryManifest,
    state: &MicrovmState,
) -> Result<(), CreateError> {
    let manifest_bytes = manifest.encode().map_err(CreateError::Memory)?;
    let state_bytes =
        file::encode(&file::FileKind::STATE, state).map_err(CreateError::StateFile)?;
    crate::util::fs::replace_pair(
        (&dir.join(MEMORY_FILE), &manifest_bytes),
        (&dir.join(STATE_FILE), &state_bytes),
    )
    .map_err(CreateError::Files)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a snapshot of the paused `vmm` into `dir`, memory chunks into `store`
/// (default: `dir` itself). Steps: devices, then vCPUs and VM state; memory (reading the
/// dirty log); overlays; the two files; then the VM's snapshot base and dirty-log state.
pub fn create_snapshot(
    vmm: &mut Vmm,
    dir: &Path,
    store: Option<&Path>,
) -> Result<SnapshotReport, CreateError> {
    if vmm.machine.state != RunState::Paused {
        return Err(CreateError::NotPaused(vmm.machine.state));
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|source| CreateError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let (mut blocks, serial) = save_devices(vmm)?;
    let nets = save_nets(vmm)?;
    let (vcpus, vm) = save_kvm_state(vmm)?;
    let state_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let store_dir = store.unwrap_or(dir).to_path_buf();
    let chunk_store = open_store(&store_dir)?;
    let store_canon = std::fs::canonicalize(&store_dir).unwrap_or_else(|_| store_dir.clone());
    // Whatever happens below, the base is consumed: the dirty log is read (and reset)
    // now, so after a failure the next snapshot must be a full one.
    // What memory held when the log last restarted (the dirty log's reference, whatever
    // store it is in), and the same as a base to copy entries from (same store only).
    let reference = vmm.snapshot_base.take();
    let base = reference.as_ref().filter(|b| b.store == store_canon);
    let saved = save_guest_memory(vmm, &chunk_store, reference.as_ref(), base)?;
    let (overlay_stats, overlay_manifests, touched) = capture_overlays(vmm, &chunk_store, base)?;
    for (b, m) in blocks.iter_mut().zip(&overlay_manifests) {
        b.overlay = m.clone();
    }
    let memory_ms = t1.elapsed().as_secs_f64() * 1e3;

    let state = MicrovmState {
        config: vmm.machine.config.clone(),
        cmdline: vmm.machine.cmdline.clone(),
        memory_regions: vmm
            .machine
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect(),
        vcpus,
        vm,
        serial,
        blocks,
        store: store.map(|s| std::fs::canonicalize(s).unwrap_or_else(|_| s.to_path_buf())),
        created_unix: now_unix(),
        cpu: vmm.machine.cpu.clone(),
        nets,
    };
    write_files(dir, &saved.manifest, &state)?;
    let (stats, incremental) = (saved.stats, saved.incremental);
    let base = SnapshotBase {
        store: store_canon,
        memory: saved.manifest,
        overlays: overlay_manifests,
    };
    finish(vmm, touched, saved.log_state, base);
    let report = SnapshotReport {
        path: dir.to_path_buf(),
        store: store_dir,
        state_ms,
        memory_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        memory: stats,
        dirty_method: if incremental {
            DirtyMethod::KvmLog
        } else {
            DirtyMethod::Rehash
        },
        incremental,
        overlays: overlay_stats,
    };
    log_report(&report);
    Ok(report)
}

/// Logs what a snapshot cost.
fn log_report(r: &SnapshotReport) {
    let stats = &r.memory;
    log::info!(
        "snapshot {}: state {:.1} ms, memory {:.1} ms ({} chunks, {} zero, {} new, {} bytes written), total {:.1} ms",
        r.path.display(),
        r.state_ms,
        r.memory_ms,
        stats.chunks_total,
        stats.chunks_zero,
        stats.chunks_new,
        stats.bytes_written,
        r.total_ms
    );
}

/// Once the snapshot is written: clears what the overlay captures took, and makes the
/// snapshot the VM's base, from which the dirty log (in `log_state`) now counts.
fn finish(vmm: &mut Vmm, touched: Vec<(usize, Vec<u64>)>, log_state: LogState, base: SnapshotBase) {
    for (index, t) in touched {
        if let Some(ov) = &vmm.machine.overlays[index] {
            ov.clear_touched(&t);
        }
    }
    vmm.machine.dirty_log = log_state.after_snapshot();
    vmm.snapshot_base = Some(base);
}
