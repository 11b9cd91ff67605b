//! The VMM's control API: a small HTTP/1.1 + JSON server (in the spirit of Firecracker's).
//!
//! The server listens on `127.0.0.1:<port>` (never on other interfaces) and/or on a unix
//! socket created with mode `0600`. Each connection is served by its own thread (at most
//! [`ApiServerConfig::max_connections`] at a time; when that many are open, the longest-idle
//! one is closed for a newcomer, so idle connections never lock clients out). A well-formed request is turned into an
//! [`ApiRequest`] and handed to the VMM's main thread through the [`ApiChannel`]; the main thread
//! answers with an [`ApiReply`] which the server writes back. Everything the server can decide
//! on its own (unknown path, wrong method, malformed or oversized body, ...) is answered
//! without ever reaching the main thread, so the VM is untouched by bad requests.
//!
//! Main-thread side, once the channel's event fd is readable:
//!
//! ```ignore
//! let _ = channel.eventfd().read(); // clear the wake-up first (EAGAIN is fine)...
//! while let Some((request, reply)) = channel.try_recv() {
//!     // ...then drain every queued request.
//!     let _ = reply.send(vmm.handle(request)); // the requester may have gone: ignore errors
//! }
//! ```
//!
//! Reply convention: `Ok(value)` becomes `200` with `value` as the JSON body, except
//! `Ok(Value::Null)` which becomes `204 No Content`; `Err(ApiError)` becomes its status with
//! `{"error": message}`. See `docs/API.md` for the wire protocol.

mod client;
pub(crate) mod http;
pub(crate) use server::parse_request;
mod server;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::util::IoError;

pub use client::{ApiTarget, ClientError, DEFAULT_CLIENT_TIMEOUT, request, request_with_timeout};
pub use server::{ApiServerHandle, start, start_with_config};

/// A request forwarded by the API server to the VMM's main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm`: describe the VM (state, configuration).
    GetVm,
    /// `PATCH /vm`: pause or resume the vCPUs.
    SetState(VmStateRequest),
    /// `PUT /snapshot/create`: snapshot the VM.
    CreateSnapshot(SnapshotCreateRequest),
    /// `PUT /actions` with `{"action":"Shutdown"}`: stop the VM and the VMM.
    Shutdown,
}

/// The state a client asks the VM to move to (`PATCH /vm` body `{"state": ...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    /// Stop running the vCPUs.
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// Body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStatePatch {
    /// Requested state.
    pub state: VmStateRequest,
}

/// Body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateRequest {
    /// Directory the snapshot is written to (relative paths are relative to the VMM's cwd).
    /// Empty (absent) when `repo` is given.
    #[serde(default, skip_serializing_if = "crate::api::path_is_empty")]
    pub path: PathBuf,
    /// Optional shared chunk store directory (deduplicated across snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<PathBuf>,
    /// Optional parent snapshot this one is based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Snapshot repository to create the snapshot in (instead of `path`; src/repo/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<PathBuf>,
    /// Friendly name of the repository snapshot (with `repo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// The only action accepted by `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Shut the VM and the VMM down.
    Shutdown,
}

/// Body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// The action to perform.
    pub action: ActionType,
}

/// An error answer: an HTTP status (4xx/5xx) and a human-readable message.
///
/// Sent back as `{"error": message}`. A status outside 400..=599 is sent as 500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// Explanation for the client.
    pub message: String,
}

impl ApiError {
    /// An error with an arbitrary status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// `400 Bad Request`: the request cannot be carried out as asked.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// `409 Conflict`: the request does not fit the VM's current state (e.g. already paused).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// `500 Internal Server Error`: the VMM failed while carrying out the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// The main thread's answer to an [`ApiRequest`] (`Ok(Value::Null)` means `204 No Content`).
pub type ApiReply = Result<serde_json::Value, ApiError>;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Neither a TCP port nor a unix socket path was given.
    #[error("no API endpoint requested (give a port and/or a socket path)")]
    NoEndpoint,
    /// Binding `127.0.0.1:<port>` failed.
    #[error("cannot listen on 127.0.0.1:{port}")]
    BindTcp {
        /// Requested port.
        port: u16,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Binding the unix socket (`listen on unix socket`), or inspecting, removing,
    /// renaming or chmod-ing its file (`prepare unix socket file`) failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Another live process is serving on the socket path.
    #[error("unix socket {} is in use by another process", .0.display())]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket; it is left alone.
    #[error("{} exists and is not a unix socket", .0.display())]
    NotASocket(PathBuf),
    /// Creating an event fd failed.
    #[error("cannot create event fd")]
    EventFd(#[source] io::Error),
    /// Configuring a listener or spawning its accept thread failed.
    #[error("cannot start API thread")]
    Thread(#[source] io::Error),
}

/// Tunables of the API server. [`ApiServerConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerConfig {
    /// TCP port on 127.0.0.1 (`Some(0)` picks a free port; see [`ApiServerHandle::tcp_addr`]).
    pub port: Option<u16>,
    /// Unix socket path.
    pub sock: Option<PathBuf>,
    /// How long to wait for the main thread's answer before replying 504 (default 30 s).
    pub reply_timeout: Duration,
    /// Same for `PUT /snapshot/create`, which may legitimately take long (default 10 min).
    pub snapshot_reply_timeout: Duration,
    /// Time allowed to receive a whole request once its first byte arrived (default 10 s).
    pub request_timeout: Duration,
    /// How long an idle keep-alive connection is kept open (default 60 s).
    pub idle_timeout: Duration,
    /// Time allowed to write a response (default 10 s).
    pub write_timeout: Duration,
    /// Maximum number of connections served at once (default 16). At the limit a new
    /// connection replaces the longest-idle one; it gets 503 only when every one of them has
    /// a request in progress.
    pub max_connections: usize,
    /// Maximum request body size; larger bodies get 413 (default 64 KiB).
    pub max_body: usize,
}

impl ApiServerConfig {
    /// Defaults for the given endpoints.
    pub fn new(port: Option<u16>, sock: Option<&Path>) -> Self {
        ApiServerConfig {
            port,
            sock: sock.map(Path::to_path_buf),
            reply_timeout: Duration::from_secs(30),
            snapshot_reply_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            max_connections: 16,
            max_body: 64 * 1024,
        }
    }
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self::new(None, None)
    }
}

/// The main thread's end of the API: queued requests plus a wake-up event fd.
#[derive(Debug)]
pub struct ApiChannel {
    rx: Receiver<(ApiRequest, Sender<ApiReply>)>,
    wake: EventFd,
}

impl ApiChannel {
    /// Non-blocking event fd written by the server after queueing each request; register it
    /// with the main loop's epoll, `read()` it when readable, then drain with [`Self::try_recv`].
    pub fn eventfd(&self) -> &EventFd {
        &self.wake
    }

    /// Takes the next queued request and the sender its reply must go to, if any.
    pub fn try_recv(&self) -> Option<(ApiRequest, Sender<ApiReply>)> {
        self.rx.try_recv().ok()
    }
}

/// Identity of the unix socket file we created, so we only ever remove our own.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}
