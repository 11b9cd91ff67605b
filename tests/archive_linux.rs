//! The acceptance test: a 1 GiB Linux guest with a running counter (which reads and
//! rewrites a disk block every tick) is snapshotted, pushed to an archive (its two local
//! disks become archive images), served by a real nginx, and resumed with
//! `vmm restore http://…/vms/NAME`: the counter continues, the disk I/O works on a fresh
//! overlay, and the bytes fetched before the first guest instruction and in the first
//! second are a small fraction of the memory.

mod support;

use std::process::Command;
use std::time::Duration;

use support::env::{guest_env, vmm_bin};
use support::linux::*;
use support::nginx::{Nginx, nginx_available};
use support::process::{Running, fail};

const MEM_MIB: u64 = 1024;

/// The byte count at the start of an "archive …: fetched …: N bytes (" log line.
fn fetched_bytes(line: &str) -> u64 {
    let after = line.split("fetched").nth(1).unwrap_or_default();
    after
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line:?}"))
}

#[test]
fn linux_counter_resumes_from_an_http_archive() {
    let Some(a) = guest_env() else { return };
    if !nginx_available() {
        return;
    }
    let spec = CounterSpec {
        data_disk: true,
        mem_mib: Some(MEM_MIB),
        ..CounterSpec::new("archive-linux", "a")
    };
    let mut g = CounterGuest::boot_to_tick(&a, &spec, 3);
    let (dir, token, snap) = (g.dir.clone(), g.token.clone(), g.dir.join("snap"));
    let (_, before) = g.snapshot_and_stop(&snap);
    let last_before = *ticks(&before, &token).last().expect("ticks before");

    let archive = dir.join("archive");
    let out = Command::new(vmm_bin())
        .args(["archive", "push"])
        .arg(&snap)
        .arg(&archive)
        .args(["--name", "linux"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "archive push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // The archive alone is enough: the original disks and snapshot go away.
    std::fs::remove_dir_all(&snap).unwrap();
    std::fs::remove_file(g.root.as_ref().unwrap()).unwrap();
    std::fs::remove_file(g.data.as_ref().unwrap()).unwrap();

    let nginx = Nginx::start(&archive);
    let url = format!("{}/vms/linux", nginx.url());
    let mut r = Running::spawn(&[
        "restore".into(),
        url.clone(),
        "--cache".into(),
        dir.join("cache").display().to_string(),
    ]);
    let want = format!("vmmtest: tick {token} {}", last_before + 4);
    if r.wait_for(&want, GUEST_EVENT_TIMEOUT).is_none() {
        fail(
            &r,
            "the counter did not continue after the resume over HTTP",
        );
    }
    let first_second = r.wait_for("first second", Duration::from_secs(120));
    r.kill_and_drain();
    let out = r.output();
    let after = r.console();
    let all = ticks(&format!("{before}{after}"), &token);
    for (i, n) in all.iter().enumerate() {
        assert_eq!(*n, i as u64, "tick sequence broken: {all:?}\n{out}");
    }
    let pat = format!("vmmtest: tick {token} ");
    // Complete lines only: the process was killed, maybe in the middle of one.
    let complete = &after[..after.rfind('\n').map_or(0, |i| i + 1)];
    for l in complete.lines().filter(|l| l.contains(&pat)) {
        assert!(
            l.contains(" md5=") && !l.contains("error="),
            "disk I/O failed after the resume: {l}\n{out}"
        );
    }
    assert!(!out.contains("panicked"), "{out}");
    let line = |pat: &str| {
        out.lines()
            .find(|l| l.contains(pat))
            .unwrap_or_else(|| panic!("no {pat:?} line:\n{out}"))
            .to_string()
    };
    let before_first = line("fetched before the first guest instruction");
    let running = line("guest running");
    let first_second = first_second.unwrap_or_else(|| line("first second"));
    println!("{before_first}\n{running}\n{first_second}");
    let mem = MEM_MIB << 20;
    let b0 = fetched_bytes(&before_first);
    let b1 = fetched_bytes(&first_second);
    println!(
        "fetched before the first instruction: {b0} bytes ({:.2} % of memory); \
         by the end of the first second: {b1} bytes ({:.2} %)",
        b0 as f64 * 100.0 / mem as f64,
        b1 as f64 * 100.0 / mem as f64
    );
    assert!(b0 < mem / 100, "{before_first}");
    assert!(b1 < mem / 5, "{first_second}");
}
