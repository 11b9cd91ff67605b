//! A real nginx (Debian's `/usr/sbin/nginx`, no daemon, no master process) serving a
//! directory on a free 127.0.0.1 port: the HTTP server of the remote-disk and archive tests
//! and of the `remote_boot` bench.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::env::{TempDir, skip_unless_ci, temp_dir};

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// True when nginx is installed; otherwise prints SKIP (in CI: fails) and returns false.
pub fn nginx_available() -> bool {
    if Path::new(NGINX).exists() {
        return true;
    }
    skip_unless_ci(&format!("{NGINX} is missing (apt-get install nginx)"));
    false
}

/// How nginx is configured.
#[derive(Clone, Copy, Debug)]
pub struct NginxConfig {
    /// Keep an access log (`$connection $status $request_uri`, see [`Nginx::access_log`]).
    pub access_log: bool,
    /// `keepalive_requests` (requests per connection); nginx's default when None.
    pub keepalive_requests: Option<u32>,
}

impl NginxConfig {
    /// The tests': an access log, nginx's keep-alive default.
    pub const TESTS: NginxConfig = NginxConfig {
        access_log: true,
        keepalive_requests: None,
    };

    /// The benches': no access log, 10000 requests per connection.
    pub const BENCH: NginxConfig = NginxConfig {
        access_log: false,
        keepalive_requests: Some(10_000),
    };
}

/// An nginx child process serving `root` on 127.0.0.1:`port`; stopped when dropped.
pub struct Nginx {
    child: Option<Child>,
    port: u16,
    conf_dir: TempDir,
    root: PathBuf,
    config: NginxConfig,
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

impl Nginx {
    /// Starts nginx serving `root` on a free port ([`NginxConfig::TESTS`]); panics if it
    /// does not start.
    pub fn start(root: &Path) -> Nginx {
        Self::try_start(root, NginxConfig::TESTS).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts nginx serving `root` on a free port, or says why it did not start.
    pub fn try_start(root: &Path, config: NginxConfig) -> Result<Nginx, String> {
        let mut n = Nginx {
            child: None,
            port: free_port()?,
            conf_dir: temp_dir("nginx"),
            root: root.to_path_buf(),
            config,
        };
        n.try_restart()?;
        Ok(n)
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

    /// (Re)starts nginx on the same port and waits until it accepts connections; panics if
    /// it does not.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    fn conf(&self) -> String {
        let d = self.conf_dir.path();
        let t = |name: &str| d.join(name).display().to_string();
        let access_log = if self.config.access_log {
            format!(
                "log_format conn '$connection $status $request_uri';\n\
                 \x20 access_log {} conn;",
                t("access.log")
            )
        } else {
            "access_log off;".into()
        };
        let keepalive = match self.config.keepalive_requests {
            Some(n) => format!("\x20 keepalive_requests {n};\n"),
            None => String::new(),
        };
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr warn;\n\
             pid {pid};\nevents {{ worker_connections 256; }}\n\
             http {{\n  {access_log}\n  default_type application/octet-stream;\n{keepalive}\
             \x20 client_body_temp_path {b};\n  proxy_temp_path {p};\n  fastcgi_temp_path {f};\n\
             \x20 uwsgi_temp_path {u};\n  scgi_temp_path {s};\n\
             \x20 server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            pid = t("nginx.pid"),
            b = t("body"),
            p = t("proxy"),
            f = t("fastcgi"),
            u = t("uwsgi"),
            s = t("scgi"),
            port = self.port,
            root = self.root.display(),
        )
    }

    fn try_restart(&mut self) -> Result<(), String> {
        self.stop();
        let d = self.conf_dir.path();
        let conf = d.join("nginx.conf");
        std::fs::write(&conf, self.conf()).map_err(|e| format!("write nginx.conf: {e}"))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(d.join("stderr.log"))
            .map_err(|e| format!("nginx stderr.log: {e}"))?;
        let mut child = Command::new(NGINX)
            .args(["-e", "stderr", "-p"])
            .arg(d)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {NGINX}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                let log = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
                return Err(format!("nginx exited with {st}: {log}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("nginx did not start within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

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
