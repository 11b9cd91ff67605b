//! The VMs of the peers bench: a `vmm` or Firecracker process with its API socket, booted
//! or restored, and what is asked of it over that API (pause, snapshot create, load).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm::api::{ApiTarget, ClientError, request_with_timeout};
use vmm::util::error_chain;

use crate::support::bench::ms;
use crate::support::env::{Artifacts, vmm_bin};
use crate::support::linux::{BASE_CMDLINE, BOOT_TIMEOUT, ticks, wait_tick};
use crate::support::process::Running;

/// Guest memory of both VMs.
pub const MEM_MIB: u64 = 256;
/// Ceiling for one API request (a snapshot of a loaded host's VM included).
pub const API_TIMEOUT: Duration = Duration::from_secs(600);
/// Ceiling for a restored VM to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Ceiling for a restored guest's next tick (a ceiling: the wait returns at the tick).
pub const TICK_TIMEOUT: Duration = Duration::from_secs(120);

/// Which VMM.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// This project's `vmm`.
    Vmm,
    /// Firecracker.
    Firecracker,
}

impl Kind {
    /// Its name in tables and CSV files.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::Firecracker => "firecracker",
        }
    }
}

/// A running VM: its process (killed when dropped) and API socket.
pub struct Vm {
    /// The process.
    pub proc: Running,
    /// Its API socket.
    pub sock: PathBuf,
    /// The counter's tick token.
    pub token: String,
}

/// A snapshot to restore.
#[derive(Clone)]
pub enum Snap {
    /// A `vmm` snapshot directory.
    Vmm(PathBuf),
    /// Firecracker's state file and memory file.
    Firecracker { state: PathBuf, mem: PathBuf },
}

impl Snap {
    pub fn kind(&self) -> Kind {
        match self {
            Snap::Vmm(_) => Kind::Vmm,
            Snap::Firecracker { .. } => Kind::Firecracker,
        }
    }

    /// Bytes on disk (du).
    pub fn du(&self) -> u64 {
        match self {
            Snap::Vmm(d) => du(d),
            Snap::Firecracker { state, mem } => du(state) + du(mem),
        }
    }
}

/// Allocated bytes of `p` (a file, or a directory tree), like `du`.
pub fn du(p: &Path) -> u64 {
    let Ok(m) = fs::symlink_metadata(p) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir()
        && let Ok(rd) = fs::read_dir(p)
    {
        total += rd.flatten().map(|e| du(&e.path())).sum::<u64>();
    }
    total
}

/// One request to the API on `sock`.
pub fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    request_with_timeout(
        &ApiTarget::Unix(sock.to_path_buf()),
        method,
        path,
        body,
        API_TIMEOUT,
    )
    .map_err(|e| format!("{method} {path} on {}: {}", sock.display(), error_chain(&e)))
}

/// A request that must succeed (2xx); returns its round trip in ms.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<f64, String> {
    let t = Instant::now();
    let (status, answer) = api(sock, method, path, Some(&body.to_string()))?;
    let d = ms(t.elapsed());
    if !(200..300).contains(&status) {
        return Err(format!("{method} {path}: {status} {answer}"));
    }
    Ok(d)
}

/// `PATCH /vm` to `state` (same body for both VMMs); its round trip in ms.
pub fn set_state(vm: &Vm, state: &str) -> Result<f64, String> {
    call(&vm.sock, "PATCH", "/vm", &json!({ "state": state }))
}

/// Spawns `cmd` as a VM process; waits for its first tick line. Returns it and the seconds
/// from the spawn to that line.
pub fn boot(mut cmd: Command, sock: PathBuf, token: &str, what: &str) -> Result<(Vm, f64), String> {
    let _ = fs::remove_file(&sock);
    let mut proc = Running::try_spawn(&mut cmd)
        .map_err(|e| format!("spawn {what}: {e}"))?
        .echo("vmmtest:");
    let Some(i) = proc.wait_for_index(&format!("vmmtest: tick {token} 0 "), BOOT_TIMEOUT) else {
        return Err(format!("{what}: no first tick\n{}", proc.output()));
    };
    let secs = proc.secs_to(i);
    let vm = Vm {
        proc,
        sock,
        token: token.to_string(),
    };
    Ok((vm, secs))
}

/// Boots the `vmm` counter guest; returns it, its boot time and the full guest command line
/// `vmm` gave it (with the host workarounds).
pub fn boot_vmm(art: &Artifacts, dir: &Path, token: &str) -> Result<(Vm, f64, String), String> {
    let cmdline = format!("{BASE_CMDLINE} rdinit=/idle vmmtest.counter vmmtest.token={token}");
    let sock = dir.join("vmm-boot.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel")
        .arg(format!(
            "path={},cmdline=\"{cmdline}\"",
            art.vmlinux().display()
        ))
        .arg("--initrd")
        .arg(art.idle_initrd())
        .args([
            "--memory",
            &format!("size_mib={MEM_MIB}"),
            "--vcpu",
            "num=1",
        ])
        .arg("--api-sock")
        .arg(&sock);
    let (vm, secs) = boot(cmd, sock, token, "vmm")?;
    let (_, body) = api(&vm.sock, "GET", "/vm", None)?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("GET /vm: {e}: {body}"))?;
    let full = v["cmdline"]
        .as_str()
        .ok_or_else(|| format!("GET /vm has no cmdline: {body}"))?
        .to_string();
    Ok((vm, secs, full))
}

/// Boots the same guest under Firecracker with `cmdline`.
pub fn boot_fc(
    fc: &Path,
    art: &Artifacts,
    dir: &Path,
    cmdline: &str,
    token: &str,
) -> Result<(Vm, f64), String> {
    let config = json!({
        "boot-source": {
            "kernel_image_path": art.vmlinux(),
            "initrd_path": art.idle_initrd(),
            "boot_args": cmdline,
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": MEM_MIB,
            "track_dirty_pages": true,
        },
    });
    let cfg = dir.join("fc-config.json");
    fs::write(&cfg, config.to_string()).map_err(|e| format!("write {}: {e}", cfg.display()))?;
    let sock = dir.join("fc-boot.sock");
    let mut cmd = Command::new(fc);
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .arg("--no-seccomp");
    boot(cmd, sock, token, "firecracker")
}

/// Takes a snapshot of the paused `vm` into `to` (for `vmm`, a directory; with `store`, a
/// shared chunk store); `diff` asks Firecracker for a diff snapshot. Returns it and the
/// request's round trip in ms.
pub fn create(
    vm: &Vm,
    kind: Kind,
    to: &Path,
    store: Option<&Path>,
    diff: bool,
) -> Result<(Snap, f64), String> {
    match kind {
        Kind::Vmm => {
            let mut body = json!({ "path": to });
            if let Some(s) = store {
                body["store"] = json!(s);
            }
            let d = call(&vm.sock, "PUT", "/snapshot/create", &body)?;
            Ok((Snap::Vmm(to.to_path_buf()), d))
        }
        Kind::Firecracker => {
            let (state, mem) = (to.with_extension("state"), to.with_extension("mem"));
            let body = json!({
                "snapshot_type": if diff { "Diff" } else { "Full" },
                "snapshot_path": state,
                "mem_file_path": mem,
            });
            let d = call(&vm.sock, "PUT", "/snapshot/create", &body)?;
            Ok((Snap::Firecracker { state, mem }, d))
        }
    }
}

/// Pause, snapshot, resume; the snapshot request's round trip in ms.
pub fn snapshot_running(
    vm: &Vm,
    kind: Kind,
    to: &Path,
    store: Option<&Path>,
    diff: bool,
) -> Result<(Snap, f64), String> {
    set_state(vm, "Paused")?;
    let r = create(vm, kind, to, store, diff);
    set_state(vm, "Resumed")?;
    r
}

/// Restores `snap` in a new process with its API on `sock`: spawn → running, in ms.
pub fn restore(bin: &Path, snap: &Snap, sock: &Path, token: &str) -> Result<(Vm, f64), String> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(bin);
    match snap {
        Snap::Vmm(dir) => cmd.arg("restore").arg(dir).arg("--api-sock").arg(sock),
        Snap::Firecracker { .. } => cmd.arg("--api-sock").arg(sock).arg("--no-seccomp"),
    };
    let mut proc = Running::try_spawn(&mut cmd).map_err(|e| format!("spawn: {e}"))?;
    let target = ApiTarget::Unix(sock.to_path_buf());
    let deadline = proc.started + START_TIMEOUT;
    loop {
        if let Ok(Some(st)) = proc.child.try_wait() {
            proc.kill_and_drain();
            return Err(format!("exited during restore: {st}\n{}", proc.output()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not running after {START_TIMEOUT:?}\n{}",
                proc.output()
            ));
        }
        let answer = match snap {
            Snap::Vmm(_) if sock.exists() => {
                request_with_timeout(&target, "GET", "/vm", None, API_TIMEOUT)
            }
            Snap::Vmm(_) => Err(ClientError::BadResponse("no socket yet".into())),
            Snap::Firecracker { state, mem } => {
                let body = json!({
                    "snapshot_path": state,
                    "mem_backend": { "backend_type": "File", "backend_path": mem },
                    "resume_vm": true,
                });
                request_with_timeout(
                    &target,
                    "PUT",
                    "/snapshot/load",
                    Some(&body.to_string()),
                    API_TIMEOUT,
                )
            }
        };
        match answer {
            Ok((200, body)) if matches!(snap, Snap::Vmm(_)) => {
                if body.contains("\"Running\"") {
                    break;
                }
            }
            Ok((s, _)) if (200..300).contains(&s) && matches!(snap, Snap::Firecracker { .. }) => {
                break;
            }
            Ok((s, body)) => {
                return Err(format!("restore answered {s}: {body}\n{}", proc.output()));
            }
            // Not listening yet.
            Err(ClientError::Connect { .. }) | Err(ClientError::BadResponse(_)) => {}
            Err(e) => return Err(format!("restore: {}", error_chain(&e))),
        }
        thread::sleep(Duration::from_micros(200));
    }
    let d = ms(proc.started.elapsed());
    let vm = Vm {
        proc,
        sock: sock.to_path_buf(),
        token: token.to_string(),
    };
    Ok((vm, d))
}

/// Waits for the restored guest's next tick (ceiling [`TICK_TIMEOUT`]); returns it.
pub fn next_tick(vm: &mut Vm) -> Option<u64> {
    wait_tick(&mut vm.proc, &vm.token.clone(), 0, TICK_TIMEOUT)
}

/// The highest tick `vm` printed so far.
pub fn last_tick(vm: &Vm) -> Option<u64> {
    ticks(&vm.proc.console(), &vm.token).last().copied()
}

/// Proportional set size of process `pid`, in bytes.
pub fn pss(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let l = s.lines().find(|l| l.starts_with("Pss:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
