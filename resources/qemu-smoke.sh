#!/usr/bin/env bash
# Smoke-test the guest artifacts of resources/build-guest.sh under QEMU TCG
# (software emulation, machine microvm: virtio-mmio, no ACPI), independent of
# the vmm itself. Needs qemu-system-x86. Runs in well under a minute.
#
#   resources/qemu-smoke.sh            # uses resources/out (builds if needed)
#   GUEST_DIR=/path resources/qemu-smoke.sh
#
# Prints "N passed, N failed" at the end; exit status 1 if anything failed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${GUEST_DIR:-} ]]; then
	"$HERE/build-guest.sh" >/dev/null
	GUEST_DIR=$(readlink -f "$HERE/out")
fi
G=$GUEST_DIR
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
pass=0 fail=0
ok() { echo "ok   - $*"; pass=$((pass + 1)); }
bad() { echo "FAIL - $*"; fail=$((fail + 1)); }
check() { # check DESCRIPTION COMMAND...
	local d=$1
	shift
	if "$@"; then ok "$d"; else bad "$d"; fi
}
has() { grep -qE -- "$2" "$1"; }

# qemu LOG TIMEOUT KERNEL APPEND [extra qemu args...]; stdin goes to the serial console
qemu() {
	local log=$1 t=$2 kernel=$3 append=$4
	shift 4
	timeout "$t" qemu-system-x86_64 -accel tcg -M microvm,acpi=off -m 256 -smp 2 \
		-nographic -no-reboot -kernel "$kernel" -append "console=ttyS0 reboot=k $append" \
		"$@" >"$log.raw" 2>&1 || echo "qemu exit $?" >>"$log.raw"
	tr -d '\r' <"$log.raw" >"$log"
}
disk() { echo -drive "id=$1,file=$2,format=raw,if=none$3" -device "virtio-blk-device,drive=$1"; }

want_md5=$(md5sum <"$G/disk.img" | cut -d' ' -f1)
size=$(stat -c %s "$G/disk.img")

# 1. info, whole-disk md5, write to the last block, poweroff (vmlinux via PVH)
cp "$G/disk.img" "$W/d1.img"
qemu "$W/1.log" 60 "$G/vmlinux" "rdinit=/idle vmmtest.info vmmtest.token=tok1 vmmtest.disk=/dev/vda vmmtest.write=hello-vmm vmmtest.poweroff" \
	-initrd "$G/initramfs.cpio.gz" $(disk d0 "$W/d1.img" "")
check "info line" has "$W/1.log" '^\[ *[0-9.]+\] vmmtest: info cpus=2 mem_kib=[0-9]+ token=tok1$'
check "disk md5 = host md5sum" has "$W/1.log" "vmmtest: disk /dev/vda md5=$want_md5 bytes=$size\$"
check "write ok line" has "$W/1.log" 'vmmtest: write /dev/vda ok$'
check "done + poweroff lines" has "$W/1.log" 'vmmtest: done'
check "poweroff ends qemu cleanly" bash -c "has() { grep -qE -- \"\$2\" \"\$1\"; }; has '$W/1.log' 'vmmtest: poweroff' && has '$W/1.log' 'reboot: machine restart' && ! has '$W/1.log' 'qemu exit'"
{ printf 'hello-vmm\n'; head -c $((4096 - 10)) /dev/zero; } >"$W/expect-block"
check "write landed in the last 4 KiB block" cmp -s <(tail -c 4096 "$W/d1.img") "$W/expect-block"
check "rest of the disk unchanged" cmp -s <(head -c $((size - 4096)) "$W/d1.img") <(head -c $((size - 4096)) "$G/disk.img")

# 1b. a comma-separated disk list: each device hashed and written, in order
cp "$G/disk.img" "$W/l1.img"
head -c 65536 /dev/zero >"$W/l2.img"
qemu "$W/1b.log" 60 "$G/vmlinux" "rdinit=/idle vmmtest.disk=/dev/vda,/dev/vdb vmmtest.write=both vmmtest.poweroff" \
	-initrd "$G/idle.cpio.gz" $(disk d0 "$W/l1.img" "") $(disk d1 "$W/l2.img" "")
zero_md5=$(head -c 65536 /dev/zero | md5sum | cut -d' ' -f1)
check "disk list: both hashed and written, in order" bash -c "
	grep -E 'vmmtest: (disk|write) ' '$W/1b.log' | sed -E 's/^\\[[^]]*\\] //' | tr '\\n' '|' |
	grep -qx 'vmmtest: disk /dev/vda md5=$want_md5 bytes=$size|vmmtest: write /dev/vda ok|vmmtest: disk /dev/vdb md5=$zero_md5 bytes=65536|vmmtest: write /dev/vdb ok|'"
check "disk list: second write landed" bash -c "tail -c 4096 '$W/l2.img' | head -c 5 | grep -qx both"

# 2. read-only drive: error line, image unchanged (also with force_write: device refuses)
cp "$G/disk.img" "$W/d2.img"
qemu "$W/2.log" 60 "$G/vmlinux" "rdinit=/idle vmmtest.disk=/dev/vda vmmtest.write=nope vmmtest.poweroff" \
	-initrd "$G/initramfs.cpio.gz" $(disk d0 "$W/d2.img" ",readonly=on")
check "ro: disk md5 still printed" has "$W/2.log" "vmmtest: disk /dev/vda md5=$want_md5 "
check "ro: write error line" has "$W/2.log" 'vmmtest: write /dev/vda error=-[0-9]+$'
qemu "$W/2f.log" 60 "$G/vmlinux" "rdinit=/idle vmmtest.disk=/dev/vda vmmtest.write=nope vmmtest.force_write vmmtest.poweroff" \
	-initrd "$G/initramfs.cpio.gz" $(disk d0 "$W/d2.img" ",readonly=on")
check "ro+force_write: device error line" has "$W/2f.log" 'vmmtest: write /dev/vda error=-[0-9]+$'
check "ro: image unchanged" cmp -s "$W/d2.img" "$G/disk.img"

# 3. counter with counter_disk, kept alive by rdinit=/idle; rcutorture quiet by default
cp "$G/disk.img" "$W/d3.img"
qemu "$W/3.log" 12 "$G/vmlinux" "rdinit=/idle vmmtest.counter vmmtest.token=T3 vmmtest.counter_disk=/dev/vda" \
	-initrd "$G/initramfs.cpio.gz" $(disk d0 "$W/d3.img" "")
check "counter: ticks 0..3 with block md5" bash -c "for n in 0 1 2 3; do grep -qE \"vmmtest: tick T3 \$n blk=\$n md5=[0-9a-f]{32}\$\" '$W/3.log' || exit 1; done"
blk2=$(dd if="$G/disk.img" bs=4096 skip=2 count=1 status=none | md5sum | cut -d' ' -f1)
check "counter: block md5 = host md5 of that block" has "$W/3.log" "vmmtest: tick T3 2 blk=2 md5=$blk2\$"
check "counter: disk unchanged by the rewrites" cmp -s "$W/d3.img" "$G/disk.img"
check "counter: about one tick per second (guest time)" bash -c "
	sed -nE 's/^\\[ *([0-9.]+)\\] vmmtest: tick T3 ([0-9]+) .*/\\2 \\1/p' '$W/3.log' |
	awk '{t[\$1]=\$2} END{d=t[4]-t[1]; exit !(d>2.7 && d<3.3)}'"
check "rdinit=/idle keeps the guest alive (no panic)" bash -c "! grep -q 'Kernel panic' '$W/3.log' && grep -q 'Run /idle as init process' '$W/3.log'"
check "rcutorture quiet by default" bash -c "! grep -q 'rcu-torture\|rcu_torture' '$W/3.log'"

# 4. plain counter without disk
qemu "$W/4.log" 8 "$G/vmlinux" "rdinit=/idle vmmtest.counter" -initrd "$G/initramfs.cpio.gz"
check "counter without token/disk" has "$W/4.log" 'vmmtest: tick  2$'

# 5. rcutorture enabled
qemu "$W/5.log" 15 "$G/vmlinux" "rdinit=/idle rcutorture.enable=1 rcutorture.stat_interval=1" -initrd "$G/initramfs.cpio.gz"
check "rcutorture.enable=1 prints stats" has "$W/5.log" 'rcu-torture: rtc: .* ver: [0-9]+ tfle: 0'
check "rcutorture no failures" bash -c "! grep -qE 'rcu-torture:.*(FAILURE|!!!)' '$W/5.log'"

# 6. busybox shell from the initramfs /init (user space works under TCG)
( sleep 6; echo 'echo RESULT-$((6*7)); grep MemTotal /proc/meminfo'; sleep 2; echo 'reboot -f' ) |
	qemu "$W/6.log" 30 "$G/bzImage" "vmmtest.info" -initrd "$G/initramfs.cpio.gz"
check "bzImage (LZ4) boots" has "$W/6.log" 'Run /init as init process'
check "initramfs /init ready line" has "$W/6.log" '^vmmtest-initramfs: ready'
check "busybox shell runs commands" has "$W/6.log" '^RESULT-42'
memtotal=$(sed -nE 's/^MemTotal: +([0-9]+) kB$/\1/p' "$W/6.log")
check "info mem_kib = MemTotal ($memtotal)" has "$W/6.log" "vmmtest: info cpus=2 mem_kib=${memtotal:-x} token=\$"

# 6b. the tiny /idle-only initramfs
qemu "$W/6b.log" 8 "$G/vmlinux" "rdinit=/idle vmmtest.counter" -initrd "$G/idle.cpio.gz"
check "idle.cpio.gz: /idle runs, guest stays up" bash -c "grep -q 'Run /idle as init process' '$W/6b.log' && grep -q 'vmmtest: tick  3$' '$W/6b.log' && ! grep -q 'Kernel panic' '$W/6b.log'"

# 7. ext4 root: /init shell, and init=/idle
cp "$G/rootfs.ext4" "$W/r.ext4"
( sleep 6; echo 'echo RESULT-$((6*7)); mount | grep vda'; sleep 2; echo 'reboot -f' ) |
	qemu "$W/7.log" 30 "$G/vmlinux" "root=/dev/vda rw" $(disk r0 "$W/r.ext4" "")
check "ext4 root mounted" has "$W/7.log" 'EXT4-fs \(vda\): mounted filesystem'
check "ext4 /init ready line" has "$W/7.log" '^vmmtest-rootfs: ready'
check "ext4 busybox shell" has "$W/7.log" '^RESULT-42'
cp "$G/rootfs.ext4" "$W/r.ext4"
qemu "$W/7i.log" 10 "$G/vmlinux" "root=/dev/vda init=/idle vmmtest.counter" $(disk r0 "$W/r.ext4" "")
check "ext4 init=/idle stays up" bash -c "grep -q 'Run /idle as init process' '$W/7i.log' && grep -q 'vmmtest: tick  4$' '$W/7i.log' && ! grep -q 'Kernel panic' '$W/7i.log'"

# 8. panic -> pvpanic port 0x505 -> qemu exits with failure
qemu "$W/8.log" 30 "$G/vmlinux" "rdinit=/nonexistent root=/dev/nonexistent" -initrd "$G/initramfs.cpio.gz" \
	-device pvpanic -action panic=exit-failure
check "panic signalled on port 0x505 (pvpanic)" bash -c "grep -q 'Kernel panic' '$W/8.log' && grep -q 'qemu exit 1' '$W/8.log'"

if ((fail)) && [[ -n ${KEEP_LOGS:-} ]]; then
	cp -r "$W" "$KEEP_LOGS"
	echo "logs kept in $KEEP_LOGS"
fi
echo "$pass passed, $fail failed"
((fail == 0))
