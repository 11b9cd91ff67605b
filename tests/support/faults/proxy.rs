//! An HTTP fault proxy on loopback: sits between `vmm` and a real nginx and, per request,
//! passes the answer through or breaks it the way real networks and servers do.
//!
//! Each accepted connection gets a thread. For every request the proxy asks the test's
//! [`Policy`] what to do — given the path and how many times that path was asked for —
//! fetches the real answer from nginx (one upstream connection per request), and writes it
//! to the client whole or broken ([`Fault`]). Every decision is logged so that a test can
//! check that the faults it meant to inject were injected.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The real answer, unchanged.
    Pass,
    /// Headers and half of the body, then a TCP reset (SO_LINGER 0).
    ResetMidBody,
    /// Headers (with the right Content-Length) and half of the body, then a clean close.
    TruncatedBody,
    /// A Content-Length 1000 bytes larger than the body, the body, then a clean close.
    LongContentLength,
    /// A Content-Length 1000 bytes smaller than the body, then the whole body on a
    /// connection that stays open (the surplus is garbage in front of the next answer).
    ShortContentLength,
    /// This status with a small text body instead of the answer.
    Status(u16),
    /// Waits this long, then the real answer.
    Stall(Duration),
    /// The real answer for this other path instead (a server serving the wrong file).
    Substitute(String),
}

/// Decides the fault for a request: `(path, how many times this path was requested,
/// counting this one)`.
pub type Policy = dyn Fn(&str, u64) -> Fault + Send + Sync;

struct Shared {
    upstream: SocketAddr,
    policy: Mutex<Arc<Policy>>,
    counts: Mutex<HashMap<String, u64>>,
    log: Mutex<Vec<(String, Fault)>>,
    stop: AtomicBool,
}

/// A running proxy; stopped when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (e.g. nginx's
    /// `http://127.0.0.1:PORT`), passing everything through until [`Proxy::set_policy`].
    pub fn start(upstream: &str) -> Proxy {
        let hostport = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = hostport.parse().expect("upstream must be IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            policy: Mutex::new(Arc::new(|_: &str, _: u64| Fault::Pass)),
            counts: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Proxy { addr, shared }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the policy; the per-path counts restart from zero.
    pub fn set_policy(&self, p: impl Fn(&str, u64) -> Fault + Send + Sync + 'static) {
        *lock(&self.shared.policy) = Arc::new(p);
        lock(&self.shared.counts).clear();
    }

    /// Every request so far with the fault applied, in order.
    pub fn log(&self) -> Vec<(String, Fault)> {
        lock(&self.shared.log).clone()
    }

    /// Requests so far whose fault was not [`Fault::Pass`].
    pub fn injected(&self) -> Vec<(String, Fault)> {
        self.log()
            .into_iter()
            .filter(|(_, f)| *f != Fault::Pass)
            .collect()
    }

    /// Forgets the log.
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

use vmm::util::lock;

/// Reads one request head (the client sends no bodies); None at EOF or on error.
fn read_head(c: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
        if head.len() > 64 << 10 {
            return None;
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// One upstream answer: (status line + headers without Content-Length/Connection, body).
fn fetch(upstream: SocketAddr, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut u = TcpStream::connect(upstream)?;
    u.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        u,
        "GET {path} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n\r\n"
    )?;
    let mut all = Vec::new();
    u.read_to_end(&mut all)?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end from upstream"))?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let body = all[split + 4..].to_vec();
    let kept: Vec<&str> = head
        .split("\r\n")
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("content-length:")
                && !l.starts_with("connection:")
                && !l.starts_with("keep-alive:")
        })
        .collect();
    Ok((kept.join("\r\n"), body))
}

fn serve(mut c: TcpStream, s: &Shared) {
    while let Some(head) = read_head(&mut c) {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let n = {
            let mut counts = lock(&s.counts);
            let n = counts.entry(path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let policy = lock(&s.policy).clone();
        let fault = policy(&path, n);
        lock(&s.log).push((path.clone(), fault.clone()));
        if !answer(&mut c, s, &path, &fault).unwrap_or_default() {
            return;
        }
    }
}

/// Writes the (possibly broken) answer; returns whether the connection stays usable.
fn answer(c: &mut TcpStream, s: &Shared, path: &str, fault: &Fault) -> std::io::Result<bool> {
    if let Fault::Status(code) = fault {
        let body = format!("injected {code}\n");
        write!(
            c,
            "HTTP/1.1 {code} Injected\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(true);
    }
    if let Fault::Stall(d) = fault {
        std::thread::sleep(*d);
    }
    let real = match fault {
        Fault::Substitute(other) => other.as_str(),
        _ => path,
    };
    let (head, body) = match fetch(s.upstream, real) {
        Ok(r) => r,
        Err(_) => {
            write!(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")?;
            return Ok(true);
        }
    };
    let half = body.len() / 2;
    match fault {
        Fault::ResetMidBody => {
            write!(c, "{head}\r\nContent-Length: {}\r\n\r\n", body.len())?;
            c.write_all(&body[..half])?;
            c.flush()?;
            // SO_LINGER 0: close sends RST instead of FIN.
            let _ = socket_linger_zero(c);
            Ok(false)
        }
        Fault::TruncatedBody => {
            write!(c, "{head}\r\nContent-Length: {}\r\n\r\n", body.len())?;
            c.write_all(&body[..half])?;
            let _ = c.shutdown(Shutdown::Both);
            Ok(false)
        }
        Fault::LongContentLength => {
            write!(c, "{head}\r\nContent-Length: {}\r\n\r\n", body.len() + 1000)?;
            c.write_all(&body)?;
            let _ = c.shutdown(Shutdown::Both);
            Ok(false)
        }
        Fault::ShortContentLength => {
            let claimed = body.len().saturating_sub(1000);
            write!(c, "{head}\r\nContent-Length: {claimed}\r\n\r\n")?;
            c.write_all(&body)?;
            Ok(true)
        }
        _ => {
            write!(c, "{head}\r\nContent-Length: {}\r\n\r\n", body.len())?;
            c.write_all(&body)?;
            Ok(true)
        }
    }
}

fn socket_linger_zero(c: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket with a correctly sized linger struct.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
