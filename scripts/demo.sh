#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install what is needed, build the guest
# artifacts (cached) and vmm, boot the project's guest kernel (its test agent prints a
# counter every second), snapshot it through the control API, stop it, restore the
# snapshot in a new process and show the counter carrying on.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO bash resources/build-guest.sh --install-deps >/dev/null
bash resources/build-guest.sh >/dev/null
cargo build --release
VMM=$PWD/target/release/vmm
G=resources/out
WORK=$(mktemp -d /tmp/vmm-demo.XXXXXX)
cp "$G/rootfs.ext4" "$WORK/rootfs.ext4"
SOCK=$WORK/api.sock

echo "== booting the guest (about a minute on PVM-style nested hosts, seconds on hardware KVM)"
"$VMM" --kernel path=$G/vmlinux,cmdline="console=ttyS0 reboot=k panic=-1 init=/idle vmmtest.counter vmmtest.token=demo" \
    --memory size_mib=256 --vcpu num=1 --block path="$WORK/rootfs.ext4",root=true \
    --api-sock "$SOCK" >"$WORK/boot.log" 2>"$WORK/boot.err" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -qE 'vmmtest: tick demo 3([^0-9]|$)' "$WORK/boot.log" 2>/dev/null && break
    kill -0 $PID 2>/dev/null || { cat "$WORK/boot.log" "$WORK/boot.err"; exit 1; }
    sleep 0.5
done
grep "vmmtest: tick" "$WORK/boot.log" | tail -2

echo "== snapshot (pause, write state + deduplicated memory chunks)"
"$VMM" snapshot create "$WORK/snap" --api-sock "$SOCK" --leave-paused
kill -9 $PID; wait $PID 2>/dev/null || true
echo "   last tick before the snapshot: $(grep 'vmmtest: tick' "$WORK/boot.log" | tail -1)"
du -sh "$WORK/snap"

echo "== restore in a new process"
"$VMM" restore "$WORK/snap" --api-sock "$SOCK" >"$WORK/restore.log" 2>"$WORK/restore.err" &
PID=$!
sleep 4
grep "restored" "$WORK/restore.err" || true
grep "vmmtest: tick" "$WORK/restore.log" | head -4
kill $PID
wait $PID 2>/dev/null || true
trap - EXIT
echo "== done (files in $WORK)"
