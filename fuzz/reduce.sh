#!/bin/bash
# Keeps the committed corpora small: for each named target whose minimized corpus has more
# than MAX files (default 150), keeps only a set that covers the same edges (libFuzzer
# -set_cover_merge=1 with -use_counters=0: a small set cover of the edges, hit counts
# ignored), then puts the seeds back
# (`cargo test --test fuzz_corpus -- --ignored write_fuzz_seeds`). `fuzz/reduce.sh TARGET...`
set -u
max=${MAX:-150}
cd "$(dirname "$0")"
bin=target/x86_64-unknown-linux-gnu/release
for t in "$@"; do
    n=$(ls "corpus/$t" | wc -l)
    [ "$n" -gt "$max" ] || continue
    rm -rf "corpus/$t.edges" && mkdir "corpus/$t.edges"
    nice -n 10 "$bin/$t" -set_cover_merge=1 -use_counters=0 -malloc_limit_mb=64 -rss_limit_mb=2048 \
        -timeout=10 "corpus/$t.edges" "corpus/$t" >"artifacts/$t/reduce.log" 2>&1 &&
        rm -rf "corpus/$t" && mv "corpus/$t.edges" "corpus/$t"
    echo "$t: $n -> $(ls "corpus/$t" | wc -l) files ($(grep -o '[0-9]* new features' "artifacts/$t/reduce.log"))"
done
