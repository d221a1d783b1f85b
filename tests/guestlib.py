"""Helpers for tests that run a real QEMU with the built-in demo guest and drive it over QMP.

Typical use (pytest-asyncio, asyncio_mode=auto)::

    async with running_demo_guest() as vm:      # QEMU + QMP, guest booted and drawing
        blank = crop(await vm.screendump(), TEXT_BOXES["keys"])
        await vm.type_text("hi")
        image = await vm.wait_for_screen(lambda im: crop(im, TEXT_BOXES["keys"]) != blank,
                                         stable=TEXT_BOXES["keys"], what='"hi" to show')
        assert (await vm.read_text_screen())[4] == "KEYS: hi"   # text mode only

Everything here waits with a timeout, and every QEMU started here is ended by its pid
(terminate, wait, kill) when the context manager exits, whatever happened inside.

Screen geometry (see the header of core_daemon/guest/demo.asm for the guest's side):

* text mode 3: 80x25 cells of 9x16 pixels, screendump 720x400;
* VGA mode 13h: 320x200 guest pixels, but QEMU's VGA scans them out doubled in both
  directions, so the screendump is **640x400**; a guest 8x8 cell is 16x16 dump pixels.

In both modes character row ``r`` covers dump pixel rows ``16*r .. 16*r+15``; a column
is 9 dump pixels wide in text mode and 16 in mode 13h.  ``TEXT_BOXES``/``VGA_BOXES``
give the fields' boxes in screendump pixels, ready for ``Image.crop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from qemu.qmp import QMPClient

from core_daemon.demo_guest import demo_image_path, demo_qemu_args

if TYPE_CHECKING:
    from corelib import RawQmpPeer

QEMU_BINARY = "qemu-system-x86_64"


def text_screen(peer: RawQmpPeer, scratch: Path) -> list[str]:
    """The guest's 80x25 text screen, read from guest memory (what the guest wrote, not how it renders), row by
    row without trailing blanks."""
    path = scratch / f"vram-{time.monotonic_ns()}.bin"
    reply = peer.execute("pmemsave", arguments={"val": 0xB8000, "size": 80 * 25 * 2, "filename": str(path)})
    assert "return" in reply, reply
    try:
        cells = path.read_bytes()[::2]
    finally:
        path.unlink(missing_ok=True)
    return [cells[row * 80:(row + 1) * 80].decode("cp437").rstrip() for row in range(25)]


def text_row(peer: RawQmpPeer, row: int, scratch: Path) -> str:
    """One row of the guest's text screen (see text_screen)."""
    return text_screen(peer, scratch)[row]


Box = tuple[int, int, int, int]
"""(left, top, right, bottom) in screendump pixels, right/bottom exclusive, as Image.crop takes."""

TEXT_SIZE = (720, 400)
"""Screendump size in text mode 3 (80x25 cells of 9x16)."""
VGA_SIZE = (640, 400)
"""Screendump size in mode 13h: QEMU doubles the 320x200 guest pixels in both directions."""

TEXT_CELL = (9, 16)
VGA_CELL = (16, 16)  # an 8x8 guest cell, doubled

# Character positions of the demo guest's fields (same in both modes).
ROW_TITLE, ROW_COUNTER, ROW_KEYS = 0, 2, 4
COL_DIGITS, NUM_DIGITS = 8, 5
COL_KEYTEXT = 6
KEYMAX_TEXT, KEYMAX_VGA = 80 - COL_KEYTEXT, 40 - COL_KEYTEXT

# Colours as QEMU renders the default VGA palette (6-bit DAC value v -> v*4 + 3*(v & 1)).
BLUE = (0, 0, 168)  # title bar background
VGA_BACKGROUND = (87, 87, 87)  # dark grey fill behind everything in mode 13h
BAR_YELLOW = (255, 255, 87)  # the moving square in mode 13h


def cell_box(cell: tuple[int, int], row: int, col: int, ncols: int = 1) -> Box:
    """Box of ``ncols`` character cells starting at (row, col), for cell size TEXT_CELL or VGA_CELL."""
    w, h = cell
    return (col * w, row * h, (col + ncols) * w, (row + 1) * h)


TEXT_BOXES: dict[str, Box] = {
    "title": cell_box(TEXT_CELL, ROW_TITLE, 0, 80),  # whole blue title bar
    "counter": cell_box(TEXT_CELL, ROW_COUNTER, COL_DIGITS, NUM_DIGITS),  # the 5 digits only
    "keys": cell_box(TEXT_CELL, ROW_KEYS, COL_KEYTEXT, KEYMAX_TEXT),  # typed text, after "KEYS: "
}
"""Field boxes in a text-mode (720x400) screendump."""

VGA_BOXES: dict[str, Box] = {
    "title": cell_box(VGA_CELL, ROW_TITLE, 0, 40),
    "counter": cell_box(VGA_CELL, ROW_COUNTER, COL_DIGITS, NUM_DIGITS),
    "keys": cell_box(VGA_CELL, ROW_KEYS, COL_KEYTEXT, KEYMAX_VGA),
    "bar": (0, 192, 640, 224),  # band the 32x32 (16x16 guest) yellow square moves along
}
"""Field boxes in a mode-13h (640x400) screendump."""


def crop(image: Image.Image, box: Box) -> bytes:
    """Raw RGB bytes of ``box``: cheap to compare for equality between two screendumps."""
    return image.convert("RGB").crop(box).tobytes()


# --- keys -------------------------------------------------------------------------------

_UNSHIFTED = {
    " ": "spc", "-": "minus", "=": "equal", "[": "bracket_left", "]": "bracket_right",
    ";": "semicolon", "'": "apostrophe", "`": "grave_accent", "\\": "backslash",
    ",": "comma", ".": "dot", "/": "slash", "\n": "ret", "\b": "backspace", "\x1b": "esc",
}  # fmt: skip
_SHIFTED = {
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8",
    "(": "9", ")": "0", "_": "minus", "+": "equal", "{": "bracket_left",
    "}": "bracket_right", ":": "semicolon", '"': "apostrophe", "~": "grave_accent",
    "|": "backslash", "<": "comma", ">": "dot", "?": "slash",
}  # fmt: skip


def qcodes_for_char(char: str) -> tuple[str, tuple[str, ...]]:
    """(qcode, modifiers) that type ``char`` on a US keyboard layout (as SeaBIOS assumes)."""
    if char.isascii() and char.isalpha():
        return char.lower(), (("shift",) if char.isupper() else ())
    if char.isascii() and char.isdigit():
        return char, ()
    if char in _UNSHIFTED:
        return _UNSHIFTED[char], ()
    if char in _SHIFTED:
        return _SHIFTED[char], ("shift",)
    raise ValueError(f"no qcode known for {char!r}")


def key_events(qcode: str, modifiers: Sequence[str] = ()) -> list[dict[str, object]]:
    """``input-send-event`` events for one key press: modifiers down, key down, key up, modifiers up."""

    def event(code: str, down: bool) -> dict[str, object]:
        return {"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": code}}}

    return [
        *(event(m, True) for m in modifiers),
        event(qcode, True),
        event(qcode, False),
        *(event(m, False) for m in reversed(modifiers)),
    ]


# --- QEMU process + QMP -----------------------------------------------------------------


class QemuError(RuntimeError):
    """QEMU failed to start, died, or did not do what was waited for in time."""


@dataclass
class QemuVM:
    """A QEMU child process with a connected QMP client; made by ``start_qemu``."""

    process: asyncio.subprocess.Process
    qmp: QMPClient
    workdir: Path
    """Short private dir under /tmp holding the QMP socket, QEMU's stderr and screendumps."""
    _dumps: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def pid(self) -> int:
        """QEMU's process id (what stop() signals)."""
        return self.process.pid

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "qemu.stderr"

    def stderr_text(self) -> str:
        """What QEMU wrote to stderr so far (for error messages)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    async def execute(self, cmd: str, arguments: dict[str, object] | None = None,
                      *, timeout_s: float = 10.0) -> object:
        """Run one QMP command, failing after ``timeout_s`` seconds."""
        return await asyncio.wait_for(self.qmp.execute(cmd, arguments), timeout_s)

    async def screendump(self, *, timeout_s: float = 10.0) -> Image.Image:
        """The current display as an RGB Pillow image (QMP ``screendump``, PPM, parsed by Pillow)."""
        path = self.workdir / f"dump-{next(self._dumps)}.ppm"
        await self.execute("screendump", {"filename": str(path)}, timeout_s=timeout_s)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # loads the pixels, detached from the file
        finally:
            path.unlink(missing_ok=True)

    async def read_text_screen(self) -> list[str]:
        """The 25 rows of an 80x25 text-mode screen, read from guest memory at 0xB8000.

        Only meaningful while the guest is in text mode 3.  Uses QMP ``pmemsave``, so it
        reports what the guest wrote, independent of how QEMU renders it.  Trailing
        spaces are stripped; characters are decoded as code page 437.
        """
        path = self.workdir / f"vram-{next(self._dumps)}.bin"
        await self.execute("pmemsave", {"val": 0xB8000, "size": 80 * 25 * 2, "filename": str(path)})
        try:
            cells = path.read_bytes()[::2]  # (character, attribute) pairs -> characters
        finally:
            path.unlink(missing_ok=True)
        return [cells[row * 80 : (row + 1) * 80].decode("cp437").rstrip() for row in range(25)]

    async def send_key(self, qcode: str, *, modifiers: Sequence[str] = ()) -> None:
        """Press and release one key by QMP qcode (e.g. "a", "f2", "ret"), holding ``modifiers``."""
        await self.execute("input-send-event", {"events": key_events(qcode, modifiers)})

    async def send_keys(self, qcodes: Iterable[str], *, delay: float = 0.02) -> None:
        """Press and release several keys in order, ``delay`` seconds apart."""
        for qcode in qcodes:
            await self.send_key(qcode)
            await asyncio.sleep(delay)

    async def type_text(self, text: str, *, delay: float = 0.02) -> None:
        """Type ``text`` (US layout; \\n is Enter, \\b Backspace), one key press every ``delay`` s.

        The small gap keeps the guest's 16-entry BIOS keyboard buffer from overflowing.
        """
        for char in text:
            qcode, modifiers = qcodes_for_char(char)
            await self.send_key(qcode, modifiers=modifiers)
            await asyncio.sleep(delay)

    async def wait_for_screen(self, predicate: Callable[[Image.Image], bool], *,
                              timeout_s: float = 10.0, interval: float = 0.05,
                              stable: Box | None = None,
                              what: str = "screen condition") -> Image.Image:
        """Take screendumps until ``predicate(image)`` holds; return that image.

        QEMU dumps the display while the guest runs, so a dump can catch the guest
        half-way through drawing something.  With ``stable`` the predicate must also hold
        on a dump whose ``stable`` box is identical to the previous dump's, i.e. the guest
        has finished drawing there.  Raises QemuError (naming ``what``) after
        ``timeout_s`` seconds or if QEMU exits.
        """
        deadline = time.monotonic() + timeout_s
        previous: bytes | None = None
        while True:
            if self.process.returncode is not None:
                raise QemuError(f"QEMU exited ({self.process.returncode}) while waiting for {what}:\n"
                                f"{self.stderr_text()}")
            image = await self.screendump()
            if stable is None:
                if predicate(image):
                    return image
            else:
                current = crop(image, stable)
                if current == previous and predicate(image):
                    return image
                previous = current
            if time.monotonic() >= deadline:
                raise QemuError(f"timed out after {timeout_s}s waiting for {what} "
                                f"(last screendump {image.size[0]}x{image.size[1]})")
            await asyncio.sleep(interval)

    async def stop(self, *, timeout_s: float = 5.0) -> None:
        """End QEMU by its pid (SIGTERM, wait, then SIGKILL) and remove the work dir."""
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), timeout_s)
        finally:
            try:
                await stop_process(self.process, timeout_s=timeout_s)
            finally:
                shutil.rmtree(self.workdir, ignore_errors=True)


async def stop_process(process: asyncio.subprocess.Process, *, timeout_s: float = 5.0) -> None:
    """Terminate ``process`` by its pid, wait up to ``timeout_s`` s, then kill it and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
            return
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await asyncio.wait_for(process.wait(), timeout_s)


async def start_qemu(args: Sequence[str], *, accel: str = "tcg",
                     timeout_s: float = 10.0) -> QemuVM:
    """Start ``qemu-system-x86_64 -nodefaults -display none -accel ACCEL ARGS`` with a QMP socket.

    The socket lives in a fresh ``tempfile.mkdtemp(prefix="vmf-")`` dir (unix socket paths
    are limited to 108 bytes, so pytest's long tmp_path is avoided).  Returns once QMP is
    connected; on any failure QEMU is ended and the dir removed before raising QemuError.
    """
    workdir = Path(tempfile.mkdtemp(prefix="vmf-"))
    sock = workdir / "qmp.sock"
    command = [QEMU_BINARY, "-nodefaults", "-display", "none", "-accel", accel, *args,
               "-qmp", f"unix:{sock},server=on,wait=off"]
    try:
        stderr_fd = os.open(workdir / "qemu.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr_fd)
        finally:
            os.close(stderr_fd)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    qmp = QMPClient(f"qemu-{process.pid}")
    vm = QemuVM(process=process, qmp=qmp, workdir=workdir)
    try:
        deadline = time.monotonic() + timeout_s
        last_error: BaseException | None = None
        while True:
            if process.returncode is not None:
                raise QemuError(f"QEMU exited ({process.returncode}) at start-up: {' '.join(command)}\n"
                                f"{vm.stderr_text()}")
            if os.path.exists(sock):
                try:
                    await asyncio.wait_for(qmp.connect(str(sock)), max(deadline - time.monotonic(), 0.1))
                    return vm
                except Exception as exc:  # qemu.qmp.ConnectError (wrapping OSError), TimeoutError
                    last_error = exc
            if time.monotonic() >= deadline:
                raise QemuError(f"no QMP connection to QEMU within {timeout_s}s ({last_error}):\n"
                                f"{vm.stderr_text()}")
            await asyncio.sleep(0.02)
    except BaseException:
        await vm.stop()
        raise


# --- the demo guest ---------------------------------------------------------------------


def colours(image: Image.Image, box: Box) -> set[tuple[int, ...]]:
    """The distinct RGB colours inside ``box``."""
    found = image.convert("RGB").crop(box).getcolors(maxcolors=1 << 24) or []
    return {colour for _, colour in found if isinstance(colour, tuple)}


def is_demo_text_screen(image: Image.Image) -> bool:
    """True once the demo guest has fully drawn its text-mode screen (not SeaBIOS's boot text).

    Checks the blue title bar (drawn first) and the help line on row 7 (drawn last).
    """
    return (image.size == TEXT_SIZE
            and image.getpixel((TEXT_SIZE[0] - 4, 8)) == BLUE
            and len(colours(image, cell_box(TEXT_CELL, 7, 0, 80))) > 1)


def is_demo_vga_screen(image: Image.Image) -> bool:
    """True once the demo guest has fully drawn its mode 13h screen (640x400 dump).

    Checks the blue title bar, the grey background fill and the yellow square (drawn last).
    """
    return (image.size == VGA_SIZE
            and image.getpixel((VGA_SIZE[0] - 4, 8)) == BLUE
            and image.getpixel((VGA_SIZE[0] - 4, VGA_SIZE[1] - 4)) == VGA_BACKGROUND
            and BAR_YELLOW in colours(image, VGA_BOXES["bar"]))


async def start_demo_guest(*, accel: str = "tcg", extra_args: Sequence[str] = (),
                           boot_timeout_s: float = 20.0) -> QemuVM:
    """Start QEMU with the demo guest (image built/cached by demo_image_path) and wait until it draws.

    Returns with the guest in text mode, its title bar on screen and its main loop running.
    """
    vm = await start_qemu([*demo_qemu_args(demo_image_path()), *extra_args], accel=accel)
    try:
        await vm.wait_for_screen(is_demo_text_screen, timeout_s=boot_timeout_s,
                                 what="the demo guest's text screen")
    except BaseException:
        await vm.stop()
        raise
    return vm


@contextlib.asynccontextmanager
async def running_demo_guest(*, accel: str = "tcg", extra_args: Sequence[str] = ()) -> AsyncIterator[QemuVM]:
    """``async with`` form of start_demo_guest: QEMU is always stopped on exit."""
    vm = await start_demo_guest(accel=accel, extra_args=extra_args)
    try:
        yield vm
    finally:
        await vm.stop()
