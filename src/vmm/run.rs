//! The event loop of a running VM ([`Vmm::run`]): it waits on the exit latch, stdin, the
//! lazy memory handler and the control API, and serves the API's requests — state changes
//! and snapshots ([`super::snapshot`], [`super::repo_snapshot`]).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;

use super::repo_snapshot::{RepoCreateError, create_in_repo};
use super::snapshot::create_snapshot;
use super::{Vmm, VmmError};
use crate::api::{ApiChannel, ApiError, ApiReply, ApiRequest, VmStateRequest};
use crate::devices::legacy::SerialDevice;
use crate::util::{error_chain, lock};
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::vcpu::RunState;

impl Vmm {
    /// Runs the event loop until the guest or the user ends the VM; stops the vCPUs.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let reason = loop {
            if let Some(r) = self.machine.exit.reason() {
                break r;
            }
            if let Some(msg) = self.machine.lazy.as_ref().and_then(|l| l.fatal_error()) {
                self.machine
                    .exit
                    .exit(ExitReason::MemoryUnavailable { message: msg });
                continue;
            }
            self.machine
                .events
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
        self.machine
            .events
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
                    "state": self.machine.state,
                    "config": self.machine.config,
                    "cmdline": self.machine.cmdline,
                    "cpu": {
                        "template": self.machine.config.cpu_template,
                        "features": self.machine.cpu.features.names(),
                        "host": self.machine.cpu.host,
                    },
                    "remote_disks": self.remote_disk_report(),
                    "dirty_log": self.machine.dirty_log,
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
                if self.machine.state != RunState::Paused {
                    return Err(ApiError::conflict(format!(
                        "the VM must be paused to snapshot it (it is {:?})",
                        self.machine.state
                    )));
                }
                if let Some(repo) = &r.repo {
                    let report =
                        create_in_repo(self, repo, r.name.as_deref()).map_err(|e| match e {
                            RepoCreateError::BadName(_) => ApiError::bad_request(e.to_string()),
                            _ => ApiError::internal(error_chain(&e)),
                        })?;
                    return serde_json::to_value(report)
                        .map_err(|e| ApiError::internal(e.to_string()));
                }
                let report = create_snapshot(self, &r.path, r.store.as_deref())
                    .map_err(|e| ApiError::internal(error_chain(&e)))?;
                serde_json::to_value(report).map_err(|e| ApiError::internal(e.to_string()))
            }
            ApiRequest::Shutdown => {
                self.machine.exit.exit(ExitReason::Shutdown);
                Ok(serde_json::Value::Null)
            }
        }
    }

    /// Fetch statistics of the lazy remote disks, one JSON object per disk.
    pub fn remote_disk_report(&self) -> Vec<serde_json::Value> {
        self.machine
            .remote
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
        if let Some(l) = &self.machine.lazy {
            let evt = l.fatal_event().try_clone()?;
            self.machine
                .events
                .add_subscriber(Arc::new(Mutex::new(EventFdDrain(evt))));
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
