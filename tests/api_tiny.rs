//! The control API against a running VM (the tiny test guest): states, errors that leave
//! the VM untouched, snapshot creation, shutdown.

mod support;

use std::time::{Duration, Instant};

use vmm::api::{self, ApiTarget};
use vmm::vstate::exit::ExitReason;

use support::env::temp_dir;
use support::tiny;
use support::tiny::{Scenario, Spec};

fn call(t: &ApiTarget, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) = api::request(t, method, path, body).expect("API request");
    let v = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
    };
    (status, v)
}

#[test]
fn api_drives_pause_snapshot_resume_shutdown() {
    if !support::env::kvm_or_skip() {
        println!("SKIP: no KVM");
        return;
    }
    let tmp = temp_dir("api");
    let sock = tmp.join("api.sock");
    let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new()).expect("boot");
    vm.wait_for(Instant::now() + Duration::from_secs(120), "dirty: ready\n")
        .expect("guest ready");
    let (server, chan) = api::start(None, Some(&sock)).expect("API server");
    vm.vmm.attach_api(chan).expect("attach API");
    let mut vmm = vm.vmm;
    let runner = std::thread::spawn(move || {
        let r = vmm.run();
        (r.map_err(|e| e.to_string()), vmm.machine.state)
    });
    let t = ApiTarget::Unix(sock.clone());

    let (s, v) = call(&t, "GET", "/vm", None);
    assert_eq!((s, v["state"].as_str()), (200, Some("Running")), "{v}");
    let snap = tmp.join("snap");
    let body = serde_json::json!({ "path": snap }).to_string();
    let (s, v) = call(&t, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(s, 409, "snapshot of a running VM: {v}");
    assert!(v["error"].as_str().unwrap().contains("paused"), "{v}");
    assert!(!snap.join("state").exists());

    for bad in [
        r#"{"state":"Paused""#,
        r#"{"state":"Paused","x":1}"#,
        r#"{"state":"Bogus"}"#,
    ] {
        let (s, v) = call(&t, "PATCH", "/vm", Some(bad));
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    let (s, v) = call(&t, "GET", "/vm", None);
    assert_eq!(
        (s, v["state"].as_str()),
        (200, Some("Running")),
        "untouched: {v}"
    );

    let (s, _) = call(&t, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(s, 204);
    let (s, v) = call(&t, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(s, 409, "pausing a paused VM: {v}");
    let (s, v) = call(&t, "GET", "/vm", None);
    assert_eq!(v["state"].as_str(), Some("Paused"), "{s} {v}");

    let (s, v) = call(&t, "PUT", "/snapshot/create", Some(&body));
    assert_eq!(s, 200, "{v}");
    assert!(v["memory"]["chunks_total"].as_u64().unwrap() > 0, "{v}");
    assert!(snap.join("state").is_file() && snap.join("memory").is_file());
    let with_parent = serde_json::json!({ "path": tmp.join("snap2"), "parent": "x" }).to_string();
    let (s, v) = call(&t, "PUT", "/snapshot/create", Some(&with_parent));
    assert_eq!(s, 400, "{v}");

    let (s, _) = call(&t, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert_eq!(s, 204);
    let (s, _) = call(&t, "PUT", "/actions", Some(r#"{"action":"Shutdown"}"#));
    assert_eq!(s, 204);
    let (res, _) = runner.join().expect("run thread");
    assert_eq!(res.expect("run"), ExitReason::Shutdown);
    drop(server);
    assert!(!sock.exists(), "socket file left behind");
}

/// 200 idle connections left open on the API socket do not lock a new client out: each
/// newcomer beyond the limit replaces the longest-idle connection, so `GET /vm` and a pause
/// answer while all 200 are still open on the client side, and the newest idle connection
/// is still served.
#[test]
fn idle_connections_do_not_starve_new_clients() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    if !support::env::kvm_or_skip() {
        println!("SKIP: no KVM");
        return;
    }
    let tmp = temp_dir("api-idle");
    let sock = tmp.join("api.sock");
    let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new()).expect("boot");
    vm.wait_for(Instant::now() + Duration::from_secs(120), "dirty: ready\n")
        .expect("guest ready");
    let (server, chan) = api::start(None, Some(&sock)).expect("API server");
    vm.vmm.attach_api(chan).expect("attach API");
    let mut vmm = vm.vmm;
    let runner = std::thread::spawn(move || vmm.run().map_err(|e| e.to_string()));
    let t = ApiTarget::Unix(sock.clone());

    let mut idle: Vec<UnixStream> = (0..200)
        .map(|i| UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    // Generous ceiling: before the fix the answer was an immediate 503, so the status is
    // what tells; the time is printed.
    let ceiling = Duration::from_secs(30);
    for (method, path, body, want) in [
        ("GET", "/vm", None, 200),
        ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204),
        ("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#), 204),
    ] {
        let start = Instant::now();
        let (status, text) =
            api::request_with_timeout(&t, method, path, body, ceiling).expect("API request");
        println!(
            "{method} {path} with 200 idle connections open: {status} in {:?}",
            start.elapsed()
        );
        assert_eq!(status, want, "{method} {path}: {text}");
    }
    // The oldest idle connection was closed by the server; the newest is still served.
    let first = &mut idle[0];
    first.set_read_timeout(Some(ceiling)).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        first.read(&mut buf).unwrap_or(0),
        0,
        "the oldest idle connection is open"
    );
    let last = idle.last_mut().unwrap();
    last.set_read_timeout(Some(ceiling)).unwrap();
    last.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = last
            .read(&mut buf)
            .expect("response on the newest idle connection");
        assert!(n > 0, "the newest idle connection was closed");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(idle);
    let (s, _) = call(&t, "PUT", "/actions", Some(r#"{"action":"Shutdown"}"#));
    assert_eq!(s, 204);
    assert_eq!(runner.join().unwrap().expect("run"), ExitReason::Shutdown);
    drop(server);
}
