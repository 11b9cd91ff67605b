//! Snapshot and restore with the tiny freestanding guest (`tests/support/tiny/guest.s`): registers,
//! memory, timers and the serial port across a snapshot/restore (and a second restore of the
//! same snapshot), exact console output and serial input across chains of snapshots taken in
//! the middle of port I/O, a virtio-blk request in flight at snapshot time, corrupt
//! snapshots, lazy restore of a corrupt chunk, disk identity on restore. (Deduplication and
//! incremental snapshots: `tests/incremental_tiny.rs`.)
//!
//! The tests drive the VMs on the test thread (`tiny::boot` / `tiny::restore`); every wait
//! has a deadline. Each test skips, printing `SKIP:`, only when /dev/kvm cannot be opened.
//! Set `TINY_KEEP_TMP=1` to keep the snapshot directories under `target/tmp/tiny-snapshot`.

mod support;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::config::BlockConfig;
use vmm::util::lock;
use vmm::vstate::exit::ExitReason;

use support::env::temp_dir;
use support::tiny;
use support::tiny::harness::{check, check_ticks, deadline, ensure};
use support::tiny::{Scenario, Spec, TinyVm, Variant, guest};

// ---------------------------------------------------------------------------------------
// 1 + 2: registers, memory, timer and serial state across snapshot/restore.

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
    let tmp = temp_dir(if timer_lapic {
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
        let serial = lock(&a.vmm.machine.serial).serial.state();
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
        let tmp = temp_dir("stream");
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

/// Input for the echo test: printable ASCII, never 0 (which the guest reads as "no data").
fn echo_input(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'!' + (i * 7 % 94) as u8).collect()
}

/// The host feeds COM1 input to a guest that echoes it, pausing right after each FIFO-full
/// (so the vCPU is mostly inside a one-byte `in` from the receive buffer), snapshotting,
/// dropping the VM and restoring it, 40 times in a chain. The echoed bytes of all the VMs,
/// concatenated, must be exactly the input: an `in` that already popped a byte from the FIFO
/// when the vCPU was paused must complete before its state is saved (KVM completes it on
/// the next KVM_RUN, e.g. one with `immediate_exit` set), or the byte is lost on restore.
#[test]
fn serial_input_is_neither_lost_nor_repeated_across_snapshots() {
    check(
        "serial_input_is_neither_lost_nor_repeated_across_snapshots",
        || {
            const ROUNDS: usize = 40;
            const FIFO: usize = 64;
            let tmp = temp_dir("echo");
            let input = echo_input(ROUNDS * FIFO);
            let mut vm = tiny::boot(Spec::new(Scenario::SnapEcho), Vec::new())?;
            vm.wait_for(deadline(), "echo: ready\n")?;
            let mut echoed = String::new();
            let mut sent = 0;
            let mut unfinished = Vec::new();
            for round in 0..ROUNDS {
                let chunk = &input[sent..sent + FIFO];
                let queued = lock(&vm.vmm.machine.serial).enqueue_input(chunk);
                sent += queued;
                vm.pause()?;
                // The last exit of vCPU 0: an I/O exit means the instruction is unfinished.
                let exit = vm.vmm.machine.vcpus[0]
                    .with(|fd| fd.get_kvm_run().exit_reason)
                    .map_err(|e| format!("vcpu0: {e}"))?;
                if exit == kvm_bindings::KVM_EXIT_IO || exit == kvm_bindings::KVM_EXIT_MMIO {
                    unfinished.push(round);
                }
                let dir = tmp.join(format!("snap{round}"));
                vm.snapshot(&dir, None)?;
                let console = vm.console.text();
                echoed.push_str(console.strip_prefix("echo: ready\n").unwrap_or(&console));
                drop(vm);
                // A lazily restored VM reads its snapshot until all memory is in: keep it.
                vm = tiny::restore(&dir, None, false)?;
            }
            // Let the last VM echo what is left in its FIFO.
            let done = echoed.len();
            let total = sent;
            let soon = Instant::now() + Duration::from_secs(3);
            let waited = vm.wait_console(soon, "the rest of the echo", |c| done + c.len() >= total);
            echoed.push_str(&vm.console.text());
            let expected = String::from_utf8(input[..sent].to_vec()).expect("ASCII");
            let diag = || {
                format!(
                    "{} of {ROUNDS} pauses left vCPU 0 inside an I/O exit (rounds {unfinished:?})",
                    unfinished.len()
                )
            };
            eprintln!("  {sent} bytes sent, {} echoed; {}", echoed.len(), diag());
            if echoed != expected {
                let at = echoed
                    .bytes()
                    .zip(expected.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(echoed.len().min(expected.len()));
                let from = at.saturating_sub(8);
                return Err(format!(
                    "the echo differs from the input at byte {at} (round {}): echoed {:?}, sent {:?}; {} bytes echoed of {sent}; {}{}",
                    at / FIFO,
                    &echoed[from..(at + 8).min(echoed.len())],
                    &expected[from..(at + 8).min(expected.len())],
                    echoed.len(),
                    diag(),
                    waited.err().map(|e| format!("\n{e}")).unwrap_or_default()
                ));
            }
            Ok(())
        },
    );
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
        ..Default::default()
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
    let tmp = temp_dir(&format!("virtio-{mode:?}"));
    let disk_path = tmp.join("disk.img");
    let disk = make_disk(&disk_path)?;
    let snap = tmp.join("snap");

    // The disk's I/O worker serves the queue as soon as the guest notifies it. To catch
    // the request before the device has seen it, the test holds the device's I/O gate (as
    // a pause does) from before the guest runs: the worker does not pop a request, nor
    // write guest memory, while it is held.
    let mut spec = Spec::new(Scenario::SnapVirtio);
    spec.start_paused = true;
    let mut vm = tiny::boot(spec, vec![disk])?;
    let gate = vmm::util::lock(&vm.vmm.machine.blocks[0].device)
        .io_gate()
        .clone();
    if mode == InFlight::Pending {
        gate.hold();
    }
    vm.resume()?;
    vm.wait_for(deadline(), "virtio: read posted\n")?;
    if mode == InFlight::Completed {
        let end = deadline();
        while used_idx(&vm)? == 0 {
            ensure(Instant::now() < end, || {
                "the device did not complete the read".into()
            })?;
            std::thread::sleep(Duration::from_millis(1));
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
    if mode == InFlight::Pending {
        gate.release();
    }
    drop(vm);

    let mut r = tiny::restore(&snap, None, true)?;
    let used_r = used_idx(&r)?;
    ensure(used_r == used, || {
        format!("restored used idx {used_r}, saved {used}")
    })?;
    // Let the guest look at the used ring, then run the event loop until it resets.
    r.write(guest::MB_HOST_GO, guest::HOST_GO)?;
    r.resume()?;
    let exit = tiny::run_for(&mut r, Duration::from_secs(120))?;
    let console = r.console.text();
    ensure(
        exit == ExitReason::Reset && console == "virtio: go\nvirtio: read ok\nvirtio: write ok\n",
        || format!("restored VM ended with {exit:?}, console:\n{console}"),
    )?;
    // The read landed in guest memory (the guest checked it too) ...
    let mut buf = vec![0u8; guest::IO_LEN as usize];
    vm_memory::Bytes::read_slice(
        &r.vmm.machine.mem,
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

/// Turns the packs of `store` into chunk files (`chunks/xx/<id>`, the older layout, which
/// restores still read), so that single chunks can be damaged or removed as files.
fn unpack(store: &Path) -> Result<(), String> {
    let packs = store.join("packs");
    let Ok(rd) = fs::read_dir(&packs) else {
        return Ok(());
    };
    for p in rd.flatten().map(|e| e.path()) {
        if p.extension().is_none_or(|e| e != "idx") {
            continue;
        }
        let ix = vmm::store::pack::read_index(&p).map_err(|e| e.to_string())?;
        let data = fs::read(p.with_extension("pack")).map_err(|e| e.to_string())?;
        for e in &ix.entries {
            let dest = store.join(e.id.relative_path());
            fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
            let rec = &data[e.offset as usize..(e.offset + u64::from(e.len)) as usize];
            fs::write(&dest, rec).map_err(|e| e.to_string())?;
        }
    }
    fs::remove_dir_all(&packs).map_err(|e| e.to_string())
}

/// Chunk files of a store (its packs turned into chunk files first), sorted.
fn chunk_files(store: &Path) -> Result<Vec<PathBuf>, String> {
    unpack(store)?;
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

/// A way to damage a snapshot file.
type Corrupt = Box<dyn Fn(&Path) -> Result<(), String>>;

/// One corruption: the file (relative to the snapshot directory), what is done to it, the
/// text the error must contain to name it (empty: the file's path), and words of which the
/// error must contain one, saying what is wrong.
struct Case {
    name: String,
    file: PathBuf,
    corrupt: Corrupt,
    names: String,
    causes: &'static [&'static str],
}

/// What a damaged state file or manifest may be reported as.
const FILE_CAUSES: &[&str] = &[
    "magic",
    "version",
    "truncated",
    "checksum",
    "exceeds",
    "after the checksum",
    "decode",
];
/// What a missing file may be reported as.
const MISSING_CAUSES: &[&str] = &["No such file", "not found", "missing"];
/// What a damaged or missing chunk may be reported as.
const CHUNK_CAUSES: &[&str] = &["corrupt", "missing", "length", "holds"];

/// Corrupting any file of a snapshot (state file, manifest, chunks) makes restore fail with
/// an error that names the file or chunk and says what is wrong with it; restore never
/// panics and never builds a VM.
#[test]
fn corrupt_snapshots_are_rejected_with_clear_errors() {
    check("corrupt_snapshots_are_rejected_with_clear_errors", || {
        let tmp = temp_dir("corrupt");
        let good = tmp.join("good");
        let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new())?;
        support::tiny::snap::wait_dirty_ready(&mut vm, deadline())?;
        vm.snapshot(&good, None)?;
        drop(vm);
        // The intact snapshot restores.
        drop(tiny::restore_eager(&good, None, true)?);

        let chunks = chunk_files(&good)?;
        ensure(chunks.len() >= 2, || {
            format!("expected at least 2 stored chunks, found {}", chunks.len())
        })?;
        let mut cases = Vec::new();
        let mut file_case = |name: &str, file: &str, corrupt: Corrupt, causes| {
            cases.push(Case {
                name: name.into(),
                file: file.into(),
                corrupt,
                names: String::new(),
                causes,
            });
        };
        let (st, mem) = ("state", "memory");
        file_case(
            "state: magic",
            st,
            Box::new(|p| flip(p, |_| 0)),
            FILE_CAUSES,
        );
        file_case(
            "state: version",
            st,
            Box::new(|p| flip(p, |_| 9)),
            FILE_CAUSES,
        );
        file_case(
            "state: length",
            st,
            Box::new(|p| flip(p, |_| 13)),
            FILE_CAUSES,
        );
        file_case(
            "state: payload",
            st,
            Box::new(|p| flip(p, |n| n / 2)),
            FILE_CAUSES,
        );
        file_case(
            "state: checksum",
            st,
            Box::new(|p| flip(p, |n| n - 1)),
            FILE_CAUSES,
        );
        let half: Corrupt = Box::new(|p| truncate(p, |n| n / 2));
        file_case("state: truncated", st, half, FILE_CAUSES);
        let header: Corrupt = Box::new(|p| truncate(p, |_| 12));
        file_case("state: header only", st, header, FILE_CAUSES);
        file_case(
            "state: empty",
            st,
            Box::new(|p| truncate(p, |_| 0)),
            FILE_CAUSES,
        );
        let longer: Corrupt = Box::new(|p| truncate(p, |n| n + 1));
        file_case("state: trailing byte", st, longer, FILE_CAUSES);
        file_case("state: deleted", st, Box::new(remove), MISSING_CAUSES);
        file_case(
            "manifest: payload",
            mem,
            Box::new(|p| flip(p, |n| n / 2)),
            FILE_CAUSES,
        );
        file_case(
            "manifest: checksum",
            mem,
            Box::new(|p| flip(p, |n| n - 1)),
            FILE_CAUSES,
        );
        let shorter: Corrupt = Box::new(|p| truncate(p, |n| n - 7));
        file_case("manifest: truncated", mem, shorter, FILE_CAUSES);
        file_case("manifest: deleted", mem, Box::new(remove), MISSING_CAUSES);
        for c in [&chunks[0], &chunks[chunks.len() - 1]] {
            let file = c.strip_prefix(&good).expect("inside").to_path_buf();
            let id = c.file_name().unwrap().to_string_lossy().into_owned();
            let mut chunk_case = |what: &str, corrupt: Corrupt| {
                cases.push(Case {
                    name: format!("chunk {}: {what}", &id[..8]),
                    file: file.clone(),
                    corrupt,
                    names: id.clone(),
                    causes: CHUNK_CAUSES,
                });
            };
            chunk_case("header", Box::new(|p| flip(p, |_| 0)));
            chunk_case("middle", Box::new(|p| flip(p, |n| n / 2)));
            chunk_case("last byte", Box::new(|p| flip(p, |n| n - 1)));
            chunk_case("truncated", Box::new(|p| truncate(p, |n| n / 2)));
            chunk_case("empty", Box::new(|p| truncate(p, |_| 0)));
            chunk_case("deleted", Box::new(remove));
        }
        cases.push(Case {
            name: "chunk store deleted".into(),
            file: "chunks".into(),
            corrupt: Box::new(remove),
            names: "chunk store".into(),
            causes: MISSING_CAUSES,
        });

        let mut failures = Vec::new();
        for (n, case) in cases.iter().enumerate() {
            let name = &case.name;
            let dir = tmp.join(format!("case{n}"));
            support::files::copy_dir(&good, &dir).map_err(|e| format!("copy the snapshot: {e}"))?;
            let target = dir.join(&case.file);
            (case.corrupt)(&target).map_err(|e| format!("{name}: corrupting: {e}"))?;
            let names = if case.names.is_empty() {
                target.display().to_string()
            } else {
                case.names.clone()
            };
            match catch_unwind(AssertUnwindSafe(|| tiny::restore_eager(&dir, None, true))) {
                Err(_) => failures.push(format!("{name}: restore panicked")),
                Ok(Ok(_)) => failures.push(format!("{name}: restore succeeded")),
                Ok(Err(msg)) => {
                    let named = msg.contains(&names);
                    let msg = msg.replace(&format!("{}/", tmp.path().display()), "");
                    eprintln!("  {name}: {msg}");
                    if !named {
                        failures.push(format!("{name}: the error does not name {names}: {msg}"));
                    } else if !case.causes.iter().any(|c| msg.contains(c)) {
                        failures.push(format!(
                            "{name}: the error does not say what is wrong (one of {:?}): {msg}",
                            case.causes
                        ));
                    }
                }
            }
            let _ = fs::remove_dir_all(&dir);
        }
        ensure(failures.is_empty(), || failures.join("\n"))
    });
}

/// A lazily restored VM whose snapshot has a corrupt chunk starts (memory is fetched on
/// first touch), then stops with a clear error naming the chunk as soon as the chunk is
/// needed (here by the background fill) — it never runs on wrong memory.
#[test]
fn lazy_restore_stops_on_a_corrupt_chunk() {
    check("lazy_restore_stops_on_a_corrupt_chunk", || {
        let tmp = temp_dir("lazy-corrupt");
        let good = tmp.join("good");
        let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), Vec::new())?;
        support::tiny::snap::wait_dirty_ready(&mut vm, deadline())?;
        vm.snapshot(&good, None)?;
        drop(vm);
        let chunks = chunk_files(&good)?;
        let victim = chunks.last().ok_or("no chunk files")?.clone();
        let mut bytes = fs::read(&victim).map_err(|e| e.to_string())?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&victim, bytes).map_err(|e| e.to_string())?;
        let mut r = tiny::restore(&good, None, false)?;
        let reason = tiny::run_for(&mut r, Duration::from_secs(120))?;
        let id = victim.file_name().unwrap().to_string_lossy().to_string();
        match reason {
            ExitReason::MemoryUnavailable { message } if message.contains(&id) => Ok(()),
            other => Err(format!(
                "expected MemoryUnavailable naming {id}, got {other:?}"
            )),
        }
    });
}

/// Restore re-attaches the recorded disks and refuses one of another size or path unless
/// forced.
#[test]
fn restore_refuses_a_different_disk_unless_forced() {
    check("restore_refuses_a_different_disk_unless_forced", || {
        let tmp = temp_dir("disk-identity");
        let disk = |name: &str, len: usize| -> Result<BlockConfig, String> {
            let p = tmp.join(name);
            fs::write(&p, vec![0x5au8; len]).map_err(|e| e.to_string())?;
            Ok(BlockConfig {
                path: p,
                read_only: false,
                id: None,
                root: false,
                ..Default::default()
            })
        };
        let a = disk("a.img", 64 * 1024)?;
        let mut vm = tiny::boot(Spec::new(Scenario::SnapDirty), vec![a.clone()])?;
        support::tiny::snap::wait_dirty_ready(&mut vm, deadline())?;
        let snap = tmp.join("snap");
        vm.snapshot(&snap, None)?;
        drop(vm);
        drop(tiny::restore(&snap, None, true)?);
        let bigger = disk("b.img", 128 * 1024)?;
        let err = match tiny::restore(&snap, Some(vec![bigger.clone()]), true) {
            Ok(_) => return Err("a disk of another size and path was accepted".into()),
            Err(e) => e,
        };
        ensure(err.contains("b.img") || err.contains("a.img"), || {
            format!("the error does not name the disk: {err}")
        })?;
        let (state, memory) = vmm::builder::snapshot_files(&snap);
        let forced = vmm::builder::build_from_snapshot(
            &state,
            &memory,
            vmm::builder::RestoreOptions {
                console: vmm::builder::Console::Writer(Box::new(std::io::sink())),
                blocks: Some(vec![bigger]),
                nets: Vec::new(),
                force: true,
                start_paused: true,
                eager_memory: false,
                clock: Default::default(),
            },
        );
        ensure(forced.is_ok(), || {
            format!(
                "--force did not accept the disk: {:?}",
                forced.err().map(|e| e.to_string())
            )
        })?;
        Ok(())
    });
}
