#!/usr/bin/env bash
# Part D of bench/cache.sh (wb 4 KiB randwrite burst, cleaner=acp) for two vblkd binaries, alternating
# run by run in one invocation, so a change to the cleaner is measured against its base on the same
# machine at the same time.
#
#   bench/cache_acp.sh OLD_VBLKD [NEW_VBLKD] [SECONDS] [ROUNDS] [CORE_SIZE] [CACHE_SIZE]
#   # defaults: NEW = target/release/vblkd (built), 5 s, 5 rounds, 1G core, 256M cache
#
# Every round runs, each with a fresh daemon: OLD acp | NEW acp | NEW nop (the nop burst is the
# ceiling: nothing cleans during it). A run is a burst over half the cache (QD 32, 1 queue, same
# client), then the time until dirty_lines = 0 (acp) — the core is a file on the real disk with
# direct=on (filled with random data once), the cache device malloc, as in bench/cache.sh.
# Raw JSON lines on stdout, a table (best of ROUNDS per side) on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(realpath "$1")
NEW=${2:-}
SECS=${3:-5}
ROUNDS=${4:-5}
CORE=${5:-1G}
CACHE=${6:-256M}
cargo build --release --bin vblkd --bin vblkd-bench >&2
NEW=$(realpath "${NEW:-target/release/vblkd}")
BENCH=$PWD/target/release/vblkd-bench
mkdir -p target/bench
TMP=$(mktemp -d -p "$PWD/target/bench" cache-acp.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
CORE_MIB=$(( $(numfmt --from=iec "$CORE") >> 20 ))
HALF=$(( ($(numfmt --from=iec "$CACHE") >> 20) / 2 ))
truncate -s "$CORE" "$TMP/core.img"
dd if=/dev/urandom of="$TMP/core.img" bs=1M count="$CORE_MIB" conv=notrunc,fsync status=none

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }
stats() { # KEY: from a fresh SIGUSR1 dump of the running daemon
    local f=$TMP/d.out n; n=$(wc -l <"$f")
    kill -USR1 "$PID"
    for _ in $(seq 100); do [ "$(wc -l <"$f")" -gt "$n" ] && break; sleep 0.02; done
    tail -n1 "$f" | python3 -c "import json,sys; d=json.load(sys.stdin)['d0']; print(d.get('$1', d.get('shared_cache', {}).get('$1')))"
}
run() { # SIDE BINARY CLEANER
    rm -f "$TMP/d.sock"; : >"$TMP/d.out"
    "$2" --log-level warn --control none --bdev "driver=file,name=core,path=$TMP/core.img,direct=on" \
        --bdev "driver=malloc,name=cd,size=$CACHE" \
        --bdev "driver=cache,name=d0,cache=cd,core=core,mode=wb,cleaner=$3,clean-batch=256,seq-cutoff=off" \
        --export "bdev=d0,socket=$TMP/d.sock,queues=1" >"$TMP/d.out" 2>>"$TMP/d.err" &
    PID=$!
    wait_sock "$TMP/d.sock"
    local r d0 d t0 clean=null
    r=$("$BENCH" --socket "$TMP/d.sock" --bs 4096 --qd 32 --seconds "$SECS" --rw randwrite --span-mib "$HALF")
    d0=$(stats dirty_lines)
    if [ "$3" = acp ]; then
        t0=$(date +%s.%N); d=$d0
        while [ "$d" != 0 ]; do sleep 0.1; d=$(stats dirty_lines); done
        clean=$(python3 -c "print(round($(date +%s.%N)-$t0,2))")
    fi
    echo "{\"side\":\"$1\",\"round\":$i,\"dirty_lines_after_burst\":$d0,\"clean_down_s\":$clean,\"cleaner_writes\":$(stats cleaner_writes),\"md_rounds\":$(stats md_rounds),\"md_waiters\":$(stats md_waiters),\"result\":$r}" | tee -a "$TMP/$1"
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=
}
echo "# $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)" >&2
for i in $(seq "$ROUNDS"); do
    run old-acp "$OLD" acp
    run new-acp "$NEW" acp
    run new-nop "$NEW" nop
done
python3 - "$TMP" >&2 <<'PY'
import json, os, sys
best = {}
for side in ("old-acp", "new-acp", "new-nop"):
    rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], side))]
    best[side] = max(rows, key=lambda x: x["result"]["iops"])
    best[side]["all"] = [round(x["result"]["iops"] / 1000, 1) for x in rows]
print("| side | best IOPS | p50 µs | p99 µs | vs old-acp | dirty after | clean-down s | every run (k IOPS) |")
print("|---|---|---|---|---|---|---|---|")
for side, b in best.items():
    r = b["result"]
    print(f"| {side} | {r['iops']:.0f} | {r['p50_us']} | {r['p99_us']} | {r['iops'] / best['old-acp']['result']['iops']:.2f} "
          f"| {b['dirty_lines_after_burst']} | {b['clean_down_s']} | {'/'.join(map(str, b['all']))} |")
PY
