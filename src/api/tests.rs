//! End-to-end tests: a real server on an ephemeral port / a unix socket and a fake main thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::testutil::TempDir;

use super::client::read_response;
use super::*;

/// A stand-in for the VMM main thread: waits on the event fd, answers with `answer`, and
/// records every request it saw.
struct FakeVmm {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
    thread: Option<JoinHandle<ApiChannel>>,
}

impl FakeVmm {
    fn new(channel: ApiChannel, answer: fn(&ApiRequest) -> ApiReply) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let mut pfd = libc::pollfd {
                    fd: channel.eventfd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `pfd` is a valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 20) };
                let _ = channel.eventfd().read();
                while let Some((req, reply)) = channel.try_recv() {
                    seen2.lock().unwrap().push(req.clone());
                    let _ = reply.send(answer(&req));
                }
            }
            channel
        });
        FakeVmm {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<ApiRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(req: &ApiRequest) -> ApiReply {
    match req {
        ApiRequest::GetVm => Ok(json!({"state": "Running", "config": {"vcpus": 1}})),
        ApiRequest::SetState(_) | ApiRequest::Shutdown => Ok(Value::Null),
        ApiRequest::CreateSnapshot(s) => Ok(json!({"path": s.path})),
    }
}

fn tcp_server(tweak: impl FnOnce(&mut ApiServerConfig)) -> (ApiServerHandle, FakeVmm, ApiTarget) {
    let mut cfg = ApiServerConfig::new(Some(0), None);
    tweak(&mut cfg);
    let (handle, channel) = start_with_config(cfg).unwrap();
    let port = handle.tcp_addr().unwrap().port();
    (handle, FakeVmm::new(channel, answer), ApiTarget::Tcp(port))
}

fn addr(t: &ApiTarget) -> SocketAddr {
    match t {
        ApiTarget::Tcp(port) => SocketAddr::from(([127, 0, 0, 1], *port)),
        ApiTarget::Unix(_) => unreachable!(),
    }
}

fn connect(t: &ApiTarget) -> TcpStream {
    let s = TcpStream::connect(addr(t)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends raw bytes and returns everything the server sends until it closes.
fn raw(t: &ApiTarget, data: &[u8]) -> String {
    let mut s = connect(t);
    let _ = s.write_all(data);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
    v["error"].as_str().unwrap().to_string()
}

#[test]
fn routes_happy_path_over_tcp() {
    let (handle, vmm, t) = tcp_server(|_| {});
    assert_eq!(handle.tcp_addr().unwrap().ip().to_string(), "127.0.0.1");

    let (status, body) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "Running");

    let (status, body) = request(&t, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).unwrap();
    assert_eq!((status, body.as_str()), (204, ""));
    let (status, _) = request(&t, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)).unwrap();
    assert_eq!(status, 204);

    let snap = r#"{"path":"/tmp/snap1","store":"/tmp/store","parent":"snap0"}"#;
    let (status, body) = request(&t, "PUT", "/snapshot/create?x=1", Some(snap)).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["path"],
        "/tmp/snap1"
    );
    let (status, _) = request(&t, "PUT", "/snapshot/create", Some(r#"{"path":"s"}"#)).unwrap();
    assert_eq!(status, 200);

    let (status, _) = request(&t, "PUT", "/actions", Some(r#"{"action":"Shutdown"}"#)).unwrap();
    assert_eq!(status, 204);

    assert_eq!(
        vmm.seen(),
        vec![
            ApiRequest::GetVm,
            ApiRequest::SetState(VmStateRequest::Paused),
            ApiRequest::SetState(VmStateRequest::Resumed),
            ApiRequest::CreateSnapshot(SnapshotCreateRequest {
                path: "/tmp/snap1".into(),
                store: Some("/tmp/store".into()),
                parent: Some("snap0".into()),
                repo: None,
                name: None,
            }),
            ApiRequest::CreateSnapshot(SnapshotCreateRequest {
                path: "s".into(),
                store: None,
                parent: None,
                repo: None,
                name: None,
            }),
            ApiRequest::Shutdown,
        ]
    );
}

#[test]
fn main_thread_errors_are_forwarded() {
    let (handle, channel) = start_with_config(ApiServerConfig::new(Some(0), None)).unwrap();
    let t = ApiTarget::Tcp(handle.tcp_addr().unwrap().port());
    let _vmm = FakeVmm::new(channel, |_| Err(ApiError::conflict("already paused")));
    let (status, body) = request(&t, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#)).unwrap();
    assert_eq!(status, 409);
    assert_eq!(error_of(&body), "already paused");
}

#[test]
fn server_side_errors_never_reach_the_vmm() {
    let (_handle, vmm, t) = tcp_server(|_| {});
    let big = format!(r#"{{"path":"{}"}}"#, "x".repeat(70 * 1024));
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("PATCH", "/vm", Some(r#"{"state":"#), 400, "malformed JSON"),
        ("PATCH", "/vm", Some("not json"), 400, "malformed JSON"),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state":"Paused","x":1}"#),
            400,
            "unknown field `x`",
        ),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state":"Running"}"#),
            400,
            "unknown variant",
        ),
        ("PATCH", "/vm", Some(""), 400, "empty request body"),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"path":"a","bogus":true}"#),
            400,
            "unknown field",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"store":"a"}"#),
            400,
            "missing field `path`",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"path":""}"#),
            400,
            "must not be empty",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"path":"p","repo":"r"}"#),
            400,
            "not both",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"repo":"r","store":"s"}"#),
            400,
            "cannot be used with `repo`",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"path":"p","name":"n"}"#),
            400,
            "`name` needs `repo`",
        ),
        ("PUT", "/snapshot/create", Some(&big), 413, "exceeds"),
        (
            "PUT",
            "/actions",
            Some(r#"{"action":"Reboot"}"#),
            400,
            "unknown variant `Reboot`",
        ),
        ("DELETE", "/vm", None, 405, "not allowed"),
        ("GET", "/actions", None, 405, "not allowed"),
        ("POST", "/snapshot/create", Some("{}"), 405, "not allowed"),
        ("GET", "/", None, 404, "no such endpoint"),
        ("GET", "/vm/", None, 404, "no such endpoint"),
        ("PUT", "/snapshot/load", Some("{}"), 404, "no such endpoint"),
        ("PATCH", "/vm", None, 411, "Content-Length"),
    ];
    for (method, path, body, want, msg) in cases {
        let (status, resp) = request(&t, method, path, *body).unwrap();
        assert_eq!(status, *want, "{method} {path}: {resp}");
        let err = error_of(&resp);
        assert!(err.contains(msg), "{method} {path}: {err:?} lacks {msg:?}");
    }
    // The exact message shown in docs/API.md.
    let (_, resp) = request(&t, "PATCH", "/vm", Some(r#"{"state":"Paused","now":true}"#)).unwrap();
    assert_eq!(
        resp,
        r#"{"error":"invalid request body: unknown field `now`, expected `state` at line 1 column 23"}"#
    );
    // 405 carries Allow.
    let resp = raw(&t, b"DELETE /vm HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 405 "), "{resp}");
    assert!(resp.contains("\r\nAllow: GET, PATCH\r\n"), "{resp}");
    // Chunked bodies are refused.
    let resp = raw(
        &t,
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 411 "), "{resp}");
    assert!(vmm.seen().is_empty(), "{:?}", vmm.seen());
}

#[test]
fn garbage_and_hostile_input() {
    let (_handle, vmm, t) = tcp_server(|c| c.request_timeout = Duration::from_millis(300));
    let resp = raw(&t, b"\x00\x01\x02\xff\xfe garbage\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert!(error_of(resp.split("\r\n\r\n").nth(1).unwrap()).contains("UTF-8"));
    let resp = raw(&t, b"hello there\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    let resp = raw(&t, b"GET /vm HTTP/9.9\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 505 "), "{resp}");
    // Endless header without a blank line.
    let resp = raw(&t, &[b'A'; 20 * 1024]);
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
    let resp = raw(&t, b"PUT /actions HTTP/1.1\r\nContent-Length: -5\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    // A client that starts a request and goes silent gets 408 and is disconnected.
    let started = Instant::now();
    let resp = raw(&t, b"GET /vm HTTP/1.1\r\nHost: x");
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Same for a body that never comes.
    let resp = raw(
        &t,
        b"PUT /actions HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"act",
    );
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    // The server is still fine.
    assert_eq!(request(&t, "GET", "/vm", None).unwrap().0, 200);
    assert_eq!(vmm.seen(), vec![ApiRequest::GetVm]);
}

#[test]
fn client_closing_mid_request() {
    let (_handle, vmm, t) = tcp_server(|_| {});
    for partial in [
        &b"GET /vm HTT"[..],
        b"PUT /actions HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"act",
        b"",
    ] {
        let mut s = connect(&t);
        s.write_all(partial).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
    assert_eq!(request(&t, "GET", "/vm", None).unwrap().0, 200);
    assert_eq!(vmm.seen(), vec![ApiRequest::GetVm]);
}

#[test]
fn keep_alive_and_connection_close() {
    let (_handle, vmm, t) = tcp_server(|_| {});
    let mut s = connect(&t);
    s.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 200);
    s.write_all(b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 404);
    s.write_all(b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    s.write_all(br#"{"state":"Paused"}"#).unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 204);
    s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 200);
    // The server closed its end.
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(vmm.seen().len(), 3);

    // Two pipelined requests in one write.
    let mut s = connect(&t);
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
}

#[test]
fn idle_connections_are_closed() {
    let (_handle, _vmm, t) = tcp_server(|c| c.idle_timeout = Duration::from_millis(200));
    let mut s = connect(&t);
    let mut out = Vec::new();
    assert_eq!(s.read_to_end(&mut out).unwrap(), 0);
}

#[test]
fn gateway_timeout_and_gone_main_thread() {
    let mut cfg = ApiServerConfig::new(Some(0), None);
    cfg.reply_timeout = Duration::from_millis(200);
    let (handle, channel) = start_with_config(cfg).unwrap();
    let t = ApiTarget::Tcp(handle.tcp_addr().unwrap().port());
    // Nobody answers.
    let (status, body) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 504, "{body}");
    assert!(error_of(&body).contains("did not answer"));
    // The request was queued and the event fd signalled.
    assert_eq!(channel.eventfd().read().unwrap(), 1);
    assert!(matches!(channel.try_recv(), Some((ApiRequest::GetVm, _))));
    // The main thread has gone.
    drop(channel);
    let (status, body) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 503, "{body}");
}

#[test]
fn request_dropped_without_answer_is_503() {
    let (handle, channel) = start_with_config(ApiServerConfig::new(Some(0), None)).unwrap();
    let t = ApiTarget::Tcp(handle.tcp_addr().unwrap().port());
    let dropper = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some((_req, reply)) = channel.try_recv() {
                drop(reply);
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    });
    let (status, body) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(error_of(&body).contains("without answering"));
    dropper.join().unwrap();
    drop(handle);
    // After the server stops the port is closed.
    assert!(matches!(
        request(&t, "GET", "/vm", None),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn shutdown_fails_in_flight_requests() {
    let (handle, channel) = start_with_config(ApiServerConfig::new(Some(0), None)).unwrap();
    let t = ApiTarget::Tcp(handle.tcp_addr().unwrap().port());
    let client = thread::spawn(move || request(&t, "GET", "/vm", None));
    let deadline = Instant::now() + Duration::from_secs(10);
    while channel.eventfd().read().is_err() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    handle.shutdown();
    assert!(started.elapsed() < Duration::from_secs(30));
    match client.join().unwrap() {
        Ok((status, _)) => assert_eq!(status, 503),
        Err(e) => panic!("{e}"),
    }
}

/// At the connection limit a new client is served: the longest-idle connection is closed
/// for it, the other idle one stays usable.
#[test]
fn idle_connections_make_room_for_new_clients() {
    let (_handle, _vmm, t) = tcp_server(|c| c.max_connections = 2);
    // The server accepts connections in the order they arrive, so `oldest` is registered
    // (idle since) before `kept`, and both before the request's connection.
    let mut oldest = connect(&t);
    let mut kept = connect(&t);
    let (status, body) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let mut out = Vec::new();
    assert_eq!(
        oldest.read_to_end(&mut out).unwrap(),
        0,
        "the longest-idle connection was not closed"
    );
    kept.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut kept).unwrap().0, 200);
    // 50 more idle connections, then a request: still served.
    let idle: Vec<TcpStream> = (0..50).map(|_| connect(&t)).collect();
    let (status, _) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 200);
    drop(idle);
}

/// Connections with a request in progress are never closed for a newcomer: with every slot
/// busy the newcomer gets 503, and is served once a slot frees.
#[test]
fn busy_connections_are_kept_and_newcomers_get_503() {
    let mut cfg = ApiServerConfig::new(Some(0), None);
    cfg.max_connections = 2;
    let (handle, channel) = start_with_config(cfg).unwrap();
    let t = ApiTarget::Tcp(handle.tcp_addr().unwrap().port());
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let t = t.clone();
            thread::spawn(move || request(&t, "GET", "/vm", None))
        })
        .collect();
    // Both requests reach the (not yet answering) main thread.
    let mut pending = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending.len() < 2 {
        assert!(Instant::now() < deadline, "requests never arrived");
        match channel.try_recv() {
            Some(p) => pending.push(p),
            None => thread::sleep(Duration::from_millis(5)),
        }
    }
    let resp = raw(&t, b"GET /vm HTTP/1.1\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    for (_, reply) in pending {
        reply.send(answer(&ApiRequest::GetVm)).unwrap();
    }
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap().0, 200);
    }
    let _vmm = FakeVmm::new(channel, answer);
    assert_eq!(request(&t, "GET", "/vm", None).unwrap().0, 200);
}

#[test]
fn unix_socket_server() {
    let dir = TempDir::new("api");
    let sock = dir.path().join("api.sock");
    // A stale socket file left by a dead VMM is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (handle, channel) = start(None, Some(&sock)).unwrap();
    let vmm = FakeVmm::new(channel, answer);
    assert_eq!(handle.unix_path(), Some(sock.as_path()));
    assert!(handle.tcp_addr().is_none());
    let md = std::fs::symlink_metadata(&sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp socket left behind"
    );

    let t = ApiTarget::Unix(sock.clone());
    let (status, body) = request(&t, "GET", "/vm", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = request(&t, "PUT", "/actions", Some(r#"{"action":"Shutdown"}"#)).unwrap();
    assert_eq!(status, 204);
    let (status, _) = request(&t, "PUT", "/actions", Some("{")).unwrap();
    assert_eq!(status, 400);
    // Keep-alive over the unix socket too.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 200);
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().0, 200);
    assert_eq!(
        vmm.seen(),
        vec![
            ApiRequest::GetVm,
            ApiRequest::Shutdown,
            ApiRequest::GetVm,
            ApiRequest::GetVm
        ]
    );

    // A live server's socket is not stolen; a regular file is not deleted.
    assert!(matches!(
        start(None, Some(&sock)),
        Err(ApiServerError::SocketInUse(_))
    ));
    let file = dir.path().join("file");
    std::fs::write(&file, b"data").unwrap();
    assert!(matches!(
        start(None, Some(&file)),
        Err(ApiServerError::NotASocket(_))
    ));
    assert!(file.exists());

    drop(s);
    drop(handle);
    assert!(!sock.exists(), "socket file not removed on drop");
}

#[test]
fn both_endpoints_and_no_endpoint() {
    assert!(matches!(start(None, None), Err(ApiServerError::NoEndpoint)));
    let dir = TempDir::new("api");
    let sock = dir.path().join("both.sock");
    let (handle, channel) = start(Some(0), Some(&sock)).unwrap();
    let _vmm = FakeVmm::new(channel, answer);
    let tcp = ApiTarget::Tcp(handle.tcp_addr().unwrap().port());
    assert_eq!(request(&tcp, "GET", "/vm", None).unwrap().0, 200);
    assert_eq!(
        request(&ApiTarget::Unix(sock), "GET", "/vm", None)
            .unwrap()
            .0,
        200
    );
}
