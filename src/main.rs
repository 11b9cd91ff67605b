//! `vmm` command-line front end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use vmm::api::{self, ApiTarget};
use vmm::builder::RestoreOptions;
use vmm::builder::{self, BootOptions, Console};
use vmm::config::{self, VmConfig};
use vmm::util::error_chain;
use vmm::vmm::Vmm;

/// A KVM virtual machine monitor that boots Linux, snapshots and restores it.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// S3-compatible endpoint (`http://HOST:PORT`) for `s3://BUCKET/PREFIX` archives and
    /// disks; default: $AWS_ENDPOINT_URL. Credentials: $AWS_ACCESS_KEY_ID and
    /// $AWS_SECRET_ACCESS_KEY (docs/OBJECT_STORAGE.md).
    #[arg(long, global = true, value_name = "URL")]
    s3_endpoint: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest kernel: `path=FILE[,cmdline="…"]` (vmlinux ELF or bzImage).
    #[arg(long)]
    kernel: Option<String>,
    /// initramfs image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory: `size_mib=N` (default 256).
    #[arg(long)]
    memory: Option<String>,
    /// vCPUs: `num=N` (default 1).
    #[arg(long)]
    vcpu: Option<String>,
    /// A virtio-block disk: `path=FILE[,read_only=true][,id=NAME][,root=true]` (repeatable).
    #[arg(long)]
    block: Vec<String>,
    /// A virtio-net interface on an existing tap: `tap=NAME[,mac=MAC][,id=ID]` (repeatable;
    /// ids net0, net1, …). With --memory_path/--cpu_path: `id=ID,tap=NAME` gives a restored
    /// interface another tap.
    #[arg(long)]
    net: Vec<String>,
    /// Do not append the command-line workarounds for PVM-style nested KVM hosts.
    #[arg(long)]
    no_host_quirks: bool,
    /// CPU features given to the guest: none (everything this host can give), x86-64-v2 or
    /// x86-64-v3 (a fixed baseline that older hosts can restore; docs/KEEPING_SNAPSHOTS.md).
    #[arg(long, value_name = "NAME", default_value = "none")]
    cpu_template: config::CpuTemplate,
    /// Restore: the snapshot's memory manifest (with --cpu_path).
    #[arg(long = "memory_path", requires = "cpu_path")]
    memory_path: Option<PathBuf>,
    /// Restore: the snapshot's state file (with --memory_path).
    #[arg(long = "cpu_path", requires = "memory_path")]
    cpu_path: Option<PathBuf>,
    #[command(flatten)]
    restore: RestoreFlags,
    #[command(flatten)]
    api: ApiFlags,
}

#[derive(Args, Debug, Clone)]
struct RestoreFlags {
    /// Restore even if a disk differs from the one recorded in the snapshot, or this host
    /// lacks CPU features the snapshot's guest was given (with a warning).
    #[arg(long)]
    force: bool,
    /// Leave the restored VM paused (resume it through the API).
    #[arg(long)]
    paused: bool,
    /// Load all guest memory before the VM runs (default: served lazily on first touch
    /// through userfaultfd, with a background fill).
    #[arg(long)]
    eager_memory: bool,
    /// Advance the guest's clock by the real time since the snapshot (KVM_CLOCK_REALTIME, as
    /// Firecracker's `clock_realtime`): monotonic time then jumps by the gap too. Default: the
    /// clock continues from the snapshot (docs/KEEPING_SNAPSHOTS.md).
    #[arg(long)]
    clock_realtime: bool,
}

impl RestoreFlags {
    /// The clock mode these flags ask for.
    fn clock(&self) -> vmm::arch::x86_64::ClockMode {
        if self.clock_realtime {
            vmm::arch::x86_64::ClockMode::Realtime
        } else {
            vmm::arch::x86_64::ClockMode::Continue
        }
    }
}

#[derive(Args, Debug, Clone)]
struct ApiFlags {
    /// Serve the control API on 127.0.0.1:PORT.
    #[arg(long)]
    port: Option<u16>,
    /// Serve the control API on a unix socket.
    #[arg(long = "api-sock")]
    api_sock: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Restore a snapshot directory (written by `PUT /snapshot/create`), or with --repo a
    /// repository snapshot by name, id or id prefix.
    Restore {
        /// Snapshot directory (with --repo: name, id or id prefix).
        dir: PathBuf,
        /// Snapshot repository to restore from.
        #[arg(long)]
        repo: Option<PathBuf>,
        /// Disks to attach instead of the recorded ones (same count and order).
        #[arg(long)]
        block: Vec<String>,
        /// Another tap for a recorded network interface: `id=ID,tap=NAME` (repeatable; the
        /// others reopen their recorded tap).
        #[arg(long)]
        net: Vec<String>,
        #[command(flatten)]
        restore: RestoreFlags,
        #[command(flatten)]
        api: ApiFlags,
        #[command(flatten)]
        archive: vmm::archive::cli::ArchiveRestoreFlags,
    },
    /// VM archives: push snapshots, record working sets (docs/ARCHIVE.md).
    Archive {
        #[command(subcommand)]
        cmd: vmm::archive::cli::ArchiveCmd,
    },
    /// Snapshot operations on a running `vmm`.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Disk image archives (docs/REMOTE_IMAGES.md).
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Chunk store maintenance (docs/SNAPSHOT_FORMAT.md, "Packs").
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCmd {
    /// Move the chunk files (`chunks/xx/<id>`, the older layout) of a snapshot directory,
    /// repository or archive into packs. Run it while nothing else writes to the store
    /// (a repository's lock is taken).
    Migrate {
        /// The store's directory (snapshot directory, repository or archive).
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Cut a raw, qcow2 or vmdk image into content-addressed chunks in an archive directory
    /// that any static web server can serve.
    Import {
        /// Source image.
        src: PathBuf,
        /// Archive directory (images/ and chunks/ are created in it), or
        /// `s3://BUCKET/PREFIX` (docs/OBJECT_STORAGE.md).
        archive: PathBuf,
        /// Image name (the index is written to ARCHIVE/images/NAME).
        #[arg(long)]
        name: String,
        /// Chunk size in KiB.
        #[arg(long, default_value_t = vmm::image::DEFAULT_IMAGE_CHUNK_SIZE / 1024)]
        chunk_kib: u32,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Pause the VM (if running), write a snapshot, resume it unless --leave-paused.
    Create {
        /// Snapshot directory to write (or --repo).
        #[arg(required_unless_present = "repo", conflicts_with = "repo")]
        path: Option<PathBuf>,
        /// Snapshot repository to create the snapshot in (created if missing).
        #[arg(long, conflicts_with = "store")]
        repo: Option<PathBuf>,
        /// Friendly name of the repository snapshot.
        #[arg(long, requires = "repo")]
        name: Option<String>,
        /// Print the JSON report (the default without --repo).
        #[arg(long)]
        json: bool,
        /// Shared chunk store directory (default: inside the snapshot directory).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Leave the VM paused afterwards.
        #[arg(long)]
        leave_paused: bool,
        #[command(flatten)]
        api: ApiFlags,
    },
    #[command(flatten)]
    Repo(vmm::repo::cli::RepoCmd),
}

fn build_config(run: &RunArgs) -> Result<VmConfig, config::ConfigError> {
    let kernel = match &run.kernel {
        Some(k) => config::parse_kernel(k)?,
        None => {
            return Err(config::ConfigError::Syntax {
                flag: "kernel",
                message: "is required (path=FILE[,cmdline=\"…\"])".into(),
            });
        }
    };
    Ok(VmConfig {
        kernel,
        initrd: run.initrd.clone(),
        mem_mib: match &run.memory {
            Some(m) => config::parse_memory(m)?,
            None => config::DEFAULT_MEM_MIB,
        },
        vcpus: match &run.vcpu {
            Some(v) => config::parse_vcpu(v)?,
            None => 1,
        },
        blocks: parse_blocks(&run.block)?,
        host_quirks: !run.no_host_quirks,
        cpu_template: run.cpu_template,
        nets: config::parse_nets(&run.net, false)?,
    })
}

fn parse_blocks(b: &[String]) -> Result<Vec<config::BlockConfig>, config::ConfigError> {
    b.iter().map(|b| config::parse_block(b)).collect()
}

fn fail(code: u8, msg: String) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    if let Some(e) = &cli.s3_endpoint {
        vmm::store::s3sign::set_endpoint(e);
    }
    match cli.cmd {
        None => run_vm(&cli.run),
        Some(Cmd::Restore {
            dir,
            repo,
            block,
            net,
            restore,
            api,
            archive,
        }) => restore_cmd(dir, repo, (&block, &net), &restore, (&archive, &api)),
        Some(Cmd::Snapshot {
            cmd:
                SnapshotCmd::Create {
                    path,
                    repo,
                    name,
                    json,
                    store,
                    leave_paused,
                    api,
                },
        }) => snapshot_create(
            SnapshotTarget {
                path,
                repo,
                name,
                json,
            },
            store.as_deref(),
            leave_paused,
            &api,
        ),
        Some(Cmd::Snapshot {
            cmd: SnapshotCmd::Repo(cmd),
        }) => vmm::repo::cli::run(cmd),
        Some(Cmd::Archive { cmd }) => vmm::archive::cli::run(cmd),
        Some(Cmd::Store {
            cmd: StoreCmd::Migrate { dir },
        }) => store_migrate(&dir),
        Some(Cmd::Image {
            cmd:
                ImageCmd::Import {
                    src,
                    archive,
                    name,
                    chunk_kib,
                },
        }) => image_import(&src, &archive, &name, chunk_kib.saturating_mul(1024)),
    }
}

/// `vmm image import SRC ARCHIVE|s3://BUCKET/PREFIX --name NAME`.
fn image_import(src: &Path, archive: &Path, name: &str, chunk: u32) -> ExitCode {
    let report = match archive.to_str().filter(|a| a.starts_with("s3://")) {
        Some(url) => {
            vmm::archive::s3push::import_image_s3(src, url, name, chunk, Default::default())
                .map(|r| r.to_string())
                .map_err(|e| error_chain(&e))
        }
        None => vmm::image::import_image(src, archive, name, chunk)
            .map(|r| r.to_string())
            .map_err(|e| error_chain(&e)),
    };
    match report {
        Ok(r) => {
            println!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

/// `vmm restore DIR|ID|URL`: a snapshot directory, a repository snapshot (`--repo`) or an
/// archived VM (`http://`, `s3://`, or a local archive's `vms/NAME`).
fn restore_cmd(
    dir: PathBuf,
    repo: Option<PathBuf>,
    (block, net): (&[String], &[String]),
    restore: &RestoreFlags,
    (archive, api): (&vmm::archive::cli::ArchiveRestoreFlags, &ApiFlags),
) -> ExitCode {
    let src = dir.to_string_lossy();
    if repo.is_none() && vmm::archive::is_archive_source(&src) {
        if !net.is_empty() {
            return fail(
                2,
                "--net cannot change the taps of an archived VM (it reopens the recorded ones)"
                    .into(),
            );
        }
        return restore_archive(&src, block, restore, archive, api);
    }
    let dir = match repo {
        None => dir,
        Some(r) => match vmm::repo::Repo::open(&r).and_then(|repo| {
            let id = repo.resolve(&dir.to_string_lossy())?;
            Ok(repo.snapshot_dir(&id))
        }) {
            Ok(d) => d,
            Err(e) => return fail(2, error_chain(&e)),
        },
    };
    let (state, memory) = builder::snapshot_files(&dir);
    restore_vm(&state, &memory, (block, net), restore, api)
}

/// `vmm store migrate DIR`: a repository under its exclusive lock; an archive also lists
/// its new packs for HTTP readers.
fn store_migrate(dir: &Path) -> ExitCode {
    let _lock = if dir.join(vmm::repo::MARKER_FILE).is_file() {
        let repo = match vmm::repo::Repo::open(dir) {
            Ok(r) => r,
            Err(e) => return fail(1, error_chain(&e)),
        };
        match repo.lock(vmm::repo::lock::LockMode::Exclusive, "store migrate") {
            Ok(l) => Some(l),
            Err(e) => return fail(1, error_chain(&e)),
        }
    } else {
        None
    };
    let archive =
        dir.join(vmm::formats::marker::ARCHIVE_MARKER).is_file() || dir.join("vms").is_dir();
    match vmm::store::pack_migrate::migrate(dir, archive) {
        Ok(r) => {
            println!("{r}");
            if r.damaged.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(1, error_chain(&e)),
    }
}

fn run_vm(run: &RunArgs) -> ExitCode {
    if let (Some(m), Some(c)) = (&run.memory_path, &run.cpu_path) {
        if run.kernel.is_some() {
            log::info!("restoring a snapshot: --kernel is not needed and is ignored");
        }
        return restore_vm(c, m, (&run.block, &run.net), &run.restore, &run.api);
    }
    let cfg = match build_config(run) {
        Ok(c) => c,
        Err(e) => return fail(2, e.to_string()),
    };
    let server = match start_api(&run.api) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let _term = vmm::vmm::TerminalGuard::new();
    let vm = match builder::build_for_boot(&cfg, BootOptions::stdio()) {
        Ok(v) => v,
        Err(e) => return fail(e.exit_code(), error_chain(&e)),
    };
    serve(vm, server)
}

fn restore_vm(
    cpu: &Path,
    memory: &Path,
    (blocks, nets): (&[String], &[String]),
    flags: &RestoreFlags,
    api: &ApiFlags,
) -> ExitCode {
    let blocks = match parse_blocks(blocks) {
        Ok(b) if b.is_empty() => None,
        Ok(b) => Some(b),
        Err(e) => return fail(2, e.to_string()),
    };
    let nets = match config::parse_nets(nets, true) {
        Ok(n) => n,
        Err(e) => return fail(2, e.to_string()),
    };
    let server = match start_api(api) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let _term = vmm::vmm::TerminalGuard::new();
    let opts = RestoreOptions {
        console: Console::Stdio,
        blocks,
        nets,
        force: flags.force,
        start_paused: flags.paused,
        eager_memory: flags.eager_memory,
        clock: flags.clock(),
    };
    let mut vm = match builder::build_from_snapshot(cpu, memory, opts) {
        Ok(v) => v,
        Err(e) => return fail(e.exit_code(), error_chain(&e)),
    };
    if let Err(e) = vm.watch_lazy_memory() {
        return fail(1, format!("lazy memory: {e}"));
    }
    vm.repo_parent = cpu.parent().and_then(vmm::repo::origin_of_snapshot_dir);
    serve(vm, server)
}

/// `vmm restore http://HOST/…/vms/NAME` (or a local `ARCHIVE/vms/NAME`): docs/ARCHIVE.md.
fn restore_archive(
    src: &str,
    blocks: &[String],
    flags: &RestoreFlags,
    archive: &vmm::archive::cli::ArchiveRestoreFlags,
    api: &ApiFlags,
) -> ExitCode {
    let started = std::time::Instant::now();
    if !blocks.is_empty() {
        return fail(
            2,
            "--block cannot replace the disks of an archived VM".into(),
        );
    }
    let server = match start_api(api) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let _term = vmm::vmm::TerminalGuard::new();
    let common = vmm::archive::cli::CommonRestore {
        force: flags.force,
        paused: flags.paused,
        eager_memory: flags.eager_memory,
        clock: flags.clock(),
    };
    let (mut vm, session) = match vmm::archive::cli::restore_cli(src, archive, common, started) {
        Ok(v) => v,
        Err((code, e)) => return fail(code, e),
    };
    if let Err(e) = vm.watch_lazy_memory() {
        return fail(1, format!("lazy memory: {e}"));
    }
    let session = std::sync::Arc::new(session);
    let report = std::sync::Arc::clone(&session);
    vm.status_extras
        .push(("archive", Box::new(move || report.report())));
    let code = serve(vm, server);
    session.log_totals();
    code
}

/// The control API server and its channel, started before the VM is built or restored so
/// that its socket exists before the guest runs: a client that sees the guest's first output
/// can connect at once (requests sent meanwhile wait for the VM's event loop).
type ApiServer = Option<(api::ApiServerHandle, api::ApiChannel)>;

/// Starts the API server if asked; on failure the exit code to return.
fn start_api(api: &ApiFlags) -> Result<ApiServer, ExitCode> {
    if api.port.is_none() && api.api_sock.is_none() {
        return Ok(None);
    }
    api::start(api.port, api.api_sock.as_deref())
        .map(Some)
        .map_err(|e| fail(1, error_chain(&e)))
}

/// Attaches the API server (if any) and runs the VM to its end.
fn serve(mut vm: Vmm, server: ApiServer) -> ExitCode {
    let _server = match server {
        Some((handle, chan)) => {
            if let Err(e) = vm.attach_api(chan) {
                return fail(1, format!("control API: {e}"));
            }
            Some(handle)
        }
        None => None,
    };
    let result = vm.run();
    for d in vm.remote_disk_report() {
        log::info!("remote disk: {d}");
    }
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            if code != 0 {
                eprintln!("vmm: guest stopped: {reason}");
            } else {
                log::info!("guest stopped: {reason}");
            }
            ExitCode::from(code as u8)
        }
        Err(e) => fail(1, error_chain(&e)),
    }
}

fn api_target(api: &ApiFlags) -> Result<ApiTarget, String> {
    match (&api.api_sock, api.port) {
        (Some(p), _) => Ok(ApiTarget::Unix(p.clone())),
        (None, Some(port)) => Ok(ApiTarget::Tcp(port)),
        (None, None) => Err("name the running vmm with --api-sock PATH or --port N".into()),
    }
}

fn call(t: &ApiTarget, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
    match api::request(t, method, path, body) {
        Ok((s, b)) if (200..300).contains(&s) => Ok(b),
        Ok((s, b)) => Err(format!("{method} {path}: HTTP {s}: {b}")),
        Err(e) => Err(format!("{method} {path}: {}", error_chain(&e))),
    }
}

/// Where `vmm snapshot create` writes.
struct SnapshotTarget {
    path: Option<PathBuf>,
    repo: Option<PathBuf>,
    name: Option<String>,
    json: bool,
}

fn snapshot_create(
    target: SnapshotTarget,
    store: Option<&Path>,
    leave_paused: bool,
    api: &ApiFlags,
) -> ExitCode {
    let t = match api_target(api) {
        Ok(t) => t,
        Err(e) => return fail(2, e),
    };
    let run = || -> Result<String, String> {
        let vm: serde_json::Value = serde_json::from_str(&call(&t, "GET", "/vm", None)?)
            .map_err(|e| format!("GET /vm: {e}"))?;
        let was_running = vm["state"] == "Running";
        if was_running {
            call(&t, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#))?;
        }
        let mut body = match (&target.path, &target.repo) {
            (_, Some(r)) => {
                let abs = std::path::absolute(r).map_err(|e| e.to_string())?;
                let mut b = serde_json::json!({ "repo": abs });
                if let Some(n) = &target.name {
                    b["name"] = serde_json::json!(n);
                }
                b
            }
            (Some(p), None) => {
                serde_json::json!({ "path": std::path::absolute(p).map_err(|e| e.to_string())? })
            }
            (None, None) => return Err("give a snapshot directory or --repo".into()),
        };
        if let Some(s) = store {
            body["store"] = serde_json::json!(std::path::absolute(s).map_err(|e| e.to_string())?);
        }
        let res = call(&t, "PUT", "/snapshot/create", Some(&body.to_string()));
        if was_running && !leave_paused {
            call(&t, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))?;
        }
        res
    };
    match run() {
        Ok(report) if target.repo.is_some() && !target.json => {
            match serde_json::from_str::<serde_json::Value>(&report) {
                Ok(v) => println!("{}", vmm::repo::cli::describe_create(&v)),
                Err(_) => println!("{report}"),
            }
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}
