//! `build_for_boot`: a VM that boots a kernel. Steps: open the inputs (kernel, initrd,
//! disks) so bad input fails before anything is created; create the VM and memory and load
//! the guest; set up the platform devices and attach the disks; create and configure the
//! vCPUs for a 64-bit Linux entry; start them.

use std::fs::File;

use vm_memory::GuestAddress;

use super::{
    BuildError, Console, ExtraDevice, Platform, block_slot, enable_dirty_log, open_disks,
    open_input, plug_block, setup_platform, start_vcpus, wire_block,
};
use crate::arch::x86_64 as arch;
use crate::config::{self, VmConfig};
use crate::devices::virtio::block::{BlockConfig as BlockDeviceConfig, BlockDevice};
use crate::devices::virtio::mmio::{MmioTransport, kernel_cmdline_arg};
use crate::disk::BlockBackend;
use crate::vmm::{AttachedBlock, Machine, Vmm};
use crate::vstate::bus::{Bus, BusError};
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::vcpu::{KvmVcpu, RunState};
use crate::vstate::vm::Vm;
use std::sync::Arc;

/// The guest command line: the user's, then device parameters, then host quirks (whose
/// `clearcpuid=` also hides the features `cpu` masks: on PVM hosts the guest's CPUID
/// instruction sees the host's).
pub fn compose_cmdline(
    cfg: &VmConfig,
    device_params: &[String],
    tsc_khz: Option<u32>,
    cpu: &arch::cpu_template::CpuPlan,
) -> String {
    let mut parts = vec![cfg.kernel.cmdline.trim().to_string()];
    parts.extend(device_params.iter().cloned());
    if let Some(i) = cfg.blocks.iter().position(|b| b.root) {
        let dev = format!("root=/dev/vd{}", (b'a' + i as u8) as char);
        let ro = if cfg.blocks[i].read_only {
            " ro"
        } else {
            " rw"
        };
        parts.push(format!("{dev}{ro}"));
    }
    if cfg.host_quirks && config::pvm_host() {
        log::info!(
            "PVM-style nested KVM host detected: appending guest command-line workarounds (disable with --no-host-quirks)"
        );
        if cfg.vcpus > 1 {
            log::warn!(
                "PVM-style host and {} vCPUs: the guest gets nopv (KVM's PV IPIs hang here), \
                 which turns kvmclock off; on the TSC, a restore of an old snapshot stalls the \
                 guest for a time that grows with the snapshot's age (docs/PVM_HOSTS.md)",
                cfg.vcpus
            );
        }
        let quirks = arch::cpu_template::pvm_quirk_features(config::PVM_CLEARCPUID);
        let clear = arch::cpu_template::pvm_clearcpuid(&quirks, &cpu.hidden);
        parts.push(config::pvm_quirks(tsc_khz, &clear, cfg.vcpus));
    }
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

/// Configures vCPU `id` for a 64-bit Linux boot at `entry` with boot params at `boot_params`:
/// its CPUID is the host's supported one with the template's mask applied, normalized.
fn configure_boot_vcpu(
    host: &arch::cpu_template::HostCpu,
    cpu: &arch::cpu_template::CpuPlan,
    mem: &GuestMemory,
    fd: &kvm_ioctls::VcpuFd,
    id: u8,
    count: u8,
    entry: GuestAddress,
) -> Result<(), BuildError> {
    let step = |what: &'static str| move |source| BuildError::VcpuSetup { id, what, source };
    let mut cpuid = host.supported.clone();
    if let Some(keep) = &cpu.keep {
        arch::cpu_features::CpuFeatures::mask_cpuid(keep, &mut cpuid);
    }
    arch::cpuid::normalize_cpuid(&mut cpuid, id, count)
        .map_err(|e| BuildError::Arch(format!("vcpu{id}: cpuid: {e}")))?;
    fd.set_cpuid2(&cpuid).map_err(step("KVM_SET_CPUID2"))?;
    arch::msrs::setup_msrs(fd).map_err(|e| BuildError::Arch(format!("vcpu{id}: msrs: {e}")))?;
    arch::regs::setup_regs(fd, entry.0, arch::layout::ZERO_PAGE_START)
        .map_err(|e| BuildError::Arch(format!("vcpu{id}: regs: {e}")))?;
    arch::regs::setup_fpu(fd).map_err(|e| BuildError::Arch(format!("vcpu{id}: fpu: {e}")))?;
    arch::regs::setup_sregs(mem, fd)
        .map_err(|e| BuildError::Arch(format!("vcpu{id}: sregs: {e}")))?;
    arch::interrupts::set_lint(fd)
        .map_err(|e| BuildError::Arch(format!("vcpu{id}: lapic: {e}")))?;
    Ok(())
}

/// How to run a VM besides its configuration.
pub struct BootOptions {
    /// Console destination.
    pub console: Console,
    /// Additional port-I/O devices (tests, tools).
    pub extra_pio: Vec<ExtraDevice>,
    /// Additional MMIO devices (tests, tools).
    pub extra_mmio: Vec<ExtraDevice>,
    /// Create the vCPU threads paused.
    pub start_paused: bool,
}

impl BootOptions {
    /// Console on stdio, nothing extra, running.
    pub fn stdio() -> Self {
        Self::with_console(Console::Stdio)
    }

    /// Console to `console`, nothing extra, running.
    pub fn with_console(console: Console) -> Self {
        Self {
            console,
            extra_pio: Vec::new(),
            extra_mmio: Vec::new(),
            start_paused: false,
        }
    }
}

/// Creates a virtio-block device and transport for each opened disk, wires them (see
/// [`wire_block`]) and puts them on the MMIO bus; returns them with their kernel
/// command-line parameters.
pub fn attach_blocks(
    vm: &Vm,
    mem: &GuestMemory,
    cfg: &VmConfig,
    disks: Vec<Arc<dyn BlockBackend>>,
    mmio: &mut Bus,
    paused: bool,
) -> Result<(Vec<AttachedBlock>, Vec<String>), BuildError> {
    let mut attached = Vec::new();
    let mut params = Vec::new();
    for (i, (b, backend)) in cfg.blocks.iter().zip(disks).enumerate() {
        let device = BlockDevice::new(backend, BlockDeviceConfig { id: b.id.clone() })
            .map_err(|e| BuildError::Device(e.to_string()))?;
        let slot = block_slot(i, cfg.blocks.len())?;
        let wired = wire_block(vm, i, slot, device, paused)?;
        let transport = MmioTransport::new(mem.clone(), wired.device.clone(), wired.irq)
            .map_err(|e| BuildError::Device(e.to_string()))?;
        params.push(kernel_cmdline_arg(slot.0, slot.1));
        attached.push(plug_block(mmio, wired.device, slot, transport)?);
    }
    Ok((attached, params))
}

/// The kernel and initrd, opened.
struct GuestInputs {
    kernel: File,
    initrd: Option<File>,
}

fn open_guest_inputs(cfg: &VmConfig) -> Result<GuestInputs, BuildError> {
    Ok(GuestInputs {
        kernel: open_input("kernel", &cfg.kernel.path)?,
        initrd: cfg
            .initrd
            .as_ref()
            .map(|p| open_input("initrd", p))
            .transpose()?,
    })
}

/// The loaded guest: the kernel's entry and setup header, and where the initrd went.
struct LoadedGuest {
    kernel: arch::boot::KernelLoad,
    initrd: Option<(GuestAddress, usize)>,
}

/// Loads the kernel and initrd into guest memory.
fn load_guest(
    cfg: &VmConfig,
    mem: &GuestMemory,
    mut inputs: GuestInputs,
) -> Result<LoadedGuest, BuildError> {
    let kernel =
        arch::boot::load_kernel(mem, &mut inputs.kernel).map_err(|e| BuildError::File {
            what: "kernel",
            path: cfg.kernel.path.display().to_string(),
            message: e.to_string(),
        })?;
    let initrd = match inputs.initrd.as_mut() {
        Some(f) => Some(arch::boot::load_initrd(mem, f, &kernel).map_err(|e| {
            BuildError::File {
                what: "initrd",
                path: cfg
                    .initrd
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                message: e.to_string(),
            }
        })?),
        None => None,
    };
    Ok(LoadedGuest { kernel, initrd })
}

/// Puts the tests' and tools' extra devices on the buses.
fn add_extra_devices(
    platform: &mut Platform,
    extra_pio: Vec<ExtraDevice>,
    extra_mmio: Vec<ExtraDevice>,
) -> Result<(), BuildError> {
    let bus_err = |e: BusError| BuildError::Device(e.to_string());
    for (dev, base, len) in extra_pio {
        platform.pio.insert(dev, base, len).map_err(bus_err)?;
    }
    for (dev, base, len) in extra_mmio {
        platform.mmio.insert(dev, base, len).map_err(bus_err)?;
    }
    Ok(())
}

/// Creates the vCPUs, writes the MP table and boot parameters (with the command line,
/// returned) and configures every vCPU for the kernel's entry.
fn setup_boot_vcpus(
    vm: &Vm,
    cfg: &VmConfig,
    mem: &GuestMemory,
    cpu: (&arch::cpu_template::HostCpu, &arch::cpu_template::CpuPlan),
    guest: LoadedGuest,
    device_params: &[String],
) -> Result<(Vec<KvmVcpu>, String), BuildError> {
    let (host, plan) = cpu;
    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        vcpus.push(KvmVcpu {
            id,
            fd: vm.create_vcpu(id)?,
            kvm: vm.kvm().clone(),
        });
    }
    let tsc_khz = vcpus.first().and_then(|v| v.fd.get_tsc_khz().ok());
    let cmdline = compose_cmdline(cfg, device_params, tsc_khz, plan);
    arch::mptable::setup_mptable(mem, cfg.vcpus, arch::mptable::MAX_LEGACY_IRQ)
        .map_err(|e| BuildError::Arch(format!("mptable: {e}")))?;
    arch::boot::configure_system(mem, &cmdline, guest.initrd, guest.kernel.setup_header)
        .map_err(|e| BuildError::Arch(format!("boot params: {e}")))?;
    for v in &vcpus {
        configure_boot_vcpu(host, plan, mem, &v.fd, v.id, cfg.vcpus, guest.kernel.entry)?;
    }
    Ok((vcpus, cmdline))
}

/// Builds and starts a VM that boots `cfg.kernel`.
pub fn build_for_boot(cfg: &VmConfig, opts: BootOptions) -> Result<Vmm, BuildError> {
    let mut cfg = cfg.clone();
    super::net::fill_macs(&mut cfg.nets);
    let cfg = &cfg;
    let inputs = open_guest_inputs(cfg)?;
    let disks = open_disks(cfg)?;
    let taps = super::net::open_taps(&cfg.nets)?;
    let vm = Vm::new()?;
    vm.check_vcpu_count(u32::from(cfg.vcpus))?;
    let host = arch::cpu_template::HostCpu::probe(vm.kvm(), config::pvm_host())?;
    let cpu = arch::cpu_template::plan(cfg.cpu_template, &host)?;
    let mem = memory::create_anonymous(&arch::layout::arch_memory_regions(cfg.mem_mib << 20))?;
    vm.register_memory(&mem, 0)?;
    let dirty_log = enable_dirty_log(&vm, &mem);
    let guest = load_guest(cfg, &mem, inputs)?;

    let mut platform = setup_platform(&vm, opts.console, None)?;
    add_extra_devices(&mut platform, opts.extra_pio, opts.extra_mmio)?;
    let Platform {
        exit,
        pio,
        mut mmio,
        serial,
        events,
    } = platform;
    let (blocks, mut device_params) =
        attach_blocks(&vm, &mem, cfg, disks.backends, &mut mmio, opts.start_paused)?;
    let (nets, net_params) =
        super::net::attach_nets(&vm, &mem, cfg, taps, &mut mmio, opts.start_paused)?;
    device_params.extend(net_params);
    let (kvm_vcpus, cmdline) =
        setup_boot_vcpus(&vm, cfg, &mem, (&host, &cpu), guest, &device_params)?;

    let (pio, mmio, vcpus) = start_vcpus(kvm_vcpus, pio, mmio, &exit, opts.start_paused)?;
    log::info!("guest command line: {cmdline}");
    if cfg.cpu_template != config::CpuTemplate::None {
        log::info!(
            "CPU template {}: the guest gets {}",
            cfg.cpu_template,
            cpu.record.features.names().join(" ")
        );
    }
    Ok(Vmm::new(Machine {
        cpu: cpu.record,
        config: cfg.clone(),
        cmdline,
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
        lazy: None,
        remote: disks.remote,
        overlays: disks.overlays,
        dirty_log,
        state: if opts.start_paused {
            RunState::Paused
        } else {
            RunState::Running
        },
    }))
}
