#!/usr/bin/env bash
# Cache bdev benchmark (issue 8): cache over a file on the real disk (direct=on) vs that file alone.
#
#   bench/cache.sh [SECONDS] [ROUNDS] [CORE_SIZE] [CACHE_SIZE]   # defaults: 5 s, 5 rounds, 1G core, 256M cache
#
# Every figure is a ratio measured in the same run against a reference, the sides alternating round by
# round, best of ROUNDS runs each, same client (vblkd-bench, libblkio, 4 KiB, QD 32 unless said):
#   A. 90/10 hot/cold randread over the whole core:   file alone | cache-wt over the file (warmed)
#      (hit ratio from the cache's own counters, over each measured run)
#   B. what a hit costs: all-hit randread (span = half the cache, warmed):
#      cache device alone (malloc) | cache-wt, at QD 32 (throughput) and QD 1 (B1: latency), with a
#      busy-polling client (libblkio poll queues): a sleeping client's wake-ups (~15-20 µs in a VM whose
#      idle vCPUs halt) would otherwise decide these figures
#   C. hit-heavy scaling: the same all-hit randread through the cache with 1 | 2 queues (sleeping clients)
#   D. wb 4 KiB randwrite burst (span = half the cache): D1 with cleaner=acp, then the time until
#      dirty_lines = 0; D2 with cleaner=nop, then the time of one cache-flush (write back everything)
# The daemons of one part run side by side (an idle one sleeps), so sides alternate without restarts.
# Work files live under target/bench/ (the real disk), never /tmp or tmpfs.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
ROUNDS=${2:-5}
CORE=${3:-1G}
CACHE=${4:-256M}
cargo build --release --bin vblkd --bin vblkd-bench >&2
VBLKD=$PWD/target/release/vblkd
BENCH=$PWD/target/release/vblkd-bench
mkdir -p target/bench
TMP=$(mktemp -d -p "$PWD/target/bench" cache.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
CORE_MIB=$(( $(numfmt --from=iec "$CORE") >> 20 ))
CACHE_MIB=$(( $(numfmt --from=iec "$CACHE") >> 20 ))
HALF=$((CACHE_MIB / 2))
truncate -s "$CORE" "$TMP/core.img"
# Fill the core once so reads hit real blocks, not holes; drop it from the page cache.
dd if=/dev/urandom of="$TMP/core.img" bs=1M count="$CORE_MIB" conv=notrunc,fsync status=none
FILE_BDEV="driver=file,name=core,path=$TMP/core.img,direct=on"
CACHE_DEV="driver=malloc,name=cd,size=$CACHE"

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
# start NAME QUEUES BDEV... : a daemon exporting bdev d0 on $TMP/NAME.sock, stats dumps in $TMP/NAME.out
start() {
    local name=$1 q=$2; shift 2
    local args=(); for b in "$@"; do args+=(--bdev "$b"); done
    "$VBLKD" --log-level warn --control none "${args[@]}" --export "bdev=d0,socket=$TMP/$name.sock,queues=$q" \
        >"$TMP/$name.out" 2>>"$TMP/$name.err" &
    PIDS+=($!)
    eval "PID_${name//-/_}=$!"
    wait_sock "$TMP/$name.sock"
}
stop_all() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
# stats NAME KEY : a counter from a fresh SIGUSR1 dump of daemon NAME
stats() {
    local f=$TMP/$1.out n pid; n=$(wc -l <"$f"); eval "pid=\$PID_${1//-/_}"
    kill -USR1 "$pid"
    for _ in $(seq 100); do [ "$(wc -l <"$f")" -gt "$n" ] && break; sleep 0.02; done
    tail -n1 "$f" | python3 -c "import json,sys; d=json.load(sys.stdin)['d0']; print(d.get('$2', d.get('shared_cache', {}).get('$2')))"
}
bench() { local name=$1; shift; "$BENCH" --socket "$TMP/$name.sock" --bs 4096 --qd "${QD:-32}" --seconds "${RUN_SECS:-$SECS}" "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])$2)" "$1"; }
best() { # JSON lines on stdin -> the one with the highest IOPS
    python3 -c "import json,sys; r=[json.loads(l) for l in sys.stdin if l.strip()]; print(json.dumps(max(r, key=lambda x: x['iops'])))"
}
HOT="--rw randread --hot-pct 90 --hot-set-pct 10 --span-mib $CORE_MIB"
ALLHIT="--rw randread --span-mib $HALF"

# ---- A. 90/10 hot/cold: file alone vs cache-wt over the file ----
start file 1 "driver=file,name=d0,path=$TMP/core.img,direct=on"
start cwt 2 "$FILE_BDEV" "$CACHE_DEV" "driver=cache,name=d0,cache=cd,core=core,mode=wt,seq-cutoff=off"
RUN_SECS=$((SECS * 2)) bench cwt $HOT >/dev/null   # warm-up
: >"$TMP/A.file"; : >"$TMP/A.cache"
for i in $(seq "$ROUNDS"); do
    R=$(bench file $HOT); echo "{\"part\":\"A\",\"side\":\"file\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/A.file"
    h0=$(stats cwt read_hits); m0=$(stats cwt read_misses); p0=$(stats cwt read_partial_hits)
    R=$(bench cwt $HOT)
    h1=$(stats cwt read_hits); m1=$(stats cwt read_misses); p1=$(stats cwt read_partial_hits)
    HR=$(python3 -c "h=$h1-$h0; t=h+($m1-$m0)+($p1-$p0); print(round(h/t,3) if t else 0)")
    R=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['hit_ratio']=$HR; print(json.dumps(d))" "$R")
    echo "{\"part\":\"A\",\"side\":\"cache-wt\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/A.cache"
done
A_FILE=$(best <"$TMP/A.file"); A_CACHE=$(best <"$TMP/A.cache")

# ---- B and C. all-hit randread: cache device alone vs cache-wt (1 and 2 queues) ----
start cdev 2 "driver=malloc,name=d0,size=$CACHE"
# Fill the device alone's span by writing it: unwritten malloc memory reads as the kernel's shared zero
# page, always in the CPU's caches (the cache device's lines hold real pages: its fills wrote them).
"$BENCH" --socket "$TMP/cdev.sock" --rw write --bs 131072 --qd 4 --seconds 3 --span-mib "$HALF" >/dev/null
bench cwt $ALLHIT >/dev/null; bench cwt $ALLHIT --queues 2 >/dev/null   # warm the half-cache span
: >"$TMP/B.dev"; : >"$TMP/B.cache"; : >"$TMP/C.1"; : >"$TMP/C.2"; : >"$TMP/C.dev1"; : >"$TMP/B.dev2"; : >"$TMP/B1.dev"; : >"$TMP/B1.cache"
for i in $(seq "$ROUNDS"); do
    R=$(bench cdev $ALLHIT --poll); echo "{\"part\":\"B\",\"side\":\"cachedev\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/B.dev"
    R=$(bench cwt $ALLHIT --poll); echo "{\"part\":\"B\",\"side\":\"cache-wt-1q\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/B.cache"
    # C: sleeping clients (two polling clients and two pollers would oversubscribe 2 vCPUs), so its
    # 1-queue references are measured the same way.
    R=$(bench cwt $ALLHIT); echo "{\"part\":\"C\",\"side\":\"cache-wt-1q\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/C.1"
    R=$(bench cwt $ALLHIT --queues 2); echo "{\"part\":\"C\",\"side\":\"cache-wt-2q\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/C.2"
    R=$(bench cdev $ALLHIT); echo "{\"part\":\"C\",\"side\":\"cachedev-1q\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/C.dev1"
    R=$(bench cdev $ALLHIT --queues 2); echo "{\"part\":\"C\",\"side\":\"cachedev-2q\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/B.dev2"
    # B1: the same at QD 1, where what a hit costs shows as latency.
    R=$(QD=1 bench cdev $ALLHIT --poll); echo "{\"part\":\"B1\",\"side\":\"cachedev-qd1\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/B1.dev"
    R=$(QD=1 bench cwt $ALLHIT --poll); echo "{\"part\":\"B1\",\"side\":\"cache-wt-qd1\",\"round\":$i,\"result\":$R}"; echo "$R" >>"$TMP/B1.cache"
done
B_DEV=$(best <"$TMP/B.dev"); B_CACHE=$(best <"$TMP/B.cache"); C_2=$(best <"$TMP/C.2"); B_DEV2=$(best <"$TMP/B.dev2")
C_1=$(best <"$TMP/C.1"); C_DEV1=$(best <"$TMP/C.dev1")
B1_DEV=$(best <"$TMP/B1.dev"); B1_CACHE=$(best <"$TMP/B1.cache")
stop_all

# ---- D. wb burst and clean-down ----
# D1: cleaner=acp cleans during the burst; clean-down = time until dirty_lines = 0 afterwards.
start cwb 1 "$FILE_BDEV" "$CACHE_DEV" \
      "driver=cache,name=d0,cache=cd,core=core,mode=wb,cleaner=acp,clean-batch=256,seq-cutoff=off"
WB=$(bench cwb --rw randwrite --span-mib "$HALF")
MDR=$(stats cwb md_rounds); MDW=$(stats cwb md_waiters); MDP=$(stats cwb md_pages)
t0=$(date +%s.%N); d=$(stats cwb dirty_lines); d0=$d
while [ "$d" != 0 ]; do sleep 0.1; d=$(stats cwb dirty_lines); done
CLEAN=$(python3 -c "print(round($(date +%s.%N)-$t0,2))")
echo "{\"part\":\"D\",\"side\":\"wb-burst-acp\",\"dirty_lines_after_burst\":$d0,\"clean_down_s\":$CLEAN,\"md_rounds\":$MDR,\"md_waiters\":$MDW,\"md_pages\":$MDP,\"result\":$WB}"
stop_all
# D2: cleaner=nop (nothing cleans during the burst); clean-down = one `cache-flush` (every dirty line
# written back to the file, then the file flushed).
CTL=$TMP/ctl.sock
"$VBLKD" --log-level warn --control "$CTL" --bdev "$FILE_BDEV" --bdev "$CACHE_DEV" \
    --bdev "driver=cache,name=d0,cache=cd,core=core,mode=wb,cleaner=nop,seq-cutoff=off" \
    --export "bdev=d0,socket=$TMP/cnop.sock,queues=1" >"$TMP/cnop.out" 2>>"$TMP/cnop.err" &
PIDS+=($!); PID_cnop=$!
wait_sock "$TMP/cnop.sock"
WB2=$(bench cnop --rw randwrite --span-mib "$HALF")
d2=$(stats cnop dirty_lines)
MDR2=$(stats cnop md_rounds); MDW2=$(stats cnop md_waiters)
t0=$(date +%s.%N); "$VBLKD" ctl --control "$CTL" cache-flush d0 >/dev/null
CLEAN2=$(python3 -c "print(round($(date +%s.%N)-$t0,2))")
echo "{\"part\":\"D\",\"side\":\"wb-burst-nop\",\"dirty_lines_after_burst\":$d2,\"clean_down_s\":$CLEAN2,\"md_rounds\":$MDR2,\"md_waiters\":$MDW2,\"result\":$WB2}"
stop_all

paired() { # FILE REF-FILE KEY: median and range of the per-round ratios (the sides ran back to back)
    python3 - "$1" "$2" "$3" <<'PY'
import json, statistics, sys
a = [json.loads(l)[sys.argv[3]] for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l)[sys.argv[3]] for l in open(sys.argv[2]) if l.strip()]
r = sorted(x / y for x, y in zip(a, b))
print(f"paired rounds: median {statistics.median(r):.2f} ({r[0]:.2f}-{r[-1]:.2f})")
PY
}
row() { # label json reference-json note
    local r; r=$(python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(round(a['iops']/b['iops'],2))" "$2" "$3")
    echo "| $1 | $(field "$2" "['iops']") | $(field "$2" "['p50_us']") | $(field "$2" "['p99_us']") | $r | $4 |"
}
{
    echo "| run (best of $ROUNDS × ${SECS} s) | IOPS | p50 µs | p99 µs | ratio | note |"
    echo "|---|---|---|---|---|---|"
    row "A file alone, 90/10" "$A_FILE" "$A_FILE" "reference"
    row "A cache-wt over the file, 90/10" "$A_CACHE" "$A_FILE" "hit ratio $(field "$A_CACHE" "['hit_ratio']"); ratio vs the file alone"
    row "B cache device alone (malloc), all-hit" "$B_DEV" "$B_DEV" "reference"
    row "B cache-wt, all-hit, 1 queue" "$B_CACHE" "$B_DEV" "ratio vs the cache device; $(paired "$TMP/B.cache" "$TMP/B.dev" iops)"
    row "B1 cache device alone, all-hit, QD 1" "$B1_DEV" "$B1_DEV" "reference"
    row "B1 cache-wt, all-hit, QD 1" "$B1_CACHE" "$B1_DEV" "ratio vs the cache device; p50 ratio $(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['p50_us']/json.loads(sys.argv[2])['p50_us'],3))" "$B1_CACHE" "$B1_DEV"); p50 $(paired "$TMP/B1.cache" "$TMP/B1.dev" p50_us)"
    row "C cache-wt, all-hit, 2 queues" "$C_2" "$C_1" "ratio vs 1 queue ($(field "$C_1" "['iops']")); $(paired "$TMP/C.2" "$TMP/C.1" iops)"
    row "C cache device alone, 2 queues" "$B_DEV2" "$C_DEV1" "ratio vs 1 queue ($(field "$C_DEV1" "['iops']"))"
    row "D1 wb randwrite burst, cleaner=acp" "$WB" "$WB" "$d0 dirty lines left, clean in $CLEAN s; $MDW acks in $MDR record rounds ($MDP pages)"
    row "D2 wb randwrite burst, cleaner=nop" "$WB2" "$WB" "$d2 dirty lines, cache-flush $CLEAN2 s; $MDW2 acks in $MDR2 record rounds; ratio vs D1"
} >&2
