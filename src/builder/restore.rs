//! `build_from_snapshot`: the sibling of `build_for_boot` that rebuilds a VM from a
//! snapshot directory, sharing the device helpers of [`crate::builder`]. Every saved
//! component is built from its state through [`Persist`] (docs/DESIGN.md, "Persist and
//! the restore pipeline"); the steps of [`build_from_parts`], in order:
//!
//! 1. check the state against its configuration (disks given, vCPU count, memory layout);
//! 2. restore the disk overlays' content and open the disks;
//! 3. create the VM (checking the CPU features) and guest memory, and fill memory or start
//!    serving it lazily;
//! 4. build the platform devices (COM1 and the i8042 from their state) and the virtio-blk
//!    devices from theirs, wired to the VM with their I/O gates held;
//! 5. build the vCPUs from their state, then set the in-kernel devices and clock;
//! 6. build the virtio-mmio transports from their state last (they re-activate their
//!    devices and re-raise interrupts) and put them on the MMIO bus;
//! 7. start the vCPU threads, paused, and resume unless asked not to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;

use super::{
    BuildError, Console, Platform, WiredBlock, block_slot, enable_dirty_log, open_disks,
    plug_block, setup_platform, start_vcpus, wire_block,
};
use crate::arch::x86_64::{ClockMode, vcpu_state};
use crate::config::{BlockConfig, VmConfig};
use crate::devices::virtio::block::{BlockConfig as BlockDeviceConfig, BlockDevice};
use crate::devices::virtio::mmio::{MmioRestoreArgs, MmioTransport};
use crate::disk::BlockBackend;
use crate::formats::Persist;
use crate::snapshot::SnapshotBase;
use crate::snapshot::manifest::{MemoryManifest, ZeroChunks, restore_memory};
use crate::snapshot::microvm::MicrovmState;
use crate::store::local::LocalStore;
use crate::vmm::{AttachedBlock, Machine, Vmm};
use crate::vstate::bus::Bus;
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::uffd::LazyMemory;
use crate::vstate::vcpu::{KvmVcpu, RunState, VcpuRestoreArgs};
use crate::vstate::vm::{InKernelDevices, InKernelRestoreArgs, Vm};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

/// How to restore a snapshot besides its files.
pub struct RestoreOptions {
    /// Console destination.
    pub console: Console,
    /// Disks to attach instead of those recorded in the snapshot (same count and order).
    pub blocks: Option<Vec<BlockConfig>>,
    /// Taps for the snapshot's network interfaces, by id (`--net id=…,tap=…`); the others
    /// reopen their recorded tap.
    pub nets: Vec<crate::config::NetConfig>,
    /// Accept disks whose identity or size differs from the snapshot's record.
    pub force: bool,
    /// Leave the vCPUs paused.
    pub start_paused: bool,
    /// Fill guest memory before the vCPUs start instead of serving it lazily.
    pub eager_memory: bool,
    /// How the guest's kvmclock continues: from the snapshot (default) or advanced by the
    /// real time since (`--clock-realtime`); docs/KEEPING_SNAPSHOTS.md, "Time".
    pub clock: ClockMode,
}

impl RestoreOptions {
    /// Console on stdio, the snapshot's disks, running.
    pub fn stdio() -> Self {
        Self {
            console: Console::Stdio,
            blocks: None,
            nets: Vec::new(),
            force: false,
            start_paused: false,
            eager_memory: false,
            clock: ClockMode::Continue,
        }
    }
}

fn snap_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> BuildError {
    BuildError::File {
        what,
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn snap_err_chain(what: &'static str, path: &Path, e: &dyn std::error::Error) -> BuildError {
    snap_err(what, path, crate::util::error_chain(e))
}

/// Paths of the state file and memory manifest inside a snapshot directory.
pub fn snapshot_files(dir: &Path) -> (PathBuf, PathBuf) {
    (
        dir.join(crate::snapshot::microvm::STATE_FILE),
        dir.join(crate::snapshot::microvm::MEMORY_FILE),
    )
}

/// Rebuilds a VM from its state file (`cpu_path`) and memory manifest (`memory_path`),
/// with memory chunks from the local chunk store the state names.
pub fn build_from_snapshot(
    cpu_path: &Path,
    memory_path: &Path,
    opts: RestoreOptions,
) -> Result<Vmm, BuildError> {
    let state =
        MicrovmState::read(cpu_path).map_err(|e| snap_err_chain("snapshot state", cpu_path, &e))?;
    let manifest = MemoryManifest::read_from(memory_path)
        .map_err(|e| snap_err_chain("memory manifest", memory_path, &e))?;
    let snap_dir = cpu_path.parent().unwrap_or(Path::new("."));
    let store_dir = state.store_dir(snap_dir);
    if !LocalStore::exists(&store_dir) {
        return Err(snap_err(
            "chunk store",
            &store_dir,
            "missing (no packs/ or chunks/ directory)",
        ));
    }
    let store = LocalStore::open_read(&store_dir)
        .map_err(|e| snap_err_chain("chunk store", &store_dir, &e))?;
    let base = SnapshotBase {
        store: std::fs::canonicalize(&store_dir).unwrap_or(store_dir),
        memory: manifest.clone(),
        overlays: state.blocks.iter().map(|b| b.overlay.clone()).collect(),
    };
    let mut vmm = build_from_parts(
        state,
        manifest,
        Arc::new(store),
        cpu_path,
        memory_path,
        opts,
        true,
    )?;
    // The restored memory and overlays are exactly the snapshot's, and dirty tracking
    // starts now: the next snapshot into the same store can be incremental.
    vmm.snapshot_base = Some(base);
    vmm.machine.dirty_log = vmm.machine.dirty_log.from_known_base();
    Ok(vmm)
}

/// Logs (at info level: a guest on kvm-clock, the default on these hosts, is not affected)
/// when this host's KVM did not give the vCPU the saved TSC (the PVM hosts
/// ignore KVM_SET_MSRS(IA32_TSC): the guest reads the host's TSC), because a guest clocked by
/// the TSC then sees the whole time the snapshot was kept as a jump.
fn warn_if_tsc_not_restored(fd: &kvm_ioctls::VcpuFd, st: &vcpu_state::VcpuState) {
    match vcpu_state::tsc_restore_error(fd, st) {
        Ok(Some(secs)) => log::info!(
            "this host's KVM did not set the guest TSC to the snapshot's (it is {secs:+.1} s \
             off): a guest clocked by the TSC sees that as a jump and, with a periodic tick, \
             replays every tick it missed; guests on kvm-clock are not affected \
             (docs/KEEPING_SNAPSHOTS.md)"
        ),
        Ok(None) => {}
        Err(e) => log::debug!("cannot check the restored TSC: {e}"),
    }
}

/// Makes each disk overlay named by the configuration hold the content captured in the
/// snapshot (see [`crate::disk::overlay_capture::prepare`]). Since the overlay then holds
/// the snapshot's content wherever it lives, its path may differ from the snapshot's
/// (a clone gets its own): the saved identity is updated to the path used.
fn prepare_overlays(
    state: &mut MicrovmState,
    cfg: &crate::config::VmConfig,
    store: &dyn crate::store::ChunkRead,
) -> Result<(), BuildError> {
    for (i, (saved, b)) in state.blocks.iter_mut().zip(&cfg.blocks).enumerate() {
        let Some(m) = &saved.overlay else { continue };
        let Some(path) = &b.overlay else {
            log::warn!("disk {i}: no overlay= given; the snapshot's overlay content is not used");
            continue;
        };
        let Some(base) = saved.device.identity.inner.as_deref() else {
            return Err(BuildError::Device(format!(
                "disk {i}: the snapshot has overlay content but no base disk identity"
            )));
        };
        let done = crate::disk::overlay_capture::prepare(path, base, m, store).map_err(|e| {
            BuildError::Device(format!(
                "disk {i}: restoring overlay {}: {}",
                path.display(),
                crate::util::error_chain(&e)
            ))
        })?;
        log::info!("disk {i}: overlay {}: {done:?}", path.display());
        if saved.device.identity.kind == "overlay" {
            saved.device.identity.location = std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string();
        }
    }
    Ok(())
}

/// Refuses (unless `force`, then warns) to restore a guest that was given CPU features this
/// host cannot give.
fn check_cpu(state: &MicrovmState, vm: &Vm, force: bool) -> Result<(), BuildError> {
    use crate::arch::x86_64::cpu_template::{HostCpu, check_restore};
    let host = HostCpu::probe(vm.kvm(), crate::config::pvm_host())?;
    match check_restore(&state.cpu, state.config.cpu_template, &host) {
        Ok(()) => Ok(()),
        Err(e) if force => {
            log::warn!("--force: {}", e.forced());
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Step 1: the configuration to restore with (the snapshot's, with the disks `blocks` if
/// given), checked against the state: as many disks and vCPUs, the same memory layout.
fn restore_config(
    state: &MicrovmState,
    blocks: Option<Vec<BlockConfig>>,
    cpu_path: &Path,
) -> Result<VmConfig, BuildError> {
    let mut cfg = state.config.clone();
    if let Some(blocks) = blocks {
        if blocks.len() != state.blocks.len() {
            return Err(BuildError::Device(format!(
                "the snapshot has {} disk(s) but {} were given",
                state.blocks.len(),
                blocks.len()
            )));
        }
        cfg.blocks = blocks;
    }
    if state.vcpus.len() != usize::from(cfg.vcpus) {
        return Err(snap_err(
            "snapshot state",
            cpu_path,
            "vCPU count differs from the recorded configuration",
        ));
    }
    let expected: Vec<(u64, u64)> =
        crate::arch::x86_64::layout::arch_memory_regions(cfg.mem_mib << 20)
            .iter()
            .map(|&(a, l)| (a.0, l as u64))
            .collect();
    if state.memory_regions != expected {
        return Err(snap_err(
            "snapshot state",
            cpu_path,
            format!(
                "memory layout {:x?} does not match {} MiB of RAM ({expected:x?})",
                state.memory_regions, cfg.mem_mib
            ),
        ));
    }
    Ok(cfg)
}

/// The serial number the guest read (GET_ID) is guest-visible state: keep it, even when
/// the disk is now reached through another path (a clone's own overlay).
fn keep_disk_ids(cfg: &mut VmConfig, state: &MicrovmState) {
    for (b, saved) in cfg.blocks.iter_mut().zip(&state.blocks) {
        if b.id.is_none() {
            let id = &saved.device.disk_id;
            let len = id.iter().position(|&c| c == 0).unwrap_or(id.len());
            b.id = Some(String::from_utf8_lossy(&id[..len]).into_owned());
        }
    }
}

/// Step 3: the VM (its CPU features checked) and guest memory of the saved layout.
fn create_vm_and_memory(
    state: &MicrovmState,
    cfg: &VmConfig,
    force: bool,
) -> Result<(Vm, GuestMemory), BuildError> {
    let vm = Vm::new()?;
    vm.check_vcpu_count(u32::from(cfg.vcpus))?;
    check_cpu(state, &vm, force)?;
    let regions: Vec<(GuestAddress, usize)> = state
        .memory_regions
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = memory::create_anonymous(&regions)?;
    vm.register_memory(&mem, 0)?;
    Ok((vm, mem))
}

/// Where guest memory comes from: the manifest, its chunk store and how to serve it.
struct MemorySource<'a> {
    manifest: &'a MemoryManifest,
    store: Arc<dyn crate::store::ChunkRead>,
    path: &'a Path,
    eager: bool,
    background_fill: bool,
}

/// Step 3 (continued): fills guest memory now (eager) or starts serving it lazily.
fn restore_guest_memory(
    mem: &GuestMemory,
    src: MemorySource,
) -> Result<Option<LazyMemory>, BuildError> {
    if src.eager {
        // SAFETY: no vCPU exists yet and no device has been created, so nothing else
        // touches guest memory while these slices live.
        let mut views = unsafe { crate::vstate::memory::memory_slices_mut(mem) };
        restore_memory(
            src.manifest,
            &mut views,
            &*src.store,
            ZeroChunks::AlreadyZero,
        )
        .map_err(|e| snap_err_chain("memory", src.path, &e))?;
        return Ok(None);
    }
    // `MemoryManifest::read_from` already validated the manifest.
    let mut regions = Vec::new();
    for (r, m) in mem.iter().zip(&src.manifest.regions) {
        if r.start_addr().0 != m.guest_addr || r.len() != m.size {
            return Err(snap_err(
                "memory manifest",
                src.path,
                "its memory layout differs from the state file's",
            ));
        }
        regions.push((r.as_ptr() as usize, r.len() as usize, m.clone()));
    }
    if regions.len() != src.manifest.regions.len() {
        return Err(snap_err(
            "memory manifest",
            src.path,
            "region count differs",
        ));
    }
    let chunk = src.manifest.chunk_size as usize;
    // SAFETY: `mem` was just created by `create_anonymous` (private anonymous mappings),
    // nothing has touched it or holds a reference into it, and the returned LazyMemory is
    // kept in the Vmm next to `mem`, which outlives it.
    let lazy = unsafe { LazyMemory::start(regions, chunk, src.store) }.map_err(|e| {
        BuildError::Device(format!("lazy memory: {}", crate::util::error_chain(&e)))
    })?;
    if src.background_fill {
        lazy.fill_in_background();
    }
    Ok(Some(lazy))
}

/// Step 4: each virtio-blk device built from its state over the disk opened for it,
/// wired to the VM with its I/O gate held (paused until `Vmm::resume`).
fn restore_block_devices(
    vm: &Vm,
    cfg: &VmConfig,
    state: &MicrovmState,
    backends: Vec<Arc<dyn BlockBackend>>,
    force: bool,
) -> Result<Vec<WiredBlock>, BuildError> {
    let mut wired = Vec::new();
    for (i, ((b, backend), saved)) in cfg
        .blocks
        .iter()
        .zip(backends)
        .zip(&state.blocks)
        .enumerate()
    {
        let (base, gsi) = block_slot(i, cfg.blocks.len())?;
        if base != saved.base || gsi != saved.gsi {
            return Err(BuildError::Device(format!(
                "disk {i}: snapshot has it at {:#x}/GSI {}, this VMM puts it at {base:#x}/GSI {gsi}",
                saved.base, saved.gsi
            )));
        }
        let args = crate::devices::virtio::BlockRestoreArgs {
            backend,
            config: BlockDeviceConfig { id: b.id.clone() },
            force,
        };
        let device = BlockDevice::restore(args, &saved.device)
            .map_err(|e| BuildError::Device(format!("disk {i} ({}): {e}", b.path.display())))?;
        wired.push(wire_block(vm, i, (base, gsi), device, true)?);
    }
    Ok(wired)
}

/// Step 5: the vCPUs built from their state, then the in-kernel devices and clock.
fn restore_kvm_state(
    vm: &Vm,
    state: &MicrovmState,
    clock: ClockMode,
) -> Result<Vec<KvmVcpu>, BuildError> {
    let mut vcpus = Vec::new();
    for (id, st) in state.vcpus.iter().enumerate() {
        let args = VcpuRestoreArgs {
            vm: vm.shared_fd(),
            kvm: vm.kvm().clone(),
            id: id as u8,
        };
        let v = KvmVcpu::restore(args, st)
            .map_err(|e| BuildError::Arch(format!("restoring vcpu{id}: {e}")))?;
        vcpus.push(v);
    }
    let args = InKernelRestoreArgs {
        vm: vm.shared_fd(),
        kvm: vm.kvm().clone(),
        clock,
    };
    InKernelDevices::restore(args, &state.vm)
        .map_err(|e| BuildError::Arch(format!("restoring VM state: {e}")))?;
    if let (Some(v), Some(st)) = (vcpus.first(), state.vcpus.first()) {
        warn_if_tsc_not_restored(&v.fd, st);
    }
    Ok(vcpus)
}

/// Step 6: each transport built from its state around its restored device (re-activating
/// it and re-raising its interrupt), put on the MMIO bus.
fn restore_transports(
    mem: &GuestMemory,
    wired: Vec<WiredBlock>,
    state: &MicrovmState,
    mmio: &mut Bus,
) -> Result<Vec<AttachedBlock>, BuildError> {
    let mut attached = Vec::new();
    for (i, (w, saved)) in wired.into_iter().zip(&state.blocks).enumerate() {
        let args = MmioRestoreArgs {
            mem: mem.clone(),
            device: w.device.clone(),
            irq: w.irq,
        };
        let transport = MmioTransport::restore(args, &saved.transport)
            .map_err(|e| BuildError::Device(format!("disk {i} transport: {e}")))?;
        attached.push(plug_block(mmio, w.device, (w.base, w.gsi), transport)?);
    }
    Ok(attached)
}

/// Rebuilds a VM from an already loaded state and (validated) memory manifest, with memory
/// chunks from `store` (served lazily unless `opts.eager_memory`). `cpu_path` and
/// `memory_path` only name the parts in messages (they may be URLs). With
/// `background_fill`, lazily served memory is also filled in the background at once
/// (otherwise the caller may start it later through [`LazyMemory::handle`]).
pub fn build_from_parts(
    mut state: MicrovmState,
    manifest: MemoryManifest,
    store: Arc<dyn crate::store::ChunkRead>,
    cpu_path: &Path,
    memory_path: &Path,
    opts: RestoreOptions,
    background_fill: bool,
) -> Result<Vmm, BuildError> {
    let t0 = Instant::now();
    let mut cfg = restore_config(&state, opts.blocks, cpu_path)?;
    prepare_overlays(&mut state, &cfg, store.as_ref())?;
    keep_disk_ids(&mut cfg, &state);
    super::net::restore_net_config(&mut cfg, &state, &opts.nets)?;
    let disks = open_disks(&cfg)?;
    let taps = super::net::open_taps(&cfg.nets)?;
    let (vm, mem) = create_vm_and_memory(&state, &cfg, opts.force)?;
    // Memory does not start from zeros: only a caller that knows what it starts from
    // (`build_from_snapshot` sets the snapshot base) may let the first snapshot check it.
    let dirty_log = enable_dirty_log(&vm, &mem).restored();
    let t_mem = Instant::now();
    let src = MemorySource {
        manifest: &manifest,
        store,
        path: memory_path,
        eager: opts.eager_memory,
        background_fill,
    };
    let lazy = restore_guest_memory(&mem, src)?;
    let mem_ms = t_mem.elapsed().as_secs_f64() * 1e3;

    let Platform {
        exit,
        pio,
        mut mmio,
        serial,
        events,
    } = setup_platform(&vm, opts.console, Some(&state.serial))?;
    let wired = restore_block_devices(&vm, &cfg, &state, disks.backends, opts.force)?;
    let wired_nets = super::net::restore_net_devices(&vm, &cfg, &state, taps)?;
    let kvm_vcpus = restore_kvm_state(&vm, &state, opts.clock)?;
    // Devices last: the transports re-activate their devices and re-raise interrupts.
    let blocks = restore_transports(&mem, wired, &state, &mut mmio)?;
    let nets = super::net::restore_net_transports(&mem, wired_nets, &state, &mut mmio)?;
    super::net::announce(&nets);

    let (pio, mmio, vcpus) = start_vcpus(kvm_vcpus, pio, mmio, &exit, true)?;
    let mut vmm = Vmm::new(Machine {
        cpu: state.cpu.clone(),
        config: cfg,
        cmdline: state.cmdline.clone(),
        vm,
        mem,
        vcpus,
        exit,
        pio,
        mmio,
        serial,
        blocks,
        nets,
        events,
        state: RunState::Paused,
        lazy,
        remote: disks.remote,
        overlays: disks.overlays,
        dirty_log,
    });
    if !opts.start_paused {
        vmm.resume()
            .map_err(|e| BuildError::Device(format!("resuming: {e}")))?;
    }
    log::info!(
        "restored {} in {:.1} ms (memory {mem_ms:.1} ms)",
        cpu_path.display(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(vmm)
}
