"""The built-in demo guest: assemble ``guest/demo.asm`` into a bootable raw disk image.

The demo guest is a tiny real-mode program (see the comments in ``demo.asm``) that
boots under QEMU/SeaBIOS in about a second, even with TCG, changes the screen on
every timer tick and echoes typed keys.  vmfront uses it as the demo VM and the
end-to-end tests use it to check input -> guest -> display.

Only the assembly source ships with the package; the image is built with nasm on
first use and cached under a name derived from the source's hash, so an edited
source is rebuilt automatically and stale images are never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

__all__ = ["DEMO_SOURCE", "DemoGuestError", "demo_image_path", "demo_qemu_args"]

DEMO_SOURCE: Path = Path(__file__).resolve().parent / "guest" / "demo.asm"
"""The nasm source of the demo guest, shipped as package data."""

_SECTOR = 512
_NASM_TIMEOUT_S = 60.0


class DemoGuestError(Exception):
    """The demo guest image could not be located or built (message says why and what to do)."""


def _cache_dir() -> Path:
    """Where built images live: $VMFRONT_CACHE_DIR, else $XDG_CACHE_HOME/vmfront, else ~/.cache/vmfront."""
    explicit = os.environ.get("VMFRONT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "vmfront"
    return Path.home() / ".cache" / "vmfront"


def _read_source() -> bytes:
    try:
        return DEMO_SOURCE.read_bytes()
    except OSError as exc:
        raise DemoGuestError(f"cannot read demo guest source {DEMO_SOURCE}: {exc}") from exc


def _check_image(path: Path) -> None:
    """Reject output that SeaBIOS would not boot, so a broken build never lands in the cache."""
    data = path.read_bytes()
    if not data or len(data) % _SECTOR or data[510:512] != b"\x55\xaa":
        raise DemoGuestError(
            f"nasm produced an unbootable demo image from {DEMO_SOURCE} "
            f"({len(data)} bytes; want whole 512-byte sectors ending the first in 55 AA)"
        )


def _build(image: Path) -> None:
    """Assemble DEMO_SOURCE into ``image``, atomically (temp file in the same dir, then os.replace).

    Concurrent builders each write their own temp file; whichever os.replace runs last
    wins, and since both images come from the same source either result is correct.
    """
    import shutil  # building is rare (once per source change): the running core does not load these
    import tempfile

    nasm = shutil.which("nasm")
    if nasm is None:
        raise DemoGuestError("nasm not found: install Debian package 'nasm' (./install.sh does)")
    try:
        image.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".demo-", suffix=".img.tmp", dir=image.parent)
    except OSError as exc:
        raise DemoGuestError(f"cannot write demo guest image into {image.parent}: {exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            proc = subprocess.run(
                [nasm, "-f", "bin", "-o", str(tmp), str(DEMO_SOURCE)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_NASM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DemoGuestError(
                f"nasm timed out after {_NASM_TIMEOUT_S:.0f}s assembling {DEMO_SOURCE}"
            ) from exc
        except OSError as exc:
            raise DemoGuestError(f"cannot run nasm ({nasm}): {exc}") from exc
        if proc.returncode != 0:
            details = (proc.stderr or proc.stdout).strip() or "(no output)"
            raise DemoGuestError(
                f"nasm failed (exit {proc.returncode}) assembling {DEMO_SOURCE}:\n{details}"
            )
        _check_image(tmp)
        tmp.chmod(0o644)  # mkstemp makes it 0600; QEMU may run as another user
        os.replace(tmp, image)
    except OSError as exc:
        raise DemoGuestError(f"cannot write demo guest image {image}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def demo_image_path(*, build: bool = True) -> Path:
    """Return the assembled image, building it with nasm into the cache if missing.

    The file is ``demo-<first 16 hex digits of sha256(source)>.img`` in the cache dir
    ($VMFRONT_CACHE_DIR, else $XDG_CACHE_HOME/vmfront, else ~/.cache/vmfront), so a
    changed source gets a new name and is rebuilt.  With ``build=False`` nothing is
    assembled: the path is returned whether or not the file exists yet (check
    ``.exists()``), which lets callers find out cheaply whether a build is needed.
    Raises DemoGuestError if the source is unreadable or building fails.
    """
    digest = hashlib.sha256(_read_source()).hexdigest()[:16]
    image = _cache_dir() / f"demo-{digest}.img"
    if build and not image.is_file():
        _build(image)
    return image


def demo_qemu_args(image: Path) -> list[str]:
    """QEMU arguments (without accelerator, display, monitor options) that boot the demo guest.

    The caller starts QEMU with -nodefaults, so the VGA device is added explicitly.
    ``snapshot=on`` sends guest writes to a throw-away overlay, so a running guest never
    modifies the shared cached image (IDE disks cannot be attached read-only).
    """
    escaped = str(image).replace(",", ",,")  # a comma would end QEMU's file= option value
    return [
        "-machine", "pc",
        "-m", "16",
        "-device", "VGA",
        # An absolute pointer: with -nodefaults the PS/2 mouse is relative only, and QEMU drops absolute events.
        "-usb", "-device", "usb-tablet",
        "-drive", f"file={escaped},format=raw,if=ide,snapshot=on",
    ]
