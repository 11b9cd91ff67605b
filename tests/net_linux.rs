//! virtio-net on a tap with the Linux guest: ping (also 8000-byte pings) and the test
//! agent's UDP ticks; snapshot while a ping runs, kill, restore onto the same tap (time to
//! the first answered ping); two clones restored at once, each onto its own tap in its own
//! network namespace; a tap deleted under a running guest. The guest boots once.
//!
//! Needs root, iproute2 and ping (scripts/test.sh installs them). Every namespace, tap and
//! address is made here, inside namespaces of its own (`vmmnet-<pid>-<n>`), and removed at
//! the end even on failure; the host's own interfaces are never touched.

mod support;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::env::{guest_env, scratch};
use support::linux::*;
use support::process::{Running, fail};

const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
const UDP_PORT: u16 = 5555;
/// The host side of every tap gets the same MAC, so that a restored guest's ARP entry for
/// the host stays right on a clone's tap too (docs/NETWORK.md, "Clones").
const TAP_MAC: &str = "02:00:00:77:00:01";
const GUEST_MAC: &str = "02:00:00:77:00:02";

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run")
}

fn sh_ok(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace with one tap (host side `HOST_IP/24`, up), deleted on drop.
struct NetNs {
    name: String,
    tap: String,
}

impl NetNs {
    fn new(n: u32, tap: &str) -> Self {
        let name = format!("vmmnet-{}-{n}", std::process::id());
        let _ = sh(&["ip", "netns", "del", &name]);
        sh_ok(&["ip", "netns", "add", &name]);
        let ns = NetNs {
            name,
            tap: tap.to_string(),
        };
        let ip = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns.name, "ip"];
            v.extend_from_slice(a);
            sh_ok(&v);
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        ip(&["link", "set", "dev", tap, "address", TAP_MAC]);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        ip(&["link", "set", "dev", tap, "up"]);
        ns
    }

    /// `ip netns exec NS` + args, as a command.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Pings the guest with `count` echo requests of `size` bytes, round after round, until
    /// one round has every request answered (true), or the ceiling (false).
    fn ping(&self, size: usize, count: u32) -> bool {
        let deadline = Instant::now() + GUEST_EVENT_TIMEOUT;
        while Instant::now() < deadline {
            let out = self
                .cmd(&[
                    "ping",
                    "-n",
                    "-c",
                    &count.to_string(),
                    "-W",
                    "10",
                    "-s",
                    &size.to_string(),
                    GUEST_IP,
                ])
                .output()
                .expect("ping");
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains(&format!("{count} received")) {
                return true;
            }
        }
        false
    }

    /// A UDP socket bound to `HOST_IP:UDP_PORT` inside the namespace (made on a thread that
    /// enters it; the socket keeps its namespace).
    fn udp(&self) -> UdpSocket {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on an open netns fd affects only this thread.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let s = UdpSocket::bind((HOST_IP, UDP_PORT)).expect("bind UDP");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .join()
        .expect("udp thread")
    }

    /// Starts `vmm ARGS` inside the namespace.
    fn vmm(&self, args: &[String]) -> Running {
        let bin = support::env::vmm_bin();
        let mut c = self.cmd(&[bin]);
        c.args(args);
        Running::spawn_cmd(&mut c)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Every tick number received on `s` (payload `tick TOKEN N`) so far.
fn recv_ticks(s: &UdpSocket, token: &str, into: &mut Vec<u64>) {
    let mut buf = [0u8; 512];
    while let Ok(n) = s.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        let mut parts = text.split_whitespace();
        if parts.next() == Some("tick")
            && parts.next() == Some(token)
            && let Some(t) = parts.next().and_then(|v| v.parse().ok())
        {
            into.push(t);
        }
    }
}

/// Receives ticks until one of at least `n` arrived (or the ceiling).
fn udp_until(s: &UdpSocket, token: &str, n: u64, into: &mut Vec<u64>) -> bool {
    udp_until_within(s, token, n, into, GUEST_EVENT_TIMEOUT)
}

fn udp_until_within(
    s: &UdpSocket,
    token: &str,
    n: u64,
    into: &mut Vec<u64>,
    ceiling: Duration,
) -> bool {
    let deadline = Instant::now() + ceiling;
    while Instant::now() < deadline {
        recv_ticks(s, token, into);
        if into.last().is_some_and(|&t| t >= n) {
            return true;
        }
    }
    false
}

fn assert_consecutive(t: &[u64], what: &str) {
    assert!(!t.is_empty(), "{what}: no UDP ticks");
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: UDP ticks not consecutive: {t:?}");
    }
}

/// Pings from `ns` every 10 ms and returns the seconds from `start` to the first answer.
fn first_answer(ns: &NetNs, start: Instant, vm: &Running) -> f64 {
    let mut p = Running::spawn_cmd(&mut ns.cmd(&["ping", "-n", "-i", "0.01", "-W", "1", GUEST_IP]));
    let Some(_) = p.wait_for("bytes from", GUEST_EVENT_TIMEOUT) else {
        fail(vm, "no ping answered after the restore");
    };
    let at = p
        .lines()
        .into_iter()
        .find(|l| l.text.contains("bytes from"))
        .unwrap()
        .at;
    p.kill();
    at.duration_since(start).as_secs_f64()
}

/// Restores `snap` inside `ns` (with `--net id=net0,tap=…` when `override_tap`).
fn restore(ns: &NetNs, snap: &Path, sock: &Path, override_tap: bool) -> Running {
    let mut args = vec![
        "restore".to_string(),
        snap.display().to_string(),
        "--api-sock".into(),
        sock.display().to_string(),
    ];
    if override_tap {
        args.extend(["--net".into(), format!("id=net0,tap={}", ns.tap)]);
    }
    ns.vmm(&args)
}

fn api_get_vm(sock: &Path) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(b"GET /vm HTTP/1.1\r\nHost: vmm\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn network_survives_snapshot_restore_and_clones() {
    let Some(a) = guest_env() else { return };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ping = Command::new("ping").arg("-V").output().is_ok();
    if !root || !ping || !Path::new("/dev/net/tun").exists() {
        support::env::skip_unless_ci("net_linux needs root, ping (iputils-ping) and /dev/net/tun");
        return;
    }
    let ns = NetNs::new(0, "vmtap0");
    let sock_udp = ns.udp();
    let extra = format!(
        "ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off vmmtest.udp={HOST_IP}:{UDP_PORT}"
    );
    // The counter guest, started inside the namespace with its interface.
    let dir = scratch("net_linux_boot");
    let token = format!("net{}", std::process::id());
    let root = dir.join("rootfs.ext4");
    std::fs::copy(a.rootfs(), &root).unwrap();
    let sock = dir.join("api.sock");
    let cmdline = format!("init=/idle vmmtest.counter vmmtest.token={token} {extra}");
    let mut vm = ns.vmm(&[
        "--kernel".into(),
        kernel_arg(&a, &cmdline),
        "--block".into(),
        format!("path={},root=true", root.display()),
        "--net".into(),
        format!("tap=vmtap0,mac={GUEST_MAC}"),
        "--api-sock".into(),
        sock.display().to_string(),
    ]);
    let t0 = Instant::now();
    let mut got = Vec::new();
    if !udp_until_within(&sock_udp, &token, 3, &mut got, BOOT_TIMEOUT) {
        fail(&vm, "no UDP tick reached the namespace");
    }
    eprintln!(
        "first UDP ticks after {:.1} s: {got:?}",
        t0.elapsed().as_secs_f64()
    );
    assert!(ns.ping(56, 3), "ping not answered");
    assert!(ns.ping(8000, 2), "8000-byte ping not answered");

    // Snapshot while a ping runs, kill, restore onto the same tap.
    let mut bg = Running::spawn_cmd(&mut ns.cmd(&["ping", "-n", "-i", "0.05", GUEST_IP]));
    let _ = wait_tick(
        &mut vm,
        &token,
        got.last().unwrap() + 2,
        GUEST_EVENT_TIMEOUT,
    );
    let snap = dir.join("snap");
    snapshot_leave_paused(&vm, &sock, &snap);
    vm.kill_and_drain();
    bg.kill();
    let before = ticks(&vm.console(), &token);
    let last_before = *before.last().expect("ticks before the snapshot");
    recv_ticks(&sock_udp, &token, &mut got);
    // The last tick's datagram goes out just after its console line: a snapshot between
    // the two leaves it to the restored guest.
    let last_sent = *got.last().unwrap();
    assert!(
        last_sent + 1 >= last_before && last_sent <= last_before,
        "UDP ticks up to the snapshot {got:?}, console up to {last_before}"
    );

    let start = Instant::now();
    let sock2 = dir.join("api2.sock");
    let mut r = restore(&ns, &snap, &sock2, false);
    let secs = first_answer(&ns, start, &r);
    eprintln!("restore spawn -> first answered ping: {:.0} ms", secs * 1e3);
    assert!(secs < GUEST_EVENT_TIMEOUT.as_secs_f64());
    if !udp_until(&sock_udp, &token, last_before + 3, &mut got) {
        fail(&r, "UDP ticks did not continue after the restore");
    }
    // From the first tick received on: every tick once, in order, across the restore.
    assert_consecutive(&got, "boot + restore");
    r.kill_and_drain();

    // Two clones at once, each in its own namespace on its own tap.
    let (nb, nc) = (NetNs::new(1, "vmtapb"), NetNs::new(2, "vmtapc"));
    let (ub, uc) = (nb.udp(), nc.udp());
    let (sb, sc) = (dir.join("b.sock"), dir.join("c.sock"));
    let mut cb = restore(&nb, &snap, &sb, true);
    let mut cc = restore(&nc, &snap, &sc, true);
    for (n, u, c, what) in [(&nb, &ub, &cb, "clone b"), (&nc, &uc, &cc, "clone c")] {
        let mut t = Vec::new();
        if !udp_until(u, &token, last_before + 3, &mut t) {
            fail(c, &format!("{what}: no UDP ticks on its own tap"));
        }
        assert_eq!(t.first(), Some(&(last_sent + 1)), "{what}: {t:?}");
        assert_consecutive(&t, what);
        assert!(n.ping(56, 3), "{what}: ping not answered");
    }

    // The tap of clone c disappears: vmm logs it, keeps running, the API answers.
    sh_ok(&[
        "ip", "netns", "exec", &nc.name, "ip", "link", "del", "vmtapc",
    ]);
    if cc.wait_for("tap vmtapc", GUEST_EVENT_TIMEOUT).is_none() {
        fail(&cc, "deleting the tap was not logged");
    }
    let answer = api_get_vm(&sc).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 200"), "GET /vm: {answer}");
    let now = ticks(&cc.console(), &token).last().copied().unwrap_or(0);
    if wait_tick(&mut cc, &token, now + 2, GUEST_EVENT_TIMEOUT).is_none() {
        fail(&cc, "the guest stopped after its tap was deleted");
    }
    assert!(
        cc.wait_exit(Duration::from_millis(1)).is_none(),
        "vmm exited"
    );
    assert!(nb.ping(56, 2), "clone b affected by clone c's tap");
    cb.kill_and_drain();
    cc.kill_and_drain();
}
