//! The tiny freestanding guest (`guest.s`, a few hundred bytes of 64-bit code): building it
//! with binutils, test devices, and running a VM in-process, on its own thread with console
//! capture and a timeout ([`run_with`]) or driven by the test's thread ([`TinyVm`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::builder::{BootOptions, Console, ExtraDevice, build_for_boot};
use vmm::config::{KernelConfig, VmConfig};
use vmm::vmm::Vmm;
use vmm::vstate::bus::{BusDevice, SharedDevice};
use vmm::vstate::exit::ExitReason;

/// The guest's source and linker script; their hash names the cached ELF files.
const GUEST_SRC: &str = include_str!("guest.s");
const LINKER_SCRIPT: &str = include_str!("link.ld");

pub mod archive;
pub mod guest;
pub mod harness;
pub mod snap;

/// What the guest does, chosen at assembly time (`--defsym SCENARIO=n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Serial output, port-I/O writes and a read on the test port device, reset.
    SerialPio = 1,
    /// 1/2/4/8-byte MMIO on the test MMIO device, reset.
    Mmio = 2,
    /// Pattern in memory, host pause/check/fill/resume, reset.
    Memory = 3,
    /// PIT channel 0 through the 8259 PIC, [`guest::TICKS`] interrupts, reset.
    PitTimer = 4,
    /// LAPIC timer, periodic, [`guest::TICKS`] interrupts, reset.
    LapicTimer = 5,
    /// vCPU 1 started by INIT + SIPI, switches to long mode and reports, reset.
    Smp = 6,
    /// Writes 1 to the pvpanic port.
    Panic = 7,
    /// `ud2` with IF=0 and an empty IDT.
    TripleFault = 8,
    /// `ud2` with IF=1 and an empty IDT.
    TripleFaultIrqsOn = 9,
    /// `ud2` with the guest's IDT: the handler reports it and panics.
    Exception = 10,
    /// Sets COM1's registers, then prints `tick <n>` per timer tick (PIT, or the LAPIC timer
    /// with `TIMER_LAPIC=1`), checking the registers and r12 == [`guest::MB_COUNT`] each time.
    SnapTicks = 11,
    /// Prints 1, 2, 3, ... one per line, as fast as it can (r12 == [`guest::MB_COUNT`]).
    SnapStream = 12,
    /// virtio-blk: a read posted and notified, a wait for [`guest::HOST_GO`], the read
    /// checked, a write, reset.
    SnapVirtio = 13,
    /// Writes host-chosen qwords when [`guest::MB_CMD_SEQ`] changes.
    SnapDirty = 14,
    /// Prints `echo: ready`, then echoes every (non-zero) byte received on COM1.
    SnapEcho = 15,
    /// virtio-blk reads one at a time for ever, each checked against the disk pattern and
    /// reported as `read <k> ok` (or `read <k> error`, then retried); read k starts once
    /// [`guest::MB_READ_LIMIT`] > k, at sector `(k % READ_SLOTS) << READ_STRIDE_SHIFT`.
    VirtioReads = 16,
    /// A periodic tick built from one-shot LAPIC TSC-deadline interrupts, as Linux runs it:
    /// prints `tick <n> tsc <RDTSC hex> missed <periods skipped>` (with `KVMCLOCK=1` it
    /// enables kvmclock at [`guest::MB_PVCLOCK`] first). Runs until the host stops it.
    TscClock = 17,
}

/// A tiny-guest ELF variant: a scenario and extra `--defsym`s (e.g. `IRQS_OFF=1`).
#[derive(Clone, Debug)]
pub struct Variant {
    /// The scenario.
    pub scenario: Scenario,
    /// Additional assembler symbols.
    pub defsyms: Vec<(&'static str, u64)>,
}

impl From<Scenario> for Variant {
    fn from(scenario: Scenario) -> Self {
        Self {
            scenario,
            defsyms: Vec::new(),
        }
    }
}

fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e} (binutils `as`/`ld` are needed)"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Builds (or finds in the cache) the guest ELF for `variant` and returns its path.
/// Files live in `<target>/tmp/tiny-guest/`, named by a hash of source, script and symbols.
pub fn guest_elf(variant: impl Into<Variant>) -> PathBuf {
    let variant = variant.into();
    let mut syms = vec![("SCENARIO", variant.scenario as u64)];
    syms.extend(variant.defsyms.iter().copied());
    let mut h = blake3::Hasher::new();
    h.update(GUEST_SRC.as_bytes());
    h.update(LINKER_SCRIPT.as_bytes());
    for (k, v) in &syms {
        h.update(format!("{k}={v};").as_bytes());
    }
    let hash = h.finalize().to_hex();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-guest");
    let elf = dir.join(format!(
        "{:?}-{}.elf",
        variant.scenario,
        &hash.as_str()[..16]
    ));
    if elf.exists() {
        return elf;
    }
    // Build in a private directory, then rename into place: concurrent tests (threads or
    // processes) may build the same variant at once.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let work = dir.join(format!(
        "build-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&work).expect("create the tiny-guest build directory");
    let src = work.join("guest.s");
    let script = work.join("link.ld");
    let obj = work.join("guest.o");
    let out = work.join("guest.elf");
    fs::write(&src, GUEST_SRC).expect("write guest.s");
    fs::write(&script, LINKER_SCRIPT).expect("write link.ld");
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--64");
    for (k, v) in &syms {
        as_cmd.arg("--defsym").arg(format!("{k}={v}"));
    }
    as_cmd.arg("-o").arg(&obj).arg(&src);
    let built = run_tool(&mut as_cmd).and_then(|()| {
        run_tool(
            Command::new("ld")
                .args(["-nostdlib", "-static", "--build-id=none", "-T"])
                .arg(&script)
                .arg("-o")
                .arg(&out)
                .arg(&obj),
        )
    });
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&work);
        panic!("building the tiny guest ({variant:?}) failed: {e}");
    }
    fs::rename(&out, &elf).expect("move the tiny guest ELF into the cache");
    let _ = fs::remove_dir_all(&work);
    elf
}

/// A port-I/O or MMIO test device: a register file (reads return what was last written or
/// preloaded, zeros elsewhere) that records every access.
#[derive(Debug)]
pub struct RecordingDevice {
    regs: Vec<u8>,
    /// Every access in order.
    pub log: Vec<Access>,
}

/// One guest access to a [`RecordingDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// Write (true) or read.
    pub write: bool,
    /// Offset in the device's range.
    pub offset: u64,
    /// Bytes written, or bytes answered to a read.
    pub data: Vec<u8>,
}

impl Access {
    /// A write of `data` at `offset`.
    pub fn write(offset: u64, data: &[u8]) -> Self {
        Self {
            write: true,
            offset,
            data: data.to_vec(),
        }
    }

    /// A read at `offset` answered with `data`.
    pub fn read(offset: u64, data: &[u8]) -> Self {
        Self {
            write: false,
            offset,
            data: data.to_vec(),
        }
    }
}

impl RecordingDevice {
    /// A device of `len` bytes, all zero.
    pub fn new(len: u64) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            regs: vec![0; len as usize],
            log: Vec::new(),
        }))
    }

    /// Sets the bytes at `offset` (without logging).
    pub fn preload(&mut self, offset: u64, bytes: &[u8]) {
        let o = offset as usize;
        self.regs[o..o + bytes.len()].copy_from_slice(bytes);
    }

    /// The device as a bus entry at `base`.
    pub fn attach(dev: &Arc<Mutex<Self>>, base: u64) -> ExtraDevice {
        let len = lock(dev).regs.len() as u64;
        let shared: SharedDevice = dev.clone();
        (shared, base, len)
    }

    /// The writes in the log.
    pub fn writes(&self) -> Vec<Access> {
        self.log.iter().filter(|a| a.write).cloned().collect()
    }

    fn range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.regs.len()).then_some(start..end)
    }
}

impl BusDevice for RecordingDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.range(offset, data.len()) {
            Some(r) => data.copy_from_slice(&self.regs[r]),
            None => data.fill(0xff),
        }
        self.log.push(Access::read(offset, data));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(r) = self.range(offset, data.len()) {
            self.regs[r].copy_from_slice(data);
        }
        self.log.push(Access::write(offset, data));
    }
}

/// Locks a mutex, ignoring poisoning (a panicking vCPU thread must not hide the evidence).
pub use vmm::util::lock;

/// A console writer that keeps everything in memory.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How to run a tiny-guest VM.
pub struct Spec {
    /// Guest variant.
    pub variant: Variant,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM.
    pub mem_mib: u64,
    /// Extra port-I/O devices.
    pub pio: Vec<ExtraDevice>,
    /// Extra MMIO devices.
    pub mmio: Vec<ExtraDevice>,
    /// The whole run (build, boot, body) must end within this.
    pub timeout: Duration,
    /// Build the VM with its vCPUs paused (the body resumes them).
    pub start_paused: bool,
    /// CPU template.
    pub cpu_template: vmm::config::CpuTemplate,
}

impl Spec {
    /// One vCPU, 32 MiB, no extra devices, 180 s (a ceiling for runs that take
    /// milliseconds to seconds, generous for a loaded host).
    pub fn new(variant: impl Into<Variant>) -> Self {
        Self {
            variant: variant.into(),
            vcpus: 1,
            mem_mib: 32,
            pio: Vec::new(),
            mmio: Vec::new(),
            timeout: Duration::from_secs(180),
            start_paused: false,
            cpu_template: vmm::config::CpuTemplate::None,
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome<T> {
    /// The body's value, or why the run failed (build error, timeout, body error).
    pub result: Result<T, String>,
    /// Everything the guest wrote to COM1.
    pub console: String,
    /// From the start of `build_for_boot` to the end of the body.
    pub elapsed: Duration,
}

impl<T: std::fmt::Debug> Outcome<T> {
    /// Panics with `msg`, the run's result and the console output.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        panic!(
            "{msg}\nresult: {:?}\nelapsed: {:?}\n--- guest console ---\n{}\n--- end of console ---",
            self.result, self.elapsed, self.console
        );
    }

    /// Panics (with the console output) unless `cond`.
    #[track_caller]
    pub fn ensure(&self, cond: bool, msg: &str) {
        if !cond {
            self.fail(msg);
        }
    }

    /// The body's value; panics (with the console output) if the run failed.
    #[track_caller]
    pub fn value(&self) -> &T {
        match &self.result {
            Ok(v) => v,
            Err(_) => self.fail("the tiny-guest run failed"),
        }
    }
}

impl Outcome<ExitReason> {
    /// Panics (with the console output) unless the VM ended with `expected`.
    #[track_caller]
    pub fn expect_exit(&self, expected: ExitReason) {
        let got = self.value();
        if *got != expected {
            self.fail(&format!("expected exit {expected:?}, got {got:?}"));
        }
    }

    /// Panics (with the console output) unless the console is exactly `expected`.
    #[track_caller]
    pub fn expect_console(&self, expected: &str) {
        if self.console != expected {
            self.fail(&format!("console differs; expected:\n{expected}"));
        }
    }
}

/// Polls `cond` every millisecond until it holds; fails if the VM exits or `deadline` passes.
pub fn wait_until(
    vmm: &Vmm,
    deadline: Instant,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<(), String> {
    loop {
        if cond() {
            return Ok(());
        }
        if let Some(r) = vmm.machine.exit.reason() {
            return Err(format!("the VM exited ({r:?}) while waiting for {what}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Boots the variant and runs the event loop until the VM exits.
pub fn run(spec: Spec) -> Outcome<ExitReason> {
    run_with(spec, |vmm| vmm.run().map_err(|e| format!("Vmm::run: {e}")))
}

/// Boots the variant and calls `body` with the running VMM on a separate thread. If the run
/// does not end within `spec.timeout` the VM is told to shut down and the outcome is an error.
pub fn run_with<T, F>(spec: Spec, body: F) -> Outcome<T>
where
    T: std::fmt::Debug + Send + 'static,
    F: FnOnce(&mut Vmm) -> Result<T, String> + Send + 'static,
{
    let elf = guest_elf(spec.variant.clone());
    let cfg = VmConfig {
        kernel: KernelConfig {
            path: elf,
            cmdline: String::new(),
        },
        initrd: None,
        mem_mib: spec.mem_mib,
        vcpus: spec.vcpus,
        blocks: Vec::new(),
        host_quirks: false,
        cpu_template: spec.cpu_template,
        nets: Vec::new(),
    };
    let capture = Capture::default();
    let opts = BootOptions {
        console: Console::Writer(Box::new(capture.clone())),
        extra_pio: spec.pio,
        extra_mmio: spec.mmio,
        start_paused: spec.start_paused,
    };
    let (exit_tx, exit_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let start = Instant::now();
    let vm_thread = std::thread::Builder::new()
        .name("tiny-vm".into())
        .spawn(move || {
            let res = build_for_boot(&cfg, opts)
                .map_err(|e| format!("build_for_boot: {e}"))
                .and_then(|mut vmm| {
                    let _ = exit_tx.send(vmm.machine.exit.clone());
                    body(&mut vmm)
                });
            let _ = done_tx.send((res, start.elapsed()));
        })
        .expect("spawn the VM thread");
    let (result, elapsed) = match done_rx.recv_timeout(spec.timeout) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => {
            // Stop the VM (the event loop checks the latch) and give it a moment to go.
            if let Ok(exit) = exit_rx.try_recv() {
                exit.exit(ExitReason::Shutdown);
            }
            let late = match done_rx.recv_timeout(Duration::from_secs(10)) {
                Ok((r, _)) => format!("after a forced shutdown the run returned {r:?}"),
                Err(_) => "the VM thread did not end after a forced shutdown".into(),
            };
            (
                Err(format!(
                    "the VM did not finish within {:?}; {late}",
                    spec.timeout
                )),
                start.elapsed(),
            )
        }
        Err(RecvTimeoutError::Disconnected) => {
            let why = match vm_thread.join() {
                Err(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into()),
                Ok(()) => "no result".into(),
            };
            (
                Err(format!("the VM thread panicked: {why}")),
                start.elapsed(),
            )
        }
    };
    Outcome {
        result,
        console: capture.text(),
        elapsed,
    }
}

/// A tiny-guest VM driven directly by the calling thread (snapshot tests): no VM thread, no
/// event loop unless the test runs it.
pub struct TinyVm {
    /// The VMM.
    pub vmm: Vmm,
    /// Its COM1 output.
    pub console: Capture,
}

/// The configuration `spec` boots with these disks.
pub fn vm_config(spec: &Spec, blocks: Vec<vmm::config::BlockConfig>) -> VmConfig {
    VmConfig {
        kernel: KernelConfig {
            path: guest_elf(spec.variant.clone()),
            cmdline: String::new(),
        },
        initrd: None,
        mem_mib: spec.mem_mib,
        vcpus: spec.vcpus,
        blocks,
        host_quirks: false,
        cpu_template: spec.cpu_template,
        nets: Vec::new(),
    }
}

/// Boots `spec` (its timeout is not used) with `blocks` on the calling thread.
pub fn boot(spec: Spec, blocks: Vec<vmm::config::BlockConfig>) -> Result<TinyVm, String> {
    let cfg = vm_config(&spec, blocks);
    let console = Capture::default();
    let opts = BootOptions {
        console: Console::Writer(Box::new(console.clone())),
        extra_pio: spec.pio,
        extra_mmio: spec.mmio,
        start_paused: spec.start_paused,
    };
    let vmm = build_for_boot(&cfg, opts).map_err(|e| format!("build_for_boot: {e}"))?;
    Ok(TinyVm { vmm, console })
}

/// Boots the tick guest ([`Scenario::SnapTicks`]) with `mem_mib` of RAM on the calling
/// thread and waits for its first tick.
pub fn boot_ticking(mem_mib: u64) -> Result<TinyVm, String> {
    let mut spec = Spec::new(Scenario::SnapTicks);
    spec.mem_mib = mem_mib;
    let vm = boot(spec, Vec::new())?;
    vm.wait_for(harness::deadline(), "tick 1\n")?;
    Ok(vm)
}

/// Restores the snapshot in `dir` with a fresh console capture; guest memory is served
/// lazily (userfaultfd), as `vmm restore` does by default.
pub fn restore(
    dir: &Path,
    blocks: Option<Vec<vmm::config::BlockConfig>>,
    start_paused: bool,
) -> Result<TinyVm, String> {
    restore_with(dir, blocks, start_paused, false)
}

/// Like [`restore`], but loads all memory before returning (`--eager-memory`).
pub fn restore_eager(
    dir: &Path,
    blocks: Option<Vec<vmm::config::BlockConfig>>,
    start_paused: bool,
) -> Result<TinyVm, String> {
    restore_with(dir, blocks, start_paused, true)
}

fn restore_with(
    dir: &Path,
    blocks: Option<Vec<vmm::config::BlockConfig>>,
    start_paused: bool,
    eager_memory: bool,
) -> Result<TinyVm, String> {
    let console = Capture::default();
    let (state, memory) = vmm::builder::snapshot_files(dir);
    let opts = vmm::builder::RestoreOptions {
        console: Console::Writer(Box::new(console.clone())),
        blocks,
        nets: Vec::new(),
        force: false,
        start_paused,
        eager_memory,
        clock: Default::default(),
    };
    let vmm = vmm::builder::build_from_snapshot(&state, &memory, opts)
        .map_err(|e| format!("restoring {}: {e}", dir.display()))?;
    Ok(TinyVm { vmm, console })
}

impl TinyVm {
    /// Waits until `cond(console)` holds; the error carries the console output.
    pub fn wait_console(
        &self,
        deadline: Instant,
        what: &str,
        mut cond: impl FnMut(&str) -> bool,
    ) -> Result<(), String> {
        wait_until(&self.vmm, deadline, what, || cond(&self.console.text()))
            .map_err(|e| format!("{e}\n--- console ---\n{}\n--- end ---", self.console.text()))
    }

    /// Waits until the console contains `needle`.
    pub fn wait_for(&self, deadline: Instant, needle: &str) -> Result<(), String> {
        self.wait_console(deadline, &format!("{needle:?} on the console"), |c| {
            c.contains(needle)
        })
    }

    /// Pauses the VM.
    pub fn pause(&mut self) -> Result<(), String> {
        self.vmm.pause().map_err(|e| format!("pause: {e}"))
    }

    /// Resumes the VM.
    pub fn resume(&mut self) -> Result<(), String> {
        self.vmm.resume().map_err(|e| format!("resume: {e}"))
    }

    /// Snapshots the (paused) VM into `dir`, chunks into `store` (default `dir`).
    pub fn snapshot(
        &mut self,
        dir: &Path,
        store: Option<&Path>,
    ) -> Result<vmm::vmm::SnapshotReport, String> {
        vmm::vmm::create_snapshot(&mut self.vmm, dir, store).map_err(|e| {
            format!(
                "snapshot to {}: {}",
                dir.display(),
                vmm::util::error_chain(&e)
            )
        })
    }

    /// vCPU 0's general-purpose registers (the VM must be paused).
    pub fn regs(&self) -> Result<kvm_bindings::kvm_regs, String> {
        self.vmm.machine.vcpus[0]
            .with(|fd| fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}")))
            .map_err(|e| format!("vcpu0: {e}"))?
    }

    /// Reads a u32 of guest memory.
    pub fn read_u32(&self, addr: u64) -> Result<u32, String> {
        use vm_memory::Bytes;
        self.vmm
            .machine
            .mem
            .read_obj(vm_memory::GuestAddress(addr))
            .map_err(|e| format!("read guest memory at {addr:#x}: {e}"))
    }

    /// Reads a u64 of guest memory.
    pub fn read_u64(&self, addr: u64) -> Result<u64, String> {
        use vm_memory::Bytes;
        self.vmm
            .machine
            .mem
            .read_obj(vm_memory::GuestAddress(addr))
            .map_err(|e| format!("read guest memory at {addr:#x}: {e}"))
    }

    /// Writes a value to guest memory.
    pub fn write<T: vm_memory::ByteValued>(&self, addr: u64, val: T) -> Result<(), String> {
        use vm_memory::Bytes;
        self.vmm
            .machine
            .mem
            .write_obj(val, vm_memory::GuestAddress(addr))
            .map_err(|e| format!("write guest memory at {addr:#x}: {e}"))
    }
}

/// Runs the event loop of `vm` until the VM exits, or stops it after `timeout`.
pub fn run_for(vm: &mut TinyVm, timeout: Duration) -> Result<ExitReason, String> {
    let exit = vm.vmm.machine.exit.clone();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(timeout) {
            exit.exit(ExitReason::Shutdown);
            true
        } else {
            false
        }
    });
    let res = vm.vmm.run().map_err(|e| format!("Vmm::run: {e}"));
    let _ = stop_tx.send(());
    let fired = watchdog.join().unwrap_or(false);
    let reason = res?;
    if fired && reason == ExitReason::Shutdown {
        return Err(format!(
            "the VM did not exit within {timeout:?}\n--- console ---\n{}\n--- end ---",
            vm.console.text()
        ));
    }
    Ok(reason)
}
