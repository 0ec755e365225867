#!/bin/sh
# Stand-in for `vublk serve ...` that runs qemu-storage-daemon instead, for vublk-bench's A/A
# check (QSD measured against itself shows the noise floor of the "ratio vublk/QSD" column):
#
#   target/release/vublk-bench --vublk-bin tests/bench/qsd-as-vublk.sh --backends vublk,qsd
#
# Accepts exactly the options the test fixture passes and `exec`s, so the pid vublk-bench reads
# CPU time from is qemu-storage-daemon's own.
set -eu

[ "${1:-}" = serve ] || { echo "usage: $0 serve --image F --format raw|qcow2 --socket-path S --num-queues N --cache none|writeback [--read-only]" >&2; exit 2; }
shift
ro=off
while [ $# -gt 0 ]; do
    case "$1" in
        --image) image=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --socket-path) socket=$2; shift 2 ;;
        --num-queues) queues=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        --read-only) ro=on; shift ;;
        *) echo "$0: unsupported option $1" >&2; exit 2 ;;
    esac
done
case "$cache" in none) direct=on ;; writeback) direct=off ;; *) echo "$0: bad --cache $cache" >&2; exit 2 ;; esac
writable=on
[ "$ro" = on ] && writable=off

exec /usr/bin/qemu-storage-daemon \
    --blockdev "driver=file,node-name=file0,filename=$image,cache.direct=$direct,aio=io_uring,read-only=$ro" \
    --blockdev "driver=$format,node-name=disk0,file=file0,read-only=$ro" \
    --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$socket,writable=$writable,num-queues=$queues"
