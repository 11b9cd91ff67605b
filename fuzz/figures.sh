#!/bin/bash
# Prints the campaign figures of fuzz/logs/*.log as the Markdown table of docs/TESTING.md.
cd "$(dirname "$0")/logs" || exit 1
echo "| Target | Executions | Time | exec/s | cov | ft | Corpus committed | Peak RSS | Exit |"
echo "|---|---|---|---|---|---|---|---|---|"
for t in virtio_blk virtio_mmio state_file memory_manifest chunk_codec image_index \
    repo_catalogue repo_export working_set api_http; do
    f=$t.log
    [ -f "$f" ] || { echo "| \`$t\` | not run | | | | | | | |"; continue; }
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$f")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$f")
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$f")
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$f")
    cov=$(grep -m1 DONE "$f" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(grep -m1 DONE "$f" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    corp="$(ls ../corpus/$t | wc -l) files, $(cat ../corpus/$t/* | wc -c) B"
    rc=$(sed -n 's/.*exit status \([0-9]*\).*/\1/p' "$f")
    echo "| \`$t\` | $execs | $secs s | $speed | $cov | $ft | $corp | $rss MB | $rc |"
done
