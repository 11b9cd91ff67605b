#!/usr/bin/env bash
# Loaded-host runs (docs/TESTING.md, "Loaded-host runs"): runs each Linux-guest test binary
# N times in a row (default 3) while `stress --cpu 2` keeps both cores busy, and prints one
# line per run (binary, run, result, wall seconds) plus the load average seen.
#
#   scripts/loaded-runs.sh [N] [BINARY...]     (default: every tests/*_linux.rs)
#
# Needs what ./scripts/test.sh sets up (guest artifacts, nginx) and `stress` (apt). Logs go
# to target/test-logs/loaded-<date>/<binary>-<run>.log; the summary also goes to summary.txt
# there. Exit status non-zero if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

runs=${1:-3}
shift || true
if [ $# -gt 0 ]; then
    bins=("$@")
else
    mapfile -t bins < <(ls tests/*_linux.rs | sed 's#tests/\(.*\)\.rs#\1#')
fi
command -v stress >/dev/null || {
    echo "stress is missing: apt-get install stress" >&2
    exit 1
}
dir=target/test-logs/loaded-$(date +%Y%m%d-%H%M%S)
mkdir -p "$dir"
export CI=true
# Build first, without the load, so that the runs time the tests only.
cargo test --no-run "${bins[@]/#/--test=}" >"$dir/build.log" 2>&1 || {
    echo "build failed: $dir/build.log" >&2
    exit 1
}
stress --cpu 2 >/dev/null 2>&1 &
stress_pid=$!
trap 'kill $stress_pid 2>/dev/null' EXIT
failed=0
for b in "${bins[@]}"; do
    for i in $(seq 1 "$runs"); do
        start=$(date +%s)
        if cargo test --test "$b" >"$dir/$b-$i.log" 2>&1; then r=pass; else r=FAIL failed=1; fi
        line="$b run $i: $r in $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "$line" | tee -a "$dir/summary.txt"
    done
done
exit $failed
