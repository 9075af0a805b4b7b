#!/usr/bin/env bash
# A one-node Ceph cluster for vblkd's rbd tests and benchmarks: 1 mon, 1 mgr, 1 OSD (memstore: RAM,
# 2 GiB), auth none, bound to 127.0.0.1, no systemd. Ceph's ports are fixed (3300, 6789, 6800+), so
# there is one such cluster per machine; its state lives in $VBLKD_CEPH_DIR (default /tmp/vblkd-ceph).
#
#   scripts/ceph-cluster.sh start    # bring it up unless it already answers; prints the ceph.conf path
#   scripts/ceph-cluster.sh stop     # stop the daemons (by pid file), keep nothing
#   scripts/ceph-cluster.sh status   # exit 0 when the cluster answers
#   scripts/ceph-cluster.sh pause|resume   # SIGSTOP/SIGCONT the OSD (an unreachable cluster, for tests)
#
# Needs the Debian packages ceph-mon ceph-osd ceph-mgr ceph-common (scripts/deps-ceph.sh).
set -euo pipefail

DIR=${VBLKD_CEPH_DIR:-/tmp/vblkd-ceph}
CONF=$DIR/ceph.conf
RUN=$DIR/run
C=(-c "$CONF")

log() { printf 'ceph-cluster: %s\n' "$*" >&2; }
# A pid that runs and is not a zombie.
running() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${st:0:1}" != Z ]; }
answers() { [ -f "$CONF" ] && timeout 5 ceph "${C[@]}" --connect-timeout 4 health >/dev/null 2>&1; }
# Up and usable: a monitor answers and pool rbd exists (a start that was killed half-way leaves a
# monitor without the pool; such a cluster is rebuilt).
ready() { answers && timeout 10 ceph "${C[@]}" --connect-timeout 4 osd pool ls 2>/dev/null | grep -qx rbd; }

stop_daemons() {
    local sig=${1:-TERM} pids=() f pid
    # The OSD first, so it can tell the monitor it is going down.
    for f in "$RUN"/osd.*.pid "$RUN"/mgr.*.pid "$RUN"/mon.*.pid; do
        [ -e "$f" ] || continue
        pid=$(cat "$f"); rm -f "$f"
        kill -CONT "$pid" 2>/dev/null || true
        kill -"$sig" "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 100); do
        local left=0
        for pid in "${pids[@]}"; do running "$pid" && left=1; done
        [ $left = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

osd_pid() { cat "$RUN"/osd.*.pid 2>/dev/null | head -n1; }

start() {
    # Tests in several processes share the one cluster: one starter at a time.
    mkdir -p "$(dirname "$DIR")"
    exec 9>"$DIR.lock"
    flock 9
    if ready; then
        echo "$CONF"
        return 0
    fi
    for t in ceph-mon ceph-osd ceph-mgr ceph monmaptool rbd; do
        command -v "$t" >/dev/null || { log "$t is missing: run scripts/deps-ceph.sh"; exit 3; }
    done
    mkdir -p "$RUN"
    stop_daemons KILL
    rm -rf "$DIR/mon" "$DIR/mgr" "$DIR/osd" "$DIR/log" "$DIR/monmap"
    mkdir -p "$DIR/mon" "$DIR/mgr/ceph-x" "$DIR/osd" "$DIR/log"
    local t0=$SECONDS fsid osd_uuid id
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$CONF" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:3300,v1:127.0.0.1:6789
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
mon warn on insecure global id reclaim allowed = false
run dir = $RUN
pid file = $RUN/\$name.pid
admin socket = $RUN/\$name.asok
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The test machines' disks are often > 70 % full: keep the monitor healthy anyway.
mon data avail warn = 2
mon data avail crit = 1
[mon]
mon data = $DIR/mon/\$cluster-\$id
[mgr]
mgr data = $DIR/mgr/\$cluster-\$id
mgr initial modules =
[osd]
osd data = $DIR/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 2147483648
memstore page set = true
osd memory target = 939524096
# A client that died (vblkd killed) keeps its watch, and so the image's exclusive lock, this long:
# a restarted vblkd's first write waits for it (Ceph's default is 30 s).
osd client watch timeout = 5
CONF
    monmaptool --create --fsid "$fsid" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$DIR/monmap" >/dev/null
    ceph-mon "${C[@]}" -i a --mkfs --monmap "$DIR/monmap"
    ceph-mon "${C[@]}" -i a 9>&-
    timeout 60 ceph "${C[@]}" mon stat >/dev/null
    log "monitor up ($((SECONDS - t0)) s)"
    ceph-mgr "${C[@]}" -i x 9>&-
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(ceph "${C[@]}" osd new "$osd_uuid")
    mkdir -p "$DIR/osd/ceph-$id"
    ceph-osd "${C[@]}" -i "$id" --mkfs --osd-uuid "$osd_uuid" 2>>"$DIR/log/osd-mkfs.log"
    ceph-osd "${C[@]}" -i "$id" 9>&-
    for _ in $(seq 240); do
        ceph "${C[@]}" osd dump 2>/dev/null | grep -q "^osd.$id up *in" && break
        sleep 0.5
    done
    log "osd.$id up ($((SECONDS - t0)) s)"
    ceph "${C[@]}" osd pool create rbd 8 8 replicated >/dev/null 2>&1
    ceph "${C[@]}" osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
    rbd "${C[@]}" pool init rbd
    for _ in $(seq 240); do
        timeout 10 ceph "${C[@]}" pg stat 2>/dev/null | grep -qE '^([0-9]+) pgs: \1 active\+clean' && break
        sleep 0.5
    done
    log "pool rbd ready ($((SECONDS - t0)) s): $(timeout 10 ceph "${C[@]}" health 2>&1)"
    echo "$CONF"
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons TERM; log "stopped" ;;
    status) ready ;;
    pause) kill -STOP "$(osd_pid)" ;;
    resume) kill -CONT "$(osd_pid)" ;;
    *) echo "usage: $0 start|stop|status|pause|resume" >&2; exit 2 ;;
esac
