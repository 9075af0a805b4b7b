#!/usr/bin/env bash
# FTL benchmark (issue 7): FTL on a tmpfs-backed emulated OCSSD vs malloc, same client (vblkd-bench).
#
#   bench/ftl.sh [SECONDS] [SUSTAIN_SECONDS] [RESTART_SIZES] [ROUNDS]
#     defaults: 5 s per point, 60 s sustained randwrite, restart sizes "1G 4G", 5 rounds
#   bench/ftl.sh 1 2 64M 1      # a quick check that everything runs
#   SUSTAIN_SECONDS=0 skips part 2, RESTART_SIZES="" part 3.
#
# 1. 4 KiB randread/randwrite × QD1/QD32 × 1/2 queues, ftl vs malloc (span 256 MiB, prefilled),
#    ROUNDS rounds alternating ftl and malloc per point; a summary (best of the rounds, ftl/malloc
#    and 2-queue/1-queue ratios) goes to stderr at the end.
# 2. Sustained 4 KiB randwrite over 80 % of the FTL after a full sequential fill; WAF from SIGUSR1.
# 3. Restart time after a clean stop (SIGTERM) and after kill -9, per size in RESTART_SIZES.
# Prints one JSON line per measurement on stdout; progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
SUSTAIN=${2:-60}
SIZES=${3-"1G 4G"}
ROUNDS=${4:-5}
cargo build --release --bin vblkd --bin vblkd-bench >&2
VBLKD=$PWD/target/release/vblkd
BENCH=$PWD/target/release/vblkd-bench
TMP=$(mktemp -d -p /dev/shm vblkd-ftl-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$TMP"' EXIT
SOCK=$TMP/s.sock

wait_sock() { for _ in $(seq 2000); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; return 1; }

# Media geometry for an FTL of SIZE (bytes): 8 PUs, chunks of 1024 blocks (4 MiB), media = 2 × SIZE.
media_arg() { # size_bytes img
    local chunks=$(( $1 * 2 / (8 * 4 * 1024 * 1024) ))
    [ "$chunks" -lt 24 ] && chunks=24
    echo "driver=ocssd-emu,name=o0,path=$2,create=on,groups=2,pus=4,chunks=$chunks,chunk-blocks=1024,ws-min=4,ws-opt=16"
}

start() { # kind queues size [extra-ftl]
    rm -f "$SOCK"
    case "$1" in
    malloc) "$VBLKD" --log-level warn --bdev "driver=malloc,name=d0,size=$3" \
              --export "bdev=d0,socket=$SOCK,queues=$2" >"$TMP/stdout" 2>>"$TMP/stderr" & ;;
    ftl)    "$VBLKD" --log-level warn --bdev "$(media_arg "$(numfmt --from=iec "$3")" "$TMP/media.img")" \
              --bdev "driver=ftl,name=d0,base=o0,size=$3${4:-}" \
              --export "bdev=d0,socket=$SOCK,queues=$2" >"$TMP/stdout" 2>>"$TMP/stderr" & ;;
    esac
    SERVER=$!
    wait_sock "$SOCK"
}
stop() { kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
bench() { "$BENCH" --socket "$SOCK" "$@" || echo '{"error":true}'; }

echo "# $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)" >&2
# 1. Points.
for rw in randread randwrite; do
  for qd in 1 32; do
    for q in 1 2; do
      for round in $(seq "$ROUNDS"); do
        for kind in ftl malloc; do
          rm -f "$TMP/media.img"
          start "$kind" "$q" 1G
          [ "$rw" = randread ] && bench --rw write --qd 32 --queues 1 --seconds "$SECS" --span-mib 256 >/dev/null
          out=$(bench --rw "$rw" --bs 4096 --qd "$qd" --queues "$q" --seconds "$SECS" --span-mib 256)
          stop
          echo "{\"kind\":\"$kind\",\"rw\":\"$rw\",\"qd\":$qd,\"queues\":$q,\"round\":$round,\"result\":$out}" | tee -a "$TMP/points.json"
        done
      done
    done
  done
done
python3 - "$TMP/points.json" >&2 <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    k = (r["rw"], r["qd"], r["queues"], r["kind"])
    iops = r["result"].get("iops", 0)
    if iops >= best.get(k, (0, 0))[0]:
        best[k] = (iops, r["result"].get("p50_us", 0))
print("| pattern | QD | queues | ftl IOPS (p50 µs) | malloc IOPS (p50 µs) | ftl / malloc |")
print("|---|---|---|---|---|---|")
for rw in ("randread", "randwrite"):
    for qd in (1, 32):
        for q in (1, 2):
            f, m = best.get((rw, qd, q, "ftl"), (0, 0)), best.get((rw, qd, q, "malloc"), (0, 0))
            print(f"| {rw} | {qd} | {q} | {f[0]/1000:.1f} K ({f[1]:.1f}) | {m[0]/1000:.1f} K ({m[1]:.1f}) | {f[0]/max(m[0],1):.2f} |")
for rw in ("randread", "randwrite"):
    for kind in ("ftl", "malloc"):
        one, two = best.get((rw, 32, 1, kind), (0, 0))[0], best.get((rw, 32, 2, kind), (0, 0))[0]
        print(f"{rw} QD32 {kind}: 2 queues / 1 queue = {two/max(one,1):.2f}")
PY
# 2. Sustained randwrite over 80 % after a full fill, WAF from the FTL's statistics.
if [ "$SUSTAIN" -gt 0 ]; then
rm -f "$TMP/media.img"
start ftl 1 1G
echo "sustained: fill" >&2
bench --rw write --qd 32 --seconds "$SUSTAIN" --span-mib 1024 >/dev/null
out=$(bench --rw randwrite --qd 32 --seconds "$SUSTAIN" --span-mib 819)
kill -USR1 "$SERVER"; sleep 0.5
stats=$(grep '^{' "$TMP/stdout" | tail -1)
stop
echo "{\"kind\":\"ftl\",\"rw\":\"sustained-randwrite-80pct\",\"result\":$out,\"stats\":$stats}"
fi
# 3. Restart times (clean and killed) per size, with data written first.
for size in $SIZES; do
  rm -f "$TMP/media.img"
  start ftl 1 "$size"
  bench --rw randwrite --qd 32 --seconds "$SECS" --span-mib "$(( $(numfmt --from=iec "$size") / 1048576 ))" >/dev/null
  stop
  t0=$(date +%s.%N); start ftl 1 "$size"; t1=$(date +%s.%N)
  bench --rw randwrite --qd 32 --seconds "$SECS" --span-mib "$(( $(numfmt --from=iec "$size") / 1048576 ))" >/dev/null
  kill -KILL "$SERVER"; wait "$SERVER" 2>/dev/null || true
  t2=$(date +%s.%N); start ftl 1 "$size"; t3=$(date +%s.%N)
  stop
  echo "{\"kind\":\"ftl\",\"size\":\"$size\",\"clean_restart_s\":$(echo "$t1 - $t0" | bc),\"killed_restart_s\":$(echo "$t3 - $t2" | bc)}"
done
