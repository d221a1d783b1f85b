"""``ConsoleService``: the guest's serial console on a unix socket (mode 0600), like ``virsh console``.

The core relays the serial port's bytes unparsed (``console_data`` broadcasts, ``console_write`` requests); this
service keeps the latest ``SCROLLBACK`` bytes, so a new session first sees what scrolled by, and serves any number
of sessions: every session reads; the first that types holds the keyboard until it leaves (the others are told
once and their keys dropped), so two people never type into one shell at once. The bytes are raw both ways:
``socat -,raw,echo=0 UNIX-CONNECT:console.sock`` works as well as ``vmfront console``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipc.channel import ChannelError
from ipc.messages import MAX_CONSOLE_CHUNK, Capability, ConsoleData, ConsoleWriteOp, EventBody, Welcome
from ipc.rundir import listen_unix
from shm import Overrun, Record

if TYPE_CHECKING:
    from clients.main import ClientContext

log = logging.getLogger(__name__)

#: Serial output kept for sessions that attach later.
SCROLLBACK = 256 << 10
#: Sessions at once; more are refused.
MAX_SESSIONS = 16
#: Output queued for one session that does not read; beyond it, the session is closed.
MAX_SESSION_BACKLOG = 1 << 20
#: Keyboard input waiting for the core; beyond it, keys are dropped (a paste faster than the guest reads).
MAX_PENDING_INPUT = 256
READ_CHUNK = 4096
REQUEST_TIMEOUT = 10.0
READ_ONLY_NOTICE = b"\r\n[vmfront: another session is typing on this console; yours is read-only until it leaves]\r\n"


class _Session:
    def __init__(self, writer: asyncio.StreamWriter, number: int) -> None:
        self.writer = writer
        self.number = number
        self.told_read_only = False

    def send(self, data: bytes) -> bool:
        """Queue output; False if the session is too far behind (it is then closed)."""
        if self.writer.is_closing():
            return False
        if self.writer.transport.get_write_buffer_size() > MAX_SESSION_BACKLOG:
            log.info("console session %d does not read its output; closing it", self.number)
            self.writer.transport.abort()
            return False
        self.writer.write(data)
        return True


class ConsoleService:
    name = "console"
    #: What this service needs from the core, on top of what every client asks for.
    capabilities = (Capability.CONSOLE,)

    def __init__(self, path: Path, *, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self.scrollback = bytearray()
        self.sessions: set[_Session] = set()
        self.writer_session: _Session | None = None
        self._ctx: ClientContext | None = None
        self._server: asyncio.Server | None = None
        self._input: asyncio.Queue[bytes] = asyncio.Queue(MAX_PENDING_INPUT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._numbers = 0
        self._offered: bool | None = None  # None: not attached yet

    def endpoints(self) -> dict[str, str]:
        return {"console": str(self.path)}

    async def bind(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        try:
            sock = listen_unix(self.path, mode=self.mode)
        except OSError as exc:
            raise ValueError(f"cannot listen on unix:{self.path}: {exc.strerror or exc}") from exc
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, start_serving=False)
        log.info("serial console at %s", self.path)

    async def start(self) -> None:
        assert self._server is not None
        await self._server.start_serving()
        self._spawn(self._send_input())

    def attached(self, welcome: Welcome) -> None:
        self._offered = Capability.CONSOLE in welcome.capabilities
        if not self._offered:
            log.info("console: this VM's core has no serial console (start it with --serial)")

    def detached(self, reason: str) -> None:
        pass

    def display_records(self, records: list[Record] | Overrun) -> None:
        pass

    def event(self, body: EventBody) -> None:
        if isinstance(body, ConsoleData):
            self.output(body.data)

    def output(self, data: bytes) -> None:
        """Serial bytes from the guest: into the scrollback and to every session."""
        self.scrollback += data
        if len(self.scrollback) > SCROLLBACK:
            del self.scrollback[: len(self.scrollback) - SCROLLBACK]
        for session in list(self.sessions):
            session.send(data)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(self.sessions) >= MAX_SESSIONS:
            writer.write(f"[vmfront: {MAX_SESSIONS} console sessions already; try later]\r\n".encode())
            writer.close()
            return
        self._numbers += 1
        session = _Session(writer, self._numbers)
        log.info("console session %d opened", session.number)
        if self._offered is False:
            session.send(b"[vmfront: this VM has no serial console (vmfront core --serial, vmfront run --serial)]"
                         b"\r\n")
        session.send(bytes(self.scrollback))
        self.sessions.add(session)
        try:
            while data := await reader.read(READ_CHUNK):
                self._typed(session, data)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.sessions.discard(session)
            if self.writer_session is session:
                self.writer_session = None
            writer.close()
            log.info("console session %d closed", session.number)

    def _typed(self, session: _Session, data: bytes) -> None:
        if self.writer_session is None:
            self.writer_session = session
            log.info("console session %d holds the keyboard", session.number)
        if self.writer_session is not session:
            if not session.told_read_only:
                session.told_read_only = True
                session.send(READ_ONLY_NOTICE)
            return
        try:
            self._input.put_nowait(data)
        except asyncio.QueueFull:
            log.info("console: input arrives faster than the guest takes it; dropping %d bytes", len(data))

    async def _send_input(self) -> None:
        """One request in flight: keys reach the guest in the order typed."""
        while True:
            data = await self._input.get()
            channel = self._ctx.channel if self._ctx is not None else None
            if channel is None or not channel.attached:
                log.debug("console: no core attached; %d typed bytes dropped", len(data))
                continue
            for start in range(0, len(data), MAX_CONSOLE_CHUNK):
                try:
                    await channel.request(ConsoleWriteOp(data[start:start + MAX_CONSOLE_CHUNK]),
                                          timeout_s=REQUEST_TIMEOUT)
                except ChannelError as exc:
                    log.info("console: typed bytes not delivered: %s", exc)
                    break
