"""``vmfront screendump``: the current frame as an image file (PNG, or what the name asks for), read from the
shared framebuffer.

No QMP and no path handed to QEMU: the reader maps the segment read-only and writes the file itself with its
own rights (QMP ``screendump`` would have QEMU, which runs with the core's rights, open the path).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import posix_ipc
from PIL import Image

from shm import LayoutError, Mode, ShmReader
from shm.notify import DisplayClosed, HelloError, read_hello

_ATTEMPTS = 5


class ScreendumpError(Exception):
    """No frame to dump (no display mode yet, or it kept changing); the message says why."""


def _consistent_frame(reader: ShmReader) -> tuple[Mode, bytes]:
    """The frame and the mode it belongs to; retried if the mode changed while copying."""
    for _ in range(_ATTEMPTS):
        mode = reader.mode()
        if mode.generation == 0:
            raise ScreendumpError(f"shm segment {reader.name} has no display mode yet")
        frame = reader.copy_frame(mode)
        if reader.mode() == mode:
            return mode, frame
    raise ScreendumpError(f"the display mode kept changing during {_ATTEMPTS} attempts")


def frame_image(reader: ShmReader, width: int | None = None) -> Image.Image:
    """The current frame as an RGB image, scaled down to ``width`` pixels across (aspect kept) if narrower."""
    mode, frame = _consistent_frame(reader)
    image = Image.frombytes("RGB", (mode.width, mode.height), frame, "raw", "BGRX")
    if width is not None and width < mode.width:
        image = image.resize((width, max(1, round(mode.height * width / mode.width))), Image.Resampling.BILINEAR)
    return image


def image_format(path: Path) -> str:
    """The Pillow format a file name asks for (``.png``, ``.jpg``, ``.ppm``, ``.bmp``...); PNG without a suffix."""
    if not path.suffix:
        return "PNG"
    found = Image.registered_extensions().get(path.suffix.lower())
    if found is None or found not in Image.SAVE:
        raise ScreendumpError(f"cannot write {path}: unknown image format {path.suffix!r} (use .png, .jpg, .ppm, "
                              ".bmp, ...)")
    return found


def write_screendump(shm_name: str, path: Path, fmt: str = "PNG") -> tuple[int, int]:
    """Write the segment's current frame to ``path`` in Pillow format ``fmt`` (atomically: temp file, then
    rename).

    Returns (width, height). Pixels may tear against a concurrent update, as any screenshot of a running
    guest may; stop the guest first for an exact frame.
    """
    with ShmReader(shm_name) as reader:
        mode, frame = _consistent_frame(reader)
    image = Image.frombytes("RGB", (mode.width, mode.height), frame, "raw", "BGRX")
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            image.save(out, format=fmt)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return mode.width, mode.height


def screendump(display_socket: Path, path: Path, *, timeout_s: float = 5.0) -> tuple[int, int]:
    """``vmfront screendump``: ask the core's display socket for the segment name, then dump the frame.

    Every way this can fail (no core, no display, a segment gone, an unwritable file) is a ScreendumpError
    with a message for the operator.
    """
    fmt = image_format(path)
    try:
        hello = read_hello(display_socket, timeout_s=timeout_s, fresh=True)
    except FileNotFoundError:
        raise ScreendumpError(f"no display socket at {display_socket}: is the core running with a display?") from None
    except (HelloError, DisplayClosed, OSError) as exc:
        raise ScreendumpError(f"cannot reach the display at {display_socket}: {exc}") from exc
    try:
        return write_screendump(hello.shm, path, fmt)
    except posix_ipc.ExistentialError as exc:
        raise ScreendumpError(f"shared-memory segment {hello.shm} is gone (core restarting?): {exc}") from exc
    except LayoutError as exc:
        raise ScreendumpError(f"shared-memory segment {hello.shm} is not usable: {exc}") from exc
    except OSError as exc:
        raise ScreendumpError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
