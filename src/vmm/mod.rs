//! The running VMM: VM, memory, vCPU handles and devices ([`Vmm`]), pausing and resuming
//! them; above it, in this folder:
//!
//! * [`snapshot`]: writing a snapshot of the paused VM into a directory;
//! * [`repo_snapshot`]: the same into a snapshot repository (`src/repo/`);
//! * [`run`]: the event loop ([`Vmm::run`]) and the control API requests it serves, which
//!   take those snapshots.
//!
//! This file imports none of them (docs/DESIGN.md, "Layers").

pub mod repo_snapshot;
pub mod run;
pub mod snapshot;

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber};

use crate::api::ApiChannel;
use crate::config::VmConfig;
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::block::BlockDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::NetDevice;
use crate::util::lock;
use crate::vstate::bus::Bus;
use crate::vstate::exit::ExitSignal;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{RunState, VcpuError, VcpuHandle, VcpuRequest, VcpuResponse};
use crate::vstate::vm::Vm;

pub use repo_snapshot::{RepoCreateError, RepoCreateReport, create_in_repo};
pub use run::{EventFdDrain, ExitWaker, StdinInput, TerminalGuard};
pub use snapshot::{CreateError, SnapshotReport, create_snapshot};

/// Errors of the running VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The event loop failed.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// A vCPU request failed.
    #[error("vcpu request failed")]
    Vcpu(#[source] VcpuError),
    /// The operation is not valid in the current state.
    #[error("VM is {current:?}; {what} needs {needed:?}")]
    WrongState {
        /// What was attempted.
        what: &'static str,
        /// The state it needs.
        needed: RunState,
        /// The state the VM is in.
        current: RunState,
    },
}

/// The event-manager subscriber type used by the VMM.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A section of `GET /vm` computed on request.
pub type StatusFn = Box<dyn Fn() -> serde_json::Value + Send>;

/// A virtio-block disk attached to the VM.
pub struct AttachedBlock {
    /// The device (its I/O worker thread serves the queue).
    pub device: Arc<Mutex<BlockDevice>>,
    /// Its virtio-mmio transport on the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
}

/// A virtio-net interface attached to the VM.
pub struct AttachedNet {
    /// The device (its thread moves the frames).
    pub device: Arc<Mutex<NetDevice>>,
    /// Its virtio-mmio transport on the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// MMIO window base.
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
}

/// A running VM and everything attached to it: the [`Machine`] a builder made, plus the
/// control-plane state that grows while it runs (API channel, snapshot base, `GET /vm`
/// extras, repository parent).
pub struct Vmm {
    /// The VM, its memory, vCPUs and devices.
    pub machine: Machine,
    /// Control API requests, when an API server runs.
    pub api: Option<ApiChannel>,
    /// What the next snapshot can be incremental against.
    pub snapshot_base: Option<crate::snapshot::SnapshotBase>,
    /// Extra sections of `GET /vm`, by key (e.g. `archive`: the fetch report of a VM
    /// resumed from an archive), computed when asked.
    pub status_extras: Vec<(&'static str, StatusFn)>,
    /// The repository snapshot the VM was last snapshotted into or restored from: the parent
    /// of its next snapshot in that repository (src/repo/).
    pub repo_parent: Option<crate::repo::RepoParent>,
}

/// What a builder (boot or restore, `src/builder/`) makes: the VM with its memory, vCPU
/// threads and devices, ready to run.
pub struct Machine {
    /// VM configuration.
    pub config: VmConfig,
    /// The CPU features the guest was given at boot (kept across restores).
    pub cpu: crate::arch::x86_64::cpu_template::CpuRecord,
    /// The final kernel command line given to the guest.
    pub cmdline: String,
    /// The KVM VM.
    pub vm: Vm,
    /// Guest memory.
    pub mem: GuestMemory,
    /// vCPU threads.
    pub vcpus: Vec<VcpuHandle>,
    /// Exit latch.
    pub exit: Arc<ExitSignal>,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// virtio-block disks in attach order.
    pub blocks: Vec<AttachedBlock>,
    /// virtio-net interfaces in attach order.
    pub nets: Vec<AttachedNet>,
    /// Device event loop.
    pub events: EventManager<Subscriber>,
    /// Whole-VM run state.
    pub state: RunState,
    /// Lazily restored memory: the userfaultfd handler serving guest page faults.
    /// Declared after the vCPUs so that it is dropped after them.
    pub lazy: Option<crate::vstate::uffd::LazyMemory>,
    /// Lazy remote disk images, by disk index (for their fetch statistics).
    pub remote: Vec<(usize, Arc<crate::disk::http::LazyHttpDisk>)>,
    /// Copy-on-write overlays by disk index (captured into snapshots).
    pub overlays: Vec<Option<Arc<crate::disk::overlay::OverlayBackend>>>,
    /// Where the KVM dirty log stands (see [`crate::vstate::dirty`]).
    pub dirty_log: crate::vstate::dirty::LogState,
}

impl Vmm {
    /// A VMM over a freshly built machine: no API channel, no snapshot base, no status
    /// extras, no repository parent yet.
    pub fn new(machine: Machine) -> Self {
        Vmm {
            machine,
            api: None,
            snapshot_base: None,
            status_extras: Vec::new(),
            repo_parent: None,
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop_vcpus(&mut self) {
        for v in &self.machine.vcpus {
            let _ = v.send(VcpuRequest::Exit);
        }
        for v in &mut self.machine.vcpus {
            v.stop();
        }
        self.machine.state = RunState::Exited;
    }

    /// Pauses every vCPU (they leave KVM_RUN and wait), then holds every disk's (and network
    /// interface's) I/O gate:
    /// from then on no device writes guest memory or raises an interrupt. A disk request
    /// stuck in a slow backend is not waited for; it is recorded as pending (module
    /// `devices::virtio::block::worker`).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.expect(RunState::Running, "pause")?;
        for v in &self.machine.vcpus {
            v.send(VcpuRequest::Pause).map_err(VmmError::Vcpu)?;
        }
        for v in &self.machine.vcpus {
            expect_response(v, |r| matches!(r, VcpuResponse::Paused))?;
        }
        for g in self.io_gates() {
            g.hold();
        }
        self.machine.state = RunState::Paused;
        self.kvmclock_ctrl();
        Ok(())
    }

    /// Releases the disks' I/O gates (completions held meanwhile are published), then
    /// resumes every vCPU.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        self.expect(RunState::Paused, "resume")?;
        self.kvmclock_ctrl();
        let gates = self.io_gates();
        for g in &gates {
            g.release();
        }
        let resumed = (|| {
            for v in &self.machine.vcpus {
                v.send(VcpuRequest::Resume).map_err(VmmError::Vcpu)?;
            }
            for v in &self.machine.vcpus {
                expect_response(v, |r| matches!(r, VcpuResponse::Resumed))?;
            }
            Ok(())
        })();
        if let Err(e) = resumed {
            // Still paused as far as the state says: keep the devices quiet too.
            for g in &gates {
                g.hold();
            }
            return Err(e);
        }
        self.machine.state = RunState::Running;
        Ok(())
    }

    /// The I/O gate of every disk and network interface.
    fn io_gates(&self) -> Vec<Arc<crate::devices::virtio::IoGate>> {
        let disks = self
            .machine
            .blocks
            .iter()
            .map(|b| lock(&b.device).io_gate().clone());
        let nets = self
            .machine
            .nets
            .iter()
            .map(|n| lock(&n.device).io_gate().clone());
        disks.chain(nets).collect()
    }

    /// Tells KVM the vCPUs were stopped (KVM_KVMCLOCK_CTRL), so a guest using kvmclock does
    /// not report soft lockups for the paused time. Guests without kvmclock ignore it.
    fn kvmclock_ctrl(&self) {
        for v in &self.machine.vcpus {
            match v.with(|fd| crate::arch::x86_64::vcpu_state::kvmclock_ctrl(fd)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("vcpu{}: {e}", v.id()),
                Err(e) => log::warn!("vcpu{}: {e}", v.id()),
            }
        }
    }

    fn expect(&self, needed: RunState, what: &'static str) -> Result<(), VmmError> {
        if self.machine.state != needed {
            return Err(VmmError::WrongState {
                what,
                needed,
                current: self.machine.state,
            });
        }
        Ok(())
    }
}

fn expect_response(v: &VcpuHandle, ok: impl Fn(&VcpuResponse) -> bool) -> Result<(), VmmError> {
    let r = v
        .recv(crate::vstate::vcpu::VCPU_ANSWER_TIMEOUT)
        .map_err(VmmError::Vcpu)?;
    if ok(&r) {
        Ok(())
    } else {
        Err(VmmError::Vcpu(VcpuError::Unexpected(
            v.id(),
            format!("{r:?}"),
        )))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
        if let Some(l) = self.machine.lazy.take() {
            l.stop();
        }
    }
}
