//! Snapshot and restore with the tiny freestanding guest (`tests/tiny/guest.s`): registers,
//! memory, timers and the serial port across a snapshot/restore (and a second restore of the
//! same snapshot), exact console continuity across a chain of snapshots, a virtio-blk request
//! in flight at snapshot time, corrupt snapshots, and chunk deduplication in a shared store.
//!
//! The tests drive the VMs on the test thread (`tiny::boot` / `tiny::restore`); every wait
//! has a deadline. Each test skips, printing `SKIP:`, only when /dev/kvm cannot be opened.
//! Set `TINY_KEEP_TMP=1` to keep the snapshot directories under `target/tmp/tiny-snapshot`.

mod tiny;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::config::BlockConfig;
use vmm::devices::bus::lock;
use vmm::snapshot::{ChunkEntry, MemoryManifest};
use vmm::vstate::exit::ExitReason;

use tiny::{Scenario, Spec, TempDir, TinyVm, Variant, guest};

/// Every wait of a test ends by then.
fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// Runs a test body; a failure panics with its message (which carries console output).
fn check(name: &str, body: impl FnOnce() -> Result<(), String>) {
    if !tiny::have_kvm() {
        return;
    }
    let t = Instant::now();
    let res = body();
    eprintln!("{name}: {:?}", t.elapsed());
    if let Err(e) = res {
        panic!("{name} failed: {e}");
    }
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg()) }
}

// ---------------------------------------------------------------------------------------
// 1 + 2: registers, memory, timer and serial state across snapshot/restore.

/// Checks the tick scenario's console stream: "serial set", then "tick 1", "tick 2", ...
/// without gap or repeat (a trailing partial line is ignored). Returns the last tick.
fn check_ticks(stream: &str) -> Result<u32, String> {
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

/// Waits until `pre` + the console of `vm` holds at least `target` ticks, then checks the
/// whole stream. Returns the last tick.
fn wait_ticks(vm: &TinyVm, pre: &str, target: u32, name: &str) -> Result<u32, String> {
    let stream = |c: &str| format!("{pre}{c}");
    // A malformed stream ends the wait at once; the check below reports it.
    vm.wait_console(deadline(), &format!("tick {target} on {name}"), |c| {
        check_ticks(&stream(c)).map_or(true, |n| n >= target)
    })?;
    let console = vm.console.text();
    check_ticks(&stream(&console)).map_err(|e| {
        format!(
            "{name}: {e}\n--- console before the snapshot ---\n{pre}\n--- console of {name} ---\n{console}\n--- end ---"
        )
    })
}

fn ticks_across_snapshot(timer_lapic: bool) -> Result<(), String> {
    let variant = Variant {
        scenario: Scenario::SnapTicks,
        defsyms: vec![("TIMER_LAPIC", u64::from(timer_lapic))],
    };
    let tmp = TempDir::new(if timer_lapic {
        "ticks-lapic"
    } else {
        "ticks-pit"
    });
    let snap = tmp.join("snap");

    let mut vm = tiny::boot(Spec::new(variant), Vec::new())?;
    vm.wait_for(deadline(), "tick 3\n")?;
    vm.pause()?;
    let regs = vm.regs()?;
    let count = vm.read_u32(guest::MB_COUNT)?;
    let ticks = vm.read_u32(guest::MB_TICKS)?;
    let report = vm.snapshot(&snap, None)?;
    let pre = vm.console.text();
    let pre_last = check_ticks(&pre)?;
    eprintln!(
        "  snapshot at tick {pre_last} (r12 {}, MB_COUNT {count}, MB_TICKS {ticks}): {:.1} ms, {} chunks ({} zero)",
        regs.r12, report.total_ms, report.memory.chunks_total, report.memory.chunks_zero
    );
    drop(vm);

    // Restore paused: registers, memory and the serial registers are those saved.
    let mut a = tiny::restore(&snap, None, true)?;
    let regs_a = a.regs()?;
    ensure(regs_a == regs, || {
        format!("restored registers differ:\nsaved    {regs:x?}\nrestored {regs_a:x?}")
    })?;
    let (count_a, ticks_a) = (a.read_u32(guest::MB_COUNT)?, a.read_u32(guest::MB_TICKS)?);
    ensure((count_a, ticks_a) == (count, ticks), || {
        format!("restored MB_COUNT/MB_TICKS {count_a}/{ticks_a}, saved {count}/{ticks}")
    })?;
    {
        let serial = lock(&a.vmm.serial).serial.state();
        let got = [
            serial.baud_divisor_low,
            serial.baud_divisor_high,
            serial.line_control,
            serial.modem_control,
            serial.scratch,
        ];
        let want = guest::SERIAL_REGS.map(|(_, v, _)| v);
        // The guest may have been paused inside serial_check with DLAB set.
        let lcr_ok = got[2] & 0x7f == want[2];
        ensure(
            got[..2] == want[..2] && lcr_ok && got[3..] == want[3..],
            || {
                format!(
                    "restored COM1 registers (DLL, DLM, LCR, MCR, SCR) {got:x?}, expected {want:x?}"
                )
            },
        )?;
    }
    a.resume()?;
    // A second VM from the same snapshot, running alongside the first.
    let b = tiny::restore(&snap, None, false)?;

    // Both continue the numbering from the saved value, and their timers keep firing (the
    // guest also checks r12 == MB_COUNT and the COM1 registers at every tick).
    let last_a = wait_ticks(&a, &pre, pre_last + 3, "restore 1")?;
    let last_b = wait_ticks(&b, &pre, pre_last + 3, "restore 2")?;
    eprintln!("  restore 1 reached tick {last_a}, restore 2 tick {last_b}");
    for (name, vm) in [("restore 1", &a), ("restore 2", &b)] {
        let c = vm.console.text();
        ensure(!c.contains("serial set") && !c.contains("FAIL"), || {
            format!("{name} rebooted or failed:\n{c}")
        })?;
    }
    Ok(())
}

/// PIT + 8259 PIC ticks, r12, guest memory and COM1 registers across a snapshot, restored
/// twice (the second restore runs alongside the first).
#[test]
fn pit_ticks_registers_and_serial_across_restore() {
    check("pit_ticks_registers_and_serial_across_restore", || {
        ticks_across_snapshot(false)
    });
}

/// The same with the LAPIC timer (periodic) instead of the PIT.
#[test]
fn lapic_timer_ticks_registers_and_serial_across_restore() {
    check(
        "lapic_timer_ticks_registers_and_serial_across_restore",
        || ticks_across_snapshot(true),
    );
}

// ---------------------------------------------------------------------------------------
// Console continuity, byte for byte, across a chain of snapshots taken mid-output.

/// Checks that the complete lines of `stream` are 1, 2, 3, ...; returns the last number.
fn check_numbers(stream: &str) -> Result<u64, String> {
    let mut last = 0u64;
    let mut lines = stream.split('\n').collect::<Vec<_>>();
    lines.pop();
    for (i, line) in lines.iter().enumerate() {
        match line.parse::<u64>() {
            Ok(n) if n == last + 1 => last = n,
            _ => {
                let from = i.saturating_sub(3);
                return Err(format!(
                    "line {} is {line:?} after {last}; lines {from}..: {:?}",
                    i + 1,
                    &lines[from..(i + 3).min(lines.len())]
                ));
            }
        }
    }
    Ok(last)
}

/// The guest prints numbered lines as fast as it can; the VM is paused (mostly in the middle
/// of serial I/O), snapshotted, dropped and restored, five times in a chain. The console
/// output of all the VMs, concatenated, must be exactly 1, 2, 3, ...: an I/O instruction
/// the vCPU was executing when paused must be neither lost nor executed twice.
#[test]
fn serial_output_is_exact_across_a_chain_of_snapshots() {
    check("serial_output_is_exact_across_a_chain_of_snapshots", || {
        let tmp = TempDir::new("stream");
        let mut stream = String::new();
        let mut vm = tiny::boot(Spec::new(Scenario::SnapStream), Vec::new())?;
        for round in 0..=5 {
            let base = stream.len();
            vm.wait_console(deadline(), "300 more lines", |c| {
                c.bytes().filter(|&b| b == b'\n').count() >= 300 + usize::from(base == 0)
            })?;
            vm.pause()?;
            let count = vm.read_u32(guest::MB_COUNT)?;
            let r12 = vm.regs()?.r12;
            stream.push_str(&vm.console.text());
            let last = check_numbers(&stream).map_err(|e| {
                format!(
                    "after round {round}: {e}\n(the stream ends with {:?})",
                    tail(&stream)
                )
            })?;
            ensure(u64::from(count) == r12 && r12 >= last, || {
                format!("round {round}: MB_COUNT {count}, r12 {r12}, last line {last}")
            })?;
            if round == 5 {
                eprintln!("  {last} lines over 6 VMs");
                break;
            }
            let dir = tmp.join(format!("snap{round}"));
            vm.snapshot(&dir, None)?;
            drop(vm);
            vm = tiny::restore(&dir, None, false)?;
        }
        Ok(())
    });
}

fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(40);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

// ---------------------------------------------------------------------------------------
// 3: a virtio-blk request in flight at snapshot time.

const DISK_LEN: u64 = 64 << 10;

fn disk_pattern(xor: u64, range: std::ops::Range<u64>) -> Vec<u8> {
    range
        .step_by(8)
        .flat_map(|o| (o ^ xor).to_le_bytes())
        .collect()
}

fn make_disk(path: &Path) -> Result<BlockConfig, String> {
    fs::write(path, disk_pattern(guest::DISK_XOR, 0..DISK_LEN))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(BlockConfig {
        path: path.to_path_buf(),
        read_only: false,
        id: Some("tiny0".into()),
        root: false,
    })
}

/// Used-ring index of the guest's virtqueue.
fn used_idx(vm: &TinyVm) -> Result<u16, String> {
    Ok(vm.read_u32(guest::VQ_USED)?.to_le_bytes()[2..4]
        .try_into()
        .map(u16::from_le_bytes)
        .expect("2 bytes"))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum InFlight {
    /// Snapshot with the request in the avail ring, not yet seen by the device.
    Pending,
    /// Snapshot with the request completed in the used ring, not yet seen by the guest.
    Completed,
}

fn virtio_in_flight(mode: InFlight) -> Result<(), String> {
    let tmp = TempDir::new(&format!("virtio-{mode:?}"));
    let disk_path = tmp.join("disk.img");
    let disk = make_disk(&disk_path)?;
    let snap = tmp.join("snap");

    let mut vm = tiny::boot(Spec::new(Scenario::SnapVirtio), vec![disk])?;
    // The guest notified the queue; the device only works when the event loop runs, which
    // this test does not do for the booted VM unless asked to complete the request.
    vm.wait_for(deadline(), "virtio: read posted\n")?;
    if mode == InFlight::Completed {
        let end = deadline();
        while used_idx(&vm)? == 0 {
            ensure(Instant::now() < end, || {
                "the device did not complete the read".into()
            })?;
            vm.vmm
                .events
                .run_with_timeout(10)
                .map_err(|e| format!("event loop: {e:?}"))?;
        }
    }
    vm.pause()?;
    let used = used_idx(&vm)?;
    let expected_used = match mode {
        InFlight::Pending => 0,
        InFlight::Completed => 1,
    };
    ensure(used == expected_used, || {
        format!("used idx {used} at snapshot time, expected {expected_used}")
    })?;
    vm.snapshot(&snap, None)?;
    let pre = vm.console.text();
    ensure(pre == "virtio: read posted\n", || {
        format!("unexpected console before the snapshot: {pre:?}")
    })?;
    drop(vm);

    let mut r = tiny::restore(&snap, None, true)?;
    let used_r = used_idx(&r)?;
    ensure(used_r == used, || {
        format!("restored used idx {used_r}, saved {used}")
    })?;
    // Let the guest look at the used ring, then run the event loop until it resets.
    r.write(guest::MB_HOST_GO, guest::HOST_GO)?;
    r.resume()?;
    let exit = tiny::run_for(&mut r, Duration::from_secs(30))?;
    let console = r.console.text();
    ensure(
        exit == ExitReason::Reset && console == "virtio: go\nvirtio: read ok\nvirtio: write ok\n",
        || format!("restored VM ended with {exit:?}, console:\n{console}"),
    )?;
    // The read landed in guest memory (the guest checked it too) ...
    let mut buf = vec![0u8; guest::IO_LEN as usize];
    vm_memory::Bytes::read_slice(
        &r.vmm.mem,
        &mut buf,
        vm_memory::GuestAddress(guest::READ_BUF),
    )
    .map_err(|e| format!("read guest memory: {e}"))?;
    let off = guest::READ_SECTOR * 512;
    ensure(
        buf == disk_pattern(guest::DISK_XOR, off..off + guest::IO_LEN),
        || "the read buffer does not hold the disk's data".into(),
    )?;
    drop(r);
    // ... and the write after the restore landed in the disk file, nothing else changed.
    let data = fs::read(&disk_path).map_err(|e| format!("read the disk: {e}"))?;
    let w = guest::WRITE_SECTOR * 512;
    let mut expected = disk_pattern(guest::DISK_XOR, 0..DISK_LEN);
    expected[w as usize..(w + guest::IO_LEN) as usize]
        .copy_from_slice(&disk_pattern(guest::WRITE_XOR, w..w + guest::IO_LEN));
    if data != expected {
        let first = data
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(data.len().min(expected.len()));
        return Err(format!(
            "the disk file differs from the expected contents from byte {first:#x} (length {}, expected {})",
            data.len(),
            expected.len()
        ));
    }
    Ok(())
}

/// A virtio-blk read is in the avail ring and notified, but the device has not processed it
/// when the snapshot is taken; after restore it completes with the right data, and a write
/// issued after the restore reaches the disk file.
#[test]
fn virtio_request_pending_at_snapshot_completes_after_restore() {
    check(
        "virtio_request_pending_at_snapshot_completes_after_restore",
        || virtio_in_flight(InFlight::Pending),
    );
}

/// The read is completed in the used ring but the guest has not looked yet when the
/// snapshot is taken; after restore the guest finds it (once), then a write reaches the disk.
#[test]
fn virtio_request_completed_but_unconsumed_at_snapshot() {
    check(
        "virtio_request_completed_but_unconsumed_at_snapshot",
        || virtio_in_flight(InFlight::Completed),
    );
}

// ---------------------------------------------------------------------------------------
// 4: corrupt snapshots.

/// Chunk files of a store, sorted.
fn chunk_files(store: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let chunks = store.join("chunks");
    for d in fs::read_dir(&chunks).map_err(|e| format!("{}: {e}", chunks.display()))? {
        let d = d.map_err(|e| e.to_string())?.path();
        if !d.is_dir() {
            continue;
        }
        for f in fs::read_dir(&d).map_err(|e| e.to_string())? {
            let f = f.map_err(|e| e.to_string())?.path();
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.len() == 64 && f.is_file() {
                out.push(f);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn flip(path: &Path, pos: impl Fn(usize) -> usize) -> Result<(), String> {
    let mut b = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let i = pos(b.len());
    b[i] ^= 0x20;
    fs::write(path, b).map_err(|e| e.to_string())
}

fn truncate(path: &Path, len: impl Fn(u64) -> u64) -> Result<(), String> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let n = f.metadata().map_err(|e| e.to_string())?.len();
    f.set_len(len(n)).map_err(|e| e.to_string())
}

fn remove(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(|e| format!("{}: {e}", path.display()))
}

/// Corrupting any file of a snapshot (state file, manifest, chunks) makes restore fail with
/// an error that names the file or chunk, never panic and never build a VM.
#[test]
fn corrupt_snapshots_are_rejected_with_clear_errors() {
    check("corrupt_snapshots_are_rejected_with_clear_errors", || {
        let tmp = TempDir::new("corrupt");
        let good = tmp.join("good");
        let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new())?;
        vm.wait_for(deadline(), "dirty: ready\n")?;
        vm.pause()?;
        vm.snapshot(&good, None)?;
        drop(vm);
        // The intact snapshot restores.
        drop(tiny::restore(&good, None, true)?);

        let chunks = chunk_files(&good)?;
        ensure(chunks.len() >= 2, || {
            format!("expected at least 2 stored chunks, found {}", chunks.len())
        })?;
        let rel = |p: &Path| p.strip_prefix(&good).expect("inside").to_path_buf();
        let id = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        type Corrupt = Box<dyn Fn(&Path) -> Result<(), String>>;
        let mut cases: Vec<(String, PathBuf, Corrupt, String)> = Vec::new();
        let state = PathBuf::from("state");
        let memory = PathBuf::from("memory");
        let on_file = |name: &str, file: &PathBuf, f: Corrupt| {
            (name.to_string(), file.clone(), f, String::new())
        };
        // (case, file, corruption, text the error must contain; empty = the file's path)
        cases.push(on_file(
            "state: magic",
            &state,
            Box::new(|p| flip(p, |_| 0)),
        ));
        cases.push(on_file(
            "state: version",
            &state,
            Box::new(|p| flip(p, |_| 9)),
        ));
        cases.push(on_file(
            "state: length",
            &state,
            Box::new(|p| flip(p, |_| 13)),
        ));
        cases.push(on_file(
            "state: payload",
            &state,
            Box::new(|p| flip(p, |n| n / 2)),
        ));
        cases.push(on_file(
            "state: checksum",
            &state,
            Box::new(|p| flip(p, |n| n - 1)),
        ));
        cases.push(on_file(
            "state: truncated",
            &state,
            Box::new(|p| truncate(p, |n| n / 2)),
        ));
        cases.push(on_file(
            "state: header only",
            &state,
            Box::new(|p| truncate(p, |_| 12)),
        ));
        cases.push(on_file(
            "state: empty",
            &state,
            Box::new(|p| truncate(p, |_| 0)),
        ));
        cases.push(on_file(
            "state: trailing byte",
            &state,
            Box::new(|p| truncate(p, |n| n + 1)),
        ));
        cases.push(on_file("state: deleted", &state, Box::new(remove)));
        cases.push(on_file(
            "manifest: payload",
            &memory,
            Box::new(|p| flip(p, |n| n / 2)),
        ));
        cases.push(on_file(
            "manifest: checksum",
            &memory,
            Box::new(|p| flip(p, |n| n - 1)),
        ));
        cases.push(on_file(
            "manifest: truncated",
            &memory,
            Box::new(|p| truncate(p, |n| n - 7)),
        ));
        cases.push(on_file("manifest: deleted", &memory, Box::new(remove)));
        for c in [&chunks[0], &chunks[chunks.len() - 1]] {
            let (r, i) = (rel(c), id(c));
            let mut push = |what: &str, f: Corrupt| {
                cases.push((
                    format!("chunk {}: {what}", &i[..8]),
                    r.clone(),
                    f,
                    i.clone(),
                ));
            };
            push("header", Box::new(|p| flip(p, |_| 0)));
            push("middle", Box::new(|p| flip(p, |n| n / 2)));
            push("last byte", Box::new(|p| flip(p, |n| n - 1)));
            push("truncated", Box::new(|p| truncate(p, |n| n / 2)));
            push("empty", Box::new(|p| truncate(p, |_| 0)));
            push("deleted", Box::new(remove));
        }
        cases.push((
            "chunk store deleted".into(),
            PathBuf::from("chunks"),
            Box::new(remove),
            "chunks".into(),
        ));

        let mut failures = Vec::new();
        for (n, (name, file, corrupt, needle)) in cases.iter().enumerate() {
            let dir = tmp.join(format!("case{n}"));
            tiny::copy_dir(&good, &dir).map_err(|e| format!("copy the snapshot: {e}"))?;
            let target = dir.join(file);
            corrupt(&target).map_err(|e| format!("{name}: corrupting: {e}"))?;
            let needle = if needle.is_empty() {
                target.display().to_string()
            } else {
                needle.clone()
            };
            match catch_unwind(AssertUnwindSafe(|| tiny::restore(&dir, None, true))) {
                Err(_) => failures.push(format!("{name}: restore panicked")),
                Ok(Ok(_)) => failures.push(format!("{name}: restore succeeded")),
                Ok(Err(msg)) => {
                    eprintln!("  {name}: {msg}");
                    if !msg.contains(&needle) {
                        failures.push(format!("{name}: the error does not name {needle}: {msg}"));
                    }
                }
            }
            let _ = fs::remove_dir_all(&dir);
        }
        ensure(failures.is_empty(), || failures.join("\n"))
    });
}

// ---------------------------------------------------------------------------------------
// 5: chunk deduplication in a shared store.

/// Guest addresses of the manifest entries that differ between `a` and `b`.
fn changed_chunks(a: &MemoryManifest, b: &MemoryManifest) -> Vec<u64> {
    let mut out = Vec::new();
    for (ra, rb) in a.regions.iter().zip(&b.regions) {
        for (i, (ca, cb)) in ra.chunks.iter().zip(&rb.chunks).enumerate() {
            if ca != cb {
                out.push(ra.guest_addr + i as u64 * a.chunk_size);
            }
        }
    }
    out
}

fn manifest(dir: &Path) -> Result<MemoryManifest, String> {
    MemoryManifest::read_from(dir.join("memory")).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Has the guest write `seq << 32 | addr` at each of `addrs`, then pauses it again.
fn dirty(vm: &mut TinyVm, seq: u32, addrs: &[u64]) -> Result<(), String> {
    for (i, &a) in addrs.iter().enumerate() {
        vm.write(guest::MB_CMD_LIST + 8 * i as u64, a)?;
    }
    vm.write(guest::MB_CMD_COUNT, addrs.len() as u32)?;
    vm.write(guest::MB_CMD_SEQ, seq)?;
    vm.resume()?;
    let end = deadline();
    while vm.read_u32(guest::MB_CMD_ACK)? != seq {
        ensure(Instant::now() < end, || {
            format!("the guest did not do command {seq}")
        })?;
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause()
}

/// Two snapshots of the same paused VM into one store: the second adds nothing. After the
/// guest writes to three 64 KiB chunks (and the host to the mailbox chunk), a third snapshot
/// adds exactly those four chunks; a fourth after a mailbox-only change adds one.
#[test]
fn snapshots_in_a_shared_store_dedup_unchanged_chunks() {
    check("snapshots_in_a_shared_store_dedup_unchanged_chunks", || {
        let tmp = TempDir::new("dedup");
        let store = tmp.join("store");
        let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new())?;
        vm.wait_for(deadline(), "dirty: ready\n")?;
        vm.pause()?;
        let s1 = vm.snapshot(&tmp.join("s1"), Some(&store))?.memory;
        let s2 = vm.snapshot(&tmp.join("s2"), Some(&store))?.memory;
        eprintln!("  s1 {s1:?}\n  s2 {s2:?}");
        ensure(s1.chunks_new > 0 && s1.bytes_written > 0, || {
            format!("the first snapshot stored nothing: {s1:?}")
        })?;
        ensure(
            s2.chunks_new == 0
                && s2.bytes_written == 0
                && s2.chunks_deduped == s1.chunks_total - s1.chunks_zero,
            || format!("the second snapshot of the unchanged VM: {s2:?} (first {s1:?})"),
        )?;
        let (m1, m2) = (manifest(&tmp.join("s1"))?, manifest(&tmp.join("s2"))?);
        ensure(m1 == m2, || "the manifests of s1 and s2 differ".into())?;

        let chunk = m1.chunk_size;
        let addrs = [0x50_0000, 0x50_0ff8, 0x5a_0000, 0x1f0_0000];
        dirty(&mut vm, 1, &addrs)?;
        let s3 = vm.snapshot(&tmp.join("s3"), Some(&store))?.memory;
        eprintln!("  s3 {s3:?}");
        let m3 = manifest(&tmp.join("s3"))?;
        let changed = changed_chunks(&m1, &m3);
        let mailbox = guest::MAILBOX / chunk * chunk;
        let mut expected = vec![0x50_0000, 0x5a_0000, 0x1f0_0000, mailbox];
        expected.sort();
        ensure(changed == expected, || {
            format!("chunks changed by the guest: {changed:x?}, expected {expected:x?}")
        })?;
        ensure(s3.chunks_new == expected.len() as u64, || {
            format!(
                "s3 added {} chunks, expected {}: {s3:?}",
                s3.chunks_new,
                expected.len()
            )
        })?;

        dirty(&mut vm, 2, &[])?;
        let s4 = vm.snapshot(&tmp.join("s4"), Some(&store))?.memory;
        let changed = changed_chunks(&m3, &manifest(&tmp.join("s4"))?);
        ensure(s4.chunks_new == 1 && changed == vec![mailbox], || {
            format!("s4 (mailbox only): {s4:?}, changed {changed:x?}")
        })?;
        drop(vm);

        // s3 restores from the shared store with the guest's writes.
        let r = tiny::restore(&tmp.join("s3"), None, true)?;
        for &a in &addrs {
            let got = vm_memory::Bytes::read_obj::<u64>(&r.vmm.mem, vm_memory::GuestAddress(a))
                .map_err(|e| e.to_string())?;
            ensure(got == 1 << 32 | a, || {
                format!(
                    "restored s3 has {got:#x} at {a:#x}, expected {:#x}",
                    1u64 << 32 | a
                )
            })?;
        }
        let zero_chunks = m3.regions[0]
            .chunks
            .iter()
            .filter(|c| **c == ChunkEntry::Zero)
            .count() as u64;
        ensure(zero_chunks == s3.chunks_zero, || {
            format!(
                "{zero_chunks} zero entries in the s3 manifest, stats say {}",
                s3.chunks_zero
            )
        })?;
        Ok(())
    });
}
