#!/bin/bash
# Runs the fuzz campaign of each named target in turn (one fuzz process at a time, niced):
# `fuzz/campaign.sh [-t SECONDS] TARGET...`. Uses the binaries `cargo +nightly fuzz build`
# made (build first), grows fuzz/corpus/TARGET, keeps the full libFuzzer output in
# fuzz/artifacts/TARGET/campaign.log and its final stat lines in fuzz/logs/TARGET.log,
# then minimizes the corpus (libFuzzer -merge=1, what `cargo fuzz cmin` runs).
set -u
secs=600
if [ "${1:-}" = "-t" ]; then secs=$2; shift 2; fi
cd "$(dirname "$0")"
bin=target/x86_64-unknown-linux-gnu/release
limits=(-malloc_limit_mb=64 -rss_limit_mb=2048 -timeout=10)
for t in "$@"; do
    mkdir -p "artifacts/$t" "corpus/$t" logs
    full="artifacts/$t/campaign.log"
    start=$(date -u +%FT%TZ)
    nice -n 10 "$bin/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" "${limits[@]}" -print_final_stats=1 >"$full" 2>&1
    rc=$?
    {
        echo "# $t: ${secs} s campaign started $start, exit status $rc"
        echo "# command: $bin/$t corpus/$t -max_total_time=$secs ${limits[*]}"
        grep -E "INFO: (Loaded|seed corpus)|INITED" "$full" | head -3
        grep -E "^#[0-9]+[[:space:]]+(pulse|NEW|REDUCE)" "$full" | tail -1
        grep -E "DONE|^Done|stat::|ERROR|SUMMARY|crash-|timeout-|oom-|leak-" "$full"
    } >"logs/$t.log"
    # Minimize: merge the grown corpus into an empty directory, keep that.
    rm -rf "corpus/$t.min" && mkdir "corpus/$t.min"
    nice -n 10 "$bin/$t" -merge=1 "${limits[@]}" "corpus/$t.min" "corpus/$t" \
        >"artifacts/$t/cmin.log" 2>&1 &&
        rm -rf "corpus/$t" && mv "corpus/$t.min" "corpus/$t"
    echo "# after minimizing: $(ls "corpus/$t" | wc -l) files, $(du -sk "corpus/$t" | cut -f1) KiB" \
        >>"logs/$t.log"
done
