#!/usr/bin/env bash
# Boot the test guest under libvirt (TCG) on a vblkd export, run a write/read/compare loop, and
# restart vblkd twice while the loop runs. Used by tests/libvirt_guest.rs.
#
#   qemu/libvirt-guest.sh --vblkd PATH [--rounds N] [--restarts N] [--timeout SECS] [--keep]
#
# Everything lives in one fresh temporary directory: vblkd's disk image and socket, the guest kernel,
# initrd and console log, and libvirt's whole state. The script re-runs itself in a private mount
# namespace (unshare -m) in which /etc/libvirt (a copy, default qemu.conf: QEMU runs as the
# non-root user libvirt-qemu), /run, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are
# bind-mounted from that directory, so it touches nothing outside it and concurrent runs do not meet.
# It is also PID 1 of a private PID namespace (unshare -p): libvirt daemonizes QEMU and its probes
# and waits for them to be gone, and a container's init that reaps orphans late made libvirtd's
# start and `virsh start` take 16 s and 65 s instead of 3 s and 13 s; here bash reaps them at once,
# and everything left in the namespace dies with the script.
# No systemd: virtlogd and libvirtd are started with -d and stopped by their PIDs.
#
# The domain XML is the README's (memfd shared memory, <disk type='vhostuser'> with queues='2' and
# reconnect), with the guest's kernel and initrd. vblkd serves a file bdev with
# socket-group=libvirt-qemu,socket-mode=0660: the only thing that lets QEMU, running as
# libvirt-qemu, connect.
#
# Output: timestamped progress; per restart, the time vblkd took to stop and to listen again and the
# longest pause between two loop rounds the host saw. Exit status 0 when the guest printed
# VBLKD-GUEST-RESULT: PASS; 1 on FAIL; 2 when there was no result (timeout); 3 on a setup error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "libvirt-guest: ERROR: $*" >&2; exit 3; }
log() { echo "libvirt-guest: $(date +%T.%3N) $*" >&2; }

vblkd="" rounds=30 restarts=2 timeout_s=240 keep=0
args=("$@")
while [[ $# -gt 0 ]]; do
    case "$1" in
        --vblkd) vblkd="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --restarts) restarts="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
[[ -x "$vblkd" ]] || die "--vblkd PATH (the vblkd binary) is required"
[[ "$rounds" =~ ^[1-9][0-9]*$ && "$restarts" =~ ^[0-9]+$ && "$timeout_s" =~ ^[1-9][0-9]*$ ]] ||
    die "bad --rounds/--restarts/--timeout"
for tool in virsh libvirtd virtlogd unshare qemu-system-x86_64 cpio; do
    command -v "$tool" >/dev/null || die "missing $tool (run qemu/deps.sh)"
done
[[ $(id -u) -eq 0 ]] || die "must run as root (it starts a system libvirtd in a private namespace)"

# --- re-run inside a private mount namespace ---------------------------------------------------
if [[ -z "${VBLKD_LIBVIRT_NS:-}" ]]; then
    export VBLKD_LIBVIRT_NS=1
    exec unshare --mount --propagation private --pid --fork --mount-proc "$0" "${args[@]}"
fi

img="$("$HERE/build-guest.sh")" || die "guest build failed"
T="$(mktemp -d "${TMPDIR:-/tmp}/vblkd-libvirt.XXXXXX")"
# QEMU runs as libvirt-qemu: it must traverse this directory to reach the socket, kernel and initrd.
chmod 0711 "$T"
dom="vblkd-test-$(basename "$T" | tr -c 'A-Za-z0-9\n' -)"
vpid="" lpid="" ldpid=""
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    set +e
    if [[ -n "$lpid" ]] && kill -0 "$lpid" 2>/dev/null; then
        virsh -q destroy "$dom" >/dev/null 2>&1
        virsh -q undefine "$dom" >/dev/null 2>&1
        kill "$lpid" 2>/dev/null
    fi
    [[ -n "$ldpid" ]] && kill "$ldpid" 2>/dev/null
    [[ -n "$vpid" ]] && kill -9 "$vpid" 2>/dev/null
    for p in $lpid $ldpid; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
    done
    if [[ $keep -eq 1 ]]; then echo "libvirt-guest: kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

# --- libvirt state in $T ------------------------------------------------------------------------
mkdir -p "$T/etc" "$T/run" "$T/lib" "$T/cache" "$T/log"
cp -a /etc/libvirt "$T/etc/libvirt"
rm -f "$T"/etc/libvirt/qemu/networks/autostart/* "$T"/etc/libvirt/qemu/*.xml
grep -Eq '^[[:space:]]*user[[:space:]]*=' "$T/etc/libvirt/qemu.conf" &&
    die "/etc/libvirt/qemu.conf sets a QEMU user; this test wants the default (non-root) one"
cp -a /var/lib/libvirt/. "$T/lib/" 2>/dev/null || true
# QEMU capabilities probed by an earlier run (libvirt re-probes when the binary, libvirt or the kernel
# changed): only a cache, copied in and out; probing costs ~1 minute of a loaded 2-core machine.
caps_cache="${VBLKD_GUEST_CACHE:-$HOME/.cache/vblkd-guest}/libvirt-qemu-capabilities"
mkdir -p "$T/cache/qemu/capabilities"
if [[ -d "$caps_cache" ]]; then
    cp -a "$caps_cache/." "$T/cache/qemu/capabilities/" 2>/dev/null || true
fi
mount --bind "$T/etc/libvirt" /etc/libvirt
mount --bind "$T/run" /run
mount --bind "$T/lib" /var/lib/libvirt
mount --bind "$T/cache" /var/cache/libvirt
mount --bind "$T/log" /var/log/libvirt

# --- guest: kernel, initrd with the workload ----------------------------------------------------
cp "$img/vmlinuz" "$T/vmlinuz"
mkdir -p "$T/root/workload"
cp "$HERE/workloads/common.sh" "$HERE/workloads/restart-loop.sh" "$T/root/workload/"
echo restart-loop.sh >"$T/root/workload/list"
printf 'GUEST_QUEUES=2\nGUEST_TIMEOUT=%d\nLOOP_ROUNDS=%d\nexport GUEST_QUEUES GUEST_TIMEOUT LOOP_ROUNDS\n' \
    "$((timeout_s - 20))" "$rounds" >"$T/root/workload/env"
(cd "$T/root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) \
    >"$T/workload.cpio"
cat "$img/initramfs.cpio.gz" "$T/workload.cpio" >"$T/initrd"

# --- vblkd ---------------------------------------------------------------------------------------
sock="$T/vblkd.sock"
vblkd_args=(--log-level info --control none --bdev "driver=file,name=d0,path=$T/disk.img,size=128M"
    --export "bdev=d0,socket=$sock,queues=2,socket-group=libvirt-qemu,socket-mode=0660")
start_vblkd() {
    local t0 n=0
    t0=$(date +%s%N)
    "$vblkd" "${vblkd_args[@]}" </dev/null >>"$T/vblkd.log" 2>&1 &
    vpid=$!
    # The socket file appears when vblkd binds it, microseconds before it listens.
    until [[ -S "$sock" ]]; do
        kill -0 "$vpid" 2>/dev/null || { cat "$T/vblkd.log" >&2; die "vblkd exited at start"; }
        n=$((n + 1))
        [[ $n -lt 2000 ]] || die "vblkd did not listen within 20 s"
        sleep 0.01
    done
    listen_ms=$((($(date +%s%N) - t0) / 1000000))
}
stop_vblkd() {
    local t0 rc=0
    t0=$(date +%s%N)
    kill -TERM "$vpid"
    wait "$vpid" || rc=$?
    stop_ms=$((($(date +%s%N) - t0) / 1000000))
    vpid=""
    [[ $rc -eq 0 ]] || { cat "$T/vblkd.log" >&2; die "vblkd exited $rc on SIGTERM"; }
}
start_vblkd
log "vblkd listening on $sock ($(stat -c '%A %U:%G' "$sock")) after ${listen_ms} ms"

# --- libvirt daemons (no systemd) ---------------------------------------------------------------
virtlogd -d -p "$T/run/virtlogd.pid"
for _ in $(seq 100); do [[ -s "$T/run/virtlogd.pid" ]] && break; sleep 0.1; done
ldpid="$(cat "$T/run/virtlogd.pid")"
libvirtd -d -p "$T/run/libvirtd.pid"
for _ in $(seq 300); do [[ -s "$T/run/libvirtd.pid" ]] && virsh -q version >/dev/null 2>&1 && break; sleep 0.1; done
lpid="$(cat "$T/run/libvirtd.pid")"
virsh -q version >/dev/null || die "libvirtd did not answer"
log "virtlogd pid $ldpid, libvirtd pid $lpid ($(libvirtd --version))"

# --- the domain (README's XML + the test guest) ------------------------------------------------
cat >"$T/domain.xml" <<XML
<domain type='qemu'>
  <name>$dom</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$T/vmlinuz</kernel>
    <initrd>$T/initrd</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 rdinit=/init</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='maximum'/>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='2'/>
      <source type='unix' path='$sock'><reconnect enabled='yes' timeout='1'/></source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='$T/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
XML
timeout 60 virsh -q define "$T/domain.xml" >/dev/null
save_caps() {
    mkdir -p "$caps_cache.tmp.$$" && cp -a "$T/cache/qemu/capabilities/." "$caps_cache.tmp.$$/" &&
        rm -rf "$caps_cache" && mv "$caps_cache.tmp.$$" "$caps_cache" || rm -rf "$caps_cache.tmp.$$"
}
# With <reconnect>, QEMU retries a socket it cannot open (e.g. wrong group or mode) and `virsh start`
# waits for minutes: bound it.
timeout 120 virsh -q start "$dom" >/dev/null || {
    tail -n 30 "$T"/log/qemu/*.log >&2 || true
    ls -l "$sock" >&2 || true
    die "virsh start failed or took over 120 s (can QEMU, as libvirt-qemu, open $sock?)"
}
qemu_user="$(ps -o user= -p "$(cat "$T/run/libvirt/qemu/$dom.pid")" 2>/dev/null || echo '?')"
log "domain $dom started (QEMU runs as $qemu_user)"
save_caps 2>/dev/null || true
[[ "$qemu_user" != root ]] || die "QEMU runs as root; the test wants libvirt's default non-root user"

console() { tr -d '\r' <"$T/console.log" 2>/dev/null || true; }
last_round() { console | grep -a '^VBLKD-LOOP: ' | tail -n1 | awk '{print $2}' || true; }

# --- restart vblkd while the loop runs; watch the rounds ---------------------------------------
deadline=$(($(date +%s) + timeout_s))
declare -a restart_at=()
for r in $(seq 1 "$restarts"); do restart_at+=($((rounds * r / (restarts + 1)))); done
seen=-1 seen_t=0 max_gap_ms=0 next=0 result=""
while :; do
    result="$(console | grep -a '^VBLKD-GUEST-RESULT: ' | tail -n1 || true)"
    [[ -n "$result" ]] && break
    if [[ $(date +%s) -ge $deadline ]]; then
        result="" && break
    fi
    cur="$(last_round)"
    now=$(date +%s%N)
    if [[ -n "$cur" && "$cur" != "$seen" ]]; then
        if [[ $seen -ge 0 ]]; then
            gap=$(((now - seen_t) / 1000000))
            [[ $gap -gt $max_gap_ms ]] && max_gap_ms=$gap
        fi
        seen="$cur" seen_t=$now
        echo "$(date +%T.%3N) round $cur state $(virsh -q domstate "$dom" 2>&1)" >>"$T/rounds.log"
        if [[ $next -lt ${#restart_at[@]} && $cur -ge ${restart_at[$next]} ]]; then
            stop_vblkd
            start_vblkd
            next=$((next + 1))
            log "restart $next after round $cur: vblkd stopped in ${stop_ms} ms, listening again after ${listen_ms} ms"
        fi
    fi
    sleep 0.05
done
log "longest pause between two loop rounds seen by the host: ${max_gap_ms} ms (restarts done: $next)"
virsh -q destroy "$dom" >/dev/null 2>&1 || true
console | grep -a -E '^(VBLKD-|guest:|FAIL|  )' | sed 's/^/  | /' >&2 || true
stop_vblkd
log "vblkd stopped in ${stop_ms} ms (exit 0)"
[[ $next -eq $restarts ]] || { echo "libvirt-guest: FAIL: only $next of $restarts restarts happened" >&2; exit 1; }
case "$result" in
    "VBLKD-GUEST-RESULT: PASS"*) log "$result"; exit 0 ;;
    "VBLKD-GUEST-RESULT: FAIL"*) log "$result"; exit 1 ;;
    *)
        echo "libvirt-guest: FAIL: no result within ${timeout_s}s; console tail:" >&2
        console | tail -n 20 | sed 's/^/  | /' >&2
        tail -n 20 "$T"/log/qemu/*.log 2>/dev/null | sed 's/^/  qemu-log| /' >&2 || true
        exit 2
        ;;
esac
