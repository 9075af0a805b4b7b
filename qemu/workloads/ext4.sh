# shellcheck shell=sh
# Workload 2: mkfs.ext4, write random files, record sha256, remount, verify, fsck.
/usr/sbin/mkfs.ext4 -F -q -L vblkd "$DISK" || fail "mkfs.ext4"
mkdir -p /mnt/t
mount -t ext4 "$DISK" /mnt/t || fail "mount"
mkdir /mnt/t/small
for n in 1 2 4 8 16; do
    dd if=/dev/urandom of=/mnt/t/big$n bs=1M count=$n 2>/dev/null || fail "write big$n"
done
i=0
while [ $i -lt 200 ]; do
    dd if=/dev/urandom of=/mnt/t/small/f$i bs=$((512 + i * 97)) count=1 2>/dev/null || fail "write small/f$i"
    i=$((i + 1))
done
(cd /mnt/t && find . -type f | sort | xargs sha256sum) >/tmp/ext4.sha256
note "$(wc -l </tmp/ext4.sha256) files, $(du -sk /mnt/t | cut -f1) KiB written"
umount /mnt/t || fail "umount"
drop_caches
mount -t ext4 "$DISK" /mnt/t || fail "remount"
(cd /mnt/t && sha256sum -c -s /tmp/ext4.sha256) || fail "sha256 mismatch after remount"
note "sha256 verified after remount"
umount /mnt/t || fail "umount after verify"
/usr/sbin/e2fsck -fn "$DISK" || fail "e2fsck -fn reported problems"
