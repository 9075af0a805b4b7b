# shellcheck shell=sh
# Workload 3: discard and write-zeroes from the guest; read back zeros.
# Region A [0,32M) is discarded, B [32M,64M) zeroed with BLKZEROOUT, C [64M,96M)
# is a control that must be unchanged.
q=/sys/block/$DEV/queue
dmax=$(cat "$q"/discard_max_bytes)
zmax=$(cat "$q"/write_zeroes_max_bytes)
note "discard_max_bytes=$dmax discard_granularity=$(cat "$q"/discard_granularity) write_zeroes_max_bytes=$zmax"
[ "$dmax" -gt 0 ] || fail "device does not offer discard (VIRTIO_BLK_F_DISCARD)"
[ "$zmax" -gt 0 ] || fail "device does not offer write-zeroes (VIRTIO_BLK_F_WRITE_ZEROES)"
dd if=/dev/urandom of="$DISK" bs=1M count=96 conv=fsync 2>/dev/null || fail "fill"
drop_caches
z32=$(zero_sha 32)
[ "$(region_sha 0 32)" != "$z32" ] || fail "region A reads zero before discard"
[ "$(region_sha 32 32)" != "$z32" ] || fail "region B reads zero before write-zeroes"
c_before=$(region_sha 64 32)
# util-linux blkdiscard by full path (busybox's applet has no -z); -f: the disk may hold a filesystem.
/usr/sbin/blkdiscard -f -v -o 0 -l $((32 << 20)) "$DISK" || fail "blkdiscard"
/usr/sbin/blkdiscard -f -v -z -o $((32 << 20)) -l $((32 << 20)) "$DISK" || fail "blkdiscard -z"
drop_caches
[ "$(region_sha 0 32)" = "$z32" ] || fail "discarded region A does not read back as zeros"
[ "$(region_sha 32 32)" = "$z32" ] || fail "write-zeroed region B does not read back as zeros"
[ "$(region_sha 64 32)" = "$c_before" ] || fail "control region C changed"
note "discarded and write-zeroed ranges read back as zeros; control region intact"
