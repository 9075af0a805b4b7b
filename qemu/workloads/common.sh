# Sourced by guest/init before each workload (busybox sh). Not executable.
# shellcheck shell=sh
set -eu
DISK=${GUEST_DISK:-/dev/vda}
DEV=${DISK##*/}

fail() { echo "FAIL: $*"; exit 1; }
note() { echo "  $*"; }

# Drop the guest page cache so the next read goes to the backend.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# sha256 of LEN_MIB MiB of the disk starting at OFF_MIB MiB, read with O_DIRECT.
region_sha() {
    dd if="$DISK" bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1
}
zero_sha() { dd if=/dev/zero bs=1M count="$1" 2>/dev/null | sha256sum | cut -d' ' -f1; }

disk_mib() { echo $(($(cat /sys/block/"$DEV"/size) / 2048)); }

# Per-virtqueue interrupt counts of the disk's request queues, from
# /proc/interrupts ("req.0=N req.1=M"; MSI-X gives each virtqueue a vector).
vq_interrupts() {
    awk '$NF ~ /^virtio[0-9]+-req\.[0-9]+$/ {
        n = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i; else break
        sub(/^virtio[0-9]+-/, "", $NF); printf "%s%s=%d", sep, $NF, n; sep = " "
    } END { print "" }' /proc/interrupts
}
