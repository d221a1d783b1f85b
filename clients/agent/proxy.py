"""The agent proxy: a unix socket that speaks qemu-ga's own wire protocol to management scripts, each command
through the agent service's queue.

Requests are read as qemu-ga reads them (``AgentServerConnection``) with qemu-ga's size limit (64 MiB of tokens:
a 48 MiB guest-file-write), and answered in order, one at a time per connection: the next bytes are read once
the previous requests are answered, so a script cannot queue without bound.

Everything a local peer can make the proxy hold is bounded, and the limits keep legitimate users in:

- **connections**: at most ``PROXY_MAX_CONNECTIONS``. A new one beyond evicts an idle connection (nothing in
  flight, nothing half sent): first one that never completed a request, oldest first (a flood of connections
  that do nothing only evicts itself), then the one idle the longest; if none is idle the newcomer is refused
  with an ``AgentBusy`` error line.
- **unfinished requests**: up to ``PROXY_LARGE`` bytes each; a connection whose request grows beyond needs one of
  ``PROXY_LARGE_SLOTS`` large slots and is not read from until it gets one (its sender just waits, as on a
  busy qemu-ga socket). A slot holder that sends nothing for ``PROXY_STALL`` seconds while another connection
  waits for a slot loses its connection.
- **replies**: one per connection, written in slices; a script that takes nothing of it for
  ``PROXY_WRITE_TIMEOUT`` seconds loses its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ipc.rundir import listen_unix

from .errors import AgentBusy, AgentError
from .protocol import NO_REPLY_COMMANDS, AgentServerConnection, Answer, Request
from .qemu_json import QEMU_MAX_TOKEN_SIZE

if TYPE_CHECKING:
    from .service import AgentService

log = logging.getLogger(__name__)

#: The JSON reader's limits for one request, refused with qemu-ga's errors ("JSON token size limit exceeded",
#: "... count ..."). The size is qemu-ga's own (64 MiB); the token count is an eighth of its 2 Mi (a token costs
#: the reader about 50 bytes: big requests are big strings, not millions of tokens).
PROXY_MAX_REQUEST = QEMU_MAX_TOKEN_SIZE
PROXY_MAX_TOKENS = 256 << 10
#: Strings at least this long stay as they were read (``RawJson``) on their way to the agent.
RAW_STRINGS_FROM = 64 << 10
#: Bytes read from a script at a time (and the stream reader's buffer bound).
PROXY_READ = 64 << 10
#: The proxy's own command for per-connection options (not a qemu-ga command).
SESSION_COMMAND = "vmfront-session"
PROXY_MAX_CONNECTIONS = 16
#: An unfinished request may hold this much without a large slot; PROXY_LARGE_SLOTS connections may hold more.
PROXY_LARGE = 1 << 20
PROXY_LARGE_SLOTS = 2
PROXY_STALL = 10.0
#: Replies are written in slices of this size, each within PROXY_WRITE_TIMEOUT seconds.
PROXY_WRITE_SLICE = 1 << 20
PROXY_WRITE_TIMEOUT = 30.0
#: How long close() lets replies in flight reach their scripts before closing the connections.
CLOSE_GRACE = 0.1


class AgentProxy:
    """Serves the proxy socket at ``path`` for ``service``: its connections and their limits."""

    def __init__(self, service: AgentService, path: Path) -> None:
        self.service = service
        self.path = path
        self.sessions: dict[asyncio.Task[None], _ProxySession] = {}
        self._server: asyncio.Server | None = None
        self._large: set[_ProxySession] = set()
        self._large_freed = asyncio.Event()
        self.evicted = 0
        self.refused = 0

    async def bind(self) -> None:
        """Listen on the path (mode 0600), replacing a stale socket but never a live one or a non-socket."""
        path = self.path
        if path.exists() or path.is_symlink():
            if not path.is_socket():
                raise OSError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except OSError:
                path.unlink()  # nobody listens: stale
            else:
                raise OSError(f"another process already serves {path}")
            finally:
                probe.close()
        self._server = await asyncio.start_unix_server(self._accept, sock=listen_unix(path, mode=0o600),
                                                       limit=PROXY_READ)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self.sessions:  # a reply decided just before the stop (a guest-shutdown's success) still goes out
            await asyncio.sleep(CLOSE_GRACE)
        for task in list(self.sessions):
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = _ProxySession(self, reader, writer)
        if len(self.sessions) >= PROXY_MAX_CONNECTIONS and not self._evict_for_newcomer():
            self.refused += 1
            log.warning("agent proxy: refused a connection: %d connections, none of them idle",
                        PROXY_MAX_CONNECTIONS)
            writer.write(session.conn.error_bytes(None, AgentBusy.error_class, (
                f"the agent proxy already serves {PROXY_MAX_CONNECTIONS} connections, all of them busy; "
                "retry later")))
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            return
        self.sessions[task] = session
        session.task = task
        try:
            await session.run()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # (the proxy is closing; the server's callback would report a cancelled handler as an error)
        finally:
            self.sessions.pop(task, None)
            self.release_large(session)
            writer.close()

    def _evict_for_newcomer(self) -> bool:
        idle = [s for s in self.sessions.values() if s.idle]
        if not idle:
            return False
        never_used = [s for s in idle if not s.completed]
        victim = (min(never_used, key=lambda s: s.started) if never_used
                  else min(idle, key=lambda s: s.last_active))
        victim.evict(f"evicted to make room for a new connection ({PROXY_MAX_CONNECTIONS} is the most), "
                     f"{'it never completed a request' if never_used else 'it was idle the longest'}")
        return True

    async def take_large(self, session: _ProxySession) -> None:
        """Wait for a large slot; holders stalled for PROXY_STALL seconds are evicted meanwhile."""
        while len(self._large) >= PROXY_LARGE_SLOTS:
            now = time.monotonic()
            stalled = [s for s in self._large if not s.busy and now - s.last_input >= PROXY_STALL]
            if stalled:
                for holder in stalled:
                    holder.evict(f"sent nothing of its unfinished request for {PROXY_STALL:g} s while another "
                                 "connection waited to send a large one")
                continue
            soonest = min(s.last_input for s in self._large) + PROXY_STALL - now
            self._large_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._large_freed.wait(), max(0.05, soonest))
        self._large.add(session)
        session.large = True

    def release_large(self, session: _ProxySession) -> None:
        if session.large:
            session.large = False
            self._large.discard(session)
            self._large_freed.set()


class _ProxySession:
    """One script on the proxy socket."""

    def __init__(self, proxy: AgentProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.service = proxy.service
        self.reader = reader
        self.writer = writer
        self.conn = AgentServerConnection(max_token_size=PROXY_MAX_REQUEST, max_token_count=PROXY_MAX_TOKENS,
                                          raw_strings_from=RAW_STRINGS_FROM)
        self.wait_if_busy = True
        self.timeout: float | None = None
        self.migrations: int | None = None  # set: stateful session, fails once a migration started since
        self.started = self.last_input = self.last_active = time.monotonic()
        self.completed = 0  # requests answered
        self.busy = False  # a request is being run or answered
        self.large = False  # holds a large slot
        self.task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return not self.busy and self.conn.buffered == 0

    def evict(self, reason: str) -> None:
        """Close the connection now; it stops counting at once (its task ends at its next await)."""
        if self.task is None or self.proxy.sessions.pop(self.task, None) is None:
            return  # already evicted
        self.proxy.evicted += 1
        self.proxy.release_large(self)
        log.warning("agent proxy: closing a connection: %s", reason)
        self.writer.transport.abort()

    async def run(self) -> None:
        while True:
            if not self.large and self.conn.buffered + PROXY_READ > PROXY_LARGE:
                await self.proxy.take_large(self)
            chunk = await self.reader.read(PROXY_READ)
            if not chunk:
                return
            self.last_input = self.last_active = time.monotonic()
            answers: list[bytes] = []  # what qemu-ga answers by itself goes out in one write
            for event in self.conn.receive_data(chunk):
                if isinstance(event, Answer):
                    answers.append(event.data)
                    continue
                if answers:
                    await self._send([b"".join(answers)])
                    answers.clear()
                self.busy = True
                try:
                    await self._send(await self._request(event))
                finally:
                    self.busy = False
                self.completed += 1
            if answers:
                await self._send([b"".join(answers)])
            if self.large and self.conn.buffered <= PROXY_LARGE:
                self.proxy.release_large(self)

    async def _send(self, pieces: list[bytes | bytearray]) -> None:
        """Write a reply in slices, each taken by the script within PROXY_WRITE_TIMEOUT (else: closed)."""
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), PROXY_WRITE_SLICE):
                self.writer.write(view[start:start + PROXY_WRITE_SLICE])
                try:
                    await asyncio.wait_for(self.writer.drain(), PROXY_WRITE_TIMEOUT)
                except TimeoutError:
                    self.evict(f"the script took nothing of its reply for {PROXY_WRITE_TIMEOUT:g} s")
                    raise OSError("reply not taken") from None
        self.last_active = time.monotonic()

    async def _request(self, request: Request) -> list[bytes | bytearray]:
        """Run one request; returns the reply's bytes (none for a command that answers only on failure)."""
        if request.command == SESSION_COMMAND:
            return [self._session_options(request)]
        try:
            if self.migrations is not None and self.service.migrations != self.migrations:
                raise AgentBusy("the guest migrated (or is migrating) during this operation; it was interrupted: "
                                "retry it")
            result = await self.service.call(request.command, request.arguments, timeout_s=self.timeout,
                                             wait_if_busy=self.wait_if_busy, raw=True)
        except AgentError as exc:
            return [self.conn.error_bytes(request, exc.error_class, exc.desc)]
        if request.command in NO_REPLY_COMMANDS:
            return []  # like qemu-ga: nothing on success
        return self.conn.return_pieces(request, result)

    def _session_options(self, request: Request) -> bytes:
        """``vmfront-session``: ``wait`` (bool), ``timeout`` (seconds), ``stateful`` (bool). Returns the state."""
        arguments = request.arguments or {}
        if "wait" in arguments:
            self.wait_if_busy = bool(arguments["wait"])
        timeout = arguments.get("timeout")
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < float("inf"):
            self.timeout = float(timeout)
        if arguments.get("stateful"):
            self.migrations = self.service.migrations
            if self.service.migrating and not self.wait_if_busy:
                return self.conn.error_bytes(request, "AgentBusy", "the guest is migrating; retry when the "
                                             "migration is over")
        return self.conn.return_bytes(request, {"state": self.service.state.value})
