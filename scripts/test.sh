#!/usr/bin/env bash
# The one test command: installs what the tests need on a fresh machine, then runs every test
# (unit, vhost-user frontend, libblkio, CLI, and the QEMU guest end-to-end workloads).
#
#   scripts/test.sh            # everything (about 10-15 minutes on 2 cores, guests under TCG)
set -euo pipefail
cd "$(dirname "$0")/.."

# Host packages for the guest bench and qemu-storage-daemon (apt-get when missing).
bash qemu/deps.sh

# The guest kernel + initramfs are built once and cached outside the repo.
bash qemu/build-guest.sh

# Ceph for the rbd tests: packages, and a one-node cluster shared by the test binaries (stopped at exit).
bash scripts/deps-ceph.sh
bash scripts/ceph-cluster.sh start >/dev/null
trap 'bash scripts/ceph-cluster.sh stop' EXIT

export RUST_BACKTRACE=1
cargo build --release --all-targets
# Everything but the guest boots, then the guest boots with their workload times and fio figures shown.
cargo test --release --all-targets -- --test-threads=2 --skip guest_malloc_ --skip guest_file_ --skip guest_rbd_ \
    --skip guest_stack_ --skip guest_ftl_ --skip guest_sees_ --skip libvirt_guest_
cargo test --release --test guest_e2e -- --nocapture
cargo test --release --test guest_restart -- --nocapture
# libvirt (default non-root QEMU user) on vblkd, with vblkd restarted twice under a guest I/O loop.
cargo test --release --test libvirt_guest -- --nocapture
