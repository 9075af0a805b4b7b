# shellcheck shell=sh
# Workload 4, second boot: verify the pattern persist-write.sh left.
: "${GUEST_PERSIST_TOKEN:?runner must set GUEST_PERSIST_TOKEN}"
# A read job with verify= checks each block's crc32c header (and its offset)
# as written by persist-write.sh; it opens the disk read-only, so it also
# works on a read-only export.
fio --name=persist --filename="$DISK" --ioengine=libaio --direct=1 --rw=read --bs=64k \
    --iodepth=16 --offset=160M --size=32M --verify=crc32c --verify_fatal=1 --readonly || fail "fio verify_only of the persisted pattern"
got=$(dd if="$DISK" bs=4096 skip=$((192 * 256)) count=1 iflag=direct 2>/dev/null | head -n1)
[ "$got" = "VBLKD-PERSIST $GUEST_PERSIST_TOKEN" ] || fail "token mismatch: got '$got'"
note "persisted pattern and token '$GUEST_PERSIST_TOKEN' verified"
