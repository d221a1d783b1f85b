"""The guest agent as a client service: one queue, one command in flight, deadlines, migration awareness,
and a unix socket that speaks qemu-ga's own wire protocol for management scripts (the *agent proxy*,
:mod:`.proxy`).

The core relays the agent channel's bytes unparsed (``agent_write`` requests out, ``agent_data`` broadcasts
in); all parsing happens here, through ``protocol.AgentConnection``. Every call has a deadline that covers its
wait in the queue, a migration, the resynchronisation and the command itself; a call that runs out of time
leaves the connection unsynchronised, so the next one resynchronises first. A hung or hostile agent can only
make calls fail: the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipc.channel import ChannelError, NotAttached, RemoteError
from ipc.messages import (
    AGENT_WINDOW,
    MAX_AGENT_CHUNK,
    AgentData,
    EventBody,
    Migrated,
    Migrating,
    QmpEvent,
    RunStateChanged,
    Shutdown,
    Welcome,
)
from ipc.rundir import RunDirError
from shm import Overrun, Record

from .errors import AgentBusy, AgentCommandError, AgentError, AgentGarbage, AgentTimeout, AgentUnavailable
from .protocol import (
    DEFAULT_MAX_LINE,
    NO_REPLY_COMMANDS,
    QGA_READ_COUNT_MAX,
    AgentConnection,
    ConnState,
    ErrorReply,
    Event,
    Garbage,
    Oversize,
    Reply,
    SyncDone,
)
from .proxy import AgentProxy
from .qemu_json import plain

if TYPE_CHECKING:
    from clients.main import ClientContext
    from ipc.channel import ClientChannel

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
#: Per-command default deadlines, in seconds (a call may give its own).
COMMAND_TIMEOUTS: dict[str, float] = {
    "guest-fsfreeze-freeze": 120.0, "guest-fsfreeze-freeze-list": 120.0, "guest-fsfreeze-thaw": 120.0,
    "guest-exec": 30.0, "guest-exec-status": 30.0,
    "guest-file-read": 30.0, "guest-file-write": 30.0, "guest-file-open": 30.0, "guest-file-close": 30.0,
    "guest-fstrim": 300.0,
}
#: How long a command that answers only on failure (guest-shutdown, guest-suspend-*) is given to fail.
NO_REPLY_GRACE = 3.0
#: Calls queued beyond this are refused as busy.
MAX_QUEUE = 256
#: Once a command's request or its reply moves this many bytes, its deadline starts again: a big transfer on
#: a slow channel is not cut off while it makes progress (a drip of a few bytes never extends it).
PROGRESS_STEP = 1 << 20
#: qemu-ga's ``count`` when guest-file-read is given none (qga/guest-agent-core.h QGA_READ_COUNT_DEFAULT).
QGA_READ_COUNT_DEFAULT = 4096
#: What a guest-file-read reply holds besides its base64 data (members, our id), with room to spare.
_READ_REPLY_OVERHEAD = 256
#: QEMU events after which the guest is gone: a guest-shutdown or guest-suspend-* in flight did its work.
_GONE_EVENTS = {"SHUTDOWN": "shut down", "SUSPEND": "suspended to RAM", "SUSPEND_DISK": "suspended to disk"}
#: QEMU's status after an event (``query-status``), as far as the agent cares.
_STATUS_AFTER = {"SUSPEND": "suspended", "SUSPEND_DISK": "shutdown", "SHUTDOWN": "shutdown", "STOP": "paused",
                 "RESUME": "running", "WAKEUP": "running", "RESET": "running"}
#: How long a call waits for ``query-status`` when it must know whether the guest is suspended.
_STATUS_TIMEOUT = 2.0
#: agent_write requests wait for their reply within the call's deadline, not the channel's default 10 s.
_NO_CHANNEL_TIMEOUT = 24 * 3600.0
#: agent_data frames acknowledged at a time (op agent_ack): the core sends at most AGENT_WINDOW unacknowledged.
ACK_EVERY = AGENT_WINDOW // 4
#: Agent bytes handled per turn of the event loop: the rest of a frame waits for the next turn, so a frame of a
#: hostile agent's tiny tokens (64 KiB of them: about 0.1 s of parsing) never holds the loop that long at once.
DRAIN_SLICE = 16 << 10

class AgentState(enum.Enum):
    ABSENT = "absent"          # no core attached, or the core has no agent channel / it is down
    CONNECTING = "connecting"  # resynchronising
    READY = "ready"            # synchronised, idle
    BUSY = "busy"              # a command in flight
    MIGRATING = "migrating"    # the guest migrates: calls wait or fail busy


@dataclass(frozen=True)
class _GuestGone:
    """The guest shut down or suspended (a QEMU event said so) while a command was in flight."""

    event: str


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
        self._waiter: asyncio.Future[Event | _GuestGone] | None = None
        #: The deadline of the command in flight (pushed back while a big request or reply makes progress).
        self._timer: asyncio.Timeout | None = None
        self._timer_span = 0.0
        self._unextended = 0  # bytes moved since the deadline was last pushed back
        #: QEMU's status as the last event or run-state change told it ("running", "suspended"...); None: unknown.
        self._qemu_status: str | None = None
        self._unacked = 0  # agent_data frames handled, not yet acknowledged to the core
        self._acks = True  # False: the core does not know agent_ack (an older core: its relay is not paced)
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._inbox: collections.deque[memoryview] = collections.deque()  # agent bytes not handled yet
        self._draining = False
        self._changed = asyncio.Event()  # set whenever migrating/attached change
        self._attached = False
        self._absent_reason = "not attached to a core yet"
        self.migrating = False
        self._moving = False  # told the guest runs under another core, not attached there yet
        self.migrations = 0  # incremented when a migration starts (stateful sessions compare it)
        self._worker: asyncio.Task[None] | None = None
        self._proxy: AgentProxy | None = None
        #: The VM's name while attached to a core that offers no agent channel (calls then fail at once).
        self._no_agent: str | None = None
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
            proxy = AgentProxy(self, self.proxy_path)
            try:
                await proxy.bind()
            except OSError as exc:
                if self._proxy_required:
                    raise RunDirError(f"cannot serve the agent proxy at {self.proxy_path}: {exc}") from exc
                log.warning("agent proxy not served at %s: %s", self.proxy_path, exc)
            else:
                self._proxy = proxy
                log.info("agent proxy (qemu-ga protocol) at %s", self.proxy_path)

    def endpoints(self) -> dict[str, str]:
        return {"agent": str(self.proxy_path)} if self._proxy is not None else {}

    async def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="agent-queue")

    def attached(self, welcome: Welcome) -> None:
        self._no_agent = None if "agent" in welcome.capabilities else welcome.vm
        self._attached = True
        self._moving = False
        self._conn.abandon()  # a (new) core: its relay may have reconnected; resync before the next command
        self._unacked, self._acks = 0, True
        self._qemu_status = "running" if welcome.run_state == "running" else None  # (paused may be suspended)
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
        elif isinstance(body, RunStateChanged):
            if body.qemu_status is not None:
                self._qemu_status = body.qemu_status
            if not self._moving:
                self._set_migrating(body.state in ("migrating", "migrated"))
        elif isinstance(body, QmpEvent):
            self._qmp_event(body.event)
        elif isinstance(body, Shutdown):
            # The VM is ending: a guest-shutdown in flight did what it was asked (its caller gets success now,
            # before `vmfront run` stops this client right behind the core).
            self._fail_waiter(AgentUnavailable(f"the VM is ending ({body.reason})"))

    async def close(self) -> None:
        if self._proxy is not None:
            await self._proxy.close()
        for task in list(self._ack_tasks):
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
                   timeout_s: float | None = None, wait_if_busy: bool = True, raw: bool = False) -> Any:
        """Run one agent command; returns its ``return`` value or raises an ``AgentError``.

        ``raw``: the long strings of a big reply stay :class:`~.qemu_json.RawJson` (the proxy passes them on
        unprinted); otherwise they are decoded to ``str``."""
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
            result = await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        return result if raw else plain(result)

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
        sent = False
        event: Event | _GuestGone
        try:
            async with asyncio.timeout_at(_loop_time(job.deadline)) as timer:
                await self._wait_usable(job)
                await self._check_awake(job.command)
                if self._conn.state is not ConnState.IDLE:
                    await self._sync()
                if job.future.done():  # the caller gave up meanwhile
                    return None
                self._refuse_undeliverable(job)
                pieces = self._conn.command_pieces(job.command, job.arguments)
                waiter = self._new_waiter()
                self._timer, self._timer_span, self._unextended = timer, job.timeout, 0
                sent = True
                await self._write(pieces)
                if job.command in NO_REPLY_COMMANDS:
                    result = await self._no_reply(job, waiter)
                    if result is None:
                        return None
                    event = result
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
                               f"({self._why_silent()}){_lost_read(job, None) if sent else ''}") from None
        except AgentUnavailable as exc:
            if sent and job.command not in NO_REPLY_COMMANDS:
                raise AgentUnavailable(exc.desc + _lost_read(job, None)) from exc
            raise
        finally:
            self._waiter = None
            self._timer = None
        if isinstance(event, Reply):
            return event.value
        if isinstance(event, ErrorReply):
            raise AgentCommandError(event.error_class, event.desc)
        if isinstance(event, _GuestGone):
            self._conn.abandon()
            raise AgentUnavailable(f"{job.command}: the guest {_GONE_EVENTS[event.event]} (QEMU event "
                                   f"{event.event}) before its agent answered{_lost_read(job, None)}")
        self._conn.abandon()
        raise AgentGarbage(f"{job.command}: the guest agent sent {_event_text(event)}; resynchronising"
                           + _lost_read(job, event if isinstance(event, Oversize) else None))

    async def _no_reply(self, job: _Job, waiter: asyncio.Future[Event | _GuestGone]) -> Event | None:
        """guest-shutdown, guest-suspend-*: qemu-ga answers only when they fail. Done as soon as QEMU says the
        guest shut down or suspended, or the VM ends; else once the grace period passed without an error.
        Returns the agent's answer if there was one (an error, or garbage)."""
        try:
            event = await asyncio.wait_for(waiter, max(0.0, job.deadline - time.monotonic() - 0.05))
        except TimeoutError:
            log.debug("%s: no error within %g s: done (qemu-ga answers it only when it fails)", job.command,
                      job.timeout)
            self._conn.no_reply_done()
            return None
        except AgentUnavailable as exc:
            # The command was delivered and the guest went away: what a shutdown looks like.
            log.info("%s: the guest went away after it, as expected (%s)", job.command, exc)
            return None
        if isinstance(event, _GuestGone):
            log.info("%s: the guest %s (QEMU event %s)", job.command, _GONE_EVENTS[event.event], event.event)
            self._conn.no_reply_done()
            return None
        return event

    def _refuse_undeliverable(self, job: _Job) -> None:
        """A guest-file-read whose reply could not be taken would move the guest's file position for nothing:
        refused before it is sent (qemu-ga refuses a count over 48 MiB itself, without reading)."""
        if job.command != "guest-file-read":
            return
        count = (job.arguments or {}).get("count", QGA_READ_COUNT_DEFAULT)
        if type(count) is not int or not 0 <= count <= QGA_READ_COUNT_MAX:
            return  # qemu-ga's own error
        needed = 4 * -(-count // 3) + _READ_REPLY_OVERHEAD
        if needed > self._conn.max_line:
            most = (self._conn.max_line - _READ_REPLY_OVERHEAD) // 4 * 3
            raise AgentError(f"guest-file-read: a reply for count {count} would be {needed} bytes, over this "
                             f"client's limit of {self._conn.max_line} bytes; nothing was read (read at most "
                             f"{most} bytes at a time)")

    async def _check_awake(self, command: str) -> None:
        """A suspended guest's agent cannot answer until the guest wakes up: say so at once (as libvirt does),
        after asking QEMU (a ``system_wakeup`` may have been sent the moment before)."""
        if self._qemu_status == "running":
            return
        channel = self._ctx.channel if self._ctx is not None else None
        if channel is not None:
            with contextlib.suppress(ChannelError):
                status = await channel.qmp("query-status", timeout_s=_STATUS_TIMEOUT)
                if isinstance(status, dict) and isinstance(status.get("status"), str):
                    self._qemu_status = status["status"]
        if self._qemu_status == "suspended":
            raise AgentUnavailable(f"{command}: the guest is suspended, and its agent with it; wake it up first "
                                   "(QMP system_wakeup, `vmfront monitor NAME` system_wakeup, or what the guest "
                                   "takes as a wakeup event)")

    def _why_silent(self) -> str:
        """What an agent's silence most likely means, from what QEMU last said."""
        status = self._qemu_status
        if status in (None, "running"):
            return "is qemu-ga running in the guest?"
        if status == "suspended":
            return "the guest is suspended: wake it up first (QMP system_wakeup)"
        return f"the VM is not running: QEMU status {status!r}"

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

    async def _write(self, data: bytes | list[bytes | bytearray]) -> None:
        """Bytes for the agent, in control-channel frames of at most MAX_AGENT_CHUNK bytes, one after the other
        (the core's relay is a byte stream; each frame is acknowledged once the relay took it)."""
        channel = self._ctx.channel if self._ctx is not None else None
        if channel is None:
            raise AgentUnavailable("not attached to a core")
        if self._no_agent is not None:
            raise AgentUnavailable(f"VM {self._no_agent!r} has no guest-agent channel: start its core with --agent "
                                   "(vmfront run --agent)")
        try:
            for chunk in _frames([data] if isinstance(data, bytes) else data, MAX_AGENT_CHUNK):
                # (the call's own deadline bounds the wait: the relay may take a slow agent's time for a frame)
                await channel.agent_write(chunk, timeout_s=_NO_CHANNEL_TIMEOUT)
                self._progress(len(chunk))
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

    def _progress(self, moved: int) -> None:
        """Bytes of the command in flight or of its reply moved: every PROGRESS_STEP of them gives the command
        its timeout again from now."""
        timer = self._timer
        if timer is None:
            return
        self._unextended += moved
        if self._unextended >= PROGRESS_STEP:
            self._unextended = 0
            when, deadline = asyncio.get_running_loop().time() + self._timer_span, timer.when()
            if deadline is not None and when > deadline:
                timer.reschedule(when)

    def _new_waiter(self) -> asyncio.Future[Event | _GuestGone]:
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def _agent_data(self, data: bytes) -> None:
        """A frame of agent bytes: handled DRAIN_SLICE bytes per turn of the event loop, in order."""
        self._inbox.append(memoryview(data))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        view = self._inbox[0]
        if len(view) > DRAIN_SLICE:
            self._inbox[0] = view[DRAIN_SLICE:]
            view = view[:DRAIN_SLICE]
        else:
            self._inbox.popleft()
            self._unacked += 1  # a frame handled
            if self._unacked >= ACK_EVERY and self._acks:
                self._acknowledge()
        try:
            self._receive(bytes(view))
        finally:
            if self._inbox:
                asyncio.get_running_loop().call_soon(self._drain)
            else:
                self._draining = False

    def _receive(self, data: bytes) -> None:
        before = self._conn.line_bytes
        events = self._conn.receive_data(data)
        if self._conn.line_bytes > before and self._conn.state is ConnState.AWAITING:
            self._progress(self._conn.line_bytes - before)
        for event in events:
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

    def _acknowledge(self) -> None:
        """Tell the core the frames handled so far were taken (it sends the agent's bytes no faster)."""
        channel = self._ctx.channel if self._ctx is not None else None
        if channel is None:
            return
        frames, self._unacked = self._unacked, 0
        task = asyncio.get_running_loop().create_task(self._send_ack(channel, frames))
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _send_ack(self, channel: ClientChannel, frames: int) -> None:
        try:
            await channel.agent_ack(frames)
        except RemoteError as exc:
            if self._acks:
                log.info("the core takes no agent_ack (%s: %s): its agent relay is not paced", exc.error_class,
                         exc.desc)
            self._acks = False
        except ChannelError as exc:
            log.debug("agent_ack not delivered: %s", exc)  # the core went away: the next one starts afresh

    def _qmp_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if not isinstance(name, str):
            return
        self._qemu_status = _STATUS_AFTER.get(name, self._qemu_status)
        waiter = self._waiter
        if name not in _GONE_EVENTS or waiter is None or waiter.done():
            return
        if self._conn.command_name in NO_REPLY_COMMANDS or self._conn.state is ConnState.AWAITING:
            waiter.set_result(_GuestGone(name))  # success for the former, a clear failure for the others
        # (while resynchronising: the call's deadline, with a message that says why)

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


def _frames(pieces: list[bytes | bytearray], size: int) -> Iterator[bytes]:
    """The pieces' bytes in order, cut into frames of at most ``size`` bytes (small pieces joined)."""
    pending: list[bytes | memoryview] = []
    pending_size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = view[:size - pending_size]
            pending.append(take)
            pending_size += len(take)
            view = view[len(take):]
            if pending_size == size:
                yield b"".join(pending)
                pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


_COUNT = re.compile(rb'"count": *(\d{1,12})[,}]')


def _lost_read(job: _Job, oversize: Oversize | None) -> str:
    """For a guest-file-read whose reply did not arrive whole: how far the guest's file position moved."""
    if job.command != "guest-file-read":
        return ""
    found = _COUNT.search(oversize.head) if oversize is not None else None
    if found is not None:
        count = int(found.group(1))
        return (f"; the guest read {count} bytes and its file position moved past them: guest-file-seek "
                f"{{'offset': -{count}, 'whence': 'cur'}} reads them again")
    asked = (job.arguments or {}).get("count", QGA_READ_COUNT_DEFAULT)
    return (f"; the guest may have read up to {asked} bytes and its file position moved past them: "
            "guest-file-seek back to where the read started before reading on")


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _event_text(event: Event) -> str:
    if isinstance(event, Garbage):
        return f"garbage ({event.reason}{'' if event.lines == 1 else f', and {event.lines - 1} more lines'})"
    if isinstance(event, Oversize):
        return f"a reply longer than {event.limit} bytes"
    return repr(event)
