//! `vmm` command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use vmm::builder::{self, BootOptions};
use vmm::config::{self, VmConfig};

/// A KVM virtual machine monitor that boots Linux, snapshots and restores it.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about)]
struct Cli {
    /// Guest kernel: `path=FILE[,cmdline="…"]` (vmlinux ELF or bzImage).
    #[arg(long)]
    kernel: Option<String>,
    /// initramfs image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory: `size_mib=N`.
    #[arg(long, default_value = "size_mib=256")]
    memory: String,
    /// vCPUs: `num=N`.
    #[arg(long, default_value = "num=1")]
    vcpu: String,
    /// A virtio-block disk: `path=FILE[,read_only=true][,id=NAME][,root=true]` (repeatable).
    #[arg(long)]
    block: Vec<String>,
    /// Do not append the command-line workarounds for PVM-style nested KVM hosts.
    #[arg(long)]
    no_host_quirks: bool,
}

fn build_config(cli: &Cli) -> Result<VmConfig, config::ConfigError> {
    let kernel = match &cli.kernel {
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
        initrd: cli.initrd.clone(),
        mem_mib: config::parse_memory(&cli.memory)?,
        vcpus: config::parse_vcpu(&cli.vcpu)?,
        blocks: cli
            .block
            .iter()
            .map(|b| config::parse_block(b))
            .collect::<Result<_, _>>()?,
        host_quirks: !cli.no_host_quirks,
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let cfg = match build_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: error: {e}");
            return ExitCode::from(2);
        }
    };
    let _term = vmm::vmm::TerminalGuard::new();
    let mut vm = match builder::build_for_boot(&cfg, BootOptions::stdio()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    match vm.run() {
        Ok(reason) => {
            let code = reason.exit_code();
            if code != 0 {
                eprintln!("vmm: guest stopped: {reason}");
            } else {
                log::info!("guest stopped: {reason}");
            }
            ExitCode::from(code as u8)
        }
        Err(e) => {
            eprintln!("vmm: error: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
