#!/usr/bin/env bash
# Installs everything vmfront needs on a fresh Debian machine (run as root, or with sudo available):
# Debian packages (QEMU, nasm, qemu-guest-agent, socat), a virtualenv at .venv with vmfront installed
# editable with its test extras, and the demo guest image. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

# QEMU (its keymaps come with it: qemu-system-data) and the demo guest's assembler; a C compiler and Python's
# headers for the one compiled module (the Hextile encoder, rfb/encodings/_hextile.c, built by pip install -e .
# below); the rest are the real peers the tests drive (qemu-ga, TigerVNC and remote-viewer (virt-viewer, gtk-vnc)
# under Xvfb, noVNC in headless Chromium, socat for the monitor, tmux for interactive sessions; cpio builds the
# Linux test guest's initramfs; openssl makes the VNC TLS tests' CAs, gvncviewer is gtk-vnc's viewer with client
# certificates; xclip and spice-vdagent go into the test guest's graphical tier, xclip also reads viewers'
# clipboards; systemd's systemd-analyze checks contrib/systemd's units, nothing is started with it).
APT_PACKAGES=(qemu-system-x86 qemu-utils nasm gcc libc6-dev python3-dev socat qemu-guest-agent tigervnc-viewer
              tigervnc-tools xvfb imagemagick chromium novnc tmux cpio openssl gvncviewer xclip spice-vdagent
              virt-viewer systemd)

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

# The system user and group clients run as: `vmfront run` as root starts its client as this user, and the core
# opens control.sock, display.sock and the shm segment to this group (the systemd units use the group too).
# The same as contrib/systemd/vmfront.sysusers.conf declares.
CLIENT_USER=vmfront
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! getent group "$CLIENT_USER" >/dev/null; then
    echo "install.sh: creating system group $CLIENT_USER"
    $SUDO groupadd --system "$CLIENT_USER"
fi
if ! getent passwd "$CLIENT_USER" >/dev/null; then
    echo "install.sh: creating system user $CLIENT_USER (for vmfront clients)"
    $SUDO useradd --system --gid "$CLIENT_USER" --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "vmfront clients" "$CLIENT_USER"
fi

# The venv's interpreter must be one the client's user can execute (a client started directly as that user, as
# the systemd unit does, runs it; one that drops privileges still loads modules from it): not, say, a pyenv
# build under a 0700 home. Debian's own python3 always is.
runs_as_client() { $SUDO setpriv --reuid="$CLIENT_USER" --regid="$CLIENT_USER" --clear-groups "$@" >/dev/null 2>&1; }
PYTHON=${PYTHON:-python3}
if ! runs_as_client "$(command -v "$PYTHON")" -c 'import sys, venv'; then
    echo "install.sh: $PYTHON ($(command -v "$PYTHON")) cannot be run by user $CLIENT_USER; using /usr/bin/python3"
    PYTHON=/usr/bin/python3
fi
if [ -x .venv/bin/python ] && ! runs_as_client .venv/bin/python -c 'import sys'; then
    echo "install.sh: .venv's interpreter cannot be run by user $CLIENT_USER; building .venv again"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# Byte-compile vmfront's own modules (an editable install does not): every core and client would otherwise compile
# them at start, which costs time and leaves the compiler's garbage in each process.
.venv/bin/python -m compileall -q vmfront core_daemon clients ipc shm rfb >/dev/null

# The demo guest is part of the product: `vmfront core` with no QEMU arguments boots it.
.venv/bin/vmfront demo-image >/dev/null
# The Linux test guest (Debian's kernel + a busybox initramfs with qemu-ga), downloaded and built once, cached.
linux_guest="$(tests/linux_guest/build.sh)"
# Its graphical tier (Xvfb, spice-vdagent, xclip: the host's binaries) for the clipboard tests.
tests/linux_guest/build_x11.sh >/dev/null
if ! runs_as_client .venv/bin/python -c 'import vmfront.cli'; then
    echo "install.sh: warning: user $CLIENT_USER cannot read $(pwd) (a directory on its way is closed?);" \
         "clients run as that user need to: move vmfront, or open the path (chmod o+x)" >&2
fi
echo "install.sh: done. Demo guest image: $(.venv/bin/vmfront demo-image); Linux test guest: $linux_guest"
