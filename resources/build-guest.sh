#!/usr/bin/env bash
# Build the vmm test guest from Debian packages: a Linux 6.1 kernel (vmlinux +
# bzImage) with our patches and the vmmtest agent, a busybox initramfs, an ext4
# root image and a data disk image. See docs/GUEST.md.
#
#   resources/build-guest.sh [--install-deps] [--force] [--keep-build]
#
#   --install-deps  apt-get install the Debian packages needed (as root or via sudo)
#   --force         rebuild even if the cache already holds this build
#   --keep-build    keep the kernel build tree (under the cache, build-<hash>/)
#
# Outputs go to ${VMM_GUEST_CACHE:-$HOME/.cache/vmm-guest}/<hash>/, <hash> being
# a sha256 over every input. resources/out points there afterwards. Progress goes
# to stderr; stdout gets only NAME=PATH lines (VMLINUX, BZIMAGE, INITRAMFS,
# ROOTFS, DISK, then IDLE_INITRAMFS), so `eval "$(resources/build-guest.sh)"` works.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin" # mkfs.ext4 for non-root users

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT="$HERE/$(basename "${BASH_SOURCE[0]}")"
KDIR="$HERE/kernel"
RDIR="$HERE/rootfs"
KSRC_TAR=/usr/src/linux-source-6.1.tar.xz
DEPS=(build-essential bc flex bison libelf-dev libssl-dev cpio busybox-static
      e2fsprogs qemu-system-x86 dwarves linux-source-6.1 lz4 xz-utils patch)
ARCH_ARGS=(ARCH=x86_64)
ROOTFS_MIB=32
DISK_BYTES=$((1024 * 1024)) # 1 MiB: in-guest md5 runs at ~55 KB/s on the PVM hosts
DISK_SEED=0x766d6d74657374

log() { printf '[build-guest] %s\n' "$*" >&2; }
die() { printf '[build-guest] ERROR: %s\n' "$*" >&2; exit 1; }

install_deps=0 force=0 keep_build=0
for arg in "$@"; do
	case "$arg" in
	--install-deps) install_deps=1 ;;
	--force) force=1 ;;
	--keep-build) keep_build=1 ;;
	-h|--help) sed -n '2,16p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $arg" ;;
	esac
done

if ((install_deps)); then
	SUDO=()
	if [[ $(id -u) != 0 ]]; then
		command -v sudo >/dev/null || die "--install-deps needs root or sudo"
		SUDO=(sudo)
	fi
	log "installing ${DEPS[*]}"
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends "${DEPS[@]}" >&2
fi

# ---- check the tools ----------------------------------------------------------
missing=()
for cmd in gcc make as ld bc flex bison cpio gzip lz4 xz tar patch mkfs.ext4 \
	sha256sum dpkg-query flock readelf perl; do
	command -v "$cmd" >/dev/null || missing+=("$cmd")
done
[[ -f $KSRC_TAR ]] || missing+=("$KSRC_TAR (linux-source-6.1)")
[[ -x /bin/busybox ]] || missing+=("/bin/busybox (busybox-static)")
[[ -f /usr/include/gelf.h ]] || missing+=("libelf-dev")
((${#missing[@]} == 0)) || die "missing: ${missing[*]} (run with --install-deps)"
readelf -l /bin/busybox | grep -q 'Requesting program interpreter' &&
	die "/bin/busybox is dynamically linked: install busybox-static"

# ---- the cache key --------------------------------------------------------------
pkgver() { dpkg-query -W -f='${Package}=${Version}\n' "$1"; }
inputs=("$SCRIPT" "$KDIR/config-fragment" "$KDIR/vmmtest/vmmtest.c"
	"$RDIR/init" "$RDIR/idle.S" "$RDIR/gendata.c")
shopt -s nullglob
patches=("$KDIR"/patches/*.patch)
shopt -u nullglob
inputs+=("${patches[@]}")
HASH=$(
	{
		for f in "${inputs[@]}"; do
			printf '%s ' "${f#"$HERE"/}"
			sha256sum <"$f"
		done
		pkgver linux-source-6.1
		pkgver busybox-static
		gcc --version | head -n1
		ld --version | head -n1
	} | sha256sum | cut -c1-16
)

CACHE=${VMM_GUEST_CACHE:-$HOME/.cache/vmm-guest}
OUT="$CACHE/$HASH"
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT="$CACHE/$HASH"

print_result() {
	ln -sfn "$OUT" "$HERE/out"
	cat "$OUT/paths.env"
}

# One build at a time per cache directory.
exec 9>"$CACHE/.lock"
flock 9

if [[ -f $OUT/.complete ]] && ((!force)); then
	log "up to date: $OUT"
	print_result
	exit 0
fi

START=$(date +%s)
TMP=$(mktemp -d "$CACHE/.tmp-$HASH.XXXXXX")
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
BUILD="$TMP/build"
STAGE="$TMP/out"
LOGF="$TMP/build.log"
mkdir -p "$BUILD" "$STAGE" "$TMP/tools"

run_logged() {
	if ! "$@" >>"$LOGF" 2>&1; then
		tail -n 60 "$LOGF" >&2
		die "failed: $*"
	fi
}

# ---- kernel source ---------------------------------------------------------------
log "unpacking $KSRC_TAR ($(pkgver linux-source-6.1))"
# Leave out what an x86 build never reads (a quarter of the files: faster to
# unpack and to delete). Documentation/Kconfig and the other architectures'
# Kconfig files stay: Kconfig sources them.
top=linux-source-6.1
excl=(--exclude="$top/Documentation/*/*" --exclude="$top/tools/testing"
	--exclude="$top/tools/perf" --exclude="$top/arch/*/boot/dts")
tar -xf "$KSRC_TAR" -C "$BUILD" --strip-components=1 "${excl[@]}"
[[ -f $BUILD/Makefile && -d $BUILD/arch/x86 ]] || die "unexpected layout of $KSRC_TAR"
for p in "${patches[@]}"; do
	log "patch $(basename "$p")"
	patch -d "$BUILD" -p1 --forward --batch -s <"$p" >&2 || die "patch $p does not apply"
done
log "adding the vmmtest agent as drivers/misc/vmmtest.c"
cp "$KDIR/vmmtest/vmmtest.c" "$BUILD/drivers/misc/vmmtest.c"
printf '\n# vmm project test agent (resources/build-guest.sh)\nobj-y += vmmtest.o\n' \
	>>"$BUILD/drivers/misc/Makefile"

# ---- configuration ---------------------------------------------------------------
EPOCH=$(stat -c %Y "$KSRC_TAR")
export KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=vmm-guest KBUILD_BUILD_TIMESTAMP="@$EPOCH"
log "config: tinyconfig + config-fragment"
run_logged make -C "$BUILD" "${ARCH_ARGS[@]}" tinyconfig
(cd "$BUILD" && run_logged env "${ARCH_ARGS[@]}" scripts/kconfig/merge_config.sh \
	-m .config "$KDIR/config-fragment")
run_logged make -C "$BUILD" "${ARCH_ARGS[@]}" olddefconfig

bad=()
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		grep -qxF -- "$line" "$BUILD/.config" ||
			bad+=("$line (got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$BUILD/.config" || echo absent))")
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		! grep -qE "^${BASH_REMATCH[1]}=" "$BUILD/.config" ||
			bad+=("$line (got: $(grep -E "^${BASH_REMATCH[1]}=" "$BUILD/.config"))")
	fi
done <"$KDIR/config-fragment"
if ((${#bad[@]})); then
	printf '[build-guest]   %s\n' "${bad[@]}" >&2
	die "${#bad[@]} option(s) of config-fragment did not end up in .config as requested"
fi
log "config: all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$KDIR/config-fragment") fragment options verified"

# ---- kernel build ----------------------------------------------------------------
log "make -j$(nproc) bzImage (builds vmlinux first; log: $LOGF)"
run_logged make -C "$BUILD" "${ARCH_ARGS[@]}" -j"$(nproc)" bzImage
grep -q 'vmmtest_init' "$BUILD/System.map" || die "vmmtest agent is not in the kernel"
cp "$BUILD/vmlinux" "$STAGE/vmlinux"
cp "$BUILD/arch/x86/boot/bzImage" "$STAGE/bzImage"
cp "$BUILD/.config" "$STAGE/config"
cp "$BUILD/System.map" "$STAGE/System.map"
log "kernel $(make -s -C "$BUILD" "${ARCH_ARGS[@]}" kernelrelease 2>/dev/null):" \
	"vmlinux $(stat -c %s "$STAGE/vmlinux") bytes, bzImage $(stat -c %s "$STAGE/bzImage") bytes"

# ---- user space: busybox tree, /init, /idle ------------------------------------------
log "user space: busybox $(pkgver busybox-static), /init, /idle"
as --64 -o "$TMP/tools/idle.o" "$RDIR/idle.S"
ld -static -nostdlib -o "$TMP/tools/idle" "$TMP/tools/idle.o"
strip "$TMP/tools/idle"

make_tree() { # make_tree DIR NAME
	local root=$1 name=$2 app
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,mnt}
	chmod 1777 "$root/tmp"
	cp /bin/busybox "$root/bin/busybox"
	while IFS= read -r app; do
		[[ $app == bin/busybox || $app != */* ]] && continue
		ln -sf "$(realpath -m --relative-to="$root/$(dirname "$app")" "$root/bin/busybox")" "$root/$app"
	done < <(/bin/busybox --list-full)
	sed "s/@ROOT@/$name/g" "$RDIR/init" >"$root/init"
	chmod 0755 "$root/init"
	ln -sfn ../init "$root/sbin/init"
	install -m 0755 "$TMP/tools/idle" "$root/idle"
	find "$root" -exec touch -h -d "@$EPOCH" {} +
}

make_tree "$TMP/initramfs" initramfs
(cd "$TMP/initramfs" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
	gzip -9 -n >"$STAGE/initramfs.cpio.gz"

# A minimal initramfs with only /idle: on the PVM hosts unpacking the busybox
# initramfs alone takes minutes of guest time.
mkdir -p "$TMP/idleroot"/{dev,proc,sys,root}
install -m 0755 "$TMP/tools/idle" "$TMP/idleroot/idle"
find "$TMP/idleroot" -exec touch -h -d "@$EPOCH" {} +
(cd "$TMP/idleroot" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
	gzip -9 -n >"$STAGE/idle.cpio.gz"

make_tree "$TMP/rootfs" rootfs
run_logged mkfs.ext4 -q -F -L vmmroot -U 5f1b7e4c-6d2a-4c3e-9a51-766d6d746573 \
	-E root_owner=0:0,hash_seed=766d6d74-6573-7400-0000-000000000000 \
	-d "$TMP/rootfs" "$STAGE/rootfs.ext4" "${ROOTFS_MIB}M"

# ---- data disk -----------------------------------------------------------------------
gcc -O2 -o "$TMP/tools/gendata" "$RDIR/gendata.c"
"$TMP/tools/gendata" "$DISK_BYTES" "$DISK_SEED" >"$STAGE/disk.img"
(cd "$STAGE" && md5sum disk.img >disk.img.md5)

# ---- publish ---------------------------------------------------------------------------
cat >"$STAGE/paths.env" <<EOF
VMLINUX=$OUT/vmlinux
BZIMAGE=$OUT/bzImage
INITRAMFS=$OUT/initramfs.cpio.gz
ROOTFS=$OUT/rootfs.ext4
DISK=$OUT/disk.img
IDLE_INITRAMFS=$OUT/idle.cpio.gz
EOF
{
	echo "hash=$HASH"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "seconds=$(($(date +%s) - START))"
	pkgver linux-source-6.1
	pkgver busybox-static
	gcc --version | head -n1
} >"$STAGE/BUILD-INFO"
cp "$LOGF" "$STAGE/build.log"
touch "$STAGE/.complete"
rm -rf "$OUT"
mv "$STAGE" "$OUT"
if ((keep_build)); then
	rm -rf "$CACHE/build-$HASH"
	mv "$BUILD" "$CACHE/build-$HASH"
	log "kernel build tree kept in $CACHE/build-$HASH"
fi
log "done in $(($(date +%s) - START)) s: $OUT"
print_result
