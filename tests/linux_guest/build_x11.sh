#!/usr/bin/env bash
# Builds the graphical tier of the test Linux guest: an initramfs overlay holding an X server (Xvfb),
# spice-vdagentd + spice-vdagent (the guest side of `vmfront core --clipboard`) and xclip, all the host's own
# Debian binaries with the shared libraries they link. The kernel loads it after build.sh's initramfs (Linux
# unpacks concatenated archives in order), and `rdinit=/init-x11` starts X and the agents before build.sh's /init.
# Used by tests/test_clipboard_linux_guest.py; install.sh runs it so the tests need no network.
#
# Prints the directory holding vmlinuz and initrd.img (the base initramfs followed by the overlay). Cached like
# build.sh's output, under a name derived from both builds' files.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
base="$("$here/build.sh")"
cache="${VMFRONT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmfront}"
key="$(cat "$here/build.sh" "$here/init" "$here/shutdown" "$here/build_x11.sh" "$here/init-x11" | sha256sum | cut -c1-16)"
out="$cache/linux-guest-x11-$key"
if [ -s "$out/initrd.img" ] && [ -s "$out/vmlinuz" ]; then
    echo "$out"
    exit 0
fi

binaries=(/usr/bin/Xvfb /usr/bin/xkbcomp /usr/bin/xclip /usr/bin/spice-vdagent /usr/sbin/spice-vdagentd)
for binary in "${binaries[@]}"; do
    [ -x "$binary" ] || { echo "build_x11.sh: $binary missing (Debian packages xvfb, x11-xkb-utils, xclip, spice-vdagent)" >&2
                          exit 1; }
done
[ -d /usr/share/X11/xkb ] || { echo "build_x11.sh: /usr/share/X11/xkb missing (Debian package xkb-data)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root/usr/share/X11" "$root/usr/bin" "$root/usr/sbin" "$root/etc"
for binary in "${binaries[@]}"; do
    cp "$binary" "$root$binary"
    for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
cp -a /usr/share/X11/xkb "$root/usr/share/X11/xkb"
# Xvfb runs xkbcomp from its own directory and keeps the compiled keymaps here.
mkdir -p "$root/var/lib/xkb"
cp "$here/init-x11" "$root/init-x11"
chmod 755 "$root/init-x11"

mkdir -p "$out.tmp"
{ cat "$base/initrd.img"; (cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1; } > "$out.tmp/initrd.img"
cp "$base/vmlinuz" "$base/kernel-release" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
