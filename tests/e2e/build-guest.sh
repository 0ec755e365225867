#!/bin/bash
#
# Builds the kernel and initramfs of the vublk end-to-end test guest.
#
# Usage: tests/e2e/build-guest.sh [OUTDIR]     (default: ${CARGO_TARGET_DIR:-target}/e2e)
#
# Outputs, in OUTDIR:
#   vmlinuz             the Debian cloud kernel (linux-image-cloud-amd64's current dependency)
#   initramfs.cpio.gz   busybox-static, fio with its libraries, the virtio modules, /init
#   guest.env           KERNEL_PACKAGE=, KERNEL_VERSION=, MODULES= (what was packed)
#
# The kernel package is fetched with `apt-get download` into OUTDIR/cache and unpacked with
# `dpkg-deb -x`: nothing is installed on the host and nothing comes from outside the Debian
# archive. The build is skipped when all outputs exist and are newer than this script and
# guest-init.sh; set VUBLK_E2E_REBUILD=1 to force it. Concurrent runs serialise on a lock.
#
# Environment:
#   VUBLK_E2E_KERNEL_PACKAGE  versioned kernel package to use instead of resolving the
#                             linux-image-cloud-amd64 metapackage
#   VUBLK_E2E_REBUILD=1       rebuild even when the outputs look current
#
# Host packages needed: apt, dpkg, busybox-static, fio, cpio, gzip, util-linux (flock),
# xz-utils and zstd (only if the kernel's modules are compressed).

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
workspace=$(cd "$here/../.." && pwd)
out=${1:-${CARGO_TARGET_DIR:-$workspace/target}/e2e}
init_script=$here/guest-init.sh
metapackage=linux-image-cloud-amd64
# Modules the guest must be able to load (if the kernel does not have them built in).
wanted_modules=(virtio_pci virtio_blk)

log() {
	echo "build-guest: $*" >&2
}

die() {
	echo "build-guest: error: $*" >&2
	exit 1
}

need() {
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null || die "'$tool' not found; install the package providing it"
	done
}

mkdir -p "$out"
out=$(cd "$out" && pwd)

exec 9>"$out/.lock"
flock 9

outputs=("$out/vmlinuz" "$out/initramfs.cpio.gz" "$out/guest.env")

up_to_date() {
	local f
	[[ "${VUBLK_E2E_REBUILD:-0}" != 1 ]] || return 1
	for f in "${outputs[@]}"; do
		[[ -f "$f" && "$f" -nt "${BASH_SOURCE[0]}" && "$f" -nt "$init_script" ]] || return 1
	done
}

if up_to_date; then
	log "up to date in $out"
	exit 0
fi

need apt-cache apt-get dpkg-deb cpio gzip fio ldd find sort
busybox=/bin/busybox
[[ -x "$busybox" ]] || die "$busybox not found; install busybox-static"
"$busybox" --list | grep -qx insmod || die "$busybox has no insmod applet; install busybox-static"

# --- 1. the kernel package -------------------------------------------------------------------

resolve_kernel_package() {
	if [[ -n "${VUBLK_E2E_KERNEL_PACKAGE:-}" ]]; then
		echo "$VUBLK_E2E_KERNEL_PACKAGE"
		return
	fi
	local pkg
	pkg=$(apt-cache depends "$metapackage" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
	[[ -n "$pkg" ]] || die "cannot resolve $metapackage with apt-cache depends (run apt-get update?)"
	echo "$pkg"
}

kernel_package=$(resolve_kernel_package)
cache=$out/cache
mkdir -p "$cache"
shopt -s nullglob
debs=("$cache/${kernel_package}"_*.deb)
shopt -u nullglob
if ((${#debs[@]} == 0)); then
	log "downloading $kernel_package into $cache"
	# apt-get download writes into the current directory.
	(cd "$cache" && apt-get download "$kernel_package" >&2) ||
		die "apt-get download $kernel_package failed (is the Debian archive reachable? apt-get update?)"
	shopt -s nullglob
	debs=("$cache/${kernel_package}"_*.deb)
	shopt -u nullglob
	((${#debs[@]} > 0)) || die "apt-get download left no ${kernel_package}_*.deb in $cache"
fi
deb=${debs[-1]}
log "using $deb"

work=$out/work
rm -rf "$work"
mkdir -p "$work"
kroot=$work/kernel
dpkg-deb -x "$deb" "$kroot"

shopt -s nullglob
vmlinuz=("$kroot"/boot/vmlinuz-*)
moddirs=("$kroot"/lib/modules/* "$kroot"/usr/lib/modules/*)
shopt -u nullglob
((${#vmlinuz[@]} == 1)) || die "expected one boot/vmlinuz-* in $deb, found ${#vmlinuz[@]}"
((${#moddirs[@]} == 1)) || die "expected one lib/modules/VERSION in $deb, found ${#moddirs[@]}"
moddir=${moddirs[0]}
kernel_version=${moddir##*/}

# --- 2. the modules, in dependency order ------------------------------------------------------
#
# The package ships no modules.dep (its postinst runs depmod), so dependencies come from each
# module's own .modinfo section (`depends=`), which is what depmod reads too. Modules may be
# compressed (.ko.xz, .ko.zst, .ko.gz): they are read and packed decompressed, since busybox
# insmod loads plain ELF objects only.

declare -A module_path=()
while IFS= read -r -d '' file; do
	name=${file##*/}
	name=${name%%.ko*}
	module_path[${name//-/_}]=$file
done < <(find "$moddir/kernel" -name '*.ko*' -print0)

declare -A builtin=()
if [[ -f "$moddir/modules.builtin" ]]; then
	while IFS= read -r line; do
		name=${line##*/}
		name=${name%%.ko*}
		builtin[${name//-/_}]=1
	done <"$moddir/modules.builtin"
fi

decompress() {
	case "$1" in
	*.ko) cat "$1" ;;
	*.ko.xz) need xz && xz -dc "$1" ;;
	*.ko.zst) need zstd && zstd -qdc "$1" ;;
	*.ko.gz) gzip -dc "$1" ;;
	*) die "unknown module compression: $1" ;;
	esac
}

module_depends() {
	decompress "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '
}

declare -A visiting=() done_modules=()
load_order=()

# Depth-first post-order walk: a module comes after everything it depends on.
add_module() {
	local name=$1 dep deps
	[[ -z "${done_modules[$name]:-}" ]] || return 0
	if [[ -n "${builtin[$name]:-}" ]]; then
		done_modules[$name]=1
		return 0
	fi
	[[ -z "${visiting[$name]:-}" ]] || die "module dependency cycle through $name"
	[[ -n "${module_path[$name]:-}" ]] || die "module $name is neither built in nor in $deb"
	visiting[$name]=1
	deps=$(module_depends "${module_path[$name]}")
	for dep in ${deps}; do
		add_module "$dep"
	done
	done_modules[$name]=1
	load_order+=("$name")
}

for m in "${wanted_modules[@]}"; do
	add_module "$m"
done
log "kernel $kernel_version; modules to load: ${load_order[*]:-none (all built in)}"

# --- 3. the initramfs -------------------------------------------------------------------------

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,lib/modules}

cp "$busybox" "$root/bin/busybox"
while IFS= read -r applet; do
	[[ "$applet" == busybox || -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
done < <("$busybox" --list)

install -m 0755 "$init_script" "$root/init"

: >"$root/etc/vublk-modules"
for m in "${load_order[@]}"; do
	decompress "${module_path[$m]}" >"$root/lib/modules/$m.ko"
	echo "$m" >>"$root/etc/vublk-modules"
done

# fio, every library ldd resolves for it, and the dynamic loader, each at its host path so the
# loader's compiled-in search path and the libraries' RUNPATHs keep working without ld.so.cache.
fio_bin=$(command -v fio)
copy_with_path() {
	local src=$1
	mkdir -p "$root$(dirname "$src")"
	cp -L "$src" "$root$src"
}
copy_with_path "$fio_bin"
while read -r lib; do
	copy_with_path "$lib"
done < <(ldd "$fio_bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)

# Check that fio starts from the staged tree (needs root for chroot; skipped otherwise).
if [[ $(id -u) == 0 ]]; then
	chroot "$root" /usr/bin/fio --version >/dev/null || die "fio does not run from the staged initramfs tree"
fi

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null --create --format=newc --quiet) |
	gzip -1 >"$work/initramfs.cpio.gz"

{
	echo "KERNEL_PACKAGE=$kernel_package"
	echo "KERNEL_VERSION=$kernel_version"
	echo "MODULES=${load_order[*]}"
} >"$work/guest.env"

rm -f "$out/guest.env"
cp "${vmlinuz[0]}" "$work/vmlinuz"
# guest.env goes last: up_to_date() needs all three, so a half-finished build is never current.
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
mv -f "$work/guest.env" "$out/guest.env"
rm -rf "$work"
log "built $out/vmlinuz and $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1))"
