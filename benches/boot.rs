//! Linux boot time (harness = false; runs only under `cargo bench`, it takes minutes).
//!
//! Boots the project's `vmlinux` `BOOT_BENCH_RUNS` times (default 3): 256 MiB, 1 vCPU, a
//! fresh copy of `rootfs.ext4` as root with `init=/idle` (no system calls: see
//! docs/PVM_HOSTS.md), `vmmtest.info vmmtest.poweroff`. Measures process start → the
//! `vmmtest: info` line and → process exit, plus the guest's own printk timestamp of
//! that line. Appends to `target/bench/boot.csv`.
//!
//! On PVM-style nested hosts early boot is emulated, so absolute times mean little;
//! compare them only as ratios against another VMM on the same host.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::process::Command;
use std::time::Duration;

use support::bench::*;
use support::env::vmm_bin;
use support::linux::kernel_arg;
use support::process::Running;

fn main() {
    let Some(art) = linux_bench("boot") else {
        return;
    };
    let runs: usize = env_or("BOOT_BENCH_RUNS", 3);
    let mem_mib: u64 = env_or("BOOT_BENCH_MIB", 256);
    let run = run_id();
    print_host("boot");
    let dir = bench_dir("boot");
    let csv = Csv::new(
        "boot",
        "run,iter,kernel,mem_mib,vcpus,info_s,exit_s,guest_info_s,exit_code,load1_before,load1_after",
    );
    let (mut infos, mut exits, mut guests) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=runs {
        let root = dir.join(format!("rootfs-{i}.ext4"));
        fs::copy(art.rootfs(), &root).expect("copy rootfs");
        let l_before = load1();
        let mut p = Running::try_spawn(
            Command::new(vmm_bin())
                .arg("--kernel")
                .arg(kernel_arg(&art, "init=/idle vmmtest.info vmmtest.poweroff"))
                .arg("--memory")
                .arg(format!("size_mib={mem_mib}"))
                .arg("--vcpu")
                .arg("num=1")
                .arg("--block")
                .arg(format!("path={},root=true", root.display())),
        )
        .expect("spawn vmm")
        .echo("vmmtest:");
        let info = p.wait_for_index("vmmtest: info", Duration::from_secs(420));
        let (code, exit_at) = p.wait_exit_at(Duration::from_secs(120));
        let exit_s = (exit_at - p.started).as_secs_f64();
        let Some(info) = info else {
            println!(
                "boot {i}: no `vmmtest: info` line (exit {code:?})\n{}",
                p.output()
            );
            continue;
        };
        let info_s = p.secs_to(info);
        let guest_s = printk_secs(&p.line(info).text).unwrap_or(f64::NAN);
        println!(
            "boot {i}/{runs}: `vmmtest: info` after {info_s:.2} s (guest clock {guest_s:.2} s), \
             exit {code:?} after {exit_s:.2} s; load {l_before:.2} → {:.2}",
            load1()
        );
        if code == Some(0) {
            infos.push(info_s);
            exits.push(exit_s);
            guests.push(guest_s);
        }
        csv.row(&[
            run.to_string(),
            i.to_string(),
            "vmlinux".into(),
            mem_mib.to_string(),
            "1".into(),
            f(info_s),
            f(exit_s),
            f(guest_s),
            code.map_or("none".into(), |c| c.to_string()),
            f(l_before),
            f(load1()),
        ]);
        let _ = fs::remove_file(&root);
    }
    let (imin, imed) = min_median(&infos);
    let (emin, emed) = min_median(&exits);
    let (gmin, gmed) = min_median(&guests);
    println!(
        "boot vmlinux {mem_mib} MiB, {} good run(s): start → `vmmtest: info` min {imin:.2} s / \
         median {imed:.2} s (guest clock min {gmin:.2} / median {gmed:.2}); start → exit min \
         {emin:.2} s / median {emed:.2} s; loadavg {}",
        infos.len(),
        loadavg()
    );
    let _ = fs::remove_dir_all(&dir);
}
