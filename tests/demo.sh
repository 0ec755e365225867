#!/bin/bash
#
# Shows vublk doing its job: a manager (this script) opens a disk image itself and hands vublk
# only the file descriptor; vublk serves it over vhost-user-blk to a QEMU guest (Linux's
# virtio-blk driver), which writes and verifies data with fio. A second guest boot, against
# the same running vublk, verifies that the data is still there.
#
# Usage: tests/demo.sh [IMAGE_SIZE]      (default 256M; needs root or sudo for apt-get)

set -euo pipefail

workspace=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$workspace"
size=${1:-256M}

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

say "installing dependencies and building vublk and the test guest"
tests/install-deps.sh
cargo build --release --bin vublk --locked
tests/e2e/build-guest.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/vublk-demo.XXXXXX")
vublk_pid=
cleanup() {
	if [ -n "$vublk_pid" ]; then kill "$vublk_pid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT

say "the manager creates a $size raw image and opens it (O_RDWR) itself"
truncate -s "$size" "$work/disk.img"
exec {image_fd}<>"$work/disk.img"

say "vublk serves fd:$image_fd on $work/vhost-user.sock (it never sees the path)"
target/release/vublk serve --image "fd:$image_fd" --format raw --cache writeback \
	--serial vublk-demo --socket-path "$work/vhost-user.sock" --num-queues 2 &
vublk_pid=$!
exec {image_fd}>&-
for _ in $(seq 200); do
	[ -S "$work/vhost-user.sock" ] && break
	kill -0 "$vublk_pid" || { echo "vublk exited" >&2; exit 1; }
	sleep 0.05
done

boot() {
	local job=$1
	timeout 300 qemu-system-x86_64 -accel tcg -m 512 -smp 2 -nographic -no-reboot \
		-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
		-chardev socket,id=vu0,path="$work/vhost-user.sock" \
		-device vhost-user-blk-pci,chardev=vu0,num-queues=2 \
		-kernel target/e2e/vmlinuz -initrd target/e2e/initramfs.cpio.gz \
		-append "console=ttyS0 quiet vublk.job=$job vublk.size=64M" | tee "$work/console-$job.log" |
		grep -E '^(fio: +(READ|WRITE):|VUBLK-E2E-(RESULT|INFO))' || true
	grep -q "VUBLK-E2E-RESULT job=$job status=PASS" "$work/console-$job.log"
}

say "guest 1: fio writes 64 MiB with verify=crc32c through the guest's virtio-blk driver"
boot write
say "guest 2 (a new QEMU, same vublk): fio re-reads and verifies what guest 1 wrote"
boot verify
say "guest 3: what the guest sees of the device"
boot info

say "stopping vublk with SIGTERM (drains and flushes)"
kill -TERM "$vublk_pid"
wait "$vublk_pid"
vublk_pid=
say "demo passed: vublk served a manager-passed fd to three guests, data intact"
