//! KVM-level tests with the tiny freestanding guest (`tests/support/tiny/guest.s`): serial and
//! port I/O, MMIO, guest memory seen by the host across pause/resume, PIT and LAPIC timer
//! interrupts, a second vCPU started by INIT/SIPI, and the pvpanic / triple-fault exits.
//!
//! Each test builds its guest variant with binutils (cached under `target/tmp/tiny-guest`)
//! and skips, printing `SKIP:`, only when /dev/kvm cannot be opened.

mod support;

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::vstate::exit::ExitReason;

use support::tiny;
use support::tiny::{Access, RecordingDevice, Scenario, Spec, Variant, guest, lock};

fn report(name: &str, elapsed: Duration) {
    eprintln!("{name}: {elapsed:?}");
}

fn serial_and_port_io(variant: Variant, name: &str) {
    let port = RecordingDevice::new(guest::TEST_PORT_LEN);
    lock(&port).preload(8, &0x1234_5678u32.to_le_bytes());
    let mut spec = Spec::new(variant);
    spec.pio
        .push(RecordingDevice::attach(&port, guest::TEST_PORT));
    let out = tiny::run(spec);
    report(name, out.elapsed);
    out.expect_exit(ExitReason::Reset);
    out.expect_console("tiny guest: serial ok\npio read 0x12345678\npio ok\n");
    let log = lock(&port).log.clone();
    out.ensure(
        log == vec![
            Access::write(0, &0xcafe_f00du32.to_le_bytes()),
            Access::write(4, &[0x5a]),
            Access::write(6, &0xbeefu16.to_le_bytes()),
            Access::read(8, &0x1234_5678u32.to_le_bytes()),
        ],
        &format!("unexpected port accesses: {log:x?}"),
    );
}

/// Serial output, 1/2/4-byte port writes and a 4-byte read on a test device, i8042 reset.
#[test]
fn serial_and_port_io_then_reset() {
    if !support::env::kvm_or_skip() {
        return;
    }
    serial_and_port_io(Scenario::SerialPio.into(), "serial_and_port_io_then_reset");
}

/// The same with interrupts never enabled (as in early Linux boot).
#[test]
fn serial_and_port_io_with_interrupts_off() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let variant = Variant {
        scenario: Scenario::SerialPio,
        defsyms: vec![("IRQS_OFF", 1)],
    };
    serial_and_port_io(variant, "serial_and_port_io_with_interrupts_off");
}

/// 1/2/4/8-byte MMIO writes and reads on a test device; the guest checks what it reads.
#[test]
fn mmio_reads_and_writes() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let dev = RecordingDevice::new(guest::MMIO_LEN);
    lock(&dev).preload(0x20, &0x1122_3344u32.to_le_bytes());
    lock(&dev).preload(0x28, &0x8877_6655_4433_2211u64.to_le_bytes());
    let mut spec = Spec::new(Scenario::Mmio);
    spec.mmio
        .push(RecordingDevice::attach(&dev, guest::MMIO_BASE));
    let out = tiny::run(spec);
    report("mmio_reads_and_writes", out.elapsed);
    out.expect_exit(ExitReason::Reset);
    out.expect_console("mmio ok\n");
    let log = lock(&dev).log.clone();
    let expected = vec![
        Access::write(0, &0xdead_beefu32.to_le_bytes()),
        Access::write(8, &0x0123_4567_89ab_cdefu64.to_le_bytes()),
        Access::write(0x10, &[0xa5]),
        Access::write(0x12, &0x1234u16.to_le_bytes()),
        Access::read(0x20, &0x1122_3344u32.to_le_bytes()),
        Access::read(0x28, &0x8877_6655_4433_2211u64.to_le_bytes()),
        Access::read(8, &0x0123_4567_89ab_cdefu64.to_le_bytes()),
        Access::read(0x10, &[0xa5]),
        Access::read(0x12, &0x1234u16.to_le_bytes()),
    ];
    out.ensure(
        log == expected,
        &format!("unexpected MMIO accesses: {log:x?}"),
    );
}

/// What the memory scenario's host side measured.
#[derive(Debug)]
struct MemoryRun {
    signalled: Duration,
    exit: ExitReason,
    pause: Duration,
    resume: Duration,
    bad_qwords: usize,
}

/// The guest writes a 1 MiB pattern; the host pauses the VM, checks the pattern in `vmm.mem`,
/// writes data of its own and a go flag, resumes; the guest checks the host's data and resets.
#[test]
fn guest_memory_visible_to_host_across_pause_resume() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let port = RecordingDevice::new(guest::TEST_PORT_LEN);
    let mut spec = Spec::new(Scenario::Memory);
    spec.pio
        .push(RecordingDevice::attach(&port, guest::TEST_PORT));
    let signal = port.clone();
    let out = tiny::run_with(spec, move |vmm| {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(120);
        tiny::wait_until(vmm, deadline, "the guest's pattern-written signal", || {
            !lock(&signal).writes().is_empty()
        })?;
        let signalled = start.elapsed();
        let t = Instant::now();
        vmm.pause().map_err(|e| format!("pause: {e}"))?;
        let pause = t.elapsed();
        let mut buf = vec![0u8; guest::PATTERN_LEN as usize];
        vmm.machine
            .mem
            .read_slice(&mut buf, GuestAddress(guest::PATTERN_BASE))
            .map_err(|e| format!("read guest memory: {e}"))?;
        let bad_qwords = buf
            .chunks_exact(8)
            .enumerate()
            .filter(|(i, q)| {
                let addr = guest::PATTERN_BASE + 8 * *i as u64;
                u64::from_le_bytes((*q).try_into().unwrap()) != addr ^ guest::PATTERN_XOR
            })
            .count();
        let host: Vec<u8> = (0..0x1000u64 / 8)
            .flat_map(|i| ((guest::HOST_DATA + 8 * i) ^ guest::HOST_XOR).to_le_bytes())
            .collect();
        vmm.machine
            .mem
            .write_slice(&host, GuestAddress(guest::HOST_DATA))
            .map_err(|e| format!("write guest memory: {e}"))?;
        vmm.machine
            .mem
            .write_obj(guest::HOST_GO, GuestAddress(guest::MB_HOST_GO))
            .map_err(|e| format!("write guest memory: {e}"))?;
        let t = Instant::now();
        vmm.resume().map_err(|e| format!("resume: {e}"))?;
        let resume = t.elapsed();
        let exit = vmm.run().map_err(|e| format!("Vmm::run: {e}"))?;
        Ok(MemoryRun {
            signalled,
            exit,
            pause,
            resume,
            bad_qwords,
        })
    });
    report(
        "guest_memory_visible_to_host_across_pause_resume",
        out.elapsed,
    );
    let run = out.value();
    eprintln!(
        "  pattern signalled after {:?}, pause {:?}, resume {:?}",
        run.signalled, run.pause, run.resume
    );
    out.ensure(
        run.bad_qwords == 0,
        &format!("{} of 131072 pattern qwords differ", run.bad_qwords),
    );
    out.ensure(run.exit == ExitReason::Reset, "expected a reset exit");
    out.ensure(
        out.console == "pattern written\nhost go\nhost data ok\n",
        "unexpected console output",
    );
    out.ensure(
        lock(&port).writes() == vec![Access::write(0, &1u32.to_le_bytes())],
        "expected one signal write",
    );
}

fn timer(scenario: Scenario, name: &str, console: &str) {
    let out = tiny::run(Spec::new(scenario));
    report(name, out.elapsed);
    out.expect_exit(ExitReason::Reset);
    out.expect_console(console);
    // Ten ticks at 100 Hz cannot come in much less than 100 ms (the first after a full period).
    out.ensure(
        out.elapsed >= Duration::from_millis(80),
        "ten 10 ms timer ticks arrived implausibly fast",
    );
}

/// PIT channel 0 at 100 Hz through the remapped 8259 PIC (LAPIC LINT0 = ExtINT): 10 ticks.
#[test]
fn pit_timer_interrupts() {
    if !support::env::kvm_or_skip() {
        return;
    }
    timer(
        Scenario::PitTimer,
        "pit_timer_interrupts",
        "timer: 10 PIT ticks\n",
    );
}

/// The LAPIC timer in periodic mode at 100 Hz: 10 ticks.
#[test]
fn lapic_timer_interrupts() {
    if !support::env::kvm_or_skip() {
        return;
    }
    timer(
        Scenario::LapicTimer,
        "lapic_timer_interrupts",
        "timer: 10 LAPIC timer ticks\n",
    );
}

/// The BSP starts vCPU 1 with INIT + SIPI; the AP goes from real mode to long mode, prints
/// its LAPIC id and sets a mark the BSP waits for.
#[test]
fn second_vcpu_started_by_init_sipi() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let mut spec = Spec::new(Scenario::Smp);
    spec.vcpus = 2;
    let out = tiny::run_with(spec, |vmm| {
        let exit = vmm.run().map_err(|e| format!("Vmm::run: {e}"))?;
        let read = |addr: u64| {
            vmm.machine
                .mem
                .read_obj::<u32>(GuestAddress(addr))
                .unwrap_or(0)
        };
        Ok((
            exit,
            read(guest::TRAMP_RM_MARK),
            read(guest::MB_AP_MARK),
            read(guest::MB_AP_APIC_ID),
        ))
    });
    report("second_vcpu_started_by_init_sipi", out.elapsed);
    let (exit, rm_mark, mark, apic_id) = out.value();
    out.ensure(
        *rm_mark == guest::AP_REAL_MODE,
        &format!("AP real-mode mark is {rm_mark:#x}: the AP did not start"),
    );
    out.ensure(
        *mark == guest::AP_ALIVE,
        &format!("AP long-mode mark is {mark:#x}"),
    );
    out.ensure(*apic_id == 1, &format!("AP's LAPIC id is {apic_id}"));
    out.ensure(*exit == ExitReason::Reset, "expected a reset exit");
    out.ensure(
        out.console == "bsp: starting ap\nap: long mode, apic id 1\nbsp: ap is up\n",
        "unexpected console output",
    );
}

/// Writing 1 to the pvpanic port ends the VM with GuestPanic.
#[test]
fn pvpanic_port_ends_vm_with_guest_panic() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let out = tiny::run(Spec::new(Scenario::Panic));
    report("pvpanic_port_ends_vm_with_guest_panic", out.elapsed);
    out.expect_exit(ExitReason::GuestPanic);
    out.expect_console("panic: writing 1 to port 0x505\n");
}

/// `ud2` with interrupts off and an empty IDT: #UD cannot be delivered -> #DF -> triple fault.
#[test]
fn triple_fault_with_interrupts_off() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let out = tiny::run(Spec::new(Scenario::TripleFault));
    report("triple_fault_with_interrupts_off", out.elapsed);
    out.expect_exit(ExitReason::TripleFault { vcpu: 0 });
    out.expect_console("triple fault: ud2 with interrupts off and no IDT\n");
}

/// The same with interrupts on.
#[test]
fn triple_fault_with_interrupts_on() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let out = tiny::run(Spec::new(Scenario::TripleFaultIrqsOn));
    report("triple_fault_with_interrupts_on", out.elapsed);
    out.expect_exit(ExitReason::TripleFault { vcpu: 0 });
    out.expect_console("triple fault: ud2 with interrupts on and no IDT\n");
}

/// `ud2` with the guest's IDT: the handler reports vector 6 and the faulting RIP, then
/// panics through pvpanic (how every other scenario reports an unexpected exception).
#[test]
fn guest_exception_handler_reports_ud() {
    if !support::env::kvm_or_skip() {
        return;
    }
    let out = tiny::run(Spec::new(Scenario::Exception));
    report("guest_exception_handler_reports_ud", out.elapsed);
    out.expect_exit(ExitReason::GuestPanic);
    out.ensure(
        out.console
            .starts_with("exception: ud2\n\n!EXC vector=06 rip=0000000000"),
        "expected the #UD report",
    );
}
