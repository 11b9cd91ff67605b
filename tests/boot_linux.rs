//! Boots the project's guest kernel (see docs/GUEST.md) and checks the test agent's output.
//! Slow on PVM-style hosts (about a minute per boot), so each scenario boots once.

mod support;

use support::env::*;
use support::linux::*;
use support::process::*;

fn boot_info(kernel: &str, vcpus: u8, mem_mib: u64) {
    let Some(a) = guest_env() else { return };
    let token = format!("t{}x{}", std::process::id(), vcpus);
    // rdinit=/idle from the tiny idle initramfs: an init that needs no system calls (guest
    // user space cannot make any on PVM hosts), so the boot completes and the agent runs.
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 rdinit=/idle vmmtest.info vmmtest.token={token} vmmtest.poweroff"
    );
    let mut r = Running::spawn(&[
        "--kernel".into(),
        format!("path={},cmdline=\"{cmdline}\"", a.file(kernel).display()),
        "--memory".into(),
        format!("size_mib={mem_mib}"),
        "--vcpu".into(),
        format!("num={vcpus}"),
        "--initrd".into(),
        a.file("idle.cpio.gz").display().to_string(),
    ]);
    let Some(line) = r.wait_for("vmmtest: info", BOOT_TIMEOUT) else {
        fail(&r, "no `vmmtest: info` line")
    };
    let want_cpus = format!("cpus={vcpus} ");
    if !line.contains(&want_cpus) || !line.contains(&format!("token={token}")) {
        fail(&r, &format!("bad info line {line:?}"));
    }
    let mem_kib: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mem_kib="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fail(&r, "no mem_kib"));
    // MemTotal is RAM minus what the kernel reserves for itself; it must be close to, and
    // not above, what we gave the guest.
    let given = mem_mib * 1024;
    if mem_kib > given || mem_kib < given * 3 / 4 {
        fail(
            &r,
            &format!("mem_kib={mem_kib} does not match {mem_mib} MiB"),
        );
    }
    match r.wait_exit(GUEST_EVENT_TIMEOUT) {
        Some(0) => {}
        other => fail(&r, &format!("vmm did not exit 0 after poweroff: {other:?}")),
    }
    println!(
        "booted {kernel} with {vcpus} vCPU(s) in {:.1} s",
        r.elapsed()
    );
}

#[test]
fn vmlinux_one_vcpu() {
    boot_info("vmlinux", 1, 256);
}

#[test]
fn vmlinux_two_vcpus() {
    boot_info("vmlinux", 2, 384);
}

/// The project's bzImage is LZ4-compressed: its decompressor (interrupts off, emulated on
/// PVM hosts) takes seconds there, so it is tested everywhere.
#[test]
fn bzimage_one_vcpu() {
    boot_info("bzImage", 1, 256);
}
