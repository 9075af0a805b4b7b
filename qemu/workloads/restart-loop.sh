# shellcheck shell=sh
# Workload: write / read back / compare in a loop while the host restarts the backend.
# Each round writes 4 MiB of fresh random data with O_DIRECT and an fsync, reads it back with
# O_DIRECT and compares checksums; any failed write/read or mismatch fails the workload. The host
# watches the "VBLKD-LOOP: N ok" lines to time its restarts. At the end the kernel log must hold no
# I/O error. LOOP_ROUNDS (default 30) sets the number of rounds.
: "${LOOP_ROUNDS:=30}"
[ "$(disk_mib)" -ge 64 ] || fail "disk too small for the loop (need 64 MiB)"
i=0
while [ "$i" -lt "$LOOP_ROUNDS" ]; do
    off=$(((i % 16) * 4))
    head -c 4194304 /dev/urandom >/tmp/pattern
    want=$(sha256sum </tmp/pattern | cut -d' ' -f1)
    dd if=/tmp/pattern of="$DISK" bs=1M seek="$off" count=4 oflag=direct conv=fsync 2>/tmp/dd.err \
        || fail "round $i: write at ${off}M failed: $(cat /tmp/dd.err)"
    got=$(region_sha "$off" 4)
    [ "$got" = "$want" ] || fail "round $i: data read back at ${off}M differs from what was written"
    read -r up _ </proc/uptime
    echo "VBLKD-LOOP: $i ok (guest uptime ${up}s)"
    i=$((i + 1))
done
if dmesg | grep -Ei 'I/O error|blk_update_request|Buffer I/O|virtio_blk.*error'; then
    fail "the kernel logged block I/O errors"
fi
note "$LOOP_ROUNDS write/read/compare rounds, no I/O error"
