//! Writing a snapshot of a paused [`Vmm`] into a snapshot directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::Vmm;
use crate::arch::x86_64::{msrs, vcpu_state, vm_state};
use crate::disk::overlay_capture::{self, CaptureStats};
use crate::formats::{Persist, file};
use crate::snapshot::manifest::{self, DEFAULT_CHUNK_SIZE, SaveStats};
use crate::snapshot::microvm::{MEMORY_FILE, MicrovmState, STATE_FILE};
use crate::snapshot::{BlockSnapshot, SnapshotBase};
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

/// Chunks of a full save that differ from `reference` (zeros if `None`) but have no
/// page in the dirty log.
fn check_log(
    saved: &manifest::MemoryManifest,
    reference: Option<&manifest::MemoryManifest>,
    dirty: &dyn Fn(usize, usize) -> bool,
) -> usize {
    let mut missed = 0;
    for (r, m) in saved.regions.iter().enumerate() {
        for (c, e) in m.chunks.iter().enumerate() {
            let before = reference
                .and_then(|b| b.regions.get(r))
                .and_then(|b| b.chunks.get(c))
                .copied()
                .unwrap_or(manifest::ChunkEntry::Zero);
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
/// parent's, among a sample.
fn spot_check_log(
    regions: &[(u64, &[u8])],
    parent: &manifest::MemoryManifest,
    dirty: &dyn Fn(usize, usize) -> bool,
) -> usize {
    let chunk = parent.chunk_size as usize;
    let clean: Vec<(usize, usize)> = parent
        .regions
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
                manifest::ChunkEntry::Zero
            } else {
                manifest::ChunkEntry::Chunk(crate::store::ChunkId::of(data))
            };
            now != parent.regions[r].chunks[c]
        })
        .count()
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

    // Devices first. The VM is paused, so every disk's I/O gate is held: its worker writes
    // no guest memory until resume. A request still in a backend call (a remote disk
    // retrying) is not waited for: the saved queue counts it as not yet consumed, so a
    // restore runs it again (`VirtioDevice::queue_states`). Make what the guest wrote
    // durable.
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
    // One file-system flush for all new chunks instead of one fsync each; nothing
    // refers to them before `sync` (called by the memory and overlay saves) returns.
    let options = LocalStoreOptions {
        batch_durability: true,
        ..Default::default()
    };
    let chunk_store =
        LocalStore::open(&store_dir, options).map_err(|source| CreateError::Store {
            path: store_dir.clone(),
            source,
        })?;
    let store_canon = std::fs::canonicalize(&store_dir).unwrap_or_else(|_| store_dir.clone());
    // Whatever happens below, the base is consumed: the dirty log is read (and reset)
    // now, so after a failure the next snapshot must be a full one.
    // What memory held when the log last restarted (the dirty log's reference, whatever
    // store it is in), and the same as a base to copy entries from (same store only).
    let reference = vmm.snapshot_base.take();
    let base = reference.as_ref().filter(|b| b.store == store_canon);
    let log_state = vmm.dirty_log;
    let pages = match log_state {
        LogState::Unverified { .. } | LogState::Trusted => {
            // From here on the log restarts: until this snapshot completes, nothing
            // may be checked against it or build on it.
            vmm.dirty_log = match log_state {
                LogState::Trusted => LogState::Trusted,
                LogState::Unverified { passes, .. } => LogState::Unverified {
                    since_start: false,
                    passes,
                },
                other => other,
            };
            Some(dirty::take_dirty_pages(vmm.vm.fd(), &vmm.mem).map_err(CreateError::Dirty)?)
        }
        LogState::Off | LogState::Broken => None,
    };
    // SAFETY: the VM is paused (checked above) and devices run on this thread.
    let regions = unsafe { memory_slices(&vmm.mem) };
    let chunk = base.map_or(DEFAULT_CHUNK_SIZE, |b| b.memory.chunk_size as usize);
    let is_dirty = |r: usize, c: usize| {
        pages
            .as_ref()
            .and_then(|p| p.get(r))
            .is_none_or(|p| dirty::chunk_dirty(p, c, chunk))
    };
    let mut incremental = false;
    let mut new_log_state = log_state;
    let (manifest, stats) = match (base, log_state) {
        (Some(b), LogState::Trusted) => {
            let wrong = spot_check_log(&regions, &b.memory, &is_dirty);
            if wrong > 0 {
                log::error!(
                    "the KVM dirty log missed writes to {wrong} sampled chunks: no longer \
                     trusting it for this VM; re-hashing all memory"
                );
                new_log_state = LogState::Broken;
                manifest::save_memory(&regions, chunk, &chunk_store)
            } else {
                incremental = true;
                let saved =
                    manifest::save_memory_incremental(&regions, &chunk_store, &b.memory, &is_dirty);
                match saved {
                    Ok(saved) if audit_enabled() => {
                        // Debugging aid: compare with a full hash of the same memory.
                        let full = manifest::save_memory(&regions, chunk, &HashOnly)
                            .map_err(CreateError::Memory)?
                            .0;
                        let wrong = audit_mismatches(&saved.0, &full);
                        if wrong > 0 {
                            log::error!(
                                "dirty-log audit: the incremental snapshot differs from a full \
                                 hash in {wrong} chunks; no longer trusting the log; re-hashing"
                            );
                            new_log_state = LogState::Broken;
                            incremental = false;
                            manifest::save_memory(&regions, chunk, &chunk_store)
                        } else {
                            log::info!("dirty-log audit: incremental snapshot matches a full hash");
                            Ok(saved)
                        }
                    }
                    other => other,
                }
            }
        }
        _ => manifest::save_memory(&regions, chunk, &chunk_store),
    }
    .map_err(CreateError::Memory)?;
    let comparable = reference
        .as_ref()
        .is_none_or(|r| r.memory.chunk_size == manifest.chunk_size);
    if let (
        LogState::Unverified {
            since_start: true,
            passes,
        },
        true,
    ) = (log_state, comparable)
    {
        // A full save saw every chunk: each that differs from what memory held before
        // (the base, or zeros after boot) must be in the log.
        let missed = check_log(&manifest, reference.as_ref().map(|b| &b.memory), &is_dirty);
        new_log_state = if missed == 0 && dirty::selftest_passed(vmm.vm.kvm()) {
            if passes + 1 >= dirty::REQUIRED_PASSES {
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
        } else {
            log::info!(
                "dirty tracking: re-hashing memory (the KVM dirty log missed {missed} changed \
                 chunks on this host)"
            );
            LogState::Broken
        };
    }
    let method = if incremental {
        DirtyMethod::KvmLog
    } else {
        DirtyMethod::Rehash
    };
    let manifest_bytes = manifest.encode().map_err(CreateError::Memory)?;
    let mut overlay_stats = Vec::new();
    let mut overlay_manifests = Vec::new();
    let mut touched = Vec::new();
    for (index, ov) in vmm.overlays.iter().enumerate() {
        let Some(ov) = ov else {
            overlay_stats.push(None);
            overlay_manifests.push(None);
            continue;
        };
        let parent = base
            .as_ref()
            .and_then(|b| b.overlays.get(index).cloned().flatten());
        let (m, t, st) = overlay_capture::capture(ov, &chunk_store, parent.as_ref())
            .map_err(|source| CreateError::Overlay { index, source })?;
        overlay_stats.push(Some(st));
        overlay_manifests.push(Some(m));
        touched.push((index, t));
    }
    for (b, m) in blocks.iter_mut().zip(&overlay_manifests) {
        b.overlay = m.clone();
    }
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
        cpu: vmm.cpu.clone(),
    };
    let state_bytes =
        file::encode(&file::FileKind::STATE, &state).map_err(CreateError::StateFile)?;
    // Over an existing snapshot, never the new manifest beside the old state.
    crate::util::fs::replace_pair(
        (&dir.join(MEMORY_FILE), &manifest_bytes),
        (&dir.join(STATE_FILE), &state_bytes),
    )
    .map_err(CreateError::Files)?;
    for (index, t) in touched {
        if let Some(ov) = &vmm.overlays[index] {
            ov.clear_touched(&t);
        }
    }
    vmm.dirty_log = match new_log_state {
        LogState::Unverified { passes, .. } => LogState::Unverified {
            since_start: true,
            passes,
        },
        other => other,
    };
    vmm.snapshot_base = Some(SnapshotBase {
        store: store_canon,
        memory: manifest,
        overlays: overlay_manifests,
    });
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
        dirty_method: method,
        incremental,
        overlays: overlay_stats,
    })
}
