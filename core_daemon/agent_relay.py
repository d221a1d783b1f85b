"""The guest-agent channel (and the serial console), relayed byte for byte: the core never parses what the guest
sends.

The agent's bytes are guest-controlled, so understanding them is the unprivileged client's job. The core only
keeps one connection to the agent's socket open for as long as it runs (qemu-ga must never see its peer go away
because a client died: a host-run qemu-ga 7.2 even exits when a peer closes with replies unread), moves bytes
between it and the client that last wrote to it, and drops what arrives while no client is listening. Both
directions are bounded: a flood from the guest is dropped in chunks, a client that writes faster than the
agent reads gets a busy error.

The serial console (``vmfront core --serial``) is the same relay, with one difference: what arrives while no
client listens is kept, up to ``SERIAL_BACKLOG`` bytes (the latest), for the next client, so the boot log that
QEMU prints before any client attached is not lost. Scrollback beyond that is the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Largest chunk handed to a client at once (the control channel's agent-data limit is 1 MiB).
READ_CHUNK = 64 << 10
#: Bytes queued towards the guest beyond which a write waits (the agent) or is refused as busy (the console).
MAX_PENDING_WRITE = 1 << 20
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0


#: Serial output kept for the next client while none listens.
SERIAL_BACKLOG = 64 << 10


class RelayBusy(Exception):
    """The guest side is not reading what it was sent; try again later."""


class RelayUnavailable(Exception):
    """No connection to the guest channel's socket right now."""



class ByteRelay:
    """Keeps a guest channel's socket open and moves bytes; ``deliver(data)`` gets everything the guest sends and
    says whether a client took it."""

    label = "guest channel"
    #: Bytes that may wait to be sent to the guest.
    max_pending = MAX_PENDING_WRITE
    #: How long a write waits for room among them before it is refused as busy (0: refused at once).
    write_wait = 0.0

    def __init__(self, path: Path, deliver: Callable[[bytes], bool]) -> None:
        self.path = path
        self._deliver = deliver
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.dropped = 0  # bytes that arrived while nobody listened, in all
        self._dropping = 0  # ... since the last byte a client took (logged when that stretch ends)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.label} relay")

    async def write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise RelayUnavailable(f"the {self.label}'s channel {self.path} is not connected")
        if writer.transport.get_write_buffer_size() + len(data) > self.max_pending:
            if not self.write_wait:
                raise RelayBusy(f"the {self.label} is not reading its channel")
            await self._wait_for_room(writer, len(data))
        writer.write(data)

    async def _wait_for_room(self, writer: asyncio.StreamWriter, size: int) -> None:
        """Until ``size`` more bytes fit among those queued; busy once the guest side took nothing of them for
        ``write_wait`` seconds (a slow reader that keeps taking is waited for)."""
        while (queued := writer.transport.get_write_buffer_size()) > 0 and queued + size > self.max_pending:
            try:
                # (over the transport's high-water mark: drain waits until it is well below)
                await asyncio.wait_for(writer.drain(), self.write_wait)
            except TimeoutError:
                if writer.transport.get_write_buffer_size() >= queued:
                    raise RelayBusy(f"the {self.label} took nothing of what waits for it for {self.write_wait:g} "
                                    "s") from None
            except (ConnectionError, OSError) as exc:
                raise RelayUnavailable(f"the {self.label}'s channel {self.path} closed: {exc}") from exc
        if writer.is_closing():
            raise RelayUnavailable(f"the {self.label}'s channel {self.path} closed")

    async def _room(self) -> None:
        """Before each read: wait until what was read may be passed on (flow control; none here)."""

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
                log.info("%s: dropped %d bytes that arrived while no client listened", self.label, self._dropping)
                self._dropping = 0
            return
        if not self._dropping:
            log.info("%s: bytes arriving with no client listening; dropping them", self.label)
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
            log.info("%s channel connected (%s)", self.label, self.path)
            self._writer = writer
            self.connected.set()
            try:
                while True:
                    await self._room()
                    if not (data := await reader.read(READ_CHUNK)):
                        break
                    self._relay(data)
            except OSError as exc:
                log.warning("%s channel error: %s", self.label, exc)
            finally:
                self.connected.clear()
                self._writer = None
                writer.close()
            # QEMU closes it when it exits (every stop): a sign of trouble only if QEMU runs on, which the
            # core sees for itself.
            log.info("%s channel closed by QEMU; reconnecting", self.label)
            await asyncio.sleep(delay)


class AgentRelay(ByteRelay):
    """The qemu-ga channel: what arrives while no client listens is dropped (qemu-ga's framing resynchronises).

    A big request (a guest-file-write of up to 48 MiB) comes in frames of up to 1 MiB, one after the other: a
    frame waits (up to ``write_wait``) while more than ``max_pending`` bytes are still queued, so the relay holds
    at most about two frames, and each frame's reply tells the client that the next one may go."""

    label = "guest agent"
    max_pending = 2 * MAX_PENDING_WRITE
    write_wait = 5.0

    def __init__(self, path: Path, deliver: Callable[[bytes], bool],
                 room: Callable[[], Awaitable[None]] | None = None) -> None:
        """``room``: awaited before each read, so a client that acknowledges its frames (op agent_ack) paces the
        relay, and through it QEMU's port and the guest's writes, instead of being sent more than it takes."""
        super().__init__(path, deliver)
        self._room_for_more = room

    async def _room(self) -> None:
        if self._room_for_more is not None:
            await self._room_for_more()


class SerialRelay(ByteRelay):
    """The guest's serial port: what arrives while no client listens is kept (the latest SERIAL_BACKLOG bytes)
    and handed to the next client by ``take_backlog``."""

    label = "serial console"

    def __init__(self, path: Path, deliver: Callable[[bytes], bool]) -> None:
        super().__init__(path, deliver)
        self._backlog = bytearray()

    def _relay(self, data: bytes) -> None:
        if self._deliver(data):
            return
        self._backlog += data
        if len(self._backlog) > SERIAL_BACKLOG:
            cut = len(self._backlog) - SERIAL_BACKLOG
            del self._backlog[:cut]
            self.dropped += cut

    def take_backlog(self) -> bytes:
        data, self._backlog = bytes(self._backlog), bytearray()
        return data
