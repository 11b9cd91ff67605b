//! The shape of tiny-guest tests: a body returning `Result<(), String>` run by [`check`]
//! (skipped without /dev/kvm), [`ensure`] for conditions, one [`deadline`] per wait, and
//! [`check_ticks`] for the tick scenario's console stream.

use std::time::{Duration, Instant};

/// Every wait of a test ends by then: a ceiling for events the guest produces at native
/// speed in milliseconds, generous so that a loaded host never reaches it.
pub fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(120)
}

/// Runs a test body; a failure panics with its message (which carries console output).
/// Skips, printing `SKIP:`, when /dev/kvm cannot be opened.
pub fn check(name: &str, body: impl FnOnce() -> Result<(), String>) {
    if !crate::support::env::kvm_or_skip() {
        return;
    }
    let t = Instant::now();
    let res = body();
    eprintln!("{name}: {:?}", t.elapsed());
    if let Err(e) = res {
        panic!("{name} failed: {e}");
    }
}

/// `Ok(())` if `cond`, else the message.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg()) }
}

/// Checks the tick scenario's console stream: "serial set", then "tick 1", "tick 2", ...
/// without gap or repeat (a trailing partial line is ignored). Returns the last tick.
pub fn check_ticks(stream: &str) -> Result<u32, String> {
    let rest = stream
        .strip_prefix("serial set\n")
        .ok_or_else(|| format!("the stream does not start with \"serial set\": {stream:?}"))?;
    let mut last = 0;
    let mut lines = rest.split('\n').collect::<Vec<_>>();
    lines.pop(); // after the last '\n': partial or empty
    for line in lines {
        let n: u32 = line
            .strip_prefix("tick ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected line {line:?} after tick {last}"))?;
        if n != last + 1 {
            return Err(format!("tick {n} follows tick {last}"));
        }
        last = n;
    }
    Ok(last)
}
