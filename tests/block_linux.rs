//! virtio-block with the project's Linux guest: root filesystem on vda, the test agent
//! hashing and writing disks, a read-only disk that refuses writes.

mod support;

use std::time::Duration;
use support::env::*;
use support::files::md5_file;
use support::linux::*;
use support::process::*;

#[test]
fn root_mount_md5_write_and_read_only() {
    let Some(a) = guest_env() else { return };
    let dir = scratch("block-linux");
    let root = dir.join("rootfs.ext4");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    std::fs::copy(a.file("rootfs.ext4"), &root).unwrap();
    std::fs::copy(a.file("disk.img"), &rw).unwrap();
    std::fs::copy(a.file("disk.img"), &ro).unwrap();
    let want_md5 = md5_file(&a.file("disk.img"));
    let token = format!("written-by-guest-{}", std::process::id());
    // /idle: an init that loops without system calls (guest user space cannot make any on
    // PVM hosts); force_write makes the agent send the write to the read-only disk too, so
    // the VMM's refusal is what is tested.
    let extra = format!(
        "init=/idle vmmtest.disk=/dev/vdb,/dev/vdc vmmtest.write={token} vmmtest.force_write vmmtest.poweroff"
    );
    let mut r = Running::spawn(&[
        "--kernel".into(),
        kernel_arg(&a, &extra),
        "--block".into(),
        format!("path={},root=true", root.display()),
        "--block".into(),
        format!("path={},id=rw-disk", rw.display()),
        "--block".into(),
        format!("path={},read_only=true", ro.display()),
    ]);
    if r.wait_for("VFS: Mounted root (ext4 filesystem)", BOOT_TIMEOUT)
        .is_none()
    {
        fail(&r, "root filesystem not mounted from virtio-blk");
    }
    if r.wait_for("Run /idle as init process", GUEST_EVENT_TIMEOUT)
        .is_none()
    {
        fail(&r, "init not started from the root filesystem");
    }
    match r.wait_exit(GUEST_EVENT_TIMEOUT) {
        Some(0) => {}
        other => fail(&r, &format!("vmm exit {other:?}")),
    }
    let out = r.output();
    for dev in ["/dev/vdb", "/dev/vdc"] {
        let line = format!("vmmtest: disk {dev} md5={want_md5} bytes=");
        if !out.contains(&line) {
            fail(&r, &format!("missing or wrong md5 line for {dev}"));
        }
    }
    if !out.contains("vmmtest: write /dev/vdb ok") {
        fail(&r, "write to the rw disk did not succeed");
    }
    if !out.contains("vmmtest: write /dev/vdc error=") {
        fail(&r, "write to the read-only disk did not fail");
    }
    let data = std::fs::read(&rw).unwrap();
    let last = &data[data.len() - 4096..];
    let expect = format!("{token}\n");
    assert_eq!(
        &last[..expect.len()],
        expect.as_bytes(),
        "text not in the last block"
    );
    assert!(
        last[expect.len()..].iter().all(|&b| b == 0),
        "block not zero-padded"
    );
    assert_eq!(md5_file(&ro), want_md5, "the read-only disk file changed");
    assert_eq!(
        &data[..data.len() - 4096],
        &std::fs::read(a.file("disk.img")).unwrap()[..data.len() - 4096],
        "the rw disk changed outside its last block"
    );
}

/// Hardware KVM only (guest user space cannot make system calls on PVM hosts): a busybox
/// shell from the initramfs runs a command, and the disk checks above run from user space
/// too (md5sum of the whole device, a write at the last 4 KiB block, a refused write to the
/// read-only disk), then `reboot -f` ends the VM cleanly.
#[test]
fn busybox_shell_from_initramfs() {
    let Some(a) = guest_env() else { return };
    if pvm_host() {
        println!(
            "SKIP: guest user space cannot make system calls on this PVM-style host \
             (see docs/PVM_HOSTS.md); the busybox shell test runs on hardware KVM"
        );
        return;
    }
    let dir = scratch("block-busybox");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    std::fs::copy(a.file("disk.img"), &rw).unwrap();
    std::fs::copy(a.file("disk.img"), &ro).unwrap();
    let want_md5 = md5_file(&a.file("disk.img"));
    let size = std::fs::metadata(&rw).unwrap().len();
    let mut cmd = std::process::Command::new(vmm_bin());
    cmd.args([
        "--kernel".to_string(),
        kernel_arg(&a, ""),
        "--initrd".into(),
        a.file("initramfs.cpio.gz").display().to_string(),
        "--block".into(),
        format!("path={}", rw.display()),
        "--block".into(),
        format!("path={},read_only=true", ro.display()),
    ]);
    cmd.stdin(std::process::Stdio::piped());
    let mut r = Running::spawn_cmd_stdin(&mut cmd);
    let mut stdin = r.child.stdin.take().expect("stdin");
    if r.wait_for("vmmtest-initramfs: ready", BOOT_TIMEOUT)
        .is_none()
    {
        fail(&r, "initramfs /init did not start");
    }
    std::thread::sleep(Duration::from_secs(2));
    use std::io::Write;
    let token = format!("shell-{}", std::process::id());
    let seek = size / 4096 - 1;
    let script = format!(
        "echo $((40 + 2))-{token}\n\
         md5sum /dev/vda /dev/vdb\n\
         printf '{token}\\n' | dd of=/dev/vda bs=4096 seek={seek} conv=sync,fsync 2>/dev/null && echo rw-write-ok\n\
         printf '{token}\\n' | dd of=/dev/vdb bs=4096 seek={seek} conv=sync,fsync 2>/dev/null || echo ro-write-refused\n\
         sync; reboot -f\n"
    );
    stdin.write_all(script.as_bytes()).unwrap();
    if r.wait_for(&format!("42-{token}"), GUEST_EVENT_TIMEOUT)
        .is_none()
    {
        fail(&r, "the busybox shell did not run the command");
    }
    match r.wait_exit(GUEST_EVENT_TIMEOUT) {
        Some(0) => {}
        other => fail(&r, &format!("vmm exit {other:?} after reboot -f")),
    }
    let out = r.output();
    for dev in ["/dev/vda", "/dev/vdb"] {
        if !out.contains(&format!("{want_md5}  {dev}")) {
            fail(
                &r,
                &format!("md5sum of {dev} from user space is wrong or missing"),
            );
        }
    }
    if !out.contains("rw-write-ok") || !out.contains("ro-write-refused") {
        fail(&r, "user-space writes did not behave");
    }
    let data = std::fs::read(&rw).unwrap();
    let expect = format!("{token}\n");
    assert_eq!(
        &data[data.len() - 4096..][..expect.len()],
        expect.as_bytes()
    );
    assert_eq!(md5_file(&ro), want_md5, "the read-only disk file changed");
}
