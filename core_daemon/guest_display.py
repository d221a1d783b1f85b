"""The guest's display as the core owns it: capture into shared memory, reader notifications, input back.

One object for the supervisor to start and stop, so the supervisor only decides *whether* there is a display
(not in attach mode: a foreign QEMU has no private VNC socket) and feeds it QEMU's run state.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shm import ShmWriter, reclaim_stale_segments, segment_name

from .display import DEFAULT_MAX_HEIGHT, DEFAULT_MAX_WIDTH, PACING_S, DisplayCapture
from .display_socket import DisplaySocket
from .input import KEY_DELAY_S, GuestInput, QmpExecute

log = logging.getLogger(__name__)


class GuestDisplay:
    """Owns the shm segment, ``display.sock`` and the capture connection for one VM."""

    def __init__(self, vm_name: str, vnc_socket: Path, display_socket: Path, execute: QmpExecute, *,
                 max_size: tuple[int, int] = (DEFAULT_MAX_WIDTH, DEFAULT_MAX_HEIGHT),
                 group: int | None = None, key_delay: float = KEY_DELAY_S,
                 on_clipboard: Callable[[str], None] | None = None) -> None:
        self.vm_name = vm_name
        self.key_delay = key_delay
        self.vnc_socket = vnc_socket
        self.display_socket_path = display_socket
        self.max_size = max_size
        self.group = group
        self._execute = execute
        self._on_clipboard = on_clipboard
        self.shm: ShmWriter | None = None
        self.notifier: DisplaySocket | None = None
        self.capture: DisplayCapture | None = None
        self.input: GuestInput | None = None

    async def start(self, connect_timeout: float) -> None:
        """Create the segment (after reclaiming a dead core's), serve ``display.sock``, connect the capture."""
        reclaimed = reclaim_stale_segments()  # of any VM: a dead core's VM may never start again
        if reclaimed:
            log.info("reclaimed shared-memory segments of dead cores: %s", ", ".join(reclaimed))
        self.shm = ShmWriter(segment_name(self.vm_name), *self.max_size, group=self.group)
        self.notifier = DisplaySocket(self.display_socket_path, self.shm.name, group=self.group, pacing=PACING_S)
        self.capture = DisplayCapture(self.shm, self.vnc_socket, notify=self.notifier.notify,
                                      on_clipboard=self._on_clipboard, connect_timeout=connect_timeout,
                                      name=self.vm_name)
        self.notifier.on_demand = self.capture.set_live
        self.capture.live = False  # no reader yet
        self.notifier.start()
        await self.capture.start()
        capture = self.capture
        self.input = GuestInput(self._execute, lambda: capture.screen_size, on_input=capture.input_hint,
                                key_delay=self.key_delay)
        log.info("display: shm %s, readers on %s", self.shm.name, self.display_socket_path)

    def note_qemu_ending(self) -> None:
        if self.capture is not None:
            self.capture.note_qemu_ending()

    def set_run_state(self, qemu_status: str) -> None:
        if self.capture is not None:
            self.capture.set_run_state(qemu_status)

    def describe(self) -> dict[str, Any]:
        """For ``state.json``: where readers find the display."""
        if self.shm is None:
            return {}
        return {"shm": self.shm.name, "socket": str(self.display_socket_path), "max": list(self.max_size)}

    async def close(self) -> None:
        """Stop capturing, drop the readers, unlink the segment (readers keep their mapping until they let go)."""
        if self.capture is not None:
            await self.capture.close()
        if self.notifier is not None:
            self.notifier.close()
        if self.shm is not None:
            self.shm.unlink()
            with contextlib.suppress(BufferError):  # a view still held: the mapping goes with the process
                self.shm.close()
        self.capture = self.notifier = self.shm = self.input = None
