#!/usr/bin/env bash
# Compare vblkd with qemu-storage-daemon, same client (vblkd-bench, libblkio), same machine, one run.
#
#   bench/compare.sh [SECONDS] [REPEATS]     # defaults: 5 s per point, 2 repeats (alternating A/B)
#
# Pairs: vblkd null vs qsd null-co; vblkd malloc vs qsd file on tmpfs (/dev/shm, cache.direct=off).
# Points: 4 KiB randread/randwrite × QD1/QD32 × 1/2 queues. Prints one JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
REPEATS=${2:-2}
cargo build --release --bin vblkd --bin vblkd-bench >&2
VBLKD=target/release/vblkd
BENCH=target/release/vblkd-bench
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP" /dev/shm/vblkd-bench.img' EXIT

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

start_server() { # kind queues
    local sock="$TMP/s.sock"; rm -f "$sock"
    case "$1" in
    vblkd-null)   "$VBLKD" --log-level warn --bdev driver=null,name=n0,size=1G --export "bdev=n0,socket=$sock,queues=$2" >/dev/null & ;;
    vblkd-malloc) "$VBLKD" --log-level warn --bdev driver=malloc,name=m0,size=1G --export "bdev=m0,socket=$sock,queues=$2" >/dev/null & ;;
    qsd-null)     qemu-storage-daemon --blockdev driver=null-co,node-name=n0,size=1073741824,read-zeroes=on \
                    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$2" & ;;
    qsd-tmpfs)    truncate -s 1G /dev/shm/vblkd-bench.img
                  qemu-storage-daemon --blockdev driver=file,node-name=n0,filename=/dev/shm/vblkd-bench.img,cache.direct=off \
                    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$2" & ;;
    esac
    SERVER=$!
    wait_sock "$sock"
}

stop_server() { kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true; }

echo "# $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)" >&2
for pair in "vblkd-null qsd-null" "vblkd-malloc qsd-tmpfs"; do
  for rw in randread randwrite; do
    for qd in 1 32; do
      for q in 1 2; do
        for rep in $(seq "$REPEATS"); do
          for kind in $pair; do
            start_server "$kind" "$q"
            out=$("$BENCH" --socket "$TMP/s.sock" --rw "$rw" --bs 4096 --qd "$qd" --queues "$q" --seconds "$SECS" || echo '{"error":true}')
            stop_server
            echo "{\"server\":\"$kind\",\"rep\":$rep,\"result\":$out}"
          done
        done
      done
    done
  done
done
