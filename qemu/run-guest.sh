#!/usr/bin/env bash
# Boot the test guest against a running vhost-user-blk backend socket and run
# workload scripts inside it.
#
#   qemu/run-guest.sh --socket PATH [options] WORKLOAD...
#
# WORKLOAD is a name in qemu/workloads/ (with or without .sh) or a path to a
# busybox-sh script; several run in order in one boot. Options:
#   --socket PATH     vhost-user socket of the backend (required; must exist)
#   --queues N        num-queues of vhost-user-blk-pci (default 1)
#   --mem SIZE        guest memory, also the memfd backend size (default 1G)
#   --smp N           vCPUs (default 2)
#   --reconnect SECS  add reconnect=SECS to the chardev (QEMU re-connects to a
#                     restarted backend)
#   --timeout SECS    host-side limit for the whole boot (default
#                     $VBLKD_GUEST_TIMEOUT or 300); QEMU is killed after it
#   --env K=V         export K=V to the workloads (repeatable)
#   --log FILE        also write the guest console to FILE
#   --quiet           do not echo the console (the log and summary still are)
#
# Environment: VBLKD_GUEST_ACCEL=tcg|kvm (default tcg: KVM guests hang after
# the firmware on some hosts), VBLKD_GUEST_CACHE (see build-guest.sh),
# VBLKD_QEMU (default qemu-system-x86_64), VBLKD_GUEST_TIMEOUT,
# VBLKD_GUEST_CPU (the -cpu model; default max under TCG, host under KVM).
#
# Exit status: 0 when the guest printed "VBLKD-GUEST-RESULT: PASS"; 1 when it
# printed FAIL; 2 when it printed no result (timeout, crash, panic); 3 on a
# setup error. The last lines printed are a summary with each workload's
# result and time.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "run-guest: ERROR: $*" >&2; exit 3; }

socket="" queues=1 mem=1G smp=2 reconnect="" log="" quiet=0
timeout_s="${VBLKD_GUEST_TIMEOUT:-300}"
envs=() workloads=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --socket) socket="$2"; shift 2 ;;
        --queues) queues="$2"; shift 2 ;;
        --mem) mem="$2"; shift 2 ;;
        --smp) smp="$2"; shift 2 ;;
        --reconnect) reconnect="$2"; shift 2 ;;
        --timeout) timeout_s="$2"; shift 2 ;;
        --env) envs+=("$2"); shift 2 ;;
        --log) log="$2"; shift 2 ;;
        --quiet) quiet=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --*) die "unknown option $1" ;;
        *) workloads+=("$1"); shift ;;
    esac
done
[[ -n "$socket" ]] || die "--socket is required"
[[ -S "$socket" ]] || die "$socket is not a listening socket (is the backend running?)"
[[ ${#workloads[@]} -gt 0 ]] || die "no workload given"
[[ "$queues" =~ ^[1-9][0-9]*$ ]] || die "bad --queues $queues"
[[ "$timeout_s" =~ ^[1-9][0-9]*$ ]] || die "bad --timeout $timeout_s"

qemu="${VBLKD_QEMU:-qemu-system-x86_64}"
command -v "$qemu" >/dev/null || die "$qemu not found (run qemu/deps.sh)"
accel="${VBLKD_GUEST_ACCEL:-tcg}"
case "$accel" in
    tcg) cpu=max ;;
    kvm) [[ -w /dev/kvm ]] || die "VBLKD_GUEST_ACCEL=kvm but /dev/kvm is not usable"; cpu=host ;;
    *) die "VBLKD_GUEST_ACCEL must be tcg or kvm, not '$accel'" ;;
esac
cpu="${VBLKD_GUEST_CPU:-$cpu}"

img="$("$HERE/build-guest.sh")" || die "guest build failed"
[[ -e "$img/vmlinuz" && -e "$img/initramfs.cpio.gz" ]] || die "bad guest build at $img"

work="$(mktemp -d "${TMPDIR:-/tmp}/vblkd-guest.XXXXXX")"
qpid=""
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    if [[ -n "$qpid" ]]; then kill -9 "$qpid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# --- workload archive, appended to the base initramfs ------------------------
mkdir -p "$work/root/workload"
cp "$HERE/workloads/common.sh" "$work/root/workload/common.sh"
: >"$work/root/workload/list"
for w in "${workloads[@]}"; do
    src="$w"
    [[ -f "$src" ]] || src="$HERE/workloads/$w"
    [[ -f "$src" ]] || src="$HERE/workloads/$w.sh"
    [[ -f "$src" ]] || die "workload '$w' not found"
    name="$(basename "$src")"
    cp "$src" "$work/root/workload/$name"
    echo "$name" >>"$work/root/workload/list"
done
# The guest-side per-workload timeout leaves the host room to see the result.
guest_timeout=$((timeout_s > 60 ? timeout_s - 20 : timeout_s))
{
    printf 'GUEST_QUEUES=%q\nexport GUEST_QUEUES\n' "$queues"
    printf 'GUEST_TIMEOUT=%q\nexport GUEST_TIMEOUT\n' "$guest_timeout"
    for kv in "${envs[@]}"; do
        [[ "$kv" == *=* && "${kv%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad --env '$kv'"
        printf '%s=%q\nexport %s\n' "${kv%%=*}" "${kv#*=}" "${kv%%=*}"
    done
} >"$work/root/workload/env"
(cd "$work/root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) >"$work/workload.cpio"
# The base image is padded to 4 bytes by build-guest.sh.
cat "$img/initramfs.cpio.gz" "$work/workload.cpio" >"$work/initrd"

chardev="socket,id=c0,path=$socket"
[[ -n "$reconnect" ]] && chardev+=",reconnect=$reconnect"

cmd=(
    "$qemu" -machine "q35,accel=$accel" -cpu "$cpu" -smp "$smp" -m "$mem"
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa "node,memdev=mem"
    -kernel "$img/vmlinuz" -initrd "$work/initrd"
    -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"
    -chardev "$chardev" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues"
    -nodefaults -display none -serial stdio -monitor none -no-reboot
)
echo "run-guest: ${cmd[*]}" >&2
console="$work/console.log"
start=$(date +%s.%N)
# QEMU runs in its own process group so the timeout can kill it reliably.
set +e
setsid "${cmd[@]}" </dev/null >"$console" 2>&1 &
qpid=$!
if [[ $quiet -eq 0 ]]; then
    tail -n +1 -f --pid="$qpid" "$console" &
fi
timed_out=0
deadline=$(($(date +%s) + timeout_s))
while kill -0 "$qpid" 2>/dev/null; do
    if [[ $(date +%s) -ge $deadline ]]; then
        timed_out=1
        kill -TERM "$qpid" 2>/dev/null
        sleep 2
        kill -KILL "$qpid" 2>/dev/null
        break
    fi
    sleep 0.5
done
wait "$qpid"
qrc=$?
qpid=""
wait 2>/dev/null # the tail
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}')
[[ -n "$log" ]] && cp "$console" "$log"

result="$(tr -d '\r' <"$console" | grep -a '^VBLKD-GUEST-RESULT: ' | tail -n1 || true)"
echo "run-guest: ---- summary (boot ${elapsed}s, qemu exit $qrc) ----" >&2
tr -d '\r' <"$console" | grep -a '^VBLKD-GUEST-WORKLOAD: ' | sed 's/^/run-guest: /' >&2 || true
if [[ $timed_out -eq 1 ]]; then
    echo "run-guest: FAIL: no result within ${timeout_s}s; QEMU killed" >&2
    exit 2
fi
case "$result" in
    "VBLKD-GUEST-RESULT: PASS"*) echo "run-guest: $result" >&2; exit 0 ;;
    "VBLKD-GUEST-RESULT: FAIL"*) echo "run-guest: $result" >&2; exit 1 ;;
    *)
        echo "run-guest: FAIL: guest printed no VBLKD-GUEST-RESULT line (qemu exit $qrc); last console lines:" >&2
        tr -d '\r' <"$console" | tail -n 20 | sed 's/^/  | /' >&2
        exit 2
        ;;
esac
