#!/bin/bash
#
# Installs everything vublk's build, tests, demo and benchmark need on a Debian 12 machine.
# Idempotent: packages already present at a suitable version are left alone.
#
# Debian packages (as root, through apt-get):
#   qemu-system-x86, qemu-utils   from bookworm-backports (QEMU 10): the plain bookworm
#                                 qemu-system-x86 is 7.2 and would remove qemu-img 10
#   busybox-static, fio, cpio     the end-to-end test guest's userland (tests/e2e)
#   xz-utils, zstd                unpacking kernel modules, if compressed
#   strace                        the seccomp allowlist test (syscalls a workload makes)
# Python (pip): qemu.qmp          the independent QMP client for control-plane tests
# Rust: cargo-nextest             installed with cargo if missing

set -euo pipefail

log() { echo "install-deps: $*" >&2; }

SUDO=
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
fi

backports_list=/etc/apt/sources.list.d/vublk-bookworm-backports.list
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
	log "adding bookworm-backports to the apt sources"
	echo 'deb http://deb.debian.org/debian bookworm-backports main' | $SUDO tee "$backports_list" >/dev/null
fi

qemu_major() {
	# Prints the major version of an installed QEMU binary, or 0.
	"$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1 || true
}

missing=()
for pkg in busybox-static fio cpio xz-utils zstd strace; do
	dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
need_qemu=0
for bin in qemu-system-x86_64 qemu-img qemu-storage-daemon; do
	major=$(qemu_major "$bin")
	if [ -z "$major" ] || [ "$major" -lt 10 ]; then
		need_qemu=1
	fi
done

if [ ${#missing[@]} -gt 0 ] || [ "$need_qemu" = 1 ] || [ "${VUBLK_APT_UPDATE:-0}" = 1 ]; then
	log "apt-get update"
	$SUDO apt-get update -q
fi
# The guest build downloads the kernel .deb with apt-get download, which needs package lists.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
	$SUDO apt-get update -q
fi
if [ "$need_qemu" = 1 ]; then
	log "installing QEMU 10 from bookworm-backports"
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -t bookworm-backports \
		qemu-system-x86 qemu-utils
fi
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

if ! python3 -c 'import qemu.qmp' >/dev/null 2>&1; then
	log "installing the qemu.qmp Python library"
	python3 -m pip install --quiet 'qemu.qmp>=0.0.3' || python3 -m pip install --quiet --break-system-packages 'qemu.qmp>=0.0.3'
fi

if ! cargo nextest --version >/dev/null 2>&1; then
	log "installing cargo-nextest"
	cargo install --locked cargo-nextest
fi

for bin in qemu-system-x86_64 qemu-img qemu-storage-daemon; do
	major=$(qemu_major "$bin")
	if [ -z "$major" ] || [ "$major" -lt 10 ]; then
		log "error: $bin is not QEMU 10 or newer after installing"
		exit 1
	fi
done
log "ready: $(qemu-system-x86_64 --version | head -n1)"
