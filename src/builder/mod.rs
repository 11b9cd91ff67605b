//! Building a VM: [`boot`] (`build_for_boot`: kernel + command line) and [`restore`]
//! (`build_from_snapshot`: every component rebuilt from its saved state through
//! [`Persist`](crate::formats::Persist)); both share the device and vCPU helpers here, and
//! both end in [`Vmm::new`] over the [`Machine`](crate::vmm::Machine) they made.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64 as arch;
use crate::config::VmConfig;
use crate::devices::IrqLine;
use crate::devices::legacy::{
    I8042, I8042_LEN, I8042_PORT, I8042RestoreArgs, I8042State, PVPANIC_PORT, PvPanic,
    SERIAL_PORTS, SerialDevice, SerialDeviceState, SerialRestoreArgs,
};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::block::BlockDevice;
use crate::devices::virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, NOTIFY_REG_OFFSET};
use crate::disk::BlockBackend;
use crate::disk::file::FileBackend;
use crate::disk::http::{LazyHttpDisk, LazyHttpOptions, open_remote_disk};
use crate::disk::overlay::OverlayBackend;
use crate::formats::Persist;
use crate::store::http::HttpStoreOptions;
use crate::vmm::{AttachedBlock, ExitWaker, StdinInput, Subscriber};
use crate::vstate::bus::{Bus, BusError, SharedDevice};
use crate::vstate::exit::ExitSignal;
use crate::vstate::memory::{self, GuestMemory};
use crate::vstate::vcpu::{KvmVcpu, VcpuContext, VcpuHandle};
use crate::vstate::vm::Vm;
use kvm_ioctls::IoEventAddress;

pub mod boot;
pub mod net;
pub mod restore;

pub use boot::{BootOptions, build_for_boot, compose_cmdline};
pub use restore::{RestoreOptions, build_from_parts, build_from_snapshot, snapshot_files};

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
    /// A network interface's tap cannot be used.
    #[error(transparent)]
    Tap(crate::devices::virtio::net::TapError),
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

/// Puts the legacy devices on the port-I/O bus; when restoring (`serial_state` given),
/// COM1 and the i8042 are built from their state.
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
    let i8042 = match serial_state {
        None => I8042::new(exit.clone()),
        // Not in the state file: it has no state of its own.
        Some(_) => {
            let args = I8042RestoreArgs {
                signal: exit.clone(),
            };
            match I8042::restore(args, &I8042State::default()) {
                Ok(d) => d,
                Err(never) => match never {},
            }
        }
    };
    pio.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, I8042_LEN)
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

/// Where disk `index` of `count` sits: its MMIO window base and GSI.
pub fn block_slot(index: usize, count: usize) -> Result<(u64, u32), BuildError> {
    let gsi = VIRTIO_FIRST_GSI + index as u32;
    match arch::layout::virtio_mmio_addr(index as u32) {
        Some(a) if gsi <= arch::mptable::MAX_LEGACY_IRQ => Ok((a.0, gsi)),
        _ => Err(BuildError::Device(format!(
            "too many virtio devices ({count} disks and network interfaces)"
        ))),
    }
}

/// A virtio-block device wired to the VM (I/O worker started, queue ioeventfds and
/// interrupt irqfd registered), before its transport exists.
pub struct WiredBlock {
    /// The device.
    pub device: Arc<Mutex<BlockDevice>>,
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// The interrupt line its transport raises.
    pub irq: IrqLine,
}

/// Registers a virtio device's queue eventfds on its transport's QueueNotify register at
/// `base` (queue `q` on the datamatch `q`), so guest notifications wake its worker.
pub fn register_queue_events(
    vm: &Vm,
    base: u64,
    events: &[vmm_sys_util::eventfd::EventFd],
) -> Result<(), BuildError> {
    for (q, evt) in events.iter().enumerate() {
        vm.fd()
            .register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                q as u32,
            )
            .map_err(|e| BuildError::Device(format!("ioeventfd: {e}")))?;
    }
    Ok(())
}

/// Wires disk `index` (placed by [`block_slot`]) to the VM: with `paused`, holds its I/O
/// gate for the VM (as [`Vmm::pause`](crate::vmm::Vmm::pause) does; `Vmm::resume` releases
/// it), starts its I/O worker thread (`virtio-blk<i>`), registers its queue ioeventfds on
/// QueueNotify and its interrupt irqfd.
pub fn wire_block(
    vm: &Vm,
    index: usize,
    (base, gsi): (u64, u32),
    mut device: BlockDevice,
    paused: bool,
) -> Result<WiredBlock, BuildError> {
    if paused {
        device.io_gate().hold();
    }
    device
        .start_worker(&format!("virtio-blk{index}"))
        .map_err(|e| BuildError::Device(crate::util::error_chain(&e)))?;
    let irq = IrqLine::new(irq_evt(vm, gsi)?, gsi);
    register_queue_events(vm, base, device.queue_events())?;
    Ok(WiredBlock {
        device: Arc::new(Mutex::new(device)),
        base,
        gsi,
        irq,
    })
}

/// Puts a wired disk's transport on the MMIO bus.
pub fn plug_block(
    mmio: &mut Bus,
    device: Arc<Mutex<BlockDevice>>,
    (base, gsi): (u64, u32),
    transport: MmioTransport,
) -> Result<AttachedBlock, BuildError> {
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)
        .map_err(|e| BuildError::Device(e.to_string()))?;
    Ok(AttachedBlock {
        device,
        transport,
        base,
        gsi,
    })
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
    kvm_vcpus: Vec<KvmVcpu>,
    pio: Bus,
    mmio: Bus,
    exit: &Arc<ExitSignal>,
    paused: bool,
) -> Result<StartedVcpus, BuildError> {
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut vcpus = Vec::new();
    for v in kvm_vcpus {
        let ctx = VcpuContext {
            id: v.id,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
        };
        vcpus.push(VcpuHandle::spawn(v, ctx, paused)?);
    }
    Ok((pio, mmio, vcpus))
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
