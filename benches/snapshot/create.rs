//! Full snapshots of synthetic guests (`snapshot.csv`) and the restore measurements of
//! each.

use std::fs;
use std::path::Path;
use std::time::Instant;

use vmm::vmm::{SnapshotReport, create_snapshot};

use crate::memory::{Content, PAGE, Pattern, scan};
use crate::restore::Restores;
use crate::support::bench::{Csv, f, load1, ms};
use crate::support::files::dir_bytes;
use crate::vm::boot_tiny;

/// The create measurements, appended to `snapshot.csv`.
pub struct Creates {
    /// The bench run.
    pub run: u64,
    /// `snapshot.csv`.
    pub csv: Csv,
    /// The host's write + fsync bandwidth, bytes/s (for the target time).
    pub fsync_bw: f64,
}

impl Creates {
    /// Prints and appends one snapshot's figures.
    pub fn row(&self, guest: &str, mem_mib: u64, c: &Content, r: &SnapshotReport, dir_b: u64) {
        let nz_bytes = c.nonzero_pages * PAGE as u64;
        let target_ms = 1.2 * nz_bytes as f64 / self.fsync_bw * 1e3;
        let m = &r.memory;
        println!(
            "  create {guest} {mem_mib} MiB: {:.1} ms (state {:.1}, memory {:.1}); non-zero pages \
             {:.1} % ({} MiB), non-zero chunks {:.1} %; chunks {} total / {} zero / {} new / {} \
             deduped; {} MiB raw new, {:.1} MiB stored, dir {:.1} MiB; target (1.2 × non-zero ÷ \
             fsync bw) {target_ms:.1} ms",
            r.total_ms,
            r.state_ms,
            r.memory_ms,
            100.0 * c.nonzero_pages as f64 / c.pages as f64,
            nz_bytes >> 20,
            100.0 * c.nonzero_chunks as f64 / c.chunks as f64,
            m.chunks_total,
            m.chunks_zero,
            m.chunks_new,
            m.chunks_deduped,
            m.bytes_new >> 20,
            m.bytes_written as f64 / 1048576.0,
            dir_b as f64 / 1048576.0,
        );
        self.csv.row(&[
            self.run.to_string(),
            guest.into(),
            mem_mib.to_string(),
            c.nonzero_pages.to_string(),
            c.pages.to_string(),
            c.nonzero_chunks.to_string(),
            m.chunks_total.to_string(),
            m.chunks_zero.to_string(),
            m.chunks_new.to_string(),
            m.chunks_deduped.to_string(),
            m.bytes_new.to_string(),
            m.bytes_written.to_string(),
            dir_b.to_string(),
            f(r.total_ms),
            f(r.state_ms),
            f(r.memory_ms),
            f(target_ms),
            f(self.fsync_bw / 1e9),
            f(load1()),
        ]);
    }
}

/// Columns of `snapshot.csv`.
pub const CREATE_HEADER: &str = "run,guest,mem_mib,nonzero_pages,pages,nonzero_chunks,chunks_total,\
chunks_zero,chunks_new,chunks_deduped,bytes_new,bytes_written,dir_bytes,create_ms,state_ms,\
memory_ms,target_ms,fsync_gbps,load1";

/// Full snapshots of the tiny kernel's VM filled with [`Pattern`] at each size of
/// `SNAPSHOT_BENCH_SIZES`, then every restore measurement of each.
pub fn full_snapshots(root: &Path, kernel: &Path, creates: &Creates, restores: &Restores) {
    let sizes: Vec<u64> = std::env::var("SNAPSHOT_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for mib in sizes {
        let dir = root.join(format!("full-{mib}"));
        let t = Instant::now();
        let mut vm = boot_tiny(kernel, mib);
        let boot_ms = ms(t.elapsed());
        let t = Instant::now();
        Pattern::new(0x5eed ^ mib).fill(&vm.machine.mem);
        let fill_ms = ms(t.elapsed());
        let content = scan(&vm.machine.mem);
        println!(
            "full snapshot, {mib} MiB (VM built in {boot_ms:.1} ms, filled in {fill_ms:.0} ms):"
        );
        let rep = create_snapshot(&mut vm, &dir, None).expect("create_snapshot");
        drop(vm);
        // SNAPSHOT_BENCH_TAG labels a variant (e.g. "tmpfs" for BENCH_DIR=/dev/shm).
        let guest = match std::env::var("SNAPSHOT_BENCH_TAG") {
            Ok(t) if !t.is_empty() => format!("synthetic-{t}"),
            _ => "synthetic".to_string(),
        };
        creates.row(&guest, mib, &content, &rep, dir_bytes(&dir));
        restores.measure(&guest, mib, &dir, &dir, &content);
        let _ = fs::remove_dir_all(&dir);
    }
}
