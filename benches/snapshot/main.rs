//! Snapshot create / restore benchmark (harness = false; runs only under `cargo bench`).
//!
//! 1. Host limits, measured by this program: memcpy, BLAKE3 (one thread, all cores),
//!    zstd level 1, write + fsync to the bench directory (`host.rs`).
//! 2. Full snapshots of a real VM (built with `build_for_boot` from a 3-instruction ELF
//!    kernel, `vm.rs`) whose memory is filled with a synthetic pattern (see
//!    [`memory::Pattern`]), at 256 MiB, 1 GiB and 4 GiB (`SNAPSHOT_BENCH_SIZES`, MiB,
//!    comma-separated): create (`create.rs`), in-process restore (`build_from_snapshot` →
//!    VM ready and paused; warm and with the page cache dropped), memory-only restore
//!    through the library, and process-level restore (`vmm restore DIR --paused`: spawn →
//!    the `restored … in X ms` log line, and spawn → the API socket answering `GET /vm`)
//!    (`restore.rs`).
//! 3. Incremental: a second, third … snapshot into a shared store after dirtying 0, 0.1,
//!    1 and 10 % of the pages (`SNAPSHOT_BENCH_INCR_MIB`, default 1024), and an idle
//!    series (`incremental.rs`).
//! 4. The real Linux guest (256 MiB, idle) booted, snapshotted through the CLI and
//!    restored, if the guest artifacts exist (`SNAPSHOT_BENCH_LINUX=0` skips it)
//!    (`linux.rs`).
//!
//! Results are printed and appended to
//! `target/bench/{host,snapshot,restore,incremental,idle_series}.csv`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod create;
mod host;
mod incremental;
mod linux;
mod memory;
mod restore;
mod vm;

use std::fs;
use std::time::Instant;

use create::{CREATE_HEADER, Creates};
use restore::Restores;
use support::bench::*;

fn main() {
    if !bench_mode("snapshot") || !kvm_bench("snapshot") {
        return;
    }
    let run = run_id();
    print_host("snapshot");
    let t0 = Instant::now();
    let root = bench_dir("snapshot");
    let kernel = vm::tiny_kernel(&root);
    let limits = if std::env::var("SNAPSHOT_BENCH_TAG").is_ok_and(|t| !t.is_empty()) {
        // A variant run: only the write + fsync bandwidth the target needs.
        host::fsync_only(&root)
    } else {
        host::host_limits(run, &root)
    };
    let creates = Creates {
        run,
        csv: Csv::new("snapshot", CREATE_HEADER),
        fsync_bw: limits.fsync_bw,
    };
    let restores = Restores {
        run,
        csv: Csv::new(
            "restore",
            "run,guest,mem_mib,method,iter,ms,vmm_reported_ms,vmm_reported_memory_ms,load1",
        ),
    };
    if std::env::var("SNAPSHOT_BENCH_FULL").as_deref() != Ok("0") {
        create::full_snapshots(&root, &kernel, &creates, &restores);
    }
    if env_or("SNAPSHOT_BENCH_INCR_MIB", 1024u64) > 0 {
        incremental::incremental(run, &root, &kernel);
    }
    if std::env::var("SNAPSHOT_BENCH_LINUX").as_deref() != Ok("0") {
        linux::linux_guest(&root, &creates, &restores);
        linux::linux_idle_series(run, &root);
    }
    let _ = fs::remove_dir_all(&root);
    println!(
        "snapshot bench done in {:.0} s; loadavg {}; CSV in {}",
        t0.elapsed().as_secs_f64(),
        loadavg(),
        out_dir().display()
    );
}
