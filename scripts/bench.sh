#!/usr/bin/env bash
# Runs the benchmarks and refreshes docs/bench/ (CSV files, SVG plots, logs, run.txt with
# the host and its load). See docs/BENCHMARKS.md.
#
#   scripts/bench.sh                      # all: snapshot snapshot_tmpfs block_request boot guest_disk
#   scripts/bench.sh snapshot boot        # some of them
#   scripts/bench.sh archive              # resume from an HTTP archive (not in the default set)
#   scripts/bench.sh peers                # vmm and Firecracker side by side (not in the default set)
#
# Environment knobs (see the benches' headers): SNAPSHOT_BENCH_SIZES (MiB list, default
# 256,1024,4096), SNAPSHOT_BENCH_INCR_MIB (1024), SNAPSHOT_BENCH_REPS (3),
# SNAPSHOT_BENCH_LINUX (1), SNAPSHOT_BENCH_DROP_CACHES (1), BOOT_BENCH_RUNS (3),
# GUEST_DISK_MIB (2), BENCH_DIR (scratch directory; default target/tmp),
# ARCHIVE_BENCH_SIZES (MiB list, default 256,1024,4096), ARCHIVE_BENCH_REPS (2),
# FIRECRACKER (binary; default ../shared/peers/firecracker), PEERS_RESTORES (10),
# PEERS_CLONES (4), PEERS_PAUSES (5).
# Needs /dev/kvm, the guest artifacts (resources/build-guest.sh) for boot, guest_disk and
# the Linux part of snapshot, and root for dropping the page cache (else that is skipped).
# About 8–10 minutes on the 2-core PVM host.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=docs/bench
mkdir -p "$OUT" target/bench
if [ $# -gt 0 ]; then benches=("$@"); else benches=(snapshot snapshot_tmpfs block_request boot guest_disk); fi

# This script's earlier CSVs are kept aside so that target/bench holds this run only
# (other CSV files there are left alone).
CSVS=(host snapshot restore incremental idle_series boot guest_disk block_request archive_create archive_restore archive_storage archive_timeline peers peers_samples)
stamp=$(date +%s)
for n in "${CSVS[@]}"; do
    if [ -f "target/bench/$n.csv" ]; then
        mkdir -p target/bench/old
        mv "target/bench/$n.csv" "target/bench/old/$stamp-$n.csv"
    fi
done

{
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host:    $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(awk '/MemTotal/ {printf "%.1f GiB RAM", $2/1048576}' /proc/meminfo)"
    echo "kernel:  $(uname -r)$([ -d /sys/module/kvm_pvm ] && echo ', /dev/kvm from kvm_pvm (nested PVM)')"
    echo "scratch: ${BENCH_DIR:-target/tmp} ($(findmnt -n -o FSTYPE,SOURCE --target "${BENCH_DIR:-target}" | xargs))"
    echo "rustc:   $(rustc --version)"
    echo "before:  $(uptime)"
} > "$OUT/run.txt"

echo "== cargo build --release"
cargo build --release 2>&1 | tail -n 1
t_all=$(date +%s)
for b in "${benches[@]}"; do
    echo "== $b"
    t=$(date +%s)
    case $b in
        block_request)
            cargo bench --bench block_request -- --warm-up-time 1 --measurement-time 3 2>&1 |
                tee "$OUT/block_request.log" ;;
        snapshot_tmpfs)
            # The synthetic snapshots again with the bench directory on tmpfs: the same
            # work without the disk's fsync costs.
            BENCH_DIR=/dev/shm SNAPSHOT_BENCH_TAG=tmpfs SNAPSHOT_BENCH_SIZES=256,1024 \
                SNAPSHOT_BENCH_INCR_MIB=0 SNAPSHOT_BENCH_LINUX=0 SNAPSHOT_BENCH_DROP_CACHES=0 \
                cargo bench --bench snapshot -- --bench 2>&1 | tee "$OUT/$b.log" ;;
        snapshot|boot|guest_disk|archive|peers)
            cargo bench --bench "$b" -- --bench 2>&1 | tee "$OUT/$b.log" ;;
        *) echo "unknown bench $b" >&2; exit 2 ;;
    esac
    echo "bench $b: $(( $(date +%s) - t )) s; loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/run.txt"
done
echo "total:   $(( $(date +%s) - t_all )) s of benches" >> "$OUT/run.txt"
echo "after:   $(uptime)" >> "$OUT/run.txt"

# Criterion's estimates of block_request → CSV.
if [ -d target/criterion/process_request ]; then
    python3 - <<'EOF'
import json, os, glob
rows = []
for d in sorted(glob.glob("target/criterion/process_request/*/new")) + sorted(glob.glob("target/criterion/device_queue/*/new")):
    group = os.path.basename(os.path.dirname(os.path.dirname(d)))
    name = os.path.basename(os.path.dirname(d))
    if group != "process_request":
        name = f"{group}/{name}"
    est = json.load(open(os.path.join(d, "estimates.json")))
    bench = json.load(open(os.path.join(d, "benchmark.json")))
    nbytes = (bench.get("throughput") or {}).get("Bytes", 0)
    mean, med = est["mean"]["point_estimate"], est["median"]["point_estimate"]
    rows.append(f"{name},{nbytes},{mean:.1f},{med:.1f},{nbytes / med:.3f}")
if rows:
    with open("target/bench/block_request.csv", "w") as f:
        f.write("bench,bytes,mean_ns,median_ns,gb_per_s_median\n" + "\n".join(rows) + "\n")
EOF
fi

for n in "${CSVS[@]}"; do
    if [ -f "target/bench/$n.csv" ]; then cp "target/bench/$n.csv" "$OUT/"; fi
done
python3 scripts/plot.py "$OUT"
python3 scripts/plot_archive.py "$OUT"
cat "$OUT/run.txt"
