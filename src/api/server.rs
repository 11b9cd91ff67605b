//! The server: [`start`] and its [`ApiServerHandle`], listeners, accept threads,
//! per-connection threads and routing.

use std::collections::HashMap;
use std::fs;
use std::io::{self, ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use serde::de::DeserializeOwned;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::http::{Conn, Head, ReadError, Response, Stream};
use super::{
    ActionRequest, ActionType, ApiChannel, ApiReply, ApiRequest, ApiServerConfig, ApiServerError,
    SnapshotCreateRequest, SocketFile, VmStatePatch,
};
use crate::util::IoError;

/// Owns the server threads. Dropping it (or calling [`Self::shutdown`]) stops accepting,
/// closes open connections, fails in-flight requests with 503 and removes the socket file.
#[derive(Debug)]
pub struct ApiServerHandle {
    shared: Arc<Shared>,
    stop_evt: EventFd,
    stop_tx: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    tcp_addr: Option<SocketAddr>,
    socket_file: Option<SocketFile>,
}

impl ApiServerHandle {
    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The unix socket path, if serving on one.
    pub fn unix_path(&self) -> Option<&Path> {
        self.socket_file.as_ref().map(|s| s.path.as_path())
    }

    /// Stops the server (same as dropping the handle).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.stop_tx.is_none() {
            return;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Disconnecting the stop channel wakes connection threads waiting for a reply.
        self.stop_tx = None;
        if let Err(e) = self.stop_evt.write(1) {
            log::error!("api: cannot signal accept threads to stop: {e}");
        }
        self.shared.close_all_connections();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(file) = self.socket_file.take() {
            remove_socket_file(&file);
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the API server with default tunables; see [`start_with_config`].
pub fn start(
    port: Option<u16>,
    sock: Option<&Path>,
) -> Result<(ApiServerHandle, ApiChannel), ApiServerError> {
    start_with_config(ApiServerConfig::new(port, sock))
}

/// Binds `127.0.0.1:port` and/or the unix socket (a stale socket file is replaced; the new
/// one has mode 0600) and spawns the accept threads `api-tcp` / `api-unix`.
pub fn start_with_config(
    config: ApiServerConfig,
) -> Result<(ApiServerHandle, ApiChannel), ApiServerError> {
    start_server(config)
}

/// How long a closing connection's unread input is drained.
const LINGER_TIME: Duration = Duration::from_secs(1);
/// How many bytes of unread input are drained at most before closing.
const LINGER_BYTES: usize = 1024 * 1024;

/// One open connection, as the server tracks it.
#[derive(Debug)]
struct ConnEntry {
    /// A clone of the connection's socket, to wake (shut) its thread.
    stream: Stream,
    /// Since when the connection has been waiting for a new request with nothing received;
    /// `None` while a request is being read, handled or answered.
    idle_since: Option<Instant>,
    /// Closed to make room for a new client; no longer counted against the limit.
    evicted: bool,
}

/// State shared by the handle, the accept threads and the connection threads.
#[derive(Debug)]
pub(crate) struct Shared {
    config: ApiServerConfig,
    tx: Sender<(ApiRequest, Sender<ApiReply>)>,
    wake: EventFd,
    /// Never sent on; disconnected when the server stops.
    stop_rx: Receiver<()>,
    pub(crate) stopping: AtomicBool,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shuts down the read side of every open connection so their threads finish promptly
    /// (a thread waiting for a reply answers 503 first, see [`forward`]).
    pub(crate) fn close_all_connections(&self) {
        for c in self.conns().values() {
            c.stream.shutdown_read();
        }
    }

    /// Records whether connection `id` is idle (waiting for a request, nothing received);
    /// a connection already idle keeps the moment it became so.
    fn set_idle(&self, id: u64, idle: bool) {
        if let Some(c) = self.conns().get_mut(&id) {
            if !idle {
                c.idle_since = None;
            } else if c.idle_since.is_none() {
                c.idle_since = Some(Instant::now());
            }
        }
    }
}

/// Makes room for one more connection in `conns` (held locked by the caller): true when
/// fewer than `max` connections count, or when the longest-idle one could be closed for the
/// newcomer. Connections with a request in progress are never closed; only when every
/// counted connection is busy is the newcomer refused (503).
///
/// Closing an idle keep-alive connection is always allowed in HTTP/1.1 (clients reopen);
/// nginx does the same when it runs out of connections.
fn make_room(conns: &mut HashMap<u64, ConnEntry>, max: usize) -> bool {
    let counted = conns.values().filter(|c| !c.evicted).count();
    if counted < max {
        return true;
    }
    let oldest = conns
        .iter_mut()
        .filter(|(_, c)| !c.evicted)
        .filter_map(|(id, c)| c.idle_since.map(|t| (t, *id, c)))
        .min_by_key(|(t, id, _)| (*t, *id));
    match oldest {
        Some((since, id, c)) => {
            log::debug!(
                "api: closing connection {id}, idle for {} ms, to serve a new client",
                since.elapsed().as_millis()
            );
            c.evicted = true;
            c.idle_since = None;
            // Its thread, blocked waiting for a request, sees end of input and closes it.
            c.stream.shutdown_read();
            true
        }
        None => false,
    }
}

/// Unregisters a connection when its thread ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => Stream::Tcp(l.accept()?.0),
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

fn start_server(config: ApiServerConfig) -> Result<(ApiServerHandle, ApiChannel), ApiServerError> {
    if config.port.is_none() && config.sock.is_none() {
        return Err(ApiServerError::NoEndpoint);
    }
    let wake = EventFd::new(EFD_NONBLOCK).map_err(ApiServerError::EventFd)?;
    let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(ApiServerError::EventFd)?;
    let channel_wake = wake.try_clone().map_err(ApiServerError::EventFd)?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);

    let mut listeners = Vec::new();
    let mut tcp_addr = None;
    if let Some(port) = config.port {
        let bind_err = |source| ApiServerError::BindTcp { port, source };
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(bind_err)?;
        l.set_nonblocking(true).map_err(bind_err)?;
        tcp_addr = Some(l.local_addr().map_err(bind_err)?);
        listeners.push(("api-tcp", Listener::Tcp(l)));
    }
    let mut socket_file = None;
    if let Some(path) = &config.sock {
        let (l, file) = bind_unix(path)?;
        socket_file = Some(file);
        listeners.push(("api-unix", Listener::Unix(l)));
    }

    let shared = Arc::new(Shared {
        config,
        tx,
        wake,
        stop_rx,
        stopping: AtomicBool::new(false),
        conns: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
    });
    // From here on, dropping `handle` cleans up (threads, socket file) on any error.
    let mut handle = ApiServerHandle {
        shared: shared.clone(),
        stop_evt,
        stop_tx: Some(stop_tx),
        threads: Vec::new(),
        tcp_addr,
        socket_file,
    };
    for (name, listener) in listeners {
        let shared = shared.clone();
        let stop = handle
            .stop_evt
            .try_clone()
            .map_err(ApiServerError::EventFd)?;
        let t = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || accept_loop(&listener, &shared, &stop))
            .map_err(ApiServerError::Thread)?;
        handle.threads.push(t);
    }
    let channel = ApiChannel {
        rx,
        wake: channel_wake,
    };
    Ok((handle, channel))
}

/// Binds the unix socket: a stale socket file is removed (a live one is an error), the new
/// socket is bound under a temporary name, chmod-ed to 0600 and renamed into place, so it is
/// never reachable with looser permissions.
fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ApiServerError> {
    let file_err =
        |source| ApiServerError::from(IoError::new("prepare unix socket file", path, source));
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiServerError::SocketInUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(file_err)?;
        }
        Ok(_) => return Err(ApiServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(file_err(e)),
    }
    let bind_err =
        |source| ApiServerError::from(IoError::new("listen on unix socket", path, source));
    let tmp = temp_socket_path(path);
    let listener = match tmp.as_deref() {
        Some(tmp) => {
            let _ = fs::remove_file(tmp);
            let l = UnixListener::bind(tmp).map_err(bind_err)?;
            let placed = fs::set_permissions(tmp, fs::Permissions::from_mode(0o600))
                .and_then(|()| fs::rename(tmp, path));
            if let Err(e) = placed {
                let _ = fs::remove_file(tmp);
                return Err(file_err(e));
            }
            l
        }
        None => {
            let l = UnixListener::bind(path).map_err(bind_err)?;
            if let Err(e) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
                let _ = fs::remove_file(path);
                return Err(file_err(e));
            }
            l
        }
    };
    set_listener_nonblocking(&listener, path)?;
    let md = fs::symlink_metadata(path).map_err(file_err)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: md.dev(),
        ino: md.ino(),
    };
    Ok((listener, file))
}

fn set_listener_nonblocking(l: &UnixListener, path: &Path) -> Result<(), ApiServerError> {
    l.set_nonblocking(true).map_err(|source| {
        let _ = fs::remove_file(path);
        IoError::new("listen on unix socket", path, source).into()
    })
}

/// A sibling temporary name for binding, if it fits in `sun_path` (108 bytes).
fn temp_socket_path(path: &Path) -> Option<PathBuf> {
    let name = format!(".vmm-api-{}.tmp", std::process::id());
    let tmp = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(name),
        _ => PathBuf::from(name),
    };
    (tmp.as_os_str().len() < 108).then_some(tmp)
}

/// Removes the socket file if it is still the one we created.
pub(crate) fn remove_socket_file(file: &SocketFile) {
    match fs::symlink_metadata(&file.path) {
        Ok(md) if md.dev() == file.dev && md.ino() == file.ino => {
            if let Err(e) = fs::remove_file(&file.path) {
                log::warn!("api: cannot remove {}: {e}", file.path.display());
            }
        }
        _ => {}
    }
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>, stop: &EventFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid, writable array of 2 pollfd structs that outlives the call,
        // and both fds stay open for its duration (owned by `listener` and `stop`).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                log::error!("api: poll failed: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        if fds[1].revents != 0 || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        loop {
            match listener.accept() {
                Ok(stream) => spawn_connection(shared, stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    log::warn!("api: accept failed: {e}");
                    thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: Stream) {
    let cfg = &shared.config;
    let configured = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(cfg.write_timeout)));
    if let Err(e) = configured {
        log::warn!("api: cannot configure connection: {e}");
        return;
    }
    let clone = match stream.try_clone() {
        Ok(clone) => clone,
        Err(e) => {
            log::warn!("api: cannot track connection: {e}");
            return;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    // Admitted and registered under the lock with the `stopping` check, so `stop()` cannot
    // miss it. A new connection counts as idle until its first byte arrives.
    let admitted = {
        let mut conns = shared.conns();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let room = make_room(&mut conns, cfg.max_connections);
        if room {
            conns.insert(
                id,
                ConnEntry {
                    stream: clone,
                    idle_since: Some(Instant::now()),
                    evicted: false,
                },
            );
        }
        room
    };
    if !admitted {
        let mut stream = stream;
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let resp = Response::error(
            503,
            "too many API requests in progress at once; retry later",
        );
        let _ = resp.write_to(&mut stream, false);
        return;
    }
    let guard = ConnGuard {
        shared: shared.clone(),
        id,
    };
    let spawned = thread::Builder::new()
        .name("api-conn".to_string())
        .spawn(move || {
            let guard = guard;
            serve_connection(&guard.shared, guard.id, Conn::new(stream));
        });
    if let Err(e) = spawned {
        log::warn!("api: cannot spawn connection thread: {e}");
    }
}

/// Serves requests on one connection until it closes, idles out, is closed to make room
/// for a new client, or the server stops.
fn serve_connection(shared: &Shared, id: u64, mut conn: Conn) {
    let cfg = &shared.config;
    while !shared.stopping.load(Ordering::SeqCst) {
        // Idle (closable for a newcomer) until the first byte of the next request arrives.
        shared.set_idle(id, !conn.has_buffered());
        if !conn.wait_for_input(cfg.idle_timeout) {
            return;
        }
        shared.set_idle(id, false);
        if shared.conns().get(&id).is_none_or(|c| c.evicted) {
            // Closed for a newcomer just as input arrived: the input may be cut, so end
            // here as an idle timeout would (the client sees the connection closed).
            return;
        }
        let (head, deadline) = match conn.read_head(cfg.idle_timeout, cfg.request_timeout) {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Http(e)) => {
                return respond_and_close(&mut conn, &Response::from_http_error(&e));
            }
        };
        let len = match head.body_len(cfg.max_body) {
            Ok(len) => len,
            Err(e) => return respond_and_close(&mut conn, &Response::from_http_error(&e)),
        };
        if len > 0 && head.expects_continue() {
            use std::io::Write;
            if conn
                .stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .is_err()
            {
                return;
            }
        }
        let body = match conn.read_body(len, deadline) {
            Ok(b) => b,
            Err(ReadError::Gone) => return,
            Err(ReadError::Http(e)) => {
                return respond_and_close(&mut conn, &Response::from_http_error(&e));
            }
        };
        let response = match parse_request(&head, &body) {
            Ok(req) => forward(shared, req),
            Err(resp) => resp,
        };
        let keep_alive =
            head.keep_alive() && !response.close && !shared.stopping.load(Ordering::SeqCst);
        if !keep_alive {
            return respond_and_close(&mut conn, &response);
        }
        if response.write_to(&mut conn.stream, true).is_err() {
            return;
        }
    }
}

/// Writes a final response, then closes gracefully: the write side is shut and unread
/// input is drained for a moment, so the kernel does not reset the connection (which could
/// discard the response) because of bytes the client already sent.
fn respond_and_close(conn: &mut Conn, response: &Response) {
    if response.write_to(&mut conn.stream, false).is_err() {
        return;
    }
    conn.stream.shutdown_write();
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0usize;
    let mut sink = [0u8; 4096];
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.stream.read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Methods allowed on each known path.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/vm" => Some("GET, PATCH"),
        "/snapshot/create" | "/actions" => Some("PUT"),
        _ => None,
    }
}

/// Maps a complete request to an [`ApiRequest`], or to the error response the server sends.
pub(crate) fn parse_request(head: &Head, body: &[u8]) -> Result<ApiRequest, Response> {
    let Some(allow) = allowed(&head.path) else {
        return Err(Response::error(
            404,
            &format!("no such endpoint: {}", head.path),
        ));
    };
    match (head.path.as_str(), head.method.as_str()) {
        ("/vm", "GET") => Ok(ApiRequest::GetVm),
        ("/vm", "PATCH") => Ok(ApiRequest::SetState(
            json_body::<VmStatePatch>(head, body)?.state,
        )),
        ("/snapshot/create", "PUT") => {
            let req: SnapshotCreateRequest = json_body(head, body)?;
            match (req.path.as_os_str().is_empty(), &req.repo) {
                (true, None) => {
                    let given = serde_json::from_slice::<serde_json::Value>(body)
                        .is_ok_and(|v| v.get("path").is_some());
                    return Err(Response::error(
                        400,
                        if given {
                            "`path` must not be empty"
                        } else {
                            "invalid request body: missing field `path` (or `repo`)"
                        },
                    ));
                }
                (false, Some(_)) => {
                    return Err(Response::error(400, "give `path` or `repo`, not both"));
                }
                (true, Some(r)) if r.as_os_str().is_empty() => {
                    return Err(Response::error(400, "`repo` must not be empty"));
                }
                _ => {}
            }
            if req.repo.is_some() && req.store.is_some() {
                return Err(Response::error(
                    400,
                    "`store` cannot be used with `repo` (the repository is the store)",
                ));
            }
            if req.name.is_some() && req.repo.is_none() {
                return Err(Response::error(400, "`name` needs `repo`"));
            }
            if req.store.as_ref().is_some_and(|s| s.as_os_str().is_empty()) {
                return Err(Response::error(400, "`store` must not be empty"));
            }
            if req.parent.as_ref().is_some_and(String::is_empty) {
                return Err(Response::error(400, "`parent` must not be empty"));
            }
            Ok(ApiRequest::CreateSnapshot(req))
        }
        ("/actions", "PUT") => match json_body::<ActionRequest>(head, body)?.action {
            ActionType::Shutdown => Ok(ApiRequest::Shutdown),
        },
        (path, method) => Err(Response {
            allow: Some(allow),
            ..Response::error(
                405,
                &format!("method {method} not allowed on {path} (allowed: {allow})"),
            )
        }),
    }
}

/// Decodes a required JSON body.
fn json_body<T: DeserializeOwned>(head: &Head, body: &[u8]) -> Result<T, Response> {
    if !head.has_content_length() {
        return Err(Response {
            close: true,
            ..Response::error(411, "a JSON body with a Content-Length header is required")
        });
    }
    if body.is_empty() {
        return Err(Response::error(
            400,
            "empty request body; a JSON object is required",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = match e.classify() {
            serde_json::error::Category::Data => format!("invalid request body: {e}"),
            _ => format!("malformed JSON body: {e}"),
        };
        Response::error(400, &msg)
    })
}

/// Hands `req` to the main thread and waits for its answer.
fn forward(shared: &Shared, req: ApiRequest) -> Response {
    if shared.stopping.load(Ordering::SeqCst) {
        return Response::error(503, "the API server is shutting down");
    }
    let timeout = match req {
        ApiRequest::CreateSnapshot(_) => shared.config.snapshot_reply_timeout,
        _ => shared.config.reply_timeout,
    };
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    if shared.tx.send((req, reply_tx)).is_err() {
        return Response::error(503, "the VMM is no longer accepting requests");
    }
    if let Err(e) = shared.wake.write(1) {
        log::error!("api: cannot wake the main thread: {e}");
    }
    select! {
        recv(reply_rx) -> reply => match reply {
            Ok(Ok(value)) => Response::ok(&value),
            Ok(Err(e)) => Response::error(e.status, &e.message),
            Err(_) => Response::error(503, "the VMM dropped the request without answering"),
        },
        recv(shared.stop_rx) -> _ => Response {
            close: true,
            ..Response::error(503, "the API server is shutting down")
        },
        default(timeout) => Response::error(
            504,
            &format!("the VMM did not answer within {} ms", timeout.as_millis()),
        ),
    }
}
