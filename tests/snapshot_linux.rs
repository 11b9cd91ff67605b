//! Pause, snapshot and restore a running Linux guest: the test agent's counter (with a
//! disk read/rewrite on every tick) and rcutorture keep going in a new `vmm` process, twice
//! from the same snapshot (clones). The guest boots once; everything else is restores.

mod kept_snapshot;
mod support;

use std::path::Path;

use support::env::guest_env;
use support::linux::*;
use support::process::{Running, fail};

fn restore_and_check(dir: &Path, before: &str, token: &str, last_before: u64, what: &str) {
    let mut r = Running::spawn(&["restore".into(), dir.display().to_string()]);
    let want = format!("vmmtest: tick {token} {}", last_before + 4);
    if r.wait_for(&want, GUEST_EVENT_TIMEOUT).is_none() {
        fail(
            &r,
            &format!("{what}: counter did not continue to {}", last_before + 4),
        );
    }
    // rcutorture reports every 3 s of guest time; wait for its first report after the
    // restore (the ticks above may come faster than that while the guest catches up).
    if !r.console().contains("rcu-torture:")
        && r.wait_for("rcu-torture:", GUEST_EVENT_TIMEOUT).is_none()
    {
        fail(
            &r,
            &format!("{what}: rcutorture printed nothing after restore"),
        );
    }
    r.kill_and_drain();
    let after = r.console();
    let combined = format!("{before}{after}");
    let last = check_consecutive(&combined, token, what);
    assert!(last >= last_before + 4);
    // Every tick after the restore read and rewrote a disk block through virtio-blk.
    let pat = format!("vmmtest: tick {token} ");
    for l in after.lines().filter(|l| l.contains(&pat)) {
        assert!(
            l.contains(" md5=") && !l.contains("error="),
            "{what}: disk I/O failed after restore: {l}\n{after}"
        );
    }
    assert!(
        !combined.contains("rcu-torture: !!!") && !combined.contains("FAILURE"),
        "{what}: rcutorture reported errors\n{combined}"
    );
    assert!(
        after.contains("rcu-torture:"),
        "{what}: rcutorture printed nothing after restore\n{after}"
    );
    let out = r.output();
    assert!(!out.contains("panicked"), "{what}: vmm panicked\n{out}");
}

#[test]
fn counter_continues_after_restore_twice() {
    let Some(a) = guest_env() else { return };
    let spec = CounterSpec {
        data_disk: true,
        extra: "rcutorture.enable=1 rcutorture.stat_interval=3 rcutorture.nreaders=1 \
                rcutorture.nfakewriters=0 rcutorture.onoff_interval=0 rcutorture.shutdown_secs=0",
        ..CounterSpec::new("snapshot-linux", "c")
    };
    let mut g = CounterGuest::boot_to_tick(&a, &spec, 3);
    let (token, snap) = (g.token.clone(), g.dir.join("snap"));
    // The VM stays paused until killed, so its console ends exactly at the snapshot.
    let (report, before) = g.snapshot_and_stop(&snap);
    assert!(report["memory"]["chunks_total"].as_u64().unwrap() > 0);
    let last_before = check_consecutive(&before, &token, "before the snapshot");
    println!("snapshot taken after tick {last_before}: {report}");

    restore_and_check(&snap, &before, &token, last_before, "first restore");
    restore_and_check(
        &snap,
        &before,
        &token,
        last_before,
        "second restore (clone)",
    );
}

/// Guest time across a snapshot kept 0 s, 1 min and 3 min (tests/kept_snapshot): its waits
/// run no guest, so they overlap the other test of this binary.
#[test]
fn counter_guest_across_kept_snapshots() {
    kept_snapshot::counter_guest_across_kept_snapshots();
}
