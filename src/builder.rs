//! Building a VM: `build_for_boot` (kernel + command line) and, as its sibling,
//! `build_from_snapshot`; both share the device and vCPU helpers here.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64 as arch;
use crate::config::{self, VmConfig};
use crate::devices::IrqLine;
use crate::devices::legacy::{
    I8042, I8042_LEN, I8042_PORT, PVPANIC_PORT, PvPanic, SERIAL_PORTS, SerialDevice,
    SerialDeviceState, SerialRestoreArgs,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::{BlockConfig as BlockDeviceConfig, BlockDevice};
use crate::devices::virtio::mmio::{
    MMIO_WINDOW_SIZE, MmioTransport, NOTIFY_REG_OFFSET, kernel_cmdline_arg,
};
use crate::disk::BlockBackend;
use crate::disk::file::FileBackend;
use crate::disk::http::{LazyHttpDisk, LazyHttpOptions, open_remote_disk};
use crate::disk::overlay::OverlayBackend;
use crate::formats::Persist;
use crate::store::http::HttpStoreOptions;
use crate::util::lock;
use crate::vmm::{AttachedBlock, ExitWaker, StdinInput, Subscriber, Vmm};
use crate::vstate::bus::{Bus, BusError, SharedDevice};
use crate::vstate::exit::ExitSignal;
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::vcpu::{RunState, VcpuContext, VcpuHandle};
use crate::vstate::vm::Vm;
use kvm_ioctls::IoEventAddress;

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file named in the configuration cannot be used.
    #[error("{what} {path}: {message}")]
    File {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// KVM VM setup failed.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Architecture setup failed.
    #[error("{0}")]
    Arch(String),
    /// The CPU template cannot be given on this host, or a snapshot's guest was given CPU
    /// features this host lacks.
    #[error(transparent)]
    Cpu(#[from] arch::cpu_template::CpuTemplateError),
    /// A device could not be set up.
    #[error("device setup: {0}")]
    Device(String),
    /// A vCPU could not be set up.
    #[error("vcpu{id}: {what} failed")]
    VcpuSetup {
        /// The vCPU.
        id: u8,
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU thread could not be started.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// The event loop could not be created.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
}

impl BuildError {
    /// The process exit code for this error: 2 when the host cannot give the guest the CPU
    /// features it asks for (like bad input), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        use arch::cpu_template::CpuTemplateError as E;
        match self {
            BuildError::Cpu(E::Supported(_)) => 1,
            BuildError::Cpu(_) => 2,
            _ => 1,
        }
    }
}

fn open_input(what: &'static str, path: &Path) -> Result<File, BuildError> {
    let err = |message: String| BuildError::File {
        what,
        path: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.is_dir() {
        return Err(err("is a directory".into()));
    }
    File::open(path).map_err(|e| err(e.to_string()))
}

fn irq_evt(vm: &Vm, gsi: u32) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| BuildError::Device(format!("eventfd: {e}")))?;
    vm.fd()
        .register_irqfd(&evt, gsi)
        .map_err(|e| BuildError::Device(format!("irqfd for GSI {gsi}: {e}")))?;
    Ok(evt)
}

/// Legacy devices every VM has: COM1 (console) .. COM4, i8042, pvpanic.
pub struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
}

/// Puts the legacy devices on the port-I/O bus.
pub fn setup_legacy(
    vm: &Vm,
    pio: &mut Bus,
    exit: &Arc<ExitSignal>,
    console: Box<dyn Write + Send>,
    serial_state: Option<&SerialDeviceState>,
) -> Result<LegacyDevices, BuildError> {
    let (com1_port, com1_irq) = SERIAL_PORTS[0];
    let com1_evt = irq_evt(vm, com1_irq)?;
    let com1 = match serial_state {
        None => SerialDevice::new(com1_evt, console),
        Some(st) => SerialDevice::restore(
            SerialRestoreArgs {
                irq_evt: com1_evt,
                out: console,
            },
            st,
        )
        .map_err(|e| BuildError::Device(e.to_string()))?,
    };
    let serial = Arc::new(Mutex::new(com1));
    let bus_err = |e: BusError| BuildError::Device(e.to_string());
    pio.insert(serial.clone(), com1_port, 8).map_err(bus_err)?;
    for &(port, _) in &SERIAL_PORTS[1..] {
        // Silent UARTs: their interrupt eventfd is not wired to the irqchip.
        let evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| BuildError::Device(format!("eventfd: {e}")))?;
        let dev: SharedDevice = Arc::new(Mutex::new(SerialDevice::new(
            evt,
            Box::new(std::io::sink()),
        )));
        pio.insert(dev, port, 8).map_err(bus_err)?;
    }
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_PORT,
        I8042_LEN,
    )
    .map_err(bus_err)?;
    pio.insert(
        Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
        PVPANIC_PORT,
        1,
    )
    .map_err(bus_err)?;
    Ok(LegacyDevices { serial })
}

/// First GSI used by virtio devices (ISA interrupts 0..=4 are taken by the PIT, COM ports…).
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// The opened disks: the backend to attach for each, and the lazy remote images among them
/// (for their fetch statistics).
pub struct OpenedDisks {
    /// One backend per configured disk, in order.
    pub backends: Vec<Arc<dyn BlockBackend>>,
    /// (disk index, remote image) for each `url=` disk.
    pub remote: Vec<(usize, Arc<LazyHttpDisk>)>,
    /// The copy-on-write overlay of each disk that has one, by disk index.
    pub overlays: Vec<Option<Arc<OverlayBackend>>>,
}

/// Opens every configured disk (clear errors: missing, a directory, a size that is not a
/// multiple of 512 bytes, an unreachable or corrupt remote index). Done before the VM is
/// created, so bad input fails fast.
pub fn open_disks(cfg: &VmConfig) -> Result<OpenedDisks, BuildError> {
    let mut out = OpenedDisks {
        backends: Vec::new(),
        remote: Vec::new(),
        overlays: Vec::new(),
    };
    for (i, b) in cfg.blocks.iter().enumerate() {
        let err = |message: String| BuildError::File {
            what: "disk",
            path: b.location(),
            message,
        };
        let backend: Arc<dyn BlockBackend> = match &b.url {
            None => Arc::new(
                FileBackend::open(&b.path, b.read_only, b.direct)
                    .map_err(|e| err(crate::util::error_chain(&e)))?,
            ),
            Some(url) => {
                let opts = LazyHttpOptions {
                    cache_dir: b.cache.clone(),
                    cache_max_bytes: b.cache_max_mib.map(|m| m << 20),
                    http: HttpStoreOptions {
                        mirrors: b.mirrors.clone(),
                        ..Default::default()
                    },
                    record_prefetch: b.record_prefetch.clone(),
                    prefetch: b.prefetch.clone(),
                };
                let (remote, top) = open_remote_disk(url, opts, None)
                    .map_err(|e| err(crate::util::error_chain(&e)))?;
                out.remote.push((i, remote.clone()));
                match &b.overlay {
                    Some(path) => {
                        let ov = Arc::new(
                            OverlayBackend::open(path, remote as Arc<dyn BlockBackend>).map_err(
                                |e| err(format!("overlay: {}", crate::util::error_chain(&e))),
                            )?,
                        );
                        out.overlays.push(Some(ov.clone()));
                        out.backends.push(ov);
                        continue;
                    }
                    None => top,
                }
            }
        };
        out.backends.push(backend);
        out.overlays.push(None);
    }
    Ok(out)
}

/// Turns on KVM dirty page logging on every memory slot, for incremental snapshots;
/// `Off` (and a warning) if KVM refuses. Whether the log is then trusted is decided by
/// the first full snapshot (see [`crate::vstate::dirty`]).
pub fn enable_dirty_log(vm: &Vm, mem: &GuestMemory) -> crate::vstate::dirty::LogState {
    use crate::vstate::dirty::LogState;
    match crate::vstate::dirty::enable_kvm_log(vm.fd(), mem) {
        Ok(()) => LogState::fresh(),
        Err(e) => {
            log::warn!(
                "dirty page logging unavailable, snapshots will re-hash memory: {}",
                crate::util::error_chain(&e)
            );
            LogState::Off
        }
    }
}

/// Creates a virtio-block device and transport for each opened disk, wires its irqfd and
/// ioeventfd, starts its I/O worker thread (`virtio-blk<i>`), and returns the devices with
/// their kernel command-line parameters. With `paused`, each device's I/O gate is held
/// for the VM (as [`Vmm::pause`](crate::vmm::Vmm::pause) does; `Vmm::resume` releases it).
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
        let mut device = BlockDevice::new(backend, BlockDeviceConfig { id: b.id.clone() })
            .map_err(|e| BuildError::Device(e.to_string()))?;
        if paused {
            device.io_gate().hold();
        }
        device
            .start_worker(&format!("virtio-blk{i}"))
            .map_err(|e| BuildError::Device(crate::util::error_chain(&e)))?;
        let device = Arc::new(Mutex::new(device));
        let gsi = VIRTIO_FIRST_GSI + i as u32;
        let base = match arch::layout::virtio_mmio_addr(i as u32) {
            Some(a) if gsi <= arch::mptable::MAX_LEGACY_IRQ => a.0,
            _ => {
                return Err(BuildError::Device(format!(
                    "too many disks ({})",
                    cfg.blocks.len()
                )));
            }
        };
        let irq = IrqLine::new(irq_evt(vm, gsi)?, gsi);
        let transport = MmioTransport::new(mem.clone(), device.clone(), irq)
            .map_err(|e| BuildError::Device(e.to_string()))?;
        for (q, evt) in lock(&device).queue_events().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                    q as u32,
                )
                .map_err(|e| BuildError::Device(format!("ioeventfd: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|e| BuildError::Device(e.to_string()))?;
        params.push(kernel_cmdline_arg(base, gsi));
        attached.push(AttachedBlock {
            device,
            transport,
            base,
            gsi,
        });
    }
    Ok((attached, params))
}

/// The devices and event loop every VM has, before disks are attached.
pub struct Platform {
    /// Exit latch.
    pub exit: Arc<ExitSignal>,
    /// Port-I/O bus with the legacy devices.
    pub pio: Bus,
    /// MMIO bus (empty).
    pub mmio: Bus,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Event loop with the exit waker (and stdin when the console is stdio).
    pub events: EventManager<Subscriber>,
}

/// Creates the exit latch, the legacy devices (COM1 from `serial_state` when restoring) and
/// the event loop.
pub fn setup_platform(
    vm: &Vm,
    console: Console,
    serial_state: Option<&SerialDeviceState>,
) -> Result<Platform, BuildError> {
    let exit = Arc::new(ExitSignal::new().map_err(|e| BuildError::Device(e.to_string()))?);
    let mut pio = Bus::new();
    let stdio = matches!(console, Console::Stdio);
    let console_out: Box<dyn Write + Send> = match console {
        Console::Stdio => Box::new(crate::devices::legacy::FlushingStdout),
        Console::Writer(w) => w,
    };
    let legacy = setup_legacy(vm, &mut pio, &exit, console_out, serial_state)?;
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(BuildError::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWaker(exit.clone()))));
    if stdio {
        events.add_subscriber(Arc::new(Mutex::new(StdinInput::new(legacy.serial.clone()))));
    }
    Ok(Platform {
        exit,
        pio,
        mmio: Bus::new(),
        serial: legacy.serial,
        events,
    })
}

/// The frozen port-I/O and MMIO buses and the vCPU threads using them.
pub type StartedVcpus = (Arc<Bus>, Arc<Bus>, Vec<VcpuHandle>);

/// Freezes the buses and starts one thread per vCPU fd (paused if asked).
pub fn start_vcpus(
    fds: Vec<kvm_ioctls::VcpuFd>,
    pio: Bus,
    mmio: Bus,
    exit: &Arc<ExitSignal>,
    paused: bool,
) -> Result<StartedVcpus, BuildError> {
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut vcpus = Vec::new();
    for (id, fd) in fds.into_iter().enumerate() {
        let ctx = VcpuContext {
            id: id as u8,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
        };
        vcpus.push(VcpuHandle::spawn(fd, ctx, paused)?);
    }
    Ok((pio, mmio, vcpus))
}

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

/// Where the console output of a VM goes.
pub enum Console {
    /// The process's stdout (and stdin as input).
    Stdio,
    /// A writer (tests); no input.
    Writer(Box<dyn Write + Send>),
}

/// A device to put on a bus at `(base, len)`.
pub type ExtraDevice = (SharedDevice, u64, u64);

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

/// Builds and starts a VM that boots `cfg.kernel`.
pub fn build_for_boot(cfg: &VmConfig, opts: BootOptions) -> Result<Vmm, BuildError> {
    let console = opts.console;
    let mut kernel = open_input("kernel", &cfg.kernel.path)?;
    let mut initrd = cfg
        .initrd
        .as_ref()
        .map(|p| open_input("initrd", p))
        .transpose()?;

    let disks = open_disks(cfg)?;
    let vm = Vm::new()?;
    vm.check_vcpu_count(u32::from(cfg.vcpus))?;
    let host = arch::cpu_template::HostCpu::probe(vm.kvm(), config::pvm_host())?;
    let cpu = arch::cpu_template::plan(cfg.cpu_template, &host)?;
    let mem = memory::create_anonymous(&arch::layout::arch_memory_regions(cfg.mem_mib << 20))?;
    vm.register_memory(&mem, 0)?;
    let dirty_log = enable_dirty_log(&vm, &mem);

    let loaded = arch::boot::load_kernel(&mem, &mut kernel).map_err(|e| BuildError::File {
        what: "kernel",
        path: cfg.kernel.path.display().to_string(),
        message: e.to_string(),
    })?;
    let initrd_region = match initrd.as_mut() {
        Some(f) => Some(arch::boot::load_initrd(&mem, f, &loaded).map_err(|e| {
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

    let Platform {
        exit,
        mut pio,
        mut mmio,
        serial,
        events,
    } = setup_platform(&vm, console, None)?;
    let bus_err = |e: BusError| BuildError::Device(e.to_string());
    for (dev, base, len) in opts.extra_pio {
        pio.insert(dev, base, len).map_err(bus_err)?;
    }
    for (dev, base, len) in opts.extra_mmio {
        mmio.insert(dev, base, len).map_err(bus_err)?;
    }

    let remote = disks.remote;
    let overlays = disks.overlays;
    let (blocks, device_params) =
        attach_blocks(&vm, &mem, cfg, disks.backends, &mut mmio, opts.start_paused)?;
    let mut fds = Vec::new();
    for id in 0..cfg.vcpus {
        fds.push(vm.create_vcpu(id)?);
    }
    let tsc_khz = fds.first().and_then(|f| f.get_tsc_khz().ok());
    let cmdline = compose_cmdline(cfg, &device_params, tsc_khz, &cpu);
    arch::mptable::setup_mptable(&mem, cfg.vcpus, arch::mptable::MAX_LEGACY_IRQ)
        .map_err(|e| BuildError::Arch(format!("mptable: {e}")))?;
    arch::boot::configure_system(&mem, &cmdline, initrd_region, loaded.setup_header)
        .map_err(|e| BuildError::Arch(format!("boot params: {e}")))?;
    for (id, fd) in fds.iter().enumerate() {
        configure_boot_vcpu(&host, &cpu, &mem, fd, id as u8, cfg.vcpus, loaded.entry)?;
    }

    let (pio, mmio, vcpus) = start_vcpus(fds, pio, mmio, &exit, opts.start_paused)?;
    log::info!("guest command line: {cmdline}");
    if cfg.cpu_template != config::CpuTemplate::None {
        log::info!(
            "CPU template {}: the guest gets {}",
            cfg.cpu_template,
            cpu.record.features.names().join(" ")
        );
    }
    Ok(Vmm {
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
        events,
        api: None,
        lazy: None,
        remote,
        overlays,
        snapshot_base: None,
        dirty_log,
        status_extras: Vec::new(),
        repo_parent: None,
        state: if opts.start_paused {
            RunState::Paused
        } else {
            RunState::Running
        },
    })
}
