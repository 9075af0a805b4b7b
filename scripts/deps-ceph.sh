#!/usr/bin/env bash
# Installs what the rbd tests and benchmarks need (Debian): a one-node Ceph cluster's daemons and
# tools, librbd/librados (loaded by vblkd at run time), and qemu-storage-daemon's rbd driver.
set -euo pipefail
need=()
for p in ceph-mon ceph-osd ceph-mgr ceph-common librbd1 librados2 qemu-block-extra; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    [ -n "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ] || apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
    echo "deps-ceph.sh: installed ${need[*]}"
fi
