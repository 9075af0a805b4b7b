#!/usr/bin/env bash
# vblkd's rbd bdev vs qemu-storage-daemon's rbd driver on the same image of the one-node test cluster
# (scripts/ceph-cluster.sh), same client (vblkd-bench, libblkio), alternating runs.
#
#   bench/rbd.sh [SECONDS] [REPEATS] [PART]   # defaults: 5 s per point, 5 repeats (A B A B ...), PART=all
#
# PART qsd:   vblkd rbd vs qsd rbd: 4 KiB randread/randwrite × QD1/QD32, 1 queue. The image is filled
#             first so reads hit data.
# PART cache: cache(wb, tmpfs file) over rbd vs rbd alone on a hot working set (HOT_MIB, default 64 MiB,
#             inside the 256 MiB image; the 128 MiB cache holds it): the set is read once to warm the
#             cache (seq-cutoff=off, so the sequential warm-up is cached), then 4 KiB randread and
#             randwrite × QD1/QD32 over the set.
# Prints one JSON line per run; BENCHMARKS.md has the recorded table.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
REPEATS=${2:-5}
PART=${3:-all}
HOT_MIB=${HOT_MIB:-64}
cargo build --release --bin vblkd --bin vblkd-bench >&2
VBLKD=target/release/vblkd
BENCH=target/release/vblkd-bench
CONF=$(bash scripts/ceph-cluster.sh start)
IMAGE=bench-$$
TMP=$(mktemp -d)
SHM=$(mktemp -d -p /dev/shm vblkd-rbd-bench.XXXXXX)   # the cache device: a tmpfs file
trap 'kill $(jobs -p) 2>/dev/null || true; rbd -c "$CONF" rm "rbd/$IMAGE" >/dev/null 2>&1 || true; rm -rf "$TMP" "$SHM"' EXIT
rbd -c "$CONF" create --size 256M "rbd/$IMAGE"

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

start_server() { # kind
    local sock="$TMP/s.sock"; rm -f "$sock"
    case "$1" in
    vblkd-rbd) "$VBLKD" --log-level warn --control none \
                  --bdev "driver=rbd,name=r0,pool=rbd,image=$IMAGE,conf=$CONF" \
                  --export "bdev=r0,socket=$sock,queues=1" >/dev/null & ;;
    vblkd-cache-rbd)
               rm -f "$TMP/cache.img"
               "$VBLKD" --log-level warn --control none \
                  --bdev "driver=rbd,name=r0,pool=rbd,image=$IMAGE,conf=$CONF" \
                  --bdev "driver=file,name=cdev,path=$SHM/cache.img,size=128M" \
                  --bdev "driver=cache,name=c0,cache=cdev,core=r0,mode=wb,seq-cutoff=off,load=off" \
                  --export "bdev=c0,socket=$sock,queues=1" >/dev/null & ;;
    qsd-rbd)   qemu-storage-daemon --blockdev "driver=rbd,node-name=r0,pool=rbd,image=$IMAGE,conf=$CONF,cache.direct=on" \
                  --export "type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" & ;;
    esac
    SERVER=$!
    wait_sock "$sock"
}
stop_server() { kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true; }

echo "# $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)" >&2
start_server vblkd-rbd
"$BENCH" --socket "$TMP/s.sock" --rw write --bs 1048576 --qd 4 --seconds 3 --span-mib 256 >/dev/null
stop_server
if [[ $PART == all || $PART == qsd ]]; then
for rw in randread randwrite; do
  for qd in 1 32; do
    for rep in $(seq "$REPEATS"); do
      for kind in vblkd-rbd qsd-rbd; do
        start_server "$kind"
        out=$("$BENCH" --socket "$TMP/s.sock" --rw "$rw" --bs 4096 --qd "$qd" --queues 1 --seconds "$SECS" --span-mib 256 || echo '{"error":true}')
        stop_server
        echo "{\"server\":\"$kind\",\"rw\":\"$rw\",\"qd\":$qd,\"rep\":$rep,\"result\":$out}"
      done
    done
  done
done
fi

if [[ $PART == all || $PART == cache ]]; then
for rw in randread randwrite; do
  for qd in 1 32; do
    for rep in $(seq "$REPEATS"); do
      for kind in vblkd-rbd vblkd-cache-rbd; do
        start_server "$kind"
        # Warm-up: read the hot set sequentially for 3 s (several passes), the same for both servers.
        "$BENCH" --socket "$TMP/s.sock" --rw read --bs 65536 --qd 8 --seconds 3 --span-mib "$HOT_MIB" >/dev/null
        out=$("$BENCH" --socket "$TMP/s.sock" --rw "$rw" --bs 4096 --qd "$qd" --queues 1 --seconds "$SECS" --span-mib "$HOT_MIB" || echo '{"error":true}')
        stop_server
        echo "{\"server\":\"$kind\",\"part\":\"hot-set\",\"rw\":\"$rw\",\"qd\":$qd,\"rep\":$rep,\"result\":$out}"
      done
    done
  done
done
fi
