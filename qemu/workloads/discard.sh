# shellcheck shell=sh
# Workload 3: discard and write-zeroes from the guest; read back zeros.
# Region A [0,16M) is discarded, B [16M,32M) zeroed with BLKZEROOUT, C [32M,48M)
# is a control that must be unchanged. fio fills them with random data first.
# (Regions are small: sha256 in busybox is slow under TCG.)
q=/sys/block/$DEV/queue
dmax=$(cat "$q"/discard_max_bytes)
zmax=$(cat "$q"/write_zeroes_max_bytes)
note "discard_max_bytes=$dmax discard_granularity=$(cat "$q"/discard_granularity) write_zeroes_max_bytes=$zmax"
[ "$dmax" -gt 0 ] || fail "device does not offer discard (VIRTIO_BLK_F_DISCARD)"
[ "$zmax" -gt 0 ] || fail "device does not offer write-zeroes (VIRTIO_BLK_F_WRITE_ZEROES)"
fio --name=fill --filename="$DISK" --ioengine=libaio --direct=1 --rw=write --bs=1M \
    --iodepth=8 --size=48M --refill_buffers --minimal >/dev/null || fail "fill [0,48M) with fio"
drop_caches
z16=$(zero_sha 16)
[ "$(region_sha 0 16)" != "$z16" ] || fail "region A reads zero before discard"
[ "$(region_sha 16 16)" != "$z16" ] || fail "region B reads zero before write-zeroes"
c_before=$(region_sha 32 16)
# util-linux blkdiscard by full path (busybox's applet has no -z); -f: the disk may hold a filesystem.
/usr/sbin/blkdiscard -f -v -o 0 -l $((16 << 20)) "$DISK" || fail "blkdiscard"
/usr/sbin/blkdiscard -f -v -z -o $((16 << 20)) -l $((16 << 20)) "$DISK" || fail "blkdiscard -z"
drop_caches
[ "$(region_sha 0 16)" = "$z16" ] || fail "discarded region A does not read back as zeros"
[ "$(region_sha 16 16)" = "$z16" ] || fail "write-zeroed region B does not read back as zeros"
[ "$(region_sha 32 16)" = "$c_before" ] || fail "control region C changed"
note "discarded and write-zeroed ranges read back as zeros; control region intact"
