#!/usr/bin/env bash
# Installs everything vmfront needs on a fresh Debian machine (run as root, or with sudo available):
# Debian packages (QEMU, nasm, qemu-guest-agent, socat), a virtualenv at .venv with vmfront installed
# editable with its test extras, and the demo guest image. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

# QEMU and the demo guest's assembler; the rest are the real peers the tests drive (qemu-ga, TigerVNC under
# Xvfb, noVNC in headless Chromium, socat for the monitor, tmux for interactive sessions; cpio builds the Linux
# test guest's initramfs).
APT_PACKAGES=(qemu-system-x86 qemu-utils nasm socat qemu-guest-agent tigervnc-viewer tigervnc-tools xvfb
              imagemagick chromium novnc tmux cpio)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "install.sh: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

# The demo guest is part of the product: `vmfront core` with no QEMU arguments boots it.
.venv/bin/vmfront demo-image >/dev/null
# The Linux test guest (Debian's kernel + a busybox initramfs with qemu-ga), downloaded and built once, cached.
linux_guest="$(tests/linux_guest/build.sh)"
echo "install.sh: done. Demo guest image: $(.venv/bin/vmfront demo-image); Linux test guest: $linux_guest"
