"""Helpers for display-capture tests: the demo guest under QEMU with ``-vnc unix:...``, captured into shm.

``running_display()`` starts QEMU (guestlib), a ShmWriter, a DisplaySocket and a DisplayCapture in the test's
event loop, the way the core wires them, and tears everything down afterwards (QEMU by its pid, the segment
unlinked, the short temporary directory removed). Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guestlib import QemuVM, start_demo_guest
from PIL import Image

from core_daemon.display import DisplayCapture
from core_daemon.display_socket import DisplaySocket
from core_daemon.input import GuestInput
from shm import Mode, ShmReader, ShmWriter, segment_name
from shm.notify import DisplaySubscription

#: -usb -device usb-tablet gives QEMU an absolute pointing device for input-send-event's abs events.
TABLET_ARGS = ("-usb", "-device", "usb-tablet")
WAIT_S = 20.0  # generous: the machine is small and shared


@dataclass
class DisplayRig:
    vm: QemuVM
    workdir: Path
    writer: ShmWriter
    socket: DisplaySocket
    capture: DisplayCapture
    input: GuestInput

    @property
    def display_socket(self) -> Path:
        return self.workdir / "display.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.workdir / "vnc.sock"

    async def subscribe(self) -> DisplaySubscription:
        return await DisplaySubscription.connect(self.display_socket)


def frame_image(reader: ShmReader, mode: Mode | None = None) -> Image.Image:
    """The shm frame as an RGB image."""
    mode = reader.mode() if mode is None else mode
    return Image.frombytes("RGB", (mode.width, mode.height), reader.copy_frame(mode), "raw", "BGRX")


async def wait_until(predicate: Callable[[], object], *, what: str, timeout_s: float = WAIT_S,
                     interval: float = 0.05) -> None:
    """Poll ``predicate`` (a test-side check, not the product's wake-up path) until true or the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_frame(sub: DisplaySubscription, predicate: Callable[[Image.Image], bool], *, what: str,
                     timeout_s: float = WAIT_S) -> Image.Image:
    """Check the shm frame after every wake-up until ``predicate(frame)`` holds; return that frame."""
    deadline = time.monotonic() + timeout_s
    while True:
        sub.reader.skip_to_end()
        image = frame_image(sub.reader)
        if predicate(image):
            return image
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} "
                                 f"(frame {image.size[0]}x{image.size[1]})")
        await sub.wait(timeout_s=min(remaining, 1.0))


@contextlib.asynccontextmanager
async def running_display(*, extra_args: Sequence[str] = TABLET_ARGS, max_size: tuple[int, int] = (2560, 1600),
                          ) -> AsyncIterator[DisplayRig]:
    workdir = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
    vnc = workdir / "vnc.sock"
    try:
        vm = await start_demo_guest(extra_args=["-vnc", f"unix:{vnc}", *extra_args])
        try:
            with ShmWriter(segment_name("t-display"), *max_size) as writer:
                sock = DisplaySocket(workdir / "display.sock", writer.name)
                sock.start()
                capture = DisplayCapture(writer, vnc, notify=sock.notify, connect_timeout=WAIT_S)
                try:
                    await capture.start()
                    guest_input = GuestInput(vm.qmp.execute, lambda: capture.screen_size)
                    yield DisplayRig(vm, workdir, writer, sock, capture, guest_input)
                finally:
                    await capture.close()
                    sock.close()
        finally:
            await vm.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
