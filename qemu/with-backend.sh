#!/usr/bin/env bash
# Start a vhost-user-blk backend, boot the guest against it, stop the backend.
#
#   qemu/with-backend.sh --socket PATH [run-guest.sh options] WORKLOAD... -- BACKEND COMMAND...
#
# Everything before `--` goes to run-guest.sh; everything after it is the
# backend's command line, which must create the listening socket PATH. The
# backend is pluggable: vblkd, or qemu-storage-daemon as a stand-in, e.g.
#
#   qemu/with-backend.sh --socket /tmp/v.sock --queues 2 fio-verify -- \
#       target/debug/vblkd --bdev driver=malloc,name=m0,size=256M \
#                          --export bdev=m0,socket=/tmp/v.sock,queues=2
#   qemu/with-backend.sh --socket /tmp/q.sock fio-verify -- \
#       qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=/tmp/x.img \
#       --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/tmp/q.sock,writable=on
#
# The backend gets SIGTERM afterwards and must exit 0 within 20 s. Exit status:
# run-guest.sh's (0 pass, 1 guest FAIL, 2 no result, 3 setup), else 4 when the
# backend did not come up or did not exit cleanly.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
guest_args=() socket=""
while [[ $# -gt 0 && "$1" != -- ]]; do
    [[ "$1" == --socket ]] && socket="${2:-}"
    guest_args+=("$1")
    shift
done
[[ $# -gt 1 && "$1" == -- ]] || { echo "with-backend: usage: $0 --socket PATH [opts] WORKLOAD... -- BACKEND..." >&2; exit 3; }
shift
[[ -n "$socket" ]] || { echo "with-backend: --socket is required" >&2; exit 3; }

blog="$(mktemp "${TMPDIR:-/tmp}/vblkd-backend.XXXXXX.log")"
rm -f "$socket"
echo "with-backend: starting: $*" >&2
"$@" </dev/null >"$blog" 2>&1 &
bpid=$!
# shellcheck disable=SC2317 # invoked by the trap
cleanup() { kill -9 "$bpid" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 200); do
    [[ -S "$socket" ]] && break
    if ! kill -0 "$bpid" 2>/dev/null; then
        echo "with-backend: backend exited before creating $socket; its output:" >&2
        cat "$blog" >&2
        exit 4
    fi
    sleep 0.1
done
[[ -S "$socket" ]] || { echo "with-backend: $socket did not appear in 20 s" >&2; cat "$blog" >&2; exit 4; }

rc=0
"$HERE/run-guest.sh" "${guest_args[@]}" || rc=$?

kill -TERM "$bpid"
for _ in $(seq 200); do
    kill -0 "$bpid" 2>/dev/null || break
    sleep 0.1
done
brc=0
wait "$bpid" || brc=$?
trap - EXIT
echo "with-backend: backend exited with status $brc; output in $blog" >&2
if [[ $rc -eq 0 && $brc -ne 0 ]]; then
    cat "$blog" >&2
    rc=4
fi
exit "$rc"
