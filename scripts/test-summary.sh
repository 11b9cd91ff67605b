#!/usr/bin/env bash
# Summarises a `cargo test` log: one line per test binary (passed, failed, ignored, wall
# time), then the failed tests, then the verdict. Usage:
#   scripts/test-summary.sh LOG [TOTAL_SECONDS] [CARGO_STATUS]
# Exits 0 when every binary ran and passed (and CARGO_STATUS, when given, is 0), else 1.
set -uo pipefail
log=$1
total=${2:-}
cargo_status=${3:-0}

awk -v total="$total" -v cargo_status="$cargo_status" '
function flush() {
    if (name == "") return
    if (!have_result) { status = "CRASH"; bad++ ; crashed[++ncrashed] = name }
    rows[++nrows] = sprintf("%-34s %-6s %5d passed %4d failed %4d ignored %10s", name, status, p, f, ig, secs)
    name = ""
}
/^ *Running / || /^ *Doc-tests / {
    flush()
    if ($1 == "Doc-tests") { name = "doc-tests " $2 }
    else {
        name = $2
        if (name == "unittests") name = "unittests " $3
        sub(/^tests\//, "", name); sub(/\.rs$/, "", name)
    }
    have_result = 0; p = f = ig = 0; secs = "?"; status = "?"
    nbin++
    next
}
/^test .* \.\.\. FAILED$/ && name != "" {
    t = $0; sub(/^test /, "", t); sub(/ \.\.\. FAILED$/, "", t)
    failed[++nfailed] = name ": " t
    next
}
/^test result: / && name != "" {
    have_result = 1
    status = ($3 == "ok.") ? "ok" : "FAILED"
    for (i = 1; i <= NF; i++) {
        if ($(i+1) ~ /^passed/) p = $i
        if ($(i+1) ~ /^failed/) f = $i
        if ($(i+1) ~ /^ignored/) ig = $i
        if ($i == "in") secs = $(i+1)
    }
    sub(/s$/, " s", secs)
    tp += p; tf += f; ti += ig
    if (status != "ok") bad++
    flush()
    next
}
/^error: could not compile/ || /^error\[E[0-9]+\]/ { build_failed = 1 }
END {
    flush()
    print ""
    print "==================== test summary ===================="
    for (i = 1; i <= nrows; i++) print rows[i]
    if (nbin == 0) print "no test binary ran" (build_failed ? " (the build failed)" : "")
    printf "%d test binaries: %d tests passed, %d failed, %d ignored", nbin, tp, tf, ti
    if (total != "") printf "; %d s in all", total
    print ""
    if (nfailed > 0) {
        print "failed tests:"
        for (i = 1; i <= nfailed; i++) print "    " failed[i]
    }
    if (ncrashed > 0) {
        print "test binaries that ended without a result:"
        for (i = 1; i <= ncrashed; i++) print "    " crashed[i]
    }
    ok = (bad == 0 && nfailed == 0 && nbin > 0 && !build_failed && cargo_status == 0)
    if (ok) print "RESULT: all passed"
    else if (bad == 0 && nfailed == 0) print "RESULT: FAILED (cargo test exited with status " cargo_status ")"
    else print "RESULT: FAILED"
    exit ok ? 0 : 1
}
' "$log"
