//! Incremental snapshots into a shared store (`incremental.csv`) and the storage of a
//! series of snapshots of an idle guest (`idle_series.csv`, the Linux one in `linux.rs`).

use std::fs;
use std::path::Path;
use std::time::Duration;

use vmm::vmm::create_snapshot;
use vmm::vstate::dirty::LogState;

use crate::memory::{Pattern, scan};
use crate::support::bench::{Csv, env_or, f, load1};
use crate::support::files::dir_bytes;
use crate::vm::boot_tiny;

/// Incremental snapshots of a 1 GiB tiny guest filled with [`Pattern`], after dirtying
/// 0 %, 0.1 %, 1 %, 10 % and 100 % of its pages (through vm-memory, so the VMM's write
/// bitmap sees them: the KVM log path sees what a guest's writes would show), with each
/// dirty-tracking method: `kvm-log` (only chunks with a dirty page are re-read) and
/// `rehash` (every chunk re-hashed; only changed ones stored). Then storage for ten
/// snapshots of the same guest left running idle between them.
pub fn incremental(run: u64, root: &Path, kernel: &Path) {
    let mib: u64 = env_or("SNAPSHOT_BENCH_INCR_MIB", 1024);
    let csv = Csv::new(
        "incremental",
        "run,mem_mib,method,dirty_pct,pages_dirtied,chunks_touched,create_ms,memory_ms,\
         chunks_reused,chunks_new,bytes_new,bytes_written,store_bytes,load1",
    );
    // Both methods, in the order given (SNAPSHOT_BENCH_INCR_METHODS, default
    // "kvm-log,rehash"): run them both ways round to see what order costs.
    let methods =
        std::env::var("SNAPSHOT_BENCH_INCR_METHODS").unwrap_or_else(|_| "kvm-log,rehash".into());
    for method in methods
        .split(',')
        .filter(|m| matches!(*m, "kvm-log" | "rehash"))
    {
        incremental_series(&csv, run, root, kernel, mib, method);
    }
    idle_series(run, root, kernel, mib);
}

/// The incremental series of one dirty-tracking method, into a store of its own.
fn incremental_series(csv: &Csv, run: u64, root: &Path, kernel: &Path, mib: u64, method: &str) {
    let store = root.join(format!("store-{method}"));
    let mut vm = boot_tiny(kernel, mib);
    let mut pat = Pattern::new(0x5eed_0abc);
    pat.fill(&vm.machine.mem);
    let content = scan(&vm.machine.mem);
    println!(
        "incremental ({method}), {mib} MiB, shared store ({:.1} % pages non-zero):",
        100.0 * content.nonzero_pages as f64 / content.pages as f64
    );
    let pages = content.pages as usize;
    let mut prev_store = 0;
    for (i, pct) in [f64::NAN, 0.0, 0.1, 1.0, 10.0, 100.0]
        .into_iter()
        .enumerate()
    {
        let (n, touched) = if pct.is_nan() {
            (0, 0)
        } else {
            let n = (pages as f64 * pct / 100.0).round() as usize;
            (n, pat.dirty_tracked(&vm.machine.mem, n))
        };
        let dir = root.join(format!("incr-{method}-{i}"));
        let r = create_snapshot(&mut vm, &dir, Some(&store)).expect("create_snapshot");
        if pct.is_nan() {
            // The pattern was written behind the logs' back, so the base snapshot's
            // check distrusts the log; pick the method under test explicitly.
            vm.machine.dirty_log = if method == "kvm-log" {
                LogState::Trusted
            } else {
                LogState::Broken
            };
        }
        let sb = dir_bytes(&store);
        let label = if pct.is_nan() {
            "base".to_string()
        } else {
            format!("{pct} %")
        };
        println!(
            "  {label:>7} dirty ({n} pages, {touched} chunks touched): {:.1} ms (memory {:.1}), \
             {} reused, {} new chunks, +{:.2} MiB stored (store grew {:.2} MiB)",
            r.total_ms,
            r.memory_ms,
            r.memory.chunks_reused,
            r.memory.chunks_new,
            r.memory.bytes_written as f64 / 1048576.0,
            (sb - prev_store) as f64 / 1048576.0
        );
        prev_store = sb;
        csv.row(&[
            run.to_string(),
            mib.to_string(),
            method.to_string(),
            if pct.is_nan() {
                "base".into()
            } else {
                pct.to_string()
            },
            n.to_string(),
            touched.to_string(),
            f(r.total_ms),
            f(r.memory_ms),
            r.memory.chunks_reused.to_string(),
            r.memory.chunks_new.to_string(),
            r.memory.bytes_new.to_string(),
            r.memory.bytes_written.to_string(),
            sb.to_string(),
            f(load1()),
        ]);
    }
    drop(vm);
    let _ = fs::remove_dir_all(&store);
}

/// Columns of `idle_series.csv`.
pub const IDLE_HEADER: &str =
    "run,guest,mem_mib,snapshot,create_ms,bytes_written,store_bytes,ratio_to_first";

/// Ten snapshots of the tiny guest (filled with [`Pattern`]) resumed for 200 ms between
/// them, into one store: total storage against the first snapshot alone.
fn idle_series(run: u64, root: &Path, kernel: &Path, mib: u64) {
    let csv = Csv::new("idle_series", IDLE_HEADER);
    let store = root.join("store-idle");
    let mut vm = boot_tiny(kernel, mib);
    Pattern::new(0x1d1e).fill(&vm.machine.mem);
    let mut first = 0u64;
    println!("idle series, {mib} MiB, 10 snapshots into one store:");
    for i in 1..=10 {
        if i > 1 {
            vm.resume().expect("resume");
            std::thread::sleep(Duration::from_millis(200));
            vm.pause().expect("pause");
        }
        let dir = root.join(format!("idle-{i}"));
        let r = create_snapshot(&mut vm, &dir, Some(&store)).expect("create_snapshot");
        let sb = dir_bytes(&store);
        if i == 1 {
            first = sb;
        }
        let ratio = sb as f64 / first as f64;
        println!(
            "  snapshot {i:>2}: {:.1} ms, +{} bytes, store {:.2} MiB ({ratio:.4}x the first)",
            r.total_ms,
            r.memory.bytes_written,
            sb as f64 / 1048576.0
        );
        csv.row(&[
            run.to_string(),
            "tiny".into(),
            mib.to_string(),
            i.to_string(),
            f(r.total_ms),
            r.memory.bytes_written.to_string(),
            sb.to_string(),
            format!("{ratio:.4}"),
        ]);
    }
    drop(vm);
    let _ = fs::remove_dir_all(&store);
}
