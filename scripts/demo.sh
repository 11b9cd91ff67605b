#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is needed, build the guest
# artifacts (cached) and vmm, then boot the project's guest kernel, which prints the test
# agent's info line and powers off.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO bash resources/build-guest.sh --install-deps >/dev/null
bash resources/build-guest.sh
cargo build --release
G=resources/out
./target/release/vmm --kernel path=$G/vmlinux,cmdline="console=ttyS0 reboot=k panic=-1 vmmtest.info vmmtest.token=demo vmmtest.poweroff" \
    --memory size_mib=256 --vcpu num=2
