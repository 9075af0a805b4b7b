#!/usr/bin/env bash
# Build (once, cached outside the repo) the guest kernel and base initramfs.
#
#   qemu/build-guest.sh            # prints the directory holding vmlinuz + initramfs.cpio.gz
#
# Cache: ${VBLKD_GUEST_CACHE:-$HOME/.cache/vblkd-guest}/<key>/, where <key> is a
# hash of this script, guest/init and the kernel package version, so editing
# either rebuilds. The kernel comes from Debian's linux-image-amd64 (its
# versioned dependency), fetched with `apt-get download` and unpacked with
# `dpkg -x` into the cache; VBLKD_GUEST_KERNEL_PKG overrides the package name.
#
# The base initramfs holds busybox-static, the virtio/ext4 modules, fio,
# util-linux (blkdiscard, blockdev) and e2fsprogs (mkfs.ext4, e2fsck) with all
# their shared libraries at their host paths. Workloads are not in it: the
# runner appends a small uncompressed cpio with them (see run-guest.sh), so the
# base image is padded to a 4-byte boundary.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VBLKD_GUEST_CACHE:-$HOME/.cache/vblkd-guest}"
mkdir -p "$CACHE"

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

for tool in busybox cpio gzip dpkg apt-get apt-cache ldd sha256sum flock; do
    command -v "$tool" >/dev/null || die "missing host tool '$tool' (run qemu/deps.sh)"
done
[[ -x /bin/busybox ]] || die "missing /bin/busybox (package busybox-static; run qemu/deps.sh)"

# Host binaries copied into the guest, at the same paths.
GUEST_BINS=(
    /usr/bin/fio
    /usr/sbin/blkdiscard
    /usr/sbin/blockdev
    /usr/sbin/mkfs.ext4
    /usr/sbin/mke2fs
    /usr/sbin/e2fsck
)
for b in "${GUEST_BINS[@]}"; do
    [[ -x "$b" ]] || die "missing $b (run qemu/deps.sh)"
done
# Module load order (no modprobe in the guest); paths relative to kernel/.
MODULES=(
    drivers/virtio/virtio_ring.ko
    drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_modern_dev.ko
    drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci.ko
    drivers/block/virtio_blk.ko
    lib/crc16.ko
    fs/mbcache.ko
    fs/jbd2/jbd2.ko
    crypto/crc32c_generic.ko
    fs/ext4/ext4.ko
)

exec 9>"$CACHE/.lock"
flock 9

# --- kernel package -------------------------------------------------------
resolve_kpkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true
}
# Refresh the package lists (as root only) when a look-up or download fails.
apt_update() {
    if [[ $(id -u) -eq 0 ]]; then
        log "apt-get update"
        apt-get update >&2 || true
    fi
}
kpkg="${VBLKD_GUEST_KERNEL_PKG:-}"
if [[ -z "$kpkg" ]]; then
    kpkg="$(resolve_kpkg)"
    if [[ -z "$kpkg" ]] && ! compgen -G "$CACHE/kernel-linux-image-*/.done" >/dev/null; then
        apt_update
        kpkg="$(resolve_kpkg)"
    fi
    # A previous download is reused when the package lists are gone.
    if [[ -z "$kpkg" ]]; then
        kpkg="$(find "$CACHE" -maxdepth 1 -name 'kernel-linux-image-*' -printf '%f\n' 2>/dev/null |
            sed 's/^kernel-//' | sort | tail -1)"
    fi
    [[ -n "$kpkg" ]] || die "cannot resolve linux-image-amd64 to a kernel package (run 'apt-get update')"
fi
KDIR="$CACHE/kernel-$kpkg"
if [[ ! -e "$KDIR/.done" ]]; then
    log "fetching kernel package $kpkg"
    rm -rf "$KDIR" "$KDIR.tmp"
    mkdir -p "$KDIR.tmp/deb"
    # _apt cannot write into a root-owned cache dir; that warning is harmless.
    if ! (cd "$KDIR.tmp/deb" && apt-get download "$kpkg") >&2; then
        apt_update
        (cd "$KDIR.tmp/deb" && apt-get download "$kpkg") >&2 ||
            die "apt-get download $kpkg failed (run 'apt-get update' first)"
    fi
    dpkg -x "$KDIR.tmp"/deb/*.deb "$KDIR.tmp/root"
    rm -rf "$KDIR.tmp/deb"
    touch "$KDIR.tmp/.done"
    mv "$KDIR.tmp" "$KDIR"
fi
vmlinuz="$(find "$KDIR/root/boot" -name 'vmlinuz-*' | head -1)"
[[ -n "$vmlinuz" ]] || die "no vmlinuz in $KDIR/root/boot"
kver="${vmlinuz##*/vmlinuz-}"
kmods="$KDIR/root/lib/modules/$kver/kernel"
[[ -d "$kmods" ]] || die "no modules at $kmods"

# --- cache key ------------------------------------------------------------
key="$(cat "$HERE/build-guest.sh" "$HERE/guest/init" <(echo "$kpkg $kver") | sha256sum | cut -c1-16)"
OUT="$CACHE/$key"
# Builds of other script versions unused for a week are removed.
while IFS= read -r old; do
    if [[ "$(basename "$old")" =~ ^[0-9a-f]{16}(\.tmp)?$ && "$(basename "$old")" != "$key" ]]; then
        rm -rf "$old"
    fi
done < <(find "$CACHE" -mindepth 1 -maxdepth 1 -type d -mtime +7)
if [[ -e "$OUT/.done" ]]; then
    touch "$OUT"
    echo "$OUT"
    exit 0
fi

log "building initramfs into $OUT (kernel $kver)"
rm -rf "$OUT.tmp"
stage="$OUT.tmp/root"
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,mnt,etc,modules,workload,root}
# Debian 12 is merged-/usr: keep the same layout so ldd's paths resolve.
ln -s usr/bin "$stage/bin"
ln -s usr/sbin "$stage/sbin"
ln -s usr/lib "$stage/lib"
ln -s usr/lib64 "$stage/lib64"

cp /bin/busybox "$stage/usr/bin/busybox"
for applet in $(/bin/busybox --list); do
    # Host tools copied below keep their own binaries.
    [[ -e "$stage/usr/bin/$applet" || -e "$stage/usr/sbin/$applet" ]] && continue
    ln -s busybox "$stage/usr/bin/$applet"
done

copy_file() { # copy a host file to the same path in the stage, dereferencing symlinks
    local src="$1" dst="$stage$1"
    mkdir -p "$(dirname "$dst")"
    [[ -e "$dst" ]] || cp -L "$src" "$dst"
}
for b in "${GUEST_BINS[@]}"; do
    rm -f "$stage$b" # replace a busybox applet link of the same name
    copy_file "$b"
    while read -r lib; do
        copy_file "$lib"
    done < <(ldd "$b" | grep -o '/[^ ]*' | sort -u)
done
[[ -e /etc/mke2fs.conf ]] && copy_file /etc/mke2fs.conf

i=0
for m in "${MODULES[@]}"; do
    src=""
    for ext in "" .xz .zst .gz; do
        [[ -e "$kmods/$m$ext" ]] && { src="$kmods/$m$ext"; break; }
    done
    [[ -n "$src" ]] || die "module $m not found under $kmods"
    dst="$stage/modules/$(printf '%02d' "$i")-$(basename "$m")"
    case "$src" in
        *.xz) xz -dc "$src" >"$dst" ;;
        *.zst) zstd -dc "$src" >"$dst" ;;
        *.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
    esac
    i=$((i + 1))
done

install -m 0755 "$HERE/guest/init" "$stage/init"
echo "$kver" >"$stage/etc/guest-kernel"

(cd "$stage" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"$OUT.tmp/initramfs.cpio.gz"
# An uncompressed archive appended later must start 4-byte aligned.
size=$(stat -c %s "$OUT.tmp/initramfs.cpio.gz")
pad=$(((4 - size % 4) % 4))
head -c "$pad" /dev/zero >>"$OUT.tmp/initramfs.cpio.gz"
cp "$vmlinuz" "$OUT.tmp/vmlinuz"
rm -rf "$stage"
touch "$OUT.tmp/.done"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "done: $(du -sh "$OUT/initramfs.cpio.gz" | cut -f1) initramfs"
echo "$OUT"
