# shellcheck shell=sh
# Workload 5: a read-only export rejects writes; GET_ID returns the serial.
ro=$(cat /sys/block/"$DEV"/ro)
[ "$ro" = 1 ] || fail "/sys/block/$DEV/ro is '$ro', expected 1 (VIRTIO_BLK_F_RO not offered?)"
[ "$(/usr/sbin/blockdev --getro "$DISK")" = 1 ] || fail "blockdev --getro is not 1"
before=$(region_sha 0 4)
if dd if=/dev/urandom of="$DISK" bs=4096 count=1 conv=fsync 2>/tmp/dd.err; then
    fail "dd write to the read-only disk succeeded"
fi
note "dd write rejected: $(grep -m1 "dd:" /tmp/dd.err || tail -n1 /tmp/dd.err)"
if fio --name=ro-write --filename="$DISK" --ioengine=libaio --direct=1 --rw=write --bs=4k \
    --size=1M >/tmp/fio.out 2>&1; then
    cat /tmp/fio.out
    fail "fio write to the read-only disk succeeded"
fi
note "fio write rejected: $(grep -m1 -i 'error\|denied\|read-only' /tmp/fio.out || tail -n1 /tmp/fio.out)"
drop_caches
[ "$(region_sha 0 4)" = "$before" ] || fail "read-only disk content changed"
dd if="$DISK" of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null || fail "read from read-only disk"
note "reads work, content unchanged"
serial=$(cat /sys/block/"$DEV"/serial 2>/dev/null || true)
if [ -n "${GUEST_EXPECT_SERIAL:-}" ]; then
    [ "$serial" = "$GUEST_EXPECT_SERIAL" ] || fail "serial is '$serial', expected '$GUEST_EXPECT_SERIAL'"
    note "serial '$serial' matches"
else
    note "serial NOT CHECKED (no GUEST_EXPECT_SERIAL); device reports '$serial'"
fi
