//! The project's Linux guest on lazy remote disks served by a real nginx: the kernel mounts
//! its root filesystem from a remote image, the test agent hashes and writes a remote data
//! disk through a persistent overlay, and a second boot with the same overlay sees the
//! written text while the served archive stays unchanged.

mod support;

use support::env::*;
use support::linux::*;

use std::process::Command;
use support::files::{md5_file, tree_hashes};
use support::nginx::{Nginx, nginx_available};
use support::process::*;

fn import(src: &std::path::Path, archive: &std::path::Path, name: &str) {
    let out = Command::new(vmm_bin())
        .args(["image", "import"])
        .arg(src)
        .arg(archive)
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bytes_fetched(out: &str, disk: usize) -> Option<u64> {
    let pat = format!("\"disk\":{disk}");
    out.lines()
        .filter(|l| l.contains("remote disk:") && l.contains(&pat))
        .find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l[l.find('{')?..]).ok()?;
            v["bytes_fetched"].as_u64()
        })
}

#[test]
fn boot_from_remote_root_with_persistent_overlay() {
    let Some(a) = guest_env() else { return };
    if !nginx_available() {
        return;
    }
    let dir = scratch("remote-linux");
    let archive = dir.join("archive");
    import(&a.file("rootfs.ext4"), &archive, "rootfs");
    import(&a.file("disk.img"), &archive, "data");
    let served_before = tree_hashes(&archive);
    let nginx = Nginx::start(&archive);
    let base = nginx.url();
    let cache = dir.join("cache");
    let token = format!("remote-{}", std::process::id());
    let disks = |extra: &str| -> Vec<String> {
        vec![
            "--kernel".into(),
            kernel_arg(&a, extra),
            "--block".into(),
            format!(
                "url={base}/images/rootfs,root=true,cache={},overlay={}",
                cache.display(),
                dir.join("root.overlay").display()
            ),
            "--block".into(),
            format!(
                "url={base}/images/data,cache={},overlay={}",
                cache.display(),
                dir.join("data.overlay").display()
            ),
        ]
    };

    // First boot: mount the remote root, hash the remote data disk, write at its end.
    let mut r = Running::spawn(&disks(&format!(
        "init=/idle vmmtest.disk=/dev/vdb vmmtest.write={token} vmmtest.poweroff"
    )));
    if r.wait_for("VFS: Mounted root (ext4 filesystem)", BOOT_TIMEOUT)
        .is_none()
    {
        fail(&r, "the remote root filesystem was not mounted");
    }
    match r.wait_exit(GUEST_EVENT_TIMEOUT) {
        Some(0) => {}
        other => fail(&r, &format!("vmm exit {other:?}")),
    }
    let out = r.output();
    let want = md5_file(&a.file("disk.img"));
    if !out.contains(&format!("vmmtest: disk /dev/vdb md5={want} ")) {
        fail(&r, "wrong md5 of the remote data disk");
    }
    if !out.contains("vmmtest: write /dev/vdb ok") {
        fail(&r, "the write to the remote disk's overlay failed");
    }
    let root_size = std::fs::metadata(a.file("rootfs.ext4")).unwrap().len();
    let fetched = bytes_fetched(&out, 0).unwrap_or_else(|| fail(&r, "no fetch report for disk 0"));
    println!("root image: {fetched} of {root_size} bytes fetched");
    assert!(
        fetched < root_size / 2,
        "mounting the root filesystem fetched {fetched} of {root_size} bytes"
    );

    // Second boot with the same overlay (and cache): the guest sees its text.
    let mut expect = std::fs::read(a.file("disk.img")).unwrap();
    let n = expect.len();
    expect[n - 4096..].fill(0);
    expect[n - 4096..][..token.len() + 1].copy_from_slice(format!("{token}\n").as_bytes());
    let modified = dir.join("expected.img");
    std::fs::write(&modified, &expect).unwrap();
    let want2 = md5_file(&modified);
    let mut r = Running::spawn(&disks("init=/idle vmmtest.disk=/dev/vdb vmmtest.poweroff"));
    match r.wait_exit(BOOT_TIMEOUT) {
        Some(0) => {}
        other => fail(&r, &format!("second boot: vmm exit {other:?}")),
    }
    if !r
        .output()
        .contains(&format!("vmmtest: disk /dev/vdb md5={want2} "))
    {
        fail(
            &r,
            "after a restart the overlay did not show the written text",
        );
    }
    drop(nginx);
    assert_eq!(
        tree_hashes(&archive),
        served_before,
        "the served archive changed"
    );
}

/// nginx stopped while the guest reads a remote disk: reads retry, then the guest gets I/O
/// errors (the test agent's counter prints `error=`), vmm keeps running without a panic,
/// and reads work again once nginx is back on the same port. 4 KiB image chunks make every
/// counter tick read a chunk that is not cached yet. No step has a time limit short enough to
/// be hit on a loaded host: each waits for its event, and the checks are on the order and
/// content of the guest's tick lines.
#[test]
fn guest_survives_the_web_server_going_away() {
    let Some(a) = guest_env() else { return };
    if !nginx_available() {
        return;
    }
    let dir = scratch("remote-fault");
    let archive = dir.join("archive");
    let out = Command::new(vmm_bin())
        .args(["image", "import"])
        .arg(a.file("disk.img"))
        .arg(&archive)
        .args(["--name", "data", "--chunk-kib", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = dir.join("rootfs.ext4");
    std::fs::copy(a.file("rootfs.ext4"), &root).unwrap();
    let mut nginx = Nginx::start(&archive);
    let token = format!("f{}", std::process::id());
    let mut r = Running::spawn(&[
        "--kernel".into(),
        kernel_arg(
            &a,
            &format!(
                "init=/idle vmmtest.counter vmmtest.token={token} vmmtest.counter_disk=/dev/vdb"
            ),
        ),
        "--block".into(),
        format!("path={},root=true", root.display()),
        "--block".into(),
        format!(
            "url={}/images/data,cache={},overlay={}",
            nginx.url(),
            dir.join("cache").display(),
            dir.join("data.overlay").display()
        ),
    ]);
    if r.wait_for(&format!("vmmtest: tick {token} 2 "), BOOT_TIMEOUT)
        .is_none()
    {
        fail(&r, "the counter did not start on the remote disk");
    }
    nginx.stop();
    // Everything printed so far may have been read while nginx was up.
    let up_before = ticks(&r.console(), &token).len();
    // The guest goes on through the outage: a tick line reporting the I/O error arrives (no
    // bound on when: the reads first use up their retries, slower on a loaded host).
    let Some(errline) = r.wait_for(" error=", GUEST_EVENT_TIMEOUT) else {
        fail(&r, "the guest saw no I/O error with nginx down");
    };
    if !errline.contains(&format!("vmmtest: tick {token} ")) {
        fail(&r, &format!("the error is not a counter tick: {errline}"));
    }
    println!("with nginx down: {errline}");
    let down = ticks(&r.console(), &token).len();
    nginx.restart();
    // Reads work again: a tick with a checksum and no error, after the restart.
    let recovered = loop {
        let Some(l) = r.wait_for(&format!("vmmtest: tick {token} "), GUEST_EVENT_TIMEOUT) else {
            fail(&r, "no ticks after nginx came back");
        };
        if l.contains(" md5=") && !l.contains("error=") {
            break l;
        }
    };
    println!("with nginx back: {recovered}");
    // Order and content: one counter, no gap or repeat across the outage; the first error
    // came after nginx stopped and the good read after the error.
    let console = r.console();
    check_consecutive(&console, &token, "across the outage");
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| l.contains(&format!("vmmtest: tick {token} ")))
        .collect();
    let first_err = lines
        .iter()
        .position(|l| l.contains("error="))
        .unwrap_or_else(|| fail(&r, "no error tick in the console"));
    assert!(
        first_err + 1 >= up_before && first_err < down,
        "the first I/O error (tick index {first_err}) is not within the outage \
         (ticks {up_before}..{down})\n{console}"
    );
    assert!(
        lines[down..]
            .iter()
            .any(|l| l.contains(" md5=") && !l.contains("error=")),
        "no good read after nginx came back\n{console}"
    );
    assert!(r.child.try_wait().unwrap().is_none(), "vmm exited");
    r.kill_and_drain();
    assert!(!r.output().contains("panicked"), "vmm panicked");
}
