#!/usr/bin/env bash
# Cache bdev benchmark (issue 8): cache over a file on the real disk (direct=on) vs that file alone.
#
#   bench/cache.sh [SECONDS] [CORE_SIZE] [CACHE_SIZE]     # defaults: 10 s per run, 1G core, 256M cache
#
# Runs (one JSON line each on stdout, a summary table on stderr):
#   file       4 KiB randread, 90/10 hot/cold, on the file alone (O_DIRECT)
#   cachedev   4 KiB randread on the cache device alone (malloc), span = cache size: the cost of a hit
#   cache-wt   same pattern through a wt cache (malloc cache device) after one warm-up run;
#              hit ratio from the cache's own statistics (SIGUSR1 JSON), over the measured run only
#   wb-burst   4 KiB randwrite burst into a wb cache (cleaner=acp), then the time until dirty_lines = 0
#   hits-1q / hits-2q  all-hit randread (span = half the cache, warmed) with 1 and 2 queues, alternating
#              three times: does the shared line map let a second queue add throughput?
# Work files live under target/ (a disk filesystem), never /tmp or tmpfs.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
CORE=${2:-1G}
CACHE=${3:-256M}
cargo build --release --bin vblkd --bin vblkd-bench >&2
VBLKD=$PWD/target/release/vblkd
BENCH=$PWD/target/release/vblkd-bench
mkdir -p target/bench
TMP=$(mktemp -d -p "$PWD/target/bench" cache.XXXXXX)
SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$TMP"' EXIT
SOCK=$TMP/s.sock
CORE_MIB=$(( $(numfmt --from=iec "$CORE") >> 20 ))
CACHE_MIB=$(( $(numfmt --from=iec "$CACHE") >> 20 ))
truncate -s "$CORE" "$TMP/core.img"
# Fill the core once so reads hit real blocks, not holes.
dd if=/dev/urandom of="$TMP/core.img" bs=1M count="$CORE_MIB" conv=notrunc status=none

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
QUEUES=1
start() { # bdev args...
    rm -f "$SOCK"
    "$VBLKD" --log-level warn "$@" --export "bdev=d0,socket=$SOCK,queues=$QUEUES" >"$TMP/stdout" &
    SERVER=$!
    wait_sock "$SOCK"
}
stop() { kill -TERM "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }
stats() { # key -> value from a fresh SIGUSR1 dump
    local n; n=$(wc -l <"$TMP/stdout")
    kill -USR1 "$SERVER"
    for _ in $(seq 100); do [ "$(wc -l <"$TMP/stdout")" -gt "$n" ] && break; sleep 0.02; done
    tail -n1 "$TMP/stdout" | python3 -c "import json,sys; print(json.load(sys.stdin)['d0']['$1'])"
}
bench() { "$BENCH" --socket "$SOCK" --bs 4096 --qd 32 --seconds "$SECS" "$@"; }
field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(d$2)" "$1"; }

FILE_BDEV="driver=file,name=core,path=$TMP/core.img,direct=on"
HOT="--rw randread --hot-pct 90 --hot-set-pct 10 --span-mib $CORE_MIB"

# 1. the file alone
start --bdev "driver=file,name=d0,path=$TMP/core.img,direct=on"
FILE=$(bench $HOT); echo "{\"run\":\"file\",\"result\":$FILE}"; stop

# 2. the cache device alone (what a hit costs at most)
start --bdev "driver=malloc,name=d0,size=$CACHE"
DEV=$(bench --rw randread --span-mib "$CACHE_MIB"); echo "{\"run\":\"cachedev\",\"result\":$DEV}"; stop

# 3. wt cache over the file: warm up, then measure
start --bdev "$FILE_BDEV" --bdev "driver=malloc,name=cd,size=$CACHE" \
      --bdev "driver=cache,name=d0,cache=cd,core=core,mode=wt,seq-cutoff=off"
bench $HOT >/dev/null
h0=$(stats read_hits); m0=$(stats read_misses); p0=$(stats read_partial_hits)
CW=$(bench $HOT)
h1=$(stats read_hits); m1=$(stats read_misses); p1=$(stats read_partial_hits)
RATIO=$(python3 -c "h=$h1-$h0; t=h+($m1-$m0)+($p1-$p0); print(round(h/t,3) if t else 0)")
echo "{\"run\":\"cache-wt\",\"hit_ratio\":$RATIO,\"result\":$CW}"; stop

# 4. wb burst and clean-down
start --bdev "$FILE_BDEV" --bdev "driver=malloc,name=cd,size=$CACHE" \
      --bdev "driver=cache,name=d0,cache=cd,core=core,mode=wb,cleaner=acp,clean-batch=256,seq-cutoff=off"
WB=$(bench --rw randwrite --span-mib $((CACHE_MIB / 2)))
t0=$(date +%s.%N); d=$(stats dirty_lines); d0=$d
while [ "$d" != 0 ]; do sleep 0.1; d=$(stats dirty_lines); done
CLEAN=$(python3 -c "print(round($(date +%s.%N)-$t0,2))")
echo "{\"run\":\"wb-burst\",\"dirty_lines_after_burst\":$d0,\"clean_down_s\":$CLEAN,\"result\":$WB}"; stop

# 5. hit-heavy: 1 vs 2 queues on one wt cache, everything cached
QUEUES=2
start --bdev "$FILE_BDEV" --bdev "driver=malloc,name=cd,size=$CACHE" \
      --bdev "driver=cache,name=d0,cache=cd,core=core,mode=wt,seq-cutoff=off"
HALF=$((CACHE_MIB / 2))
bench --rw randread --span-mib $HALF >/dev/null
bench --rw randread --span-mib $HALF >/dev/null
for i in 1 2 3; do
  for q in 1 2; do
    R=$(bench --rw randread --span-mib $HALF --queues $q)
    echo "{\"run\":\"hits-${q}q\",\"round\":$i,\"result\":$R}"
    eval "H${q}_$i=\$(field \"\$R\" \"['iops']\")"
  done
done
stop
echo "# hits: 1 queue $H1_1 $H1_2 $H1_3 IOPS; 2 queues $H2_1 $H2_2 $H2_3 IOPS" >&2

{
  echo "| run | IOPS | p50 µs | p99 µs | note |"
  echo "|---|---|---|---|---|"
  for r in "file:$FILE:" "cachedev:$DEV:" "cache-wt:$CW:hit ratio $RATIO" "wb-burst:$WB:$d0 dirty lines cleaned in $CLEAN s"; do
    name=${r%%:*}; rest=${r#*:}; json=${rest%:*}; note=${rest##*:}
    echo "| $name | $(field "$json" "['iops']") | $(field "$json" "['p50_us']") | $(field "$json" "['p99_us']") | $note |"
  done
} >&2
