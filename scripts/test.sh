#!/usr/bin/env bash
# Sets up everything the tests need on a Debian 12 machine (apt packages, guest artifacts)
# and runs the whole test suite. This is the README's test command; CI calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO bash resources/build-guest.sh --install-deps >/dev/null
# The remote-disk tests serve images with a real nginx; qcow2 import uses qemu-img.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx qemu-utils >/dev/null
bash resources/build-guest.sh
cargo test "$@" 2>&1
