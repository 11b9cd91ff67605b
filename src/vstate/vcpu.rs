//! vCPU threads: a state machine (Running / Paused / Exited) driven over channels.
//!
//! Each vCPU runs `KVM_RUN` on its own thread named `vcpu<N>`. Requests arrive on a channel;
//! to get a vCPU out of `KVM_RUN` the sender kicks its thread with a real-time signal whose
//! handler sets `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::vstate::bus::Bus;
use crate::vstate::exit::{ExitReason, ExitSignal};

mod persist;

pub use persist::{VcpuPersistError, VcpuRestoreArgs};

/// Errors of the vCPU module.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn vcpu{0} thread")]
    Spawn(u8, #[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vcpu kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread is gone.
    #[error("vcpu{0} thread is gone")]
    Gone(u8),
    /// The vCPU did not answer in time.
    #[error("vcpu{0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    /// The vCPU answered with something else than expected.
    #[error("vcpu{0}: unexpected response {1}")]
    Unexpected(u8, String),
}

/// What a vCPU thread is asked to do.
pub enum VcpuRequest {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Continue running.
    Resume,
    /// Run a closure on the vCPU while paused (used to save or inspect state).
    With(Box<dyn FnOnce(&mut KvmVcpu) -> VcpuResponse + Send>),
    /// Stop the thread.
    Exit,
}

impl std::fmt::Debug for VcpuRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuRequest::Pause => f.write_str("Pause"),
            VcpuRequest::Resume => f.write_str("Resume"),
            VcpuRequest::With(_) => f.write_str("With(<closure>)"),
            VcpuRequest::Exit => f.write_str("Exit"),
        }
    }
}

/// What a vCPU thread answers.
#[derive(Debug)]
pub enum VcpuResponse {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The thread ended.
    Exited,
    /// Result of a `With` request.
    Value(Box<dyn std::any::Any + Send>),
    /// A request failed.
    Error(String),
}

/// Run state of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RunState {
    /// Inside or about to enter KVM_RUN.
    Running,
    /// Waiting for Resume.
    Paused,
    /// Thread ended.
    Exited,
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: `p` points at this thread's mmap'ed kvm_run, set by `run_loop` while the
        // VcpuFd (which owns the mapping) is alive on this thread and cleared before it is
        // dropped. A volatile byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal);
    });
    res
}

/// A KVM vCPU: its fd and what saving its state needs (see `persist`).
pub struct KvmVcpu {
    /// vCPU index (also its APIC id).
    pub id: u8,
    /// The vCPU fd.
    pub fd: VcpuFd,
    /// The system KVM handle (for the MSR list and the host's capabilities).
    pub kvm: Arc<kvm_ioctls::Kvm>,
}

/// What a vCPU thread needs besides its vCPU.
pub struct VcpuContext {
    /// vCPU index (also its APIC id).
    pub id: u8,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where fatal conditions are reported.
    pub exit: Arc<ExitSignal>,
}

/// The VMM's handle to a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    tx: Sender<VcpuRequest>,
    rx: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

/// How long stopping a vCPU thread may take before it is abandoned.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the VMM waits for a vCPU to answer a request.
pub const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuHandle {
    /// Starts the thread `vcpu<N>`; it begins paused if `start_paused`.
    pub fn spawn(vcpu: KvmVcpu, ctx: VcpuContext, start_paused: bool) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let (tx, req_rx) = unbounded();
        let (resp_tx, rx) = unbounded();
        let id = ctx.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_loop(vcpu, ctx, req_rx, resp_tx, start_paused))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(Self {
            id,
            tx,
            rx,
            thread: Some(thread),
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends a request and kicks the thread out of KVM_RUN.
    pub fn send(&self, req: VcpuRequest) -> Result<(), VcpuError> {
        self.tx.send(req).map_err(|_| VcpuError::Gone(self.id))?;
        if let Some(t) = &self.thread
            && !t.is_finished()
        {
            // A failed kick only means the thread is already gone or will see the request.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    /// Waits for the answer to the last request.
    pub fn recv(&self, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, timeout),
            crossbeam_channel::RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
        })
    }

    /// Sends a request and waits for its answer.
    pub fn request(&self, req: VcpuRequest) -> Result<VcpuResponse, VcpuError> {
        self.send(req)?;
        self.recv(VCPU_ANSWER_TIMEOUT)
    }

    /// Runs `f` on the (paused) vCPU's fd and returns its value.
    pub fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> T + Send + 'static,
    ) -> Result<T, VcpuError> {
        self.with_vcpu(move |v| f(&mut v.fd))
    }

    /// Runs `f` on the (paused) vCPU and returns its value (used to save its state).
    pub fn with_vcpu<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut KvmVcpu) -> T + Send + 'static,
    ) -> Result<T, VcpuError> {
        let req = VcpuRequest::With(Box::new(move |v| VcpuResponse::Value(Box::new(f(v)))));
        match self.request(req)? {
            VcpuResponse::Value(v) => v
                .downcast::<T>()
                .map(|b| *b)
                .map_err(|_| VcpuError::Unexpected(self.id, "value of another type".into())),
            other => Err(VcpuError::Unexpected(self.id, format!("{other:?}"))),
        }
    }

    /// Asks the thread to exit and joins it. A thread that does not answer within
    /// [`VCPU_STOP_TIMEOUT`] (e.g. blocked on guest memory that can no longer be fetched)
    /// is left behind with a warning rather than hanging the VMM.
    pub fn stop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        let _ = self.send(VcpuRequest::Exit);
        let Some(t) = self.thread.take() else { return };
        if !t.is_finished() {
            let deadline = std::time::Instant::now() + VCPU_STOP_TIMEOUT;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                // Keep kicking: the first signal may have arrived outside KVM_RUN.
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(5));
            }
            if !t.is_finished() {
                log::warn!("vcpu{} did not stop; leaving its thread behind", self.id);
                return;
            }
        }
        let _ = t.join();
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the run loop should do after handling a request.
enum Next {
    Run,
    Wait,
    Exit,
}

fn handle_request(
    req: VcpuRequest,
    vcpu: &mut KvmVcpu,
    resp: &Sender<VcpuResponse>,
    paused: bool,
) -> Next {
    let (answer, next) = match req {
        VcpuRequest::Pause => {
            if !paused {
                complete_pending_io(&mut vcpu.fd);
            }
            (VcpuResponse::Paused, Next::Wait)
        }
        VcpuRequest::Resume => (VcpuResponse::Resumed, Next::Run),
        VcpuRequest::With(f) => {
            let a = if paused {
                f(vcpu)
            } else {
                VcpuResponse::Error("vcpu must be paused".into())
            };
            (a, if paused { Next::Wait } else { Next::Run })
        }
        VcpuRequest::Exit => (VcpuResponse::Exited, Next::Exit),
    };
    // The VMM may have stopped listening; nothing to do then.
    let _ = resp.send(answer);
    next
}

fn run_loop(
    mut vcpu: KvmVcpu,
    ctx: VcpuContext,
    rx: Receiver<VcpuRequest>,
    resp: Sender<VcpuResponse>,
    start_paused: bool,
) {
    KVM_RUN_PTR.with(|c| c.set(vcpu.fd.get_kvm_run() as *mut kvm_run));
    let mut paused = start_paused;
    'outer: loop {
        // Drain requests without blocking while running; block while paused.
        loop {
            let req = if paused {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break 'outer,
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break 'outer,
                }
            };
            match handle_request(req, &mut vcpu, &resp, paused) {
                Next::Run => paused = false,
                Next::Wait => paused = true,
                Next::Exit => break 'outer,
            }
        }
        if let Some(reason) = run_once(&mut vcpu.fd, &ctx) {
            ctx.exit.exit(reason);
            // Park until told to exit, so the VMM can still pause/save for diagnostics.
            paused = true;
        }
    }
    KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
}

/// Lets KVM finish an instruction whose port-I/O or MMIO exit was just handled, without
/// running further guest code: a KVM_RUN with `immediate_exit` set completes the pending
/// access and returns EINTR. Without it, state saved now would have RIP still at the
/// instruction, which would run a second time after a restore (a read byte lost, a write
/// repeated).
fn complete_pending_io(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => log::debug!("completing pending I/O before pause: {e}"),
        Ok(exit) => log::debug!("completing pending I/O before pause: unexpected exit {exit:?}"),
    }
    fd.set_kvm_immediate_exit(0);
}

/// One KVM_RUN; returns a reason when the VM must stop.
fn run_once(fd: &mut VcpuFd, ctx: &VcpuContext) -> Option<ExitReason> {
    match fd.run() {
        Ok(VcpuExit::InternalError) => Some(internal_error(fd, ctx.id)),
        Ok(exit) => handle_exit(exit, ctx),
        Err(e) => match e.errno() {
            libc::EINTR => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            libc::EAGAIN => {
                // An AP waiting for INIT/SIPI on some nested hosts returns EAGAIN: retry.
                std::thread::sleep(Duration::from_millis(1));
                None
            }
            _ => Some(ExitReason::VcpuError {
                vcpu: ctx.id,
                message: format!("KVM_RUN failed: {e}"),
            }),
        },
    }
}

/// Dispatches a port-I/O or MMIO exit on its bus; other exits either continue or give
/// the reason the VM must stop.
fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<ExitReason> {
    let id = ctx.id;
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                log::trace!("vcpu{id}: unhandled out {port:#x}");
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio.read(addr, data) {
                log::debug!("vcpu{id}: unhandled mmio read {addr:#x}");
                data.fill(0);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                log::debug!("vcpu{id}: unhandled mmio write {addr:#x}");
            }
            None
        }
        VcpuExit::Hlt => {
            // Only seen without an in-kernel irqchip; treat as idle.
            std::thread::yield_now();
            None
        }
        VcpuExit::Shutdown => Some(ExitReason::TripleFault { vcpu: id }),
        VcpuExit::SystemEvent(ty, _) => match ty {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::Shutdown),
            other => Some(ExitReason::VcpuError {
                vcpu: id,
                message: format!("system event {other}"),
            }),
        },
        VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::VcpuError {
            vcpu: id,
            message: format!("KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"),
        }),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => None,
        other => Some(ExitReason::VcpuError {
            vcpu: id,
            message: format!("unexpected exit {other:?}"),
        }),
    }
}

/// The reason to stop after a KVM_EXIT_INTERNAL_ERROR, with KVM's suberror and data.
fn internal_error(fd: &mut VcpuFd, id: u8) -> ExitReason {
    let run = fd.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the `internal`
    // member of the union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    ExitReason::VcpuError {
        vcpu: id,
        message: format!(
            "KVM internal error, suberror {} (1 = instruction emulation failed) at rip {rip:#x}, data {:x?}",
            internal.suberror,
            &internal.data[..n]
        ),
    }
}
