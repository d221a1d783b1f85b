#!/usr/bin/env bash
# Builds the test Linux guest: Debian's stock kernel and an initramfs holding busybox and the host's real qemu-ga
# (with the shared libraries it links), whose /init starts qemu-ga on the virtio-serial port org.qemu.guest_agent.0.
# Used by the slower test tier (tests/test_agent_linux_guest.py); install.sh runs it so the tests need no network.
#
# Prints the directory holding vmlinuz, initrd.img and kernel-release. The build is cached under a name derived from
# this directory's files, like the demo image: ${VMFRONT_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/vmfront}.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${VMFRONT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmfront}"
key="$(cat "$here/build.sh" "$here/init" "$here/shutdown" | sha256sum | cut -c1-16)"
out="$cache/linux-guest-$key"
if [ -s "$out/initrd.img" ] && [ -s "$out/vmlinuz" ]; then
    echo "$out"
    exit 0
fi

QEMU_GA=/usr/sbin/qemu-ga
[ -x "$QEMU_GA" ] || { echo "build.sh: $QEMU_GA missing (Debian package qemu-guest-agent)" >&2; exit 1; }
command -v cpio >/dev/null || { echo "build.sh: cpio missing (Debian package cpio)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# The stock kernel package linux-image-amd64 points at, and a static busybox; downloaded, not installed.
kernel_pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
if [ -z "$kernel_pkg" ]; then
    apt-get update -qq
    kernel_pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')"
fi
apt-get download -qq "$kernel_pkg" busybox-static 2>&1 | grep -v "unsandboxed as root" >&2 || true
dpkg-deb -x "$(ls ./"$kernel_pkg"_*.deb)" kernel
dpkg-deb -x "$(ls ./busybox-static_*.deb)" busybox
release="$(ls kernel/lib/modules)"

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,lib/modules}
cp busybox/bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
cp "$here/shutdown" "$root/sbin/shutdown"
for module in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console; do
    cp "$(find kernel/lib/modules -name "$module.ko")" "$root/lib/modules/"
done
cp "$QEMU_GA" "$root/usr/bin/qemu-ga"
# qemu-ga's shared libraries and the dynamic loader, at the paths the binary asks for.
for lib in $(ldd "$QEMU_GA" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cat > "$root/etc/os-release" <<OS
NAME="vmfront test guest"
ID=vmfront-test-guest
VERSION_ID=1
PRETTY_NAME="vmfront test guest (busybox + qemu-ga)"
OS
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"

mkdir -p "$out.tmp"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out.tmp/initrd.img"
cp kernel/boot/vmlinuz-* "$out.tmp/vmlinuz"
echo "$release" > "$out.tmp/kernel-release"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
