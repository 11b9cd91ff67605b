//! The running VMM: VM, vCPU handles, devices and the event loop.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use crate::api::{ApiChannel, ApiError, ApiReply, ApiRequest, VmStateRequest};
use crate::config::VmConfig;
use crate::devices::Bus;
use crate::devices::legacy::SerialDevice;
use crate::util::{error_chain, lock};
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{RunState, VcpuError, VcpuHandle, VcpuRequest, VcpuResponse};
use crate::vstate::vm::Vm;

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

/// A running VM and everything attached to it.
pub struct Vmm {
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
    pub blocks: Vec<crate::builder::AttachedBlock>,
    /// Device event loop.
    pub events: EventManager<Subscriber>,
    /// Whole-VM run state.
    pub state: RunState,
    /// Control API requests, when an API server runs.
    pub api: Option<ApiChannel>,
    /// Lazily restored memory: the userfaultfd handler serving guest page faults.
    /// Declared after the vCPUs so that it is dropped after them.
    pub lazy: Option<crate::vstate::uffd::LazyMemory>,
    /// Lazy remote disk images, by disk index (for their fetch statistics).
    pub remote: Vec<(usize, Arc<crate::disk::http::LazyHttpDisk>)>,
    /// Copy-on-write overlays by disk index (captured into snapshots).
    pub overlays: Vec<Option<Arc<crate::disk::overlay::OverlayBackend>>>,
    /// What the next snapshot can be incremental against.
    pub snapshot_base: Option<crate::snapshot::create::SnapshotBase>,
    /// Where the KVM dirty log stands (see [`crate::vstate::dirty`]).
    pub dirty_log: crate::vstate::dirty::LogState,
    /// Extra sections of `GET /vm`, by key (e.g. `archive`: the fetch report of a VM
    /// resumed from an archive), computed when asked.
    pub status_extras: Vec<(&'static str, StatusFn)>,
    /// The repository snapshot the VM was last snapshotted into or restored from: the parent
    /// of its next snapshot in that repository (src/repo/).
    pub repo_parent: Option<crate::repo::RepoParent>,
}

impl Vmm {
    /// Runs the event loop until the guest or the user ends the VM; stops the vCPUs.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let reason = loop {
            if let Some(r) = self.exit.reason() {
                break r;
            }
            if let Some(msg) = self.lazy.as_ref().and_then(|l| l.fatal_error()) {
                self.exit
                    .exit(ExitReason::MemoryUnavailable { message: msg });
                continue;
            }
            self.events
                .run_with_timeout(100)
                .map_err(VmmError::EventLoop)?;
            self.handle_api_requests();
        };
        self.stop_vcpus();
        Ok(reason)
    }

    /// Attaches a control API channel: its requests are served by [`Vmm::run`].
    pub fn attach_api(&mut self, chan: ApiChannel) -> std::io::Result<()> {
        let waker = chan.eventfd().try_clone()?;
        self.events
            .add_subscriber(Arc::new(Mutex::new(EventFdDrain(waker))));
        self.api = Some(chan);
        Ok(())
    }

    fn handle_api_requests(&mut self) {
        loop {
            let Some((req, reply)) = self.api.as_ref().and_then(|a| a.try_recv()) else {
                return;
            };
            let answer = self.handle_api_request(req);
            // The client may have gone away; the request was handled anyway.
            let _ = reply.send(answer);
        }
    }

    /// Serves one control API request.
    pub fn handle_api_request(&mut self, req: ApiRequest) -> ApiReply {
        match req {
            ApiRequest::GetVm => {
                let mut v = serde_json::json!({
                    "state": self.state,
                    "config": self.config,
                    "cmdline": self.cmdline,
                    "cpu": {
                        "template": self.config.cpu_template,
                        "features": self.cpu.features.names(),
                        "host": self.cpu.host,
                    },
                    "remote_disks": self.remote_disk_report(),
                    "dirty_log": self.dirty_log,
                });
                for (key, f) in &self.status_extras {
                    v[*key] = f();
                }
                Ok(v)
            }
            ApiRequest::SetState(VmStateRequest::Paused) => {
                self.pause().map_err(api_error)?;
                Ok(serde_json::Value::Null)
            }
            ApiRequest::SetState(VmStateRequest::Resumed) => {
                self.resume().map_err(api_error)?;
                Ok(serde_json::Value::Null)
            }
            ApiRequest::CreateSnapshot(r) => {
                if r.parent.is_some() {
                    return Err(ApiError::bad_request(
                        "\"parent\" is not accepted: a snapshot is incremental against the VM's \
                         previous snapshot (or the one it was restored from) in the same chunk \
                         store, automatically",
                    ));
                }
                if self.state != RunState::Paused {
                    return Err(ApiError::conflict(format!(
                        "the VM must be paused to snapshot it (it is {:?})",
                        self.state
                    )));
                }
                if let Some(repo) = &r.repo {
                    let report = crate::repo::create::create_in_repo(self, repo, r.name.as_deref())
                        .map_err(|e| match e {
                            crate::repo::create::RepoCreateError::BadName(_) => {
                                ApiError::bad_request(e.to_string())
                            }
                            _ => ApiError::internal(error_chain(&e)),
                        })?;
                    return serde_json::to_value(report)
                        .map_err(|e| ApiError::internal(e.to_string()));
                }
                let report =
                    crate::snapshot::create::create_snapshot(self, &r.path, r.store.as_deref())
                        .map_err(|e| ApiError::internal(error_chain(&e)))?;
                serde_json::to_value(report).map_err(|e| ApiError::internal(e.to_string()))
            }
            ApiRequest::Shutdown => {
                self.exit.exit(ExitReason::Shutdown);
                Ok(serde_json::Value::Null)
            }
        }
    }

    /// Fetch statistics of the lazy remote disks, one JSON object per disk.
    pub fn remote_disk_report(&self) -> Vec<serde_json::Value> {
        self.remote
            .iter()
            .map(|(i, d)| {
                let s = d.stats();
                serde_json::json!({
                    "disk": i,
                    "bytes_fetched": s.http.bytes_fetched,
                    "bytes_read_by_guest": s.bytes_read,
                    "chunks_fetched": s.chunks_fetched,
                    "chunks_prefetched": s.chunks_prefetched,
                    "read_errors": s.read_errors,
                })
            })
            .collect()
    }

    /// Makes the lazy memory handler's fatal errors wake the event loop.
    pub fn watch_lazy_memory(&mut self) -> std::io::Result<()> {
        if let Some(l) = &self.lazy {
            let evt = l.fatal_event().try_clone()?;
            self.events
                .add_subscriber(Arc::new(Mutex::new(EventFdDrain(evt))));
        }
        Ok(())
    }

    /// Stops and joins every vCPU thread.
    pub fn stop_vcpus(&mut self) {
        for v in &self.vcpus {
            let _ = v.send(VcpuRequest::Exit);
        }
        for v in &mut self.vcpus {
            v.stop();
        }
        self.state = RunState::Exited;
    }

    /// Pauses every vCPU (they leave KVM_RUN and wait), then holds every disk's I/O gate:
    /// from then on no device writes guest memory or raises an interrupt. A disk request
    /// stuck in a slow backend is not waited for; it is recorded as pending (module
    /// `devices::virtio::block::worker`).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        self.expect(RunState::Running, "pause")?;
        for v in &self.vcpus {
            v.send(VcpuRequest::Pause).map_err(VmmError::Vcpu)?;
        }
        for v in &self.vcpus {
            expect_response(v, |r| matches!(r, VcpuResponse::Paused))?;
        }
        for g in self.io_gates() {
            g.hold();
        }
        self.state = RunState::Paused;
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
            for v in &self.vcpus {
                v.send(VcpuRequest::Resume).map_err(VmmError::Vcpu)?;
            }
            for v in &self.vcpus {
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
        self.state = RunState::Running;
        Ok(())
    }

    /// The I/O gate of every disk.
    fn io_gates(&self) -> Vec<Arc<crate::devices::virtio::IoGate>> {
        self.blocks
            .iter()
            .map(|b| lock(&b.device).io_gate().clone())
            .collect()
    }

    /// Tells KVM the vCPUs were stopped (KVM_KVMCLOCK_CTRL), so a guest using kvmclock does
    /// not report soft lockups for the paused time. Guests without kvmclock ignore it.
    fn kvmclock_ctrl(&self) {
        for v in &self.vcpus {
            match v.with(|fd| crate::arch::x86_64::vcpu_state::kvmclock_ctrl(fd)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("vcpu{}: {e}", v.id()),
                Err(e) => log::warn!("vcpu{}: {e}", v.id()),
            }
        }
    }

    fn expect(&self, needed: RunState, what: &'static str) -> Result<(), VmmError> {
        if self.state != needed {
            return Err(VmmError::WrongState {
                what,
                needed,
                current: self.state,
            });
        }
        Ok(())
    }
}

fn api_error(e: VmmError) -> ApiError {
    match e {
        VmmError::WrongState { .. } => ApiError::conflict(e.to_string()),
        other => ApiError::internal(error_chain(&other)),
    }
}

/// Drains an eventfd that only exists to wake the event loop.
pub struct EventFdDrain(pub vmm_sys_util::eventfd::EventFd);

impl MutEventSubscriber for EventFdDrain {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("cannot watch an eventfd: {e:?}");
        }
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
        if let Some(l) = self.lazy.take() {
            l.stop();
        }
    }
}

/// Wakes the event loop when the exit latch fires.
pub struct ExitWaker(pub Arc<ExitSignal>);

impl MutEventSubscriber for ExitWaker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Draining is enough; `Vmm::run` reads the reason after every loop turn.
        let _ = self.0.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
    }
}

/// Forwards host stdin to COM1.
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
    pending: Vec<u8>,
}

impl StdinInput {
    /// Input for `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self {
            serial,
            pending: Vec::new(),
        }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        // SAFETY: reading into a valid stack buffer of the given length from fd 0.
        let n = unsafe { libc::read(stdin.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
            // EOF or error: stop watching stdin so the loop does not spin.
            let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            return;
        }
        self.pending.extend_from_slice(&buf[..n as usize]);
        let taken = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..taken);
        // Bytes that do not fit stay pending; cap so a stalled guest cannot grow us forever.
        if self.pending.len() > 4096 {
            self.pending.clear();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            // /dev/null and regular files cannot be polled; that just means no input.
            log::debug!("stdin is not pollable ({e:?}); no console input");
        }
    }
}

/// Puts the terminal on stdin in raw-ish mode (no echo, no line buffering) while alive.
pub struct TerminalGuard {
    saved: Option<libc::termios>,
}

impl TerminalGuard {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn new() -> Self {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(0) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain old data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios struct.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        // SAFETY: valid pointer to an initialised termios struct.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Self { saved: Some(saved) }
    }
}

impl Default for TerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read in `new` on fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}
