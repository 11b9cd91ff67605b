//! The acceptance test for object storage: a 1 GiB Linux counter guest (which reads
//! and rewrites a disk block every tick) is snapshotted and pushed to a bucket of a real
//! SeaweedFS cluster (`vmm archive push SNAP s3://…`; its disks become images in the
//! bucket); eight "hosts" — eight `vmm restore s3://…/vms/NAME` processes with separate,
//! cold cache directories, started at once — resume it with signed requests: every
//! counter continues from the snapshot, its disk I/O works (disks read from the bucket,
//! each instance with its own overlay), and each fetched at most 1 % of the memory before
//! its first guest instruction.

mod support;

use std::process::Command;

use support::env::{guest_env, vmm_bin};
use support::linux::*;
use support::process::{Running, fail};
use support::seaweed::Seaweed;

const MEM_MIB: u64 = 1024;
const HOSTS: usize = 8;

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
fn eight_hosts_resume_a_linux_counter_from_a_bucket() {
    let Some(a) = guest_env() else { return };
    let Some(sw) = Seaweed::start() else { return };
    let spec = CounterSpec {
        data_disk: true,
        mem_mib: Some(MEM_MIB),
        ..CounterSpec::new("s3-linux", "s")
    };
    let mut g = CounterGuest::boot_to_tick(&a, &spec, 3);
    let (dir, token, snap) = (g.dir.clone(), g.token.clone(), g.dir.join("snap"));
    let (_, before) = g.snapshot_and_stop(&snap);
    let last_before = *ticks(&before, &token).last().expect("ticks before");

    sw.create_bucket("fleet");
    let mut push = Command::new(vmm_bin());
    sw.apply_env(&mut push);
    let out = push
        .args(["archive", "push"])
        .arg(&snap)
        .args(["s3://fleet/archive", "--name", "linux"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "archive push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // The bucket alone is enough: the original disks and snapshot go away.
    std::fs::remove_dir_all(&snap).unwrap();
    std::fs::remove_file(g.root.as_ref().unwrap()).unwrap();
    std::fs::remove_file(g.data.as_ref().unwrap()).unwrap();

    let mut hosts: Vec<Running> = (0..HOSTS)
        .map(|i| {
            let mut cmd = Command::new(vmm_bin());
            sw.apply_env(&mut cmd);
            cmd.args(["restore", "s3://fleet/archive/vms/linux", "--cache"])
                .arg(dir.join(format!("cache-{i}")));
            Running::spawn_cmd(&mut cmd)
        })
        .collect();
    let want = format!("vmmtest: tick {token} {}", last_before + 4);
    for (i, r) in hosts.iter_mut().enumerate() {
        if r.wait_for(&want, GUEST_EVENT_TIMEOUT).is_none() {
            fail(r, &format!("host {i}: the counter did not continue"));
        }
    }
    let mem = MEM_MIB << 20;
    for (i, r) in hosts.iter_mut().enumerate() {
        r.kill_and_drain();
        let out = r.output();
        let after = r.console();
        let all = ticks(&format!("{before}{after}"), &token);
        for (k, n) in all.iter().enumerate() {
            assert_eq!(
                *n, k as u64,
                "host {i}: tick sequence broken: {all:?}\n{out}"
            );
        }
        let pat = format!("vmmtest: tick {token} ");
        let complete = &after[..after.rfind('\n').map_or(0, |i| i + 1)];
        for l in complete.lines().filter(|l| l.contains(&pat)) {
            assert!(
                l.contains(" md5=") && !l.contains("error="),
                "host {i}: disk I/O failed after the resume: {l}\n{out}"
            );
        }
        assert!(!out.contains("panicked"), "{out}");
        let line = out
            .lines()
            .find(|l| l.contains("fetched before the first guest instruction"))
            .unwrap_or_else(|| panic!("host {i}: no fetch report:\n{out}"))
            .to_string();
        let b0 = fetched_bytes(&line);
        println!(
            "host {i}: {} ticks after the resume; before the first instruction {b0} bytes \
             ({:.3} % of memory)",
            all.len() as u64 - last_before - 1,
            b0 as f64 * 100.0 / mem as f64
        );
        assert!(b0 <= mem / 100, "host {i}: {line}");
    }
}
