#!/bin/busybox sh
# shellcheck shell=sh
#
# /init of the vublk end-to-end test guest (packed into the initramfs by build-guest.sh).
#
# Loads the virtio modules listed in /etc/vublk-modules, waits for /dev/vda, runs the job named
# by `vublk.job=` on the kernel command line, prints one result line on the console and powers
# off. It knows nothing about the backend: it only sees a virtio-blk disk. A job that hangs gets
# a report of the disk's in-flight requests every 30 s (see watchdog below).
#
# Kernel command line parameters (all optional except vublk.job):
#   vublk.job=write|verify|info|checksum|watch
#   vublk.changes=2        watch: how many changes of size or contents to wait for
#   vublk.delay=0          seconds to stay idle (no disk I/O) before the job
#   vublk.size=32M         bytes of /dev/vda the fio job covers (from vublk.offset)
#   vublk.offset=0         where the fio job starts on /dev/vda
#   vublk.seed=1           fio --randseed; a `verify` must use the `write` run's values
#   vublk.ioengine=libaio  libaio or io_uring
#   vublk.iodepth=8
#   vublk.bssplit=4k/55:16k/20:64k/15:256k/5:1m/5
#
# Output contract (parsed by tests/src/guest.rs):
#   VUBLK-E2E-INFO key=value          zero or more, `info` job only
#   VUBLK-E2E-RESULT job=JOB status=PASS|FAIL [rc=N] [reason=WORD]
# The result line is always the last thing init prints before `poweroff -f`.

# No `set -e`: every failure must end in a FAIL line and a power-off, never in a dead init.
set -u
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

job=unknown

finish() {
	# $1 = PASS|FAIL, rest = extra key=value words for the result line.
	status=$1
	shift
	sync
	echo "VUBLK-E2E-RESULT job=$job status=$status${*:+ $*}"
	poweroff -f
	# poweroff -f only returns if reboot(2) failed; exiting init panics, and panic=-1 together
	# with QEMU's -no-reboot ends the VM either way.
	exit 1
}

mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
# The kernel may have started init without a console if the initramfs had no /dev/console.
exec </dev/console >/dev/console 2>&1
# Start on a fresh line: the firmware leaves escape sequences without a newline on the console.
echo
echo "init: vublk e2e guest, kernel $(uname -r)"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

# Hang reporter: if the job is still running after WATCHDOG_SECS (a healthy job takes a few
# seconds), print the disk's in-flight requests and every blocked task's kernel stack, then
# again at the same interval. It only reports: the host's timeout decides when to give up.
# (The kernel's hung-task detector does not help here: it ignores killable waits, which is how
# page-cache readers and fio wait for a request the backend never completes.)
WATCHDOG_SECS=30
watchdog() {
	elapsed=0
	while sleep "$WATCHDOG_SECS"; do
		elapsed=$((elapsed + WATCHDOG_SECS))
		echo "init: watchdog: job $job still running after $elapsed s"
		if [ -e /sys/block/vda/inflight ]; then
			echo "init: watchdog: vda in flight (reads writes): $(cat /sys/block/vda/inflight)"
		fi
		for busy in /sys/kernel/debug/block/vda/hctx*/busy; do
			[ -e "$busy" ] || continue
			sed "s|^|init: watchdog: ${busy#/sys/kernel/debug/block/} |" "$busy"
		done
		for task in /proc/[0-9]*; do
			state=$(sed -n 's/^State:[[:space:]]*//p' "$task/status" 2>/dev/null)
			case "$state" in
			D*) ;;
			*) continue ;;
			esac
			echo "init: watchdog: blocked task ${task#/proc/} $(cat "$task/comm" 2>/dev/null) [$state]"
			sed 's/^/init: watchdog:     /' "$task/stack" 2>/dev/null
		done
	done
}

size=32M
offset=0
seed=1
ioengine=libaio
iodepth=8
bssplit=4k/55:16k/20:64k/15:256k/5:1m/5
changes=2
delay=0
bad_param=
# Word splitting of /proc/cmdline is intended: one kernel parameter per word.
# shellcheck disable=SC2013
for word in $(cat /proc/cmdline); do
	case "$word" in
	vublk.job=*) job=${word#*=} ;;
	vublk.size=*) size=${word#*=} ;;
	vublk.offset=*) offset=${word#*=} ;;
	vublk.seed=*) seed=${word#*=} ;;
	vublk.ioengine=*) ioengine=${word#*=} ;;
	vublk.iodepth=*) iodepth=${word#*=} ;;
	vublk.bssplit=*) bssplit=${word#*=} ;;
	vublk.changes=*) changes=${word#*=} ;;
	vublk.delay=*) delay=${word#*=} ;;
	vublk.*) bad_param=$word ;;
	esac
done
if [ -n "$bad_param" ]; then
	echo "init: unknown kernel parameter $bad_param"
	finish FAIL reason=bad-parameter
fi

watchdog &

echo "init: loading $(tr '\n' ' ' </etc/vublk-modules)"
while read -r module; do
	if ! insmod "/lib/modules/$module.ko"; then
		echo "init: insmod $module failed"
		finish FAIL reason=insmod
	fi
done </etc/vublk-modules

# virtio_blk probes from insmod, but the disk node appears asynchronously: poll with a bound.
tries=0
while [ ! -b /dev/vda ]; do
	tries=$((tries + 1))
	if [ "$tries" -gt 200 ]; then
		echo "init: /dev/vda did not appear within 20 s"
		ls /sys/bus/virtio/devices/ 2>&1
		finish FAIL reason=no-disk
	fi
	usleep 100000
done

if [ "$delay" -gt 0 ]; then
	echo "init: idle for $delay s"
	sleep "$delay"
fi
echo "init: /dev/vda is ready; running job $job"

run_fio() {
	# $@ = extra fio arguments on top of the shared job definition.
	fio --name=vublk-e2e --filename=/dev/vda --direct=1 \
		--ioengine="$ioengine" --iodepth="$iodepth" --rw=randwrite \
		--bssplit="$bssplit" --size="$size" --offset="$offset" --randseed="$seed" \
		--verify=crc32c --verify_fatal=1 --end_fsync=1 "$@" >/tmp/fio.log 2>&1
	rc=$?
	sed 's/^/fio: /' /tmp/fio.log
	if [ "$rc" -eq 0 ]; then
		finish PASS
	fi
	echo "init: fio failed with exit code $rc; its first error lines, then its last lines:"
	grep -E '^(verify|fio): |err=' /tmp/fio.log | head -n 10 | sed 's/^/fio-error: /'
	tail -n 15 /tmp/fio.log | sed 's/^/fio-tail: /'
	finish FAIL "rc=$rc" reason=fio
}

info() {
	# $1 = key, $2 = file; prints the file's first line, or an error key when unreadable.
	if value=$(cat "$2" 2>/dev/null); then
		echo "VUBLK-E2E-INFO $1=$value"
	else
		echo "VUBLK-E2E-INFO $1_error=unreadable"
	fi
}

case "$job" in
write)
	run_fio --do_verify=1
	;;
verify)
	run_fio --verify_only
	;;
checksum)
	# Reads the first vublk.size bytes (a plain byte count) through the virtio-blk driver and
	# prints their md5, for the host to compare with its own oracle.
	sum=$(head -c "$size" /dev/vda | md5sum) || finish FAIL reason=read
	finish PASS "md5=${sum%% *}"
	;;
watch)
	# Reports the disk's size (sectors) and its first 16 bytes, read with O_DIRECT so the page
	# cache cannot answer, whenever either changes (the host resizes or swaps the medium
	# meanwhile); passes once it has seen vublk.changes changes, fails after 90 s.
	last=
	seen=0
	polls=0
	while [ "$polls" -lt 450 ]; do
		now="size=$(cat /sys/block/vda/size) head=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | head -c 16 | od -An -tx1 | tr -d ' \n')"
		if [ "$now" != "$last" ]; then
			echo "VUBLK-E2E-INFO watch $now"
			if [ -n "$last" ]; then
				seen=$((seen + 1))
			fi
			last=$now
			if [ "$seen" -ge "$changes" ]; then
				finish PASS "changes=$seen"
			fi
		fi
		polls=$((polls + 1))
		usleep 200000
	done
	finish FAIL reason=timeout "changes=$seen"
	;;
info)
	q=/sys/block/vda/queue
	info size /sys/block/vda/size
	info ro /sys/block/vda/ro
	info serial /sys/block/vda/serial
	info logical_block_size $q/logical_block_size
	info physical_block_size $q/physical_block_size
	info write_cache $q/write_cache
	info discard_max_bytes $q/discard_max_bytes
	info write_zeroes_max_bytes $q/write_zeroes_max_bytes
	info features /sys/block/vda/device/features
	queues=
	count=0
	for dir in /sys/block/vda/mq/*; do
		[ -d "$dir" ] || continue
		queues="$queues${queues:+,}${dir##*/}"
		count=$((count + 1))
	done
	echo "VUBLK-E2E-INFO mq=$queues"
	echo "VUBLK-E2E-INFO num_queues=$count"
	finish PASS
	;;
*)
	echo "init: unknown job '$job'"
	finish FAIL reason=bad-job
	;;
esac
