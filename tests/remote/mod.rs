//! Helpers for the remote disk tests: a real nginx serving an archive directory on a free
//! loopback port, temp dirs, test images.
#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// Returns None (after printing SKIP) when nginx is not installed; in CI that is a failure.
pub fn nginx_available() -> bool {
    if Path::new(NGINX).exists() {
        return true;
    }
    let msg = format!("{NGINX} is missing (apt-get install nginx)");
    if std::env::var("CI").is_ok() {
        panic!("{msg}");
    }
    println!("SKIP: {msg}");
    false
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-remote-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An nginx child process serving `root` on 127.0.0.1:`port`.
pub struct Nginx {
    child: Option<Child>,
    port: u16,
    conf_dir: TempDir,
    root: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Nginx {
    /// Starts nginx serving `root` on a free port.
    pub fn start(root: &Path) -> Nginx {
        let mut n = Nginx {
            child: None,
            port: free_port(),
            conf_dir: TempDir::new("nginx"),
            root: root.to_path_buf(),
        };
        n.restart();
        n
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops nginx (kills the process and reaps it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts nginx on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let d = self.conf_dir.path();
        let conf = d.join("nginx.conf");
        let t = |name: &str| d.join(name).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr warn;\n\
                 pid {pid};\nevents {{ worker_connections 256; }}\n\
                 http {{\n  log_format conn '$connection $status $request_uri';\n\
                 \x20 access_log {log} conn;\n  default_type application/octet-stream;\n\
                 \x20 client_body_temp_path {b};\n  proxy_temp_path {p};\n  fastcgi_temp_path {f};\n\
                 \x20 uwsgi_temp_path {u};\n  scgi_temp_path {s};\n\
                 \x20 server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
                pid = t("nginx.pid"),
                log = t("access.log"),
                b = t("body"),
                p = t("proxy"),
                f = t("fastcgi"),
                u = t("uwsgi"),
                s = t("scgi"),
                port = self.port,
                root = self.root.display(),
            ),
        )
        .unwrap();
        let log = File::options()
            .create(true)
            .append(true)
            .open(d.join("stderr.log"))
            .unwrap();
        let mut child = Command::new(NGINX)
            .arg("-e")
            .arg("stderr")
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                let log = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
                panic!("nginx exited with {st}: {log}");
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }
}

impl Nginx {
    /// Access log lines so far: (connection serial number, status, URI).
    pub fn access_log(&self) -> Vec<(u64, u16, String)> {
        let text =
            std::fs::read_to_string(self.conf_dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next()?.into(),
                ))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Deterministic xorshift bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A 4 MiB test image: random data with zero regions and a repeated block.
pub fn test_image(path: &Path) -> Vec<u8> {
    let mut data = random_bytes(4 << 20, 0x5eed);
    data[256 << 10..768 << 10].fill(0);
    data[3 << 20..(3 << 20) + (300 << 10)].fill(0);
    let (a, b) = data.split_at_mut(2 << 20);
    b[..128 << 10].copy_from_slice(&a[..128 << 10]);
    std::fs::write(path, &data).unwrap();
    data
}

/// BLAKE3 of every file under `dir`, sorted by path.
pub fn tree_hashes(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string();
                out.push((p, h));
            }
        }
    }
    out.sort();
    out
}
