# shellcheck shell=sh
# Restart workload: fio random writes of 4-64 KiB on every queue (one job per
# queue), queue depth 16, crc32c verify of everything written (verify_backlog:
# written blocks are read back and checked while the run goes on), for
# GUEST_FIO_RUNTIME seconds, while the host kills and restarts the backend.
# Fails on any fio error, verify mismatch, or an I/O error in the kernel log.
jobs=${GUEST_QUEUES:-1}
size_mib=${GUEST_FIO_MIB:-32}
runtime=${GUEST_FIO_RUNTIME:-60}
[ "$(disk_mib)" -ge $((jobs * size_mib)) ] || fail "disk is $(disk_mib) MiB, need $((jobs * size_mib))"
dmesg -c >/dev/null 2>&1 || true
fio --name=restart-verify --filename="$DISK" --ioengine=libaio --direct=1 \
    --rw=randwrite --bsrange=4k-64k --iodepth=16 --numjobs="$jobs" \
    --size="${size_mib}M" --offset_increment="${size_mib}M" \
    --time_based --runtime="$runtime" \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=32 \
    --group_reporting >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; fail "fio randwrite/verify failed"; }
cat /tmp/fio.out
grep -E "err= *[1-9]" /tmp/fio.out && fail "fio reported errors"
if dmesg | grep -iE "I/O error|blk_update_request|Buffer I/O" ; then
    fail "the guest kernel logged I/O errors"
fi
note "restart: fio verified with no I/O error"
