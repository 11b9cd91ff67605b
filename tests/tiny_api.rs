//! The control API against a running VM (the tiny test guest): states, errors that leave
//! the VM untouched, snapshot creation, shutdown.

mod tiny;

use std::time::{Duration, Instant};

use vmm::api::{self, ApiTarget};
use vmm::vstate::exit::ExitReason;

use tiny::{Scenario, Spec, TempDir};

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
    if !tiny::have_kvm() {
        println!("SKIP: no KVM");
        return;
    }
    let tmp = TempDir::new("api");
    let sock = tmp.join("api.sock");
    let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new()).expect("boot");
    vm.wait_for(Instant::now() + Duration::from_secs(30), "dirty: ready\n")
        .expect("guest ready");
    let (server, chan) = api::start(None, Some(&sock)).expect("API server");
    vm.vmm.attach_api(chan).expect("attach API");
    let mut vmm = vm.vmm;
    let runner = std::thread::spawn(move || {
        let r = vmm.run();
        (r.map_err(|e| e.to_string()), vmm.state)
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
