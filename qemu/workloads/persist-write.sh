# shellcheck shell=sh
# Workload 4, first boot: write a pattern that a later boot verifies.
# fio writes [160M,192M) with crc32c verify headers; a token block at 192M
# carries GUEST_PERSIST_TOKEN so data from an earlier run cannot pass.
: "${GUEST_PERSIST_TOKEN:?runner must set GUEST_PERSIST_TOKEN}"
[ "$(disk_mib)" -ge 193 ] || fail "disk too small for the persistence pattern"
fio --name=persist --filename="$DISK" --ioengine=libaio --direct=1 --rw=write --bs=64k \
    --iodepth=16 --offset=160M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    || fail "fio pattern write"
printf 'VBLKD-PERSIST %s\n' "$GUEST_PERSIST_TOKEN" >/tmp/token
dd if=/tmp/token of="$DISK" bs=4096 seek=$((192 * 256)) conv=sync,fsync 2>/dev/null || fail "token write"
sync
note "pattern written: fio [160M,192M) + token '$GUEST_PERSIST_TOKEN' at 192M"
