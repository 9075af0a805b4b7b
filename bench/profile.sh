#!/usr/bin/env bash
# Instructions per request on one queue's hot path, counted by callgrind (immune to machine noise).
#
#   bench/profile.sh [BDEV] [RW] [QD] [SECONDS]    # defaults: null randread 32 10
#   VG_ARGS=--cache-sim=yes bench/profile.sh malloc randread   (also count simulated cache misses)
#   QUEUES=8 EXTRA=,poll-threads=2 TOGGLE='*run_group*' bench/profile.sh malloc randread 4 5
#   STACK="--bdev driver=malloc,name=cd,size=64M --bdev driver=malloc,name=core,size=1G \
#          --bdev driver=cache,name=b0,cache=cd,core=core" SPAN=16 WARM=1 bench/profile.sh stack randread
#       (STACK: the bdev flags instead of one BDEV, the exported one named b0; SPAN: MiB the client
#        touches, default 512; WARM=1: WARM_SECS (3) s of sequential reads over the span before collection, e.g. to fill a cache)
#
# vblkd runs under `valgrind --tool=callgrind` with `poll-us=0` (no idle spinning) and collection
# switched on only inside the poller's per-queue pass (`Worker::pass`: pop, parse, submit, reap,
# complete, signal) and `Channel` calls it makes; vblkd-bench drives it through libblkio. Prints the
# instructions counted, the requests completed, and their ratio; leaves callgrind.out in a temp dir
# (path printed) for `callgrind_annotate`.
set -euo pipefail
cd "$(dirname "$0")/.."
BDEV=${1:-null}
RW=${2:-randread}
QD=${3:-32}
SECS=${4:-10}
QUEUES=${QUEUES:-1}      # queues (one client thread each)
EXTRA=${EXTRA:-}         # more export options, e.g. ,poll-threads=2
TOGGLE=${TOGGLE:-*Worker*pass*}
cargo build --release --bin vblkd --bin vblkd-bench >&2
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
sock="$TMP/p.sock"
SPAN=${SPAN:-512}
read -r -a bdevs <<<"${STACK:---bdev driver=$BDEV,name=b0,size=1G}"
valgrind --tool=callgrind ${VG_ARGS:-} --callgrind-out-file="$TMP/callgrind.out" --toggle-collect="$TOGGLE" \
    target/release/vblkd --control none --log-level warn "${bdevs[@]}" \
    --export "bdev=b0,socket=$sock,queues=$QUEUES,poll-us=0$EXTRA" >/dev/null 2>"$TMP/valgrind.log" &
VG=$!
for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
if [[ -n "${WARM:-}" ]]; then
    # Fill the span (sequential 128 KiB reads); collection counts these, so zero the counters.
    target/release/vblkd-bench --socket "$sock" --rw read --bs 131072 --qd 4 --seconds "${WARM_SECS:-3}" \
        --span-mib "$SPAN" >/dev/null
    callgrind_control --zero "$VG" >/dev/null
fi
out=$(target/release/vblkd-bench --socket "$sock" --rw "$RW" --qd "$QD" --queues "$QUEUES" --seconds "$SECS" --span-mib "$SPAN")
kill -TERM $VG; wait $VG 2>/dev/null || true
ops=$(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("ops") or d.get("total_ops") or int(d["iops"]*d["seconds"]))')
ir=$(callgrind_annotate "$TMP/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",","",$1); print $1; done=1}')
echo "bdev=$BDEV rw=$RW qd=$QD queues=$QUEUES$EXTRA requests=$ops instructions=$ir per_request=$(( ir / ops )) out=$TMP/callgrind.out"
