#!/bin/bash
# bench/hitcost.sh SECS ROUNDS SPAN_MIB (OLD=binary NEW=binary BENCH=vblkd-bench) : all-hit 4K randread, polling client, 1 queue; device (256M,
# new binary) vs cache-wt (256M cache device over a 1G malloc core) old and new binaries,
# alternating, QD 32 and QD 1.
# KIND=malloc (default): the device and the cache device are malloc bdevs; KIND=file: files on tmpfs
# (/dev/shm), the file engine's defaults.
SECS=$1; ROUNDS=$2; SPAN=$3
cd "$(dirname "$0")/.."
BENCH=${BENCH:-target/release/vblkd-bench}; T=$(mktemp -d); PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null; wait 2>/dev/null; rm -rf $T' EXIT
ws(){ for _ in $(seq 400); do [ -S "$1" ] && return; sleep 0.05; done; }
KIND=${KIND:-malloc}
dev(){ if [ "$KIND" = file ]; then echo "driver=file,name=$1,path=/dev/shm/hitcost-$$-$1.img,size=256M"; else echo "driver=malloc,name=$1,size=256M"; fi; }
trap 'kill ${PIDS[@]} 2>/dev/null; wait 2>/dev/null; rm -rf $T /dev/shm/hitcost-$$-*' EXIT
${NEW:-target/release/vblkd} --log-level warn --control none --bdev $(dev d0) --export bdev=d0,socket=$T/dev.sock,queues=1 >/dev/null 2>&1 & PIDS+=($!); ws $T/dev.sock
OLD=${OLD:-/tmp/vblkd-old}; NEW=${NEW:-target/release/vblkd}; old=$OLD; new=$NEW
for b in old new; do ${!b} --log-level warn --control none --bdev $(dev cd$b | sed 's/name=cd[a-z]*/name=cd/') --bdev driver=malloc,name=core,size=1G --bdev driver=cache,name=d0,cache=cd,core=core,mode=wt,seq-cutoff=off --export bdev=d0,socket=$T/$b.sock,queues=1 >/dev/null 2>&1 & PIDS+=($!); ws $T/$b.sock; $BENCH --socket $T/$b.sock --rw read --bs 131072 --qd 4 --seconds 3 --span-mib $SPAN >/dev/null; done
# The device alone is filled by writing the span: read before any write, a malloc bdev's memory and a
# sparse tmpfs file give the kernel's one shared zero page, always in the CPU's caches (the cache
# device's lines hold real pages: its fills wrote them).
$BENCH --socket $T/dev.sock --rw write --bs 131072 --qd 4 --seconds 3 --span-mib $SPAN >/dev/null
run(){ $BENCH --socket $T/$1.sock --bs 4096 --rw randread --span-mib $SPAN --poll --seconds $SECS --qd $2 | python3 -c "import json,sys; d=json.load(sys.stdin); print(f\"{d['iops']:.0f} {d['p50_us']} {d['p99_us']}\")"; }
for r in $(seq $ROUNDS); do for qd in 32 1; do
  echo "round=$r qd=$qd dev=[$(run dev $qd)] old=[$(run old $qd)] new=[$(run new $qd)]"
done; done
