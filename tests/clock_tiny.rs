//! Guest time across snapshot/restore with the tiny freestanding guest (`Scenario::TscClock`):
//! a periodic tick built from LAPIC TSC-deadline interrupts the way Linux builds its tick on
//! a TSC-deadline LAPIC, with kvmclock enabled. The guest prints its RDTSC at every tick and
//! how many tick periods it had to skip; the host reads kvmclock's per-vCPU page from guest
//! memory and converts the guest's TSC values to kvmclock time.
//!
//! What they show (docs/KEEPING_SNAPSHOTS.md, "Time"; docs/PVM_HOSTS.md):
//! - kvmclock continues from the snapshot (KVM_SET_CLOCK), whatever the gap, on every host;
//!   with `ClockMode::Realtime` it is advanced by the gap instead.
//! - KVM by the book makes the guest TSC continue from the saved value (KVM_SET_MSRS): no
//!   tick periods to skip. PVM-style hosts ignore the TSC a VMM writes (the guest reads the
//!   host's TSC): there the guest's TSC jumps by the gap and a Linux-style periodic tick would
//!   replay every period it missed. The test asserts each host's behaviour and prints it.
//! - After a restore the VMM tells the guest it was stopped (KVM_KVMCLOCK_CTRL sets
//!   PVCLOCK_GUEST_STOPPED, which Linux's watchdogs read).

mod support;

use std::path::Path;
use std::time::Duration;

use vmm::arch::x86_64::ClockMode;

use support::env::temp_dir;
use support::tiny;
use support::tiny::harness::{check, deadline, ensure};
use support::tiny::{Scenario, Spec, TinyVm, Variant, guest};

/// How long the snapshot is kept before it is restored.
const GAP: Duration = Duration::from_secs(3);
/// `pvclock_vcpu_time_info.flags`: the host stopped the VM (KVM_KVMCLOCK_CTRL).
const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;

/// One `tick <n> tsc <hex> missed <m>` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tick {
    n: u32,
    tsc: u64,
    missed: u32,
}

/// The complete tick lines of `console`, in order.
fn ticks(console: &str) -> Vec<Tick> {
    let mut lines: Vec<&str> = console.split('\n').collect();
    lines.pop(); // partial or empty
    lines
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w[..] {
                ["tick", n, "tsc", tsc, "missed", m] => Some(Tick {
                    n: n.parse().ok()?,
                    tsc: u64::from_str_radix(tsc, 16).ok()?,
                    missed: m.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// kvmclock's `pvclock_vcpu_time_info` as the guest sees it.
#[derive(Clone, Copy, Debug)]
struct Pvclock {
    version: u32,
    tsc_timestamp: u64,
    system_time: u64,
    mul: u32,
    shift: i8,
    flags: u8,
}

impl Pvclock {
    /// Reads it from the guest's mailbox (the VM must be paused).
    fn read(vm: &TinyVm) -> Result<Self, String> {
        let r = |o: u64| vm.read_u32(guest::MB_PVCLOCK + o);
        let q =
            |o: u64| -> Result<u64, String> { Ok(u64::from(r(o)?) | u64::from(r(o + 4)?) << 32) };
        let last = r(28)?;
        let pv = Self {
            version: r(0)?,
            tsc_timestamp: q(8)?,
            system_time: q(16)?,
            mul: r(24)?,
            shift: (last & 0xff) as u8 as i8,
            flags: (last >> 8) as u8,
        };
        ensure(
            pv.version != 0 && pv.version.is_multiple_of(2) && pv.mul != 0,
            || format!("kvmclock is not (consistently) set up: {pv:?}"),
        )?;
        Ok(pv)
    }

    /// kvmclock time, in ns, at guest TSC `tsc` (pvclock_clocksource_read's formula).
    fn ns_at(&self, tsc: u64) -> i128 {
        let mut delta = i128::from(tsc.wrapping_sub(self.tsc_timestamp) as i64);
        if self.shift < 0 {
            delta >>= -self.shift;
        } else {
            delta <<= self.shift;
        }
        i128::from(self.system_time) + ((delta * i128::from(self.mul)) >> 32)
    }
}

/// What a snapshot/restore across [`GAP`] did to the guest's clocks.
#[derive(Debug)]
struct Across {
    /// The last tick before the snapshot and the first one entirely after the restore.
    before: Tick,
    after: Tick,
    /// kvmclock time at those ticks, ns.
    kvmclock_before: i128,
    kvmclock_after: i128,
    /// The most tick periods one tick skipped after `before` (the first tick that read the
    /// TSC after the restore is the one that skips the gap).
    missed: u32,
    /// kvmclock's page after the restore.
    pv_after: Pvclock,
    /// The vCPU's TSC frequency.
    tsc_khz: u32,
}

impl Across {
    fn tsc_advance_s(&self) -> f64 {
        self.after.tsc.wrapping_sub(self.before.tsc) as i64 as f64
            / (f64::from(self.tsc_khz) * 1000.0)
    }

    fn kvmclock_advance_s(&self) -> f64 {
        (self.kvmclock_after - self.kvmclock_before) as f64 / 1e9
    }
}

fn restore_with_clock(dir: &Path, clock: ClockMode) -> Result<TinyVm, String> {
    let console = tiny::Capture::default();
    let (state, memory) = vmm::builder::snapshot_files(dir);
    let opts = vmm::builder::RestoreOptions {
        console: vmm::builder::Console::Writer(Box::new(console.clone())),
        blocks: None,
        nets: Vec::new(),
        force: false,
        start_paused: false,
        eager_memory: false,
        clock,
    };
    let vmm = vmm::builder::build_from_snapshot(&state, &memory, opts)
        .map_err(|e| format!("restoring {}: {e}", dir.display()))?;
    Ok(TinyVm { vmm, console })
}

/// Boots the guest, snapshots it at tick 3 or later, keeps the snapshot for [`GAP`], restores
/// it with `clock` and waits for two ticks entirely after the restore.
fn snapshot_gap_restore(name: &str, clock: ClockMode) -> Result<Across, String> {
    let variant = Variant {
        scenario: Scenario::TscClock,
        defsyms: vec![("KVMCLOCK", 1)],
    };
    let tmp = temp_dir(name);
    let snap = tmp.join("snap");
    let mut vm = tiny::boot(Spec::new(variant), Vec::new())?;
    vm.wait_console(deadline(), "tick 3", |c| ticks(c).len() >= 3)?;
    vm.pause()?;
    let pv_before = Pvclock::read(&vm)?;
    vm.snapshot(&snap, None)?;
    let pre = vm.console.text();
    drop(vm);
    let pre_ticks = ticks(&pre);
    let before = *pre_ticks.last().ok_or("no tick before the snapshot")?;
    // A tick line cut by the snapshot is completed by the restored VM: wait for the one after.
    let want = before.n + 2;
    std::thread::sleep(GAP);

    let mut vm = restore_with_clock(&snap, clock)?;
    let all = |c: &str| ticks(&format!("{pre}{c}"));
    vm.wait_console(deadline(), &format!("tick {want}"), |c| {
        all(c).last().is_some_and(|t| t.n >= want)
    })?;
    vm.pause()?;
    let pv_after = Pvclock::read(&vm)?;
    let tsc_khz = vm.vmm.machine.vcpus[0]
        .with(|fd| fd.get_tsc_khz())
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("KVM_GET_TSC_KHZ: {e}"))?;
    let console = vm.console.text();
    let every = all(&console);
    for (i, t) in every.iter().enumerate() {
        ensure(t.n as usize == i + 1, || {
            format!(
                "tick {} at position {}: the numbering broke\n{pre}--- restore ---\n{console}",
                t.n,
                i + 1
            )
        })?;
    }
    let after = every[want as usize - 1];
    let missed = every[before.n as usize..]
        .iter()
        .map(|t| t.missed)
        .max()
        .unwrap_or(0);
    Ok(Across {
        before,
        after,
        missed,
        kvmclock_before: pv_before.ns_at(before.tsc),
        kvmclock_after: pv_after.ns_at(after.tsc),
        pv_after,
        tsc_khz,
    })
}

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The default: kvmclock continues from the snapshot however long it was kept; the TSC does
/// too where KVM lets the VMM set it; the guest is told it was stopped.
#[test]
fn clock_continues_across_a_kept_snapshot() {
    check("clock_continues_across_a_kept_snapshot", || {
        let a = snapshot_gap_restore("clock-continue", ClockMode::Continue)?;
        let gap = GAP.as_secs_f64();
        eprintln!(
            "  kept {gap} s: kvmclock advanced {:.3} s, guest TSC {:.3} s, at most {} tick periods skipped by one tick after the restore",
            a.kvmclock_advance_s(),
            a.tsc_advance_s(),
            a.missed
        );
        // Not a timing bound: a clock that saw the gap advanced by more than `gap`.
        ensure(a.kvmclock_advance_s() < gap - 1.0, || {
            format!("kvmclock saw the time the snapshot was kept: {a:?}")
        })?;
        ensure(a.pv_after.flags & PVCLOCK_GUEST_STOPPED != 0, || {
            format!(
                "the restored guest was not told it was stopped: {:?}",
                a.pv_after
            )
        })?;
        if pvm_host() {
            // This host ignores the TSC the VMM writes: the guest's TSC carried on with the
            // host's, and a Linux-style periodic tick would replay every period it missed.
            eprintln!(
                "  PVM host: the guest TSC jumped by the gap ({:.3} s); only kvmclock continues",
                a.tsc_advance_s()
            );
            ensure(a.tsc_advance_s() >= gap && a.missed > 0, || {
                format!(
                    "this PVM host now restores the guest TSC: update docs/PVM_HOSTS.md and the quirks: {a:?}"
                )
            })
        } else {
            ensure(a.tsc_advance_s() < gap - 1.0, || {
                format!("the guest TSC saw the time the snapshot was kept: {a:?}")
            })?;
            let ticks_per_s = f64::from(a.tsc_khz) * 1000.0 / guest::TSC_PERIOD as f64;
            ensure(f64::from(a.missed) < (gap - 1.0) * ticks_per_s, || {
                format!("the tick skipped periods for the time the snapshot was kept: {a:?}")
            })
        }
    });
}

/// `--clock-realtime`: kvmclock is advanced by the time the snapshot was kept (where the
/// snapshot recorded the host's real time).
#[test]
fn clock_realtime_advances_kvmclock_by_the_gap() {
    check("clock_realtime_advances_kvmclock_by_the_gap", || {
        let a = match snapshot_gap_restore("clock-realtime", ClockMode::Realtime) {
            Err(e) if e.contains("does not record the host's real time") => {
                eprintln!("SKIP: this KVM does not report KVM_CLOCK_REALTIME: {e}");
                return Ok(());
            }
            r => r?,
        };
        let gap = GAP.as_secs_f64();
        eprintln!(
            "  kept {gap} s, restored with ClockMode::Realtime: kvmclock advanced {:.3} s",
            a.kvmclock_advance_s()
        );
        ensure(a.kvmclock_advance_s() >= gap, || {
            format!("kvmclock was not advanced by the gap: {a:?}")
        })
    });
}
