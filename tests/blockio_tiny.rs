//! Disk I/O off the event loop: a VM whose guest keeps reading a lazy remote disk, and the
//! disk's web server (a real nginx) stops. Each read then sits in the HTTP store's retries
//! for seconds, on the disk's I/O worker thread; the control API must not notice: `GET /vm`,
//! pause, snapshot and resume each answer within 100 ms (the acceptance bound of issue #12,
//! the VMM's own host-side latency, measured from the client). The snapshot records the read
//! in flight as pending: when nginx is back the read completes and the guest carries on, and
//! a restore of that snapshot replays the read.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::env::{TempDir, temp_dir};
use support::nginx::{Nginx, nginx_available};
use support::tiny;
use support::tiny::{Scenario, Spec, guest};
use vmm::api::{self, ApiTarget};
use vmm::config::BlockConfig;
use vmm::vstate::exit::ExitReason;

/// The acceptance bound for each API call while the disk's server is down.
const API_BOUND: Duration = Duration::from_millis(100);
/// Rounds of calls tried before the bound is declared missed.
const ROUNDS: usize = 5;

/// A directory on tmpfs (`/dev/shm`) when there is one, removed when dropped. The snapshot
/// and the disk cache go there: the snapshot makes them durable (fsync, syncfs), and on a
/// shared disk that waits for everyone's dirty data, which is not the VMM's latency.
struct FastDir(std::path::PathBuf, Option<TempDir>);

impl FastDir {
    fn new(name: &str) -> Self {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let p = shm.join(format!("vmm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            if std::fs::create_dir_all(&p).is_ok() {
                return Self(p, None);
            }
        }
        let t = temp_dir(name);
        Self(t.path().to_path_buf(), Some(t))
    }

    fn join(&self, p: &str) -> std::path::PathBuf {
        self.0.join(p)
    }
}

impl Drop for FastDir {
    fn drop(&mut self) {
        if self.1.is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// The remote image: `READ_SLOTS` strides of the tiny guest's disk pattern.
fn write_image(path: &Path) {
    let len = guest::READ_SLOTS * guest::READ_STRIDE;
    let data: Vec<u8> = (0..len)
        .step_by(8)
        .flat_map(|o| (o ^ guest::DISK_XOR).to_le_bytes())
        .collect();
    std::fs::write(path, data).expect("write the image");
}

/// One API call, timed from the client's side.
fn timed(t: &ApiTarget, method: &str, path: &str, body: Option<&str>) -> (u16, String, Duration) {
    let start = Instant::now();
    let (status, text) = api::request(t, method, path, body).expect("API request");
    (status, text, start.elapsed())
}

/// The guest's avail and used ring indexes.
fn ring_indexes(mem: &vmm::vstate::memory::GuestMemory) -> (u16, u16) {
    use vm_memory::{Bytes, GuestAddress};
    let idx = |ring: u64| -> u16 { mem.read_obj(GuestAddress(ring + 2)).expect("ring index") };
    (idx(guest::VQ_AVAIL), idx(guest::VQ_USED))
}

#[test]
fn api_answers_while_the_remote_disk_server_is_down() {
    if !support::env::kvm_or_skip() {
        println!("SKIP: no KVM");
        return;
    }
    if !nginx_available() {
        return;
    }
    let tmp = temp_dir("blockio-outage");
    let src = tmp.join("src.img");
    write_image(&src);
    let archive = tmp.join("archive");
    vmm::image::import_image(&src, &archive, "img", vmm::image::DEFAULT_IMAGE_CHUNK_SIZE)
        .expect("import the image");
    let mut nginx = Nginx::start(&archive);
    let url = format!("{}/images/img", nginx.url());
    let fast = FastDir::new("blockio-outage");
    let disk = |cache: &str| BlockConfig {
        url: Some(url.clone()),
        cache: Some(fast.join(cache)),
        ..Default::default()
    };

    // Small memory: the snapshot's own work (hashing guest memory) stays small.
    let mut spec = Spec::new(Scenario::VirtioReads);
    spec.mem_mib = 16;
    let mut vm = tiny::boot(spec, vec![disk("cache")]).expect("boot");
    let remote = vm.vmm.machine.remote[0].1.clone();
    let console = vm.console.clone();
    let mem = vm.vmm.machine.mem.clone();
    let sock = tmp.join("api.sock");
    let (server, chan) = api::start(None, Some(&sock)).expect("API server");
    vm.vmm.attach_api(chan).expect("attach the API");
    let mut vmm = vm.vmm;
    let runner = std::thread::spawn(move || vmm.run().map_err(|e| e.to_string()));
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let end = deadline();
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; console:\n{}",
                console.text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let set_limit = |n: u32| {
        use vm_memory::{Bytes, GuestAddress};
        mem.write_obj(n, GuestAddress(guest::MB_READ_LIMIT))
            .expect("write the mailbox");
    };
    wait("the guest", &|| console.text().contains("reads: ready\n"));
    set_limit(3);
    wait("read 2", &|| console.text().contains("read 2 ok\n"));

    // The server goes away; the guest's next read (an uncached chunk) starts retrying.
    nginx.stop();
    let failed = remote.stats().http.failed_requests;
    set_limit(u32::MAX);
    wait("a failed fetch", &|| {
        remote.stats().http.failed_requests > failed
    });
    let t = ApiTarget::Unix(sock.clone());

    // Rounds of GET /vm, pause, snapshot, resume, each with a read stuck in the retries.
    // A VMM that waited for the read would take seconds in every round; a loaded host can
    // make any one call slow, so the bound must hold for every call of one round.
    let mut pending_snapshot = None;
    let mut good_round = None;
    for round in 0..ROUNDS {
        let snap = fast.join(&format!("snap{round}"));
        let snap_body = serde_json::json!({ "path": snap }).to_string();
        let calls: [(&str, &str, &str, Option<&str>, u16); 4] = [
            ("GET /vm", "GET", "/vm", None, 200),
            ("pause", "PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204),
            (
                "snapshot create",
                "PUT",
                "/snapshot/create",
                Some(&snap_body),
                200,
            ),
            (
                "resume",
                "PATCH",
                "/vm",
                Some(r#"{"state":"Resumed"}"#),
                204,
            ),
        ];
        let mut slow = Vec::new();
        let mut pending = false;
        for (what, method, path, body, expected) in calls {
            if what == "snapshot create" {
                let (avail, used) = ring_indexes(&mem);
                pending = avail == used.wrapping_add(1);
            }
            let (status, text, took) = timed(&t, method, path, body);
            println!(
                "round {round}: {what}: {status} in {:.1} ms",
                took.as_secs_f64() * 1e3
            );
            assert_eq!(status, expected, "{what}: {text}");
            if took > API_BOUND {
                slow.push(format!("{what} took {took:?}"));
            }
        }
        println!("round {round}: read in flight at the snapshot: {pending}");
        if pending && pending_snapshot.is_none() {
            pending_snapshot = Some(snap);
        }
        if slow.is_empty() && pending {
            good_round = Some(round);
            break;
        }
        println!("round {round}: {slow:?}");
    }
    let console_at_resume = console.text();
    assert!(
        !console_at_resume.contains("read 3 ok"),
        "read 3 completed while the server was down:\n{console_at_resume}"
    );
    assert!(
        good_round.is_some(),
        "in none of {ROUNDS} rounds did every API call answer within {API_BOUND:?} with a \
         disk read in flight"
    );
    let snap = pending_snapshot.expect("a snapshot with a read in flight");

    // The server comes back: the pending read completes and the guest carries on.
    nginx.restart();
    wait("read 5 after the server's return", &|| {
        console.text().contains("read 5 ok\n")
    });
    assert!(console.text().contains("read 3 ok\nread 4 ok\n"));
    let (status, text, _) = timed(&t, "PUT", "/actions", Some(r#"{"action":"Shutdown"}"#));
    assert_eq!(status, 204, "{text}");
    let exit = runner.join().expect("run thread").expect("run");
    assert_eq!(exit, ExitReason::Shutdown);
    drop(server);

    // The snapshot taken with read 3 in flight: restored with an empty cache, the read is
    // replayed (fetched from nginx again) and the guest goes on from there.
    let r = tiny::restore(&snap, Some(vec![disk("cache2")]), true).expect("restore");
    let (avail, used) = ring_indexes(&r.vmm.machine.mem);
    assert_eq!(
        avail,
        used.wrapping_add(1),
        "the snapshot should hold one request posted and not completed"
    );
    let mut r = r;
    r.resume().expect("resume the restored VM");
    r.wait_for(deadline(), "read 4 ok\n").unwrap();
    let text = r.console.text();
    assert!(
        text.starts_with("read 3 ok\nread 4 ok\n"),
        "restored console:\n{text}"
    );
    assert!(
        r.vmm.machine.remote[0].1.stats().chunks_fetched >= 2,
        "the replayed read did not fetch"
    );
}
