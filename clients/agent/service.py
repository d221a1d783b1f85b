"""The guest agent as a client service: one queue, one command in flight, deadlines, migration awareness,
and a unix socket that speaks qemu-ga's own wire protocol for management scripts (the *agent proxy*).

The core relays the agent channel's bytes unparsed (``agent_write`` requests out, ``agent_data`` broadcasts
in); all parsing happens here, through ``protocol.AgentConnection``. Every call has a deadline that covers its
wait in the queue, a migration, the resynchronisation and the command itself; a call that runs out of time
leaves the connection unsynchronised, so the next one resynchronises first. A hung or hostile agent can only
make calls fail: the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipc.channel import ChannelError, NotAttached, RemoteError
from ipc.messages import (
    MAX_AGENT_CHUNK,
    AgentData,
    EventBody,
    Migrated,
    Migrating,
    RunStateChanged,
    Shutdown,
    Welcome,
)
from ipc.rundir import RunDirError, listen_unix
from shm import Overrun, Record

from .protocol import (
    DEFAULT_MAX_LINE,
    NO_REPLY_COMMANDS,
    AgentConnection,
    AgentServerConnection,
    Answer,
    ConnState,
    ErrorReply,
    Event,
    Garbage,
    Oversize,
    Reply,
    Request,
    SyncDone,
)

if TYPE_CHECKING:
    from clients.main import ClientContext

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
#: Per-command default deadlines, in seconds (a call may give its own).
COMMAND_TIMEOUTS: dict[str, float] = {
    "guest-fsfreeze-freeze": 120.0, "guest-fsfreeze-freeze-list": 120.0, "guest-fsfreeze-thaw": 120.0,
    "guest-exec": 30.0, "guest-exec-status": 30.0,
    "guest-file-read": 30.0, "guest-file-write": 30.0, "guest-file-open": 30.0, "guest-file-close": 30.0,
    "guest-fstrim": 300.0,
}
#: How long close() lets replies in flight reach their scripts before closing the proxy connections.
CLOSE_GRACE = 0.1
#: How long a command that answers only on failure (guest-shutdown, guest-suspend-*) is given to fail.
NO_REPLY_GRACE = 3.0
#: Calls queued beyond this are refused as busy.
MAX_QUEUE = 256
#: Proxy: the JSON reader's limits for one request, refused with qemu-ga's errors ("JSON token size limit
#: exceeded", "... count ..."). QEMU's are 64 MiB and 2 Mi tokens; these are an eighth, to bound a connection's
#: memory (and a request over the control channel's 1 MiB cannot be relayed anyway).
PROXY_MAX_REQUEST = 8 << 20
PROXY_MAX_TOKENS = 256 << 10
#: Proxy: bytes read from a script at a time (and the stream reader's buffer bound).
PROXY_READ = 64 << 10
#: The proxy's own command for per-connection options (not a qemu-ga command).
SESSION_COMMAND = "vmfront-session"


class AgentError(Exception):
    """Root of the agent errors; ``error_class`` is what scripts see (qemu-ga style)."""

    error_class = "AgentError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class AgentUnavailable(AgentError):
    error_class = "AgentUnavailable"


class AgentBusy(AgentError):
    error_class = "AgentBusy"


class AgentTimeout(AgentError):
    error_class = "AgentTimeout"


class AgentGarbage(AgentError):
    """The agent answered with something that is not a reply (garbage, an oversized line)."""

    error_class = "AgentProtocolError"


class AgentCommandError(AgentError):
    """The guest agent answered with an error: its own class and description."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class


class AgentState(enum.Enum):
    ABSENT = "absent"          # no core attached, or the core has no agent channel / it is down
    CONNECTING = "connecting"  # resynchronising
    READY = "ready"            # synchronised, idle
    BUSY = "busy"              # a command in flight
    MIGRATING = "migrating"    # the guest migrates: calls wait or fail busy


@dataclass
class _Job:
    command: str
    arguments: dict[str, Any] | None
    deadline: float
    timeout: float
    wait_if_busy: bool
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AgentService:
    """Owns the agent channel of one client. ``await call(command, arguments)`` returns the ``return`` value."""

    name = "agent"

    def __init__(self, proxy_path: Path | None = None, *, proxy_required: bool = False,
                 max_reply: int = DEFAULT_MAX_LINE) -> None:
        self.proxy_path = proxy_path
        self._proxy_required = proxy_required
        self._ctx: ClientContext | None = None
        self._conn = AgentConnection(max_reply)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(MAX_QUEUE)
        self._waiter: asyncio.Future[Event] | None = None
        self._changed = asyncio.Event()  # set whenever migrating/attached change
        self._attached = False
        self._absent_reason = "not attached to a core yet"
        self.migrating = False
        self._moving = False  # told the guest runs under another core, not attached there yet
        self.migrations = 0  # incremented when a migration starts (stateful sessions compare it)
        self._worker: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        #: The VM's name while attached to a core that offers no agent channel (calls then fail at once).
        self._no_agent: str | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._garbage_logged = 0.0
        self.calls = 0

    # -- state ----------------------------------------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        if self.migrating:
            return AgentState.MIGRATING
        if not self._attached:
            return AgentState.ABSENT
        st = self._conn.state
        if st is ConnState.SYNCING:
            return AgentState.CONNECTING
        if st is ConnState.AWAITING:
            return AgentState.BUSY
        if st is ConnState.IDLE:
            return AgentState.READY
        return AgentState.CONNECTING if self._waiter is not None else AgentState.READY

    # -- Service protocol -----------------------------------------------------------------------------------

    async def bind(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        if self.proxy_path is not None:
            try:
                self._server = await _bind_proxy(self.proxy_path, self._session)
            except OSError as exc:
                if self._proxy_required:
                    raise RunDirError(f"cannot serve the agent proxy at {self.proxy_path}: {exc}") from exc
                log.warning("agent proxy not served at %s: %s", self.proxy_path, exc)
            else:
                log.info("agent proxy (qemu-ga protocol) at %s", self.proxy_path)

    def endpoints(self) -> dict[str, str]:
        return {"agent": str(self.proxy_path)} if self._server is not None else {}

    async def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="agent-queue")

    def attached(self, welcome: Welcome) -> None:
        self._no_agent = None if "agent" in welcome.capabilities else welcome.vm
        self._attached = True
        self._moving = False
        self._conn.abandon()  # a (new) core: its relay may have reconnected; resync before the next command
        # "migrated": a source whose guest left (it lingers); the client is sent on to the destination.
        self._set_migrating(welcome.run_state in ("migrating", "migrated"))
        self._changed.set()

    def detached(self, reason: str) -> None:
        self._attached = False
        self._absent_reason = f"no core attached ({reason})"
        self._conn.abandon()
        self._fail_waiter(AgentUnavailable(f"the core went away ({reason})"))
        self._changed.set()

    def display_records(self, records: list[Record] | Overrun) -> None:
        pass

    def event(self, body: EventBody) -> None:
        if isinstance(body, AgentData):
            self._agent_data(body.data)
        elif isinstance(body, Migrating):
            self._set_migrating(True)
        elif isinstance(body, Migrated):
            # The guest left this core; the channel is about to follow it. Until the client is attached to the
            # new core, calls still wait (or fail busy): sent now, they would reach the old core, or no core.
            self._moving = True
            self._set_migrating(True)
        elif isinstance(body, RunStateChanged) and not self._moving:
            self._set_migrating(body.state in ("migrating", "migrated"))
        elif isinstance(body, Shutdown):
            # The VM is ending: a guest-shutdown in flight did what it was asked (its caller gets success now,
            # before `vmfront run` stops this client right behind the core).
            self._fail_waiter(AgentUnavailable(f"the VM is ending ({body.reason})"))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            if self.proxy_path is not None:
                with contextlib.suppress(OSError):
                    self.proxy_path.unlink()
        if self._sessions:  # a reply decided just before the stop (a guest-shutdown's success) still goes out
            await asyncio.sleep(CLOSE_GRACE)
        for task in list(self._sessions):
            task.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(AgentUnavailable("the client is stopping"))

    # -- calls ----------------------------------------------------------------------------------------------

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout_s: float | None = None, wait_if_busy: bool = True) -> Any:
        """Run one agent command; returns its ``return`` value or raises an ``AgentError``."""
        timeout = timeout_s
        if timeout is None:
            timeout = NO_REPLY_GRACE if command in NO_REPLY_COMMANDS else COMMAND_TIMEOUTS.get(command,
                                                                                               DEFAULT_TIMEOUT)
        if self.migrating and not wait_if_busy:
            raise AgentBusy(f"the guest is migrating: {command} not sent; retry when the migration is over")
        job = _Job(command, arguments, time.monotonic() + timeout, timeout, wait_if_busy)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise AgentBusy(f"{MAX_QUEUE} agent calls already queued") from None
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.future.cancel()
            raise

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            if job.future.done():
                continue
            self.calls += 1
            try:
                result = await self._execute(job)
            except AgentError as exc:
                if not job.future.done():
                    job.future.set_exception(exc)
            except Exception as exc:  # a bug here must not stop the queue
                log.exception("agent call %s failed unexpectedly", job.command)
                if not job.future.done():
                    job.future.set_exception(AgentError(f"internal error: {exc}"))
            else:
                if not job.future.done():
                    job.future.set_result(result)

    async def _execute(self, job: _Job) -> Any:
        try:
            async with asyncio.timeout_at(_loop_time(job.deadline)):
                await self._wait_usable(job)
                if self._conn.state is not ConnState.IDLE:
                    await self._sync()
                if job.future.done():  # the caller gave up meanwhile
                    return None
                data = self._conn.command(job.command, job.arguments)
                if len(data) > MAX_AGENT_CHUNK:
                    self._conn.abandon()
                    raise AgentError(f"{job.command}: request of {len(data)} bytes is over the channel's "
                                     f"{MAX_AGENT_CHUNK}-byte limit")
                waiter = self._new_waiter()
                await self._write(data)
                if job.command in NO_REPLY_COMMANDS:
                    try:
                        event = await asyncio.wait_for(waiter, max(0.0, job.deadline - time.monotonic() - 0.05))
                    except TimeoutError:
                        self._conn.no_reply_done()
                        return None
                    except AgentUnavailable as exc:
                        # The command was delivered and the guest went away: what a shutdown looks like.
                        log.info("%s: the guest went away after it, as expected (%s)", job.command, exc)
                        return None
                else:
                    event = await waiter
        except TimeoutError:
            was = self._conn.state
            self._conn.abandon()
            self._waiter = None
            if self.migrating:
                raise AgentBusy(f"the guest is still migrating after {job.timeout:g} s: {job.command} not sent; "
                                "retry when the migration is over") from None
            if not self._attached:
                raise AgentUnavailable(f"{job.command}: {self._absent_reason}") from None
            what = "resynchronise with" if was is ConnState.SYNCING else "get an answer from"
            raise AgentTimeout(f"{job.command}: could not {what} the guest agent within {job.timeout:g} s "
                               "(is qemu-ga running in the guest?)") from None
        finally:
            self._waiter = None
        if isinstance(event, Reply):
            return event.value
        if isinstance(event, ErrorReply):
            raise AgentCommandError(event.error_class, event.desc)
        self._conn.abandon()
        raise AgentGarbage(f"{job.command}: the guest agent sent {_event_text(event)}; resynchronising")

    async def _wait_usable(self, job: _Job) -> None:
        while self.migrating or not self._attached or self._ctx is None or self._ctx.channel is None:
            if self.migrating and not job.wait_if_busy:
                raise AgentBusy(f"the guest is migrating: {job.command} not sent; retry when it is over")
            if not self._attached and not job.wait_if_busy:
                raise AgentUnavailable(f"{job.command}: {self._absent_reason}")
            self._changed.clear()
            await self._changed.wait()

    async def _sync(self) -> None:
        waiter = self._new_waiter()
        log.debug("resynchronising with the guest agent")
        await self._write(self._conn.sync())
        event = await waiter
        if not isinstance(event, SyncDone):  # only SyncDone resolves a sync waiter
            raise AgentGarbage(f"unexpected {event} while resynchronising")
        log.debug("guest agent synchronised (id %d)", event.sync_id)

    async def _write(self, data: bytes) -> None:
        channel = self._ctx.channel if self._ctx is not None else None
        if channel is None:
            raise AgentUnavailable("not attached to a core")
        if self._no_agent is not None:
            raise AgentUnavailable(f"VM {self._no_agent!r} has no guest-agent channel: start its core with --agent "
                                   "(vmfront run --agent)")
        try:
            await channel.agent_write(data)
        except RemoteError as exc:
            self._conn.abandon()
            if exc.error_class == "AgentBusy":
                raise AgentBusy(f"the guest agent is not reading its channel: {exc.desc}") from exc
            raise AgentUnavailable(f"the guest agent is not available: {exc.desc}") from exc
        except NotAttached as exc:
            self._conn.abandon()
            raise AgentUnavailable(f"no core attached: {exc}") from exc
        except ChannelError as exc:
            self._conn.abandon()
            raise AgentUnavailable(f"control channel: {exc}") from exc

    def _new_waiter(self) -> asyncio.Future[Event]:
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def _agent_data(self, data: bytes) -> None:
        for event in self._conn.receive_data(data):
            waiter = self._waiter
            if isinstance(event, Garbage | Oversize):
                self._log_garbage(event)
                if waiter is not None and not waiter.done() and self._conn.state is not ConnState.SYNCING:
                    waiter.set_result(event)
                continue
            if waiter is not None and not waiter.done():
                waiter.set_result(event)

    def _log_garbage(self, event: Garbage | Oversize) -> None:
        now = time.monotonic()
        if now - self._garbage_logged >= 10.0:
            self._garbage_logged = now
            log.warning("guest agent sent %s", _event_text(event))

    def _fail_waiter(self, exc: AgentError) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _set_migrating(self, migrating: bool) -> None:
        if migrating and not self.migrating:
            self.migrations += 1
            log.info("guest migrating: agent calls wait or fail busy until it is over")
        elif self.migrating and not migrating:
            log.info("migration over: agent calls resume")
            self._conn.abandon()  # the agent may be another relay now: resync
        self.migrating = migrating
        self._changed.set()

    # -- the proxy socket -----------------------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        session = _ProxySession(self, reader, writer)
        try:
            await session.run()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._sessions.discard(task)
            writer.close()


class _ProxySession:
    """One script on the proxy socket: qemu-ga's wire protocol, each command through the service's queue.

    Requests are read as qemu-ga reads them (``AgentServerConnection``) and answered in order, one at a time
    (the next bytes are read once the previous requests are answered: a script cannot queue without bound).
    """

    def __init__(self, service: AgentService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.service = service
        self.reader = reader
        self.writer = writer
        self.conn = AgentServerConnection(max_token_size=PROXY_MAX_REQUEST, max_token_count=PROXY_MAX_TOKENS)
        self.wait_if_busy = True
        self.timeout: float | None = None
        self.migrations: int | None = None  # set: stateful session, fails once a migration started since

    async def run(self) -> None:
        while chunk := await self.reader.read(PROXY_READ):
            answers: list[bytes] = []  # what qemu-ga answers by itself goes out in one write
            for event in self.conn.receive_data(chunk):
                if isinstance(event, Answer):
                    answers.append(event.data)
                    continue
                if answers:
                    await self._send(b"".join(answers))
                    answers.clear()
                reply = await self._request(event)
                if reply:
                    await self._send(reply)
            if answers:
                await self._send(b"".join(answers))

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _request(self, request: Request) -> bytes:
        """Run one request; returns the reply's bytes (none for a command that answers only on failure)."""
        if request.command == SESSION_COMMAND:
            return self._session_options(request)
        try:
            if self.migrations is not None and self.service.migrations != self.migrations:
                raise AgentBusy("the guest migrated (or is migrating) during this operation; it was interrupted: "
                                "retry it")
            result = await self.service.call(request.command, request.arguments, timeout_s=self.timeout,
                                             wait_if_busy=self.wait_if_busy)
        except AgentError as exc:
            return self.conn.error_bytes(request, exc.error_class, exc.desc)
        if request.command in NO_REPLY_COMMANDS:
            return b""  # like qemu-ga: nothing on success
        return self.conn.return_bytes(request, result)

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


async def _bind_proxy(path: Path, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
                      ) -> asyncio.Server:
    """Listen on ``path`` (mode 0600), replacing a stale socket but never a live one or a non-socket."""
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
    return await asyncio.start_unix_server(handler, sock=listen_unix(path, mode=0o600), limit=PROXY_READ)


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _event_text(event: Event) -> str:
    if isinstance(event, Garbage):
        return f"garbage ({event.reason}{'' if event.lines == 1 else f', and {event.lines - 1} more lines'})"
    if isinstance(event, Oversize):
        return f"a reply longer than {event.limit} bytes"
    return repr(event)
