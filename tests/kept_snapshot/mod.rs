//! Guest time across a kept snapshot (docs/KEEPING_SNAPSHOTS.md, "Time"): the test agent's
//! counter guest is snapshotted once and restored 0 s, 1 min and 3 min later. Each restore
//! must tick at once (no catch-up of the time the snapshot was kept), continue the count,
//! keep the guest's monotonic clock continuous and bring its wall clock to the host's.
//!
//! The waits between restores run no guest, so other tests of the including binary run
//! meanwhile (`counter_guest_across_kept_snapshots` is included by tests/snapshot_linux.rs).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::support::env::guest_env;
use crate::support::linux::*;
use crate::support::process::{Running, fail};

/// One `vmmtest: tick TOKEN N mono=S.N real=S.N` line.
#[derive(Clone, Copy, Debug)]
pub struct TimedTick {
    /// The count.
    pub n: u64,
    /// CLOCK_MONOTONIC, seconds.
    pub mono: f64,
    /// CLOCK_REALTIME, seconds since the epoch.
    pub real: f64,
}

/// The complete tick lines of `console` carrying times, in order.
pub fn timed_ticks(console: &str, token: &str) -> Vec<TimedTick> {
    let pat = format!("vmmtest: tick {token} ");
    let mut lines: Vec<&str> = console.split('\n').collect();
    lines.pop(); // partial or empty
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l[l.find(&pat)? + pat.len()..].split_whitespace();
            let n = w.next()?.parse().ok()?;
            let mono = w.next()?.strip_prefix("mono=")?.parse().ok()?;
            let real = w.next()?.strip_prefix("real=")?.parse().ok()?;
            Some(TimedTick { n, mono, real })
        })
        .collect()
}

/// Appends `line` (with the date) to `target/test-logs/kept-snapshot.txt`, so that every run
/// of the suite keeps its figures even though cargo hides a passing test's output.
fn record(line: &str) {
    use std::io::Write;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-logs");
    let opened = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("kept-snapshot.txt"))
    });
    if let Ok(mut f) = opened {
        let _ = writeln!(f, "{:.0} {line}", now_s());
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What one restore showed.
#[derive(Debug)]
struct Restored {
    /// Seconds the snapshot had been kept when the restore started.
    kept_s: f64,
    /// Host wall time from starting `vmm restore` to seeing the first tick printed entirely
    /// after the restore.
    first_tick_s: f64,
    /// Guest monotonic time between the last tick before the snapshot and that tick, beyond
    /// the counter's one second per tick.
    mono_step_s: f64,
    /// Guest wall clock at that tick minus the host's wall clock when the restore started.
    wall_vs_host_s: f64,
}

/// Restores `snap`, waits for two ticks after the last one of `before`,
/// checks the count and returns the timings.
fn restore_once(snap: &Path, before: &str, token: &str, taken_at: Instant, what: &str) -> Restored {
    let last = *timed_ticks(before, token).last().expect("ticks before");
    let kept_s = taken_at.elapsed().as_secs_f64();
    let wall_start = now_s();
    let t0 = Instant::now();
    let mut r = Running::spawn(&["restore".to_string(), snap.display().to_string()]);
    // The snapshot may have cut a tick line: the restored VM completes it first. The first
    // tick printed entirely after the restore is the first complete line of its own output
    // (its line starts with the printk timestamp).
    let first = loop {
        let line = r
            .wait_for(&format!("vmmtest: tick {token} "), Duration::from_secs(300))
            .unwrap_or_else(|| fail(&r, &format!("{what}: no tick after the restore")));
        if line.starts_with('[') {
            break line;
        }
    };
    let first_tick_s = t0.elapsed().as_secs_f64();
    let first = timed_ticks(&format!("{first}\n"), token)
        .pop()
        .unwrap_or_else(|| fail(&r, &format!("{what}: bad tick line {first:?}")));
    if r.wait_for(
        &format!("vmmtest: tick {token} {} ", first.n + 1),
        Duration::from_secs(120),
    )
    .is_none()
    {
        fail(
            &r,
            &format!("{what}: the counter stopped after {}", first.n),
        );
    }
    r.kill_and_drain();
    let after = r.console();
    let combined = format!("{before}{after}");
    check_consecutive(&combined, token, what);
    let out = r.output();
    assert!(!out.contains("panicked"), "{what}: vmm panicked\n{out}");
    // The first tick after the restore is the one after `last` or, when the snapshot caught
    // the agent between the two, the one after that.
    assert!(
        first.n == last.n + 1 || first.n == last.n + 2,
        "{what}: first tick after the restore is {} after {}\n{combined}",
        first.n,
        last.n
    );
    let periods = (first.n - last.n) as f64;
    Restored {
        kept_s,
        first_tick_s,
        mono_step_s: first.mono - last.mono - periods,
        wall_vs_host_s: first.real - wall_start,
    }
}

/// Boots the counter guest (1 vCPU, 256 MiB, `rdinit=/idle`), snapshots it, restores the
/// snapshot 0 s, 1 min and 3 min later.
pub fn counter_guest_across_kept_snapshots() {
    let Some(a) = guest_env() else { return };
    let spec = CounterSpec {
        root_disk: false,
        extra: "vmmtest.clock_sync",
        ..CounterSpec::new("kept-snapshot", "k")
    };
    let mut g = CounterGuest::boot_to_tick(&a, &spec, 3);
    // Snapshot late in a counter second, so that the next tick is due soon after a restore.
    g.expect_tick(4, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(600));
    let (token, snap) = (g.token.clone(), g.dir.join("snap"));
    let (_, before) = g.snapshot_and_stop(&snap);
    let taken_at = Instant::now();
    assert!(
        !timed_ticks(&before, &token).is_empty(),
        "tick lines without mono=/real= times: rebuild the guest (resources/build-guest.sh)\n{before}"
    );
    let last_before = check_consecutive(&before, &token, "before the snapshot");
    println!("snapshot after tick {last_before}");

    for (gap, what) in [
        (0, "restored at once"),
        (60, "restored after 1 min"),
        (180, "restored after 3 min"),
    ] {
        let wait = Duration::from_secs(gap).saturating_sub(taken_at.elapsed());
        std::thread::sleep(wait);
        let res = restore_once(&snap, &before, &token, taken_at, what);
        let line = format!(
            "{what}: kept {:.0} s, first tick after {:.3} s, guest monotonic step {:.3} s, guest wall clock {:+.3} s from the host's",
            res.kept_s, res.first_tick_s, res.mono_step_s, res.wall_vs_host_s
        );
        println!("{line}");
        record(&line);
        // The guest's monotonic clock did not see the time the snapshot was kept.
        assert!(
            res.mono_step_s < 1.0,
            "{what}: guest monotonic time advanced {:.3} s beyond the tick period: {res:?}",
            res.mono_step_s
        );
        // No catch-up: generous for a loaded host, far below the minutes the catch-up took.
        assert!(
            res.first_tick_s < 10.0,
            "{what}: the first tick came {:.1} s after the restore started: {res:?}",
            res.first_tick_s
        );
        // Stepped to the host's by the agent (the tick is printed after the restore
        // started and before the host saw it).
        assert!(
            res.wall_vs_host_s > -1.0 && res.wall_vs_host_s < res.first_tick_s + 1.0,
            "{what}: guest wall clock {:+.3} s from the host's: {res:?}",
            res.wall_vs_host_s
        );
    }
}
