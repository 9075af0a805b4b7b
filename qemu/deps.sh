#!/usr/bin/env bash
# Install the host packages the QEMU guest bench needs, when they are missing.
#
# Installs only as root (or under CI=true with sudo available); otherwise it
# lists what is missing and exits non-zero, so a missing package is never
# silently skipped. `linux-image-amd64` is not installed: build-guest.sh
# fetches the kernel package with `apt-get download` into its cache.
set -euo pipefail

PKGS=(qemu-system-x86 fio busybox-static e2fsprogs util-linux cpio gzip coreutils)
# qemu-storage-daemon (the development stand-in backend) is in qemu-system-common,
# which qemu-system-x86 depends on; listed for clarity.
PKGS+=(qemu-system-common)
# The libvirt guest test (tests/libvirt_guest.rs, qemu/libvirt-guest.sh) and the systemd unit check
# (systemd-analyze verify in tests/ops_systemd.rs).
PKGS+=(libvirt-daemon-system libvirt-clients systemd)

missing=()
for pkg in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "deps.sh: all guest-bench packages present"
    exit 0
fi

echo "deps.sh: missing packages: ${missing[*]}"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if [[ "${CI:-}" == true ]] && command -v sudo >/dev/null; then
        SUDO=(sudo -n)
    else
        echo "deps.sh: not root: install them with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists when they are absent or the install fails on a stale list.
if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
    "${SUDO[@]}" apt-get update
fi
if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "deps.sh: installed ${missing[*]}"
