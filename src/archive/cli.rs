//! The command-line side of archives: `vmm archive push`, `vmm archive record-workingset`,
//! and the flags `vmm restore http://…/vms/NAME` takes (`src/main.rs` only dispatches).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::restore::{ArchiveRestoreOptions, ArchiveSession, restore};
use super::workingset::FillRate;
use super::{Source, WORKINGSET_FILE};
use crate::builder::Console;
use crate::store::http::HttpStoreOptions;
use crate::store::s3sign::SCHEME as S3_SCHEME;
use crate::util::error_chain;
use crate::vmm::Vmm;
use crate::vstate::exit::ExitReason;

/// `vmm archive …` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ArchiveCmd {
    /// Write a snapshot directory into an archive directory (ARCHIVE/vms/NAME plus the
    /// chunks the archive lacks); serve ARCHIVE with any web server and resume it with
    /// `vmm restore http://HOST/…/vms/NAME`. An archive `s3://BUCKET/PREFIX` is written
    /// to S3-compatible object storage (same layout; docs/OBJECT_STORAGE.md) and resumed
    /// with `vmm restore s3://BUCKET/PREFIX/vms/NAME`.
    Push {
        /// Snapshot directory (state + memory).
        snapshot: PathBuf,
        /// Archive directory, or `s3://BUCKET/PREFIX`.
        archive: PathBuf,
        /// Name of the archived VM.
        #[arg(long)]
        name: String,
    },
    /// Resume an archived VM for a few seconds with its console discarded, record the
    /// memory chunks it touches, in order, and store them as its working set (prefetched
    /// by later resumes). The VM is then stopped.
    RecordWorkingset {
        /// `ARCHIVE/vms/NAME` or `http://HOST/…/vms/NAME`.
        source: String,
        /// How long to let the VM run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Where to write the list (default: SOURCE/workingset for a local archive;
        /// required for an http:// source).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        flags: ArchiveRestoreFlags,
    },
}

/// Flags of `vmm restore` that only apply to archived VMs.
#[derive(clap::Args, Debug, Clone)]
pub struct ArchiveRestoreFlags {
    /// Archived VMs: root of the chunk cache shared by all instances (`chunks/`, for
    /// memory and disks alike); default $XDG_CACHE_HOME/vmm or ~/.cache/vmm.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Archived VMs: size limit of that cache in MiB (oldest chunks evicted first, down
    /// to 7/8 of it); default no limit.
    #[arg(long, visible_alias = "cache-size")]
    pub cache_max_mib: Option<u64>,
    /// Archived VMs: directory for this instance's fresh disk overlays, kept afterwards
    /// (default: a temporary directory under the cache root, removed at exit).
    #[arg(long)]
    pub overlay_dir: Option<PathBuf>,
    /// Archived VMs: do not prefetch the archived working set.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Archived VMs: background fill of the memory outside the working set, in MiB/s,
    /// `max`, or `off` (then the VM needs the archive for as long as it runs).
    #[arg(long, default_value = "64")]
    pub fill_rate: String,
    /// Archived VMs: a further archive base URL holding the same chunks (repeatable).
    #[arg(long)]
    pub mirror: Vec<String>,
}

/// `vmm restore` flags shared with plain snapshots.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommonRestore {
    /// `--force`.
    pub force: bool,
    /// `--paused`.
    pub paused: bool,
    /// `--eager-memory`.
    pub eager_memory: bool,
    /// `--clock-realtime`.
    pub clock: crate::arch::x86_64::ClockMode,
}

fn fail(code: u8, msg: String) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::from(code)
}

/// Runs `vmm archive …`.
pub fn run(cmd: ArchiveCmd) -> ExitCode {
    match cmd {
        ArchiveCmd::Push {
            snapshot,
            archive,
            name,
        } => match archive.to_str().filter(|a| a.starts_with(S3_SCHEME)) {
            Some(url) => match super::s3push::push_s3(&snapshot, url, &name, Default::default()) {
                Ok(r) => {
                    println!("{r}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, error_chain(&e)),
            },
            None => match super::push::push(&snapshot, &archive, &name) {
                Ok(r) => {
                    println!("{r}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, error_chain(&e)),
            },
        },
        ArchiveCmd::RecordWorkingset {
            source,
            seconds,
            out,
            flags,
        } => match record_working_set(&source, seconds, out, &flags) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, e),
        },
    }
}

fn options(
    flags: &ArchiveRestoreFlags,
    common: CommonRestore,
    console: Console,
    started: Instant,
) -> Result<ArchiveRestoreOptions, String> {
    let mut o = ArchiveRestoreOptions::new(console);
    o.cache_root = flags.cache.clone();
    o.cache_max_mib = flags.cache_max_mib;
    o.overlay_dir = flags.overlay_dir.clone();
    o.http = HttpStoreOptions {
        mirrors: flags.mirror.clone(),
        ..HttpStoreOptions::default()
    };
    o.prefetch = !flags.no_prefetch;
    o.fill = FillRate::parse(&flags.fill_rate)?;
    o.force = common.force;
    o.start_paused = common.paused;
    o.eager_memory = common.eager_memory;
    o.clock = common.clock;
    o.started = Some(started);
    Ok(o)
}

/// `vmm restore SOURCE` for an archived VM: resumes it with the console on stdio. An error
/// comes with the process exit code (2: this host lacks CPU features the guest was given;
/// 1: anything else).
pub fn restore_cli(
    source: &str,
    flags: &ArchiveRestoreFlags,
    common: CommonRestore,
    started: Instant,
) -> Result<(Vmm, ArchiveSession), (u8, String)> {
    let opts = options(flags, common, Console::Stdio, started).map_err(|e| (1, e))?;
    restore(&Source::parse(source), opts).map_err(|e| {
        let code = match &e {
            super::restore::RestoreError::Build(b) => b.exit_code(),
            _ => 1,
        };
        (code, error_chain(&e))
    })
}

fn record_working_set(
    source: &str,
    seconds: f64,
    out: Option<PathBuf>,
    flags: &ArchiveRestoreFlags,
) -> Result<String, String> {
    let src = Source::parse(source);
    let out = match (out, &src) {
        (Some(o), _) => o,
        (None, Source::Local { vm_dir }) => vm_dir.join(WORKINGSET_FILE),
        (None, Source::Http { .. }) => {
            return Err("record-workingset from an http:// source needs --out FILE".into());
        }
    };
    if !(0.0..=3600.0).contains(&seconds) {
        return Err(format!("--seconds {seconds}: expected 0..=3600"));
    }
    let mut opts = options(
        flags,
        CommonRestore::default(),
        Console::Writer(Box::new(std::io::sink())),
        Instant::now(),
    )?;
    opts.record = true;
    opts.prefetch = false;
    opts.fill = FillRate::Off;
    let (mut vmm, session) = restore(&src, opts).map_err(|e| error_chain(&e))?;
    vmm.watch_lazy_memory()
        .map_err(|e| format!("lazy memory: {e}"))?;
    let exit = vmm.machine.exit.clone();
    let timer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(seconds));
        exit.exit(ExitReason::Shutdown);
    });
    let reason = vmm.run().map_err(|e| error_chain(&e))?;
    let ws = session.take_working_set();
    drop(vmm);
    drop(session);
    let _ = timer.join();
    if reason != ExitReason::Shutdown {
        log::warn!("the VM stopped by itself while recording: {reason}");
    }
    if let ExitReason::MemoryUnavailable { message } = &reason {
        return Err(format!("memory could not be read: {message}"));
    }
    ws.write_to(&out)
        .map_err(|e| format!("{}: {}", out.display(), error_chain(&e)))?;
    Ok(format!(
        "recorded a working set of {} chunks in {:.1} s into {}",
        ws.chunks.len(),
        ws.recorded_ms as f64 / 1e3,
        out.display()
    ))
}
