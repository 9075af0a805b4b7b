# shellcheck shell=sh
# Workload 1: fio random writes of 4-128 KiB, queue depth 16, crc32c verify.
# One job per guest queue (GUEST_QUEUES), 64 MiB each in its own region, so a
# 2-queue export gets I/O on both virtqueues (checked via /proc/interrupts).
# fio warns that "multiple writers may overwrite blocks": they do not, the
# regions are disjoint (offset_increment = size).
jobs=${GUEST_QUEUES:-1}
size_mib=${GUEST_FIO_MIB:-64}
[ "$(disk_mib)" -ge $((jobs * size_mib)) ] || fail "disk is $(disk_mib) MiB, need $((jobs * size_mib))"
before=$(vq_interrupts)
fio --name=randwrite-verify --filename="$DISK" --ioengine=libaio --direct=1 \
    --rw=randwrite --bsrange=4k-128k --iodepth=16 --numjobs="$jobs" \
    --size="${size_mib}M" --offset_increment="${size_mib}M" \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=0 \
    --group_reporting || fail "fio randwrite/verify failed"
after=$(vq_interrupts)
note "virtqueue interrupts before: ${before:-n/a}"
note "virtqueue interrupts after:  ${after:-n/a}"
nq=$(echo "$after" | wc -w)
[ "$nq" -eq "$jobs" ] || fail "guest sees $nq request virtqueue(s), expected $jobs"
for kv in $after; do
    [ "${kv#*=}" -gt 0 ] || fail "virtqueue ${kv%=*} completed no requests: $after"
done
