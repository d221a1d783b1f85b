"""The guest-agent channel, relayed byte for byte: the core never parses what the guest sends.

The agent's bytes are guest-controlled, so understanding them is the unprivileged client's job. The core only
keeps one connection to the agent's socket open for as long as it runs (qemu-ga must never see its peer go away
because a client died: a host-run qemu-ga 7.2 even exits when a peer closes with replies unread), moves bytes
between it and the client that last wrote to it, and drops what arrives while no client is listening. Both
directions are bounded: a flood from the guest is dropped in chunks, a client that writes faster than the
agent reads gets a busy error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Largest chunk handed to a client at once (the control channel's agent-data limit is 1 MiB).
READ_CHUNK = 64 << 10
#: Bytes queued towards the agent beyond which a write is refused as busy.
MAX_PENDING_WRITE = 1 << 20
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0


class AgentBusy(Exception):
    """The agent is not reading what it was sent; try again later."""


class AgentUnavailable(Exception):
    """No connection to the agent's socket right now."""


class AgentRelay:
    """Keeps the agent socket open and moves bytes; ``deliver(data)`` gets everything the agent sends."""

    def __init__(self, path: Path, deliver: Callable[[bytes], bool]) -> None:
        self.path = path
        self._deliver = deliver
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.dropped = 0  # bytes that arrived while nobody listened, in all
        self._dropping = 0  # ... since the last byte a client took (logged when that stretch ends)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="agent-relay")

    async def write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise AgentUnavailable(f"the guest agent's channel {self.path} is not connected")
        if writer.transport.get_write_buffer_size() + len(data) > MAX_PENDING_WRITE:
            raise AgentBusy("the guest agent is not reading its channel")
        writer.write(data)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()

    def _relay(self, data: bytes) -> None:
        if self._deliver(data):
            if self._dropping:
                log.info("guest agent: dropped %d bytes that arrived while no client listened", self._dropping)
                self._dropping = 0
            return
        if not self._dropping:
            log.info("guest agent: bytes arriving with no client listening; dropping them")
        self._dropping += len(data)
        self.dropped += len(data)

    async def _run(self) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=READ_CHUNK)
            except OSError as exc:
                log.debug("guest agent socket %s not ready: %s", self.path, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            log.info("guest agent channel connected (%s)", self.path)
            self._writer = writer
            self.connected.set()
            try:
                while data := await reader.read(READ_CHUNK):
                    self._relay(data)
            except OSError as exc:
                log.warning("guest agent channel error: %s", exc)
            finally:
                self.connected.clear()
                self._writer = None
                writer.close()
            log.warning("guest agent channel closed by the other side; reconnecting")
            await asyncio.sleep(delay)
