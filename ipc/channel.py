"""The control channel's transport: a ZeroMQ ROUTER in the core, a DEALER in each client, on asyncio.

The wire format is ipc/messages.py; this module moves frames and keeps sessions: hello/welcome, heartbeats both
ways, requests and replies, broadcasts, and what happens when either side vanishes (docs/control.md). zmq.asyncio
watches ZeroMQ's descriptor from the running loop (stdlib or uvloop), so there are no Python threads.

The core never waits on a client: every send is non-blocking, with ROUTER_MANDATORY so that a client that went
away (EHOSTUNREACH) or stopped reading (its queue is full: EAGAIN) is dropped instead of silently losing frames.
A request handler that raises cannot stop the channel; neither can any frame a peer sends. Heartbeats bound how
long a vanished peer goes unnoticed; ZeroMQ's connection events (socket monitors) make it milliseconds when the
peer's process died.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import resource
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

if TYPE_CHECKING:
    from zmq.auth.asyncio import AsyncioAuthenticator

from .messages import (
    ALL_CAPABILITIES,
    KIND_CAPABILITY,
    MAX_FRAME,
    OP_CAPABILITY,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    AgentAckOp,
    AgentWriteOp,
    Broadcast,
    Bye,
    ClipboardSetOp,
    EncodeError,
    ErrorCode,
    ErrorFrame,
    ErrorInfo,
    EventBody,
    Heartbeat,
    Hello,
    InputEvent,
    InputOp,
    Op,
    ProtocolError,
    QmpOp,
    RefreshOp,
    ReleaseInputOp,
    Reply,
    Request,
    VncAuthOp,
    VncStateOp,
    VncViewerOp,
    Welcome,
    choose_version,
    decode,
)
from .rundir import RunDir, check_socket_path

log = logging.getLogger(__name__)

CONTROL_SOCKET_NAME = "control.sock"
DEFAULT_INTERVAL = 1.0
#: A peer silent for this many heartbeat intervals is gone. 2.5 keeps "noticed within 3 intervals" with margin.
EXPIRY_INTERVALS = 2.5
#: Frames ZeroMQ queues for one peer; a client further behind than this is not reading and is dropped.
SEND_HWM = 1000
#: Requests of one client waiting in the core; more are answered with a ``busy`` error at once.
MAX_QUEUED_REQUESTS = 256
#: A client's requests run in lanes: in order within a lane, lanes side by side. Input is paced (keys 10 ms
#: apart), so a viewer typing a long text must not hold up the monitor's QMP or a guest-agent call. VNC reports
#: and authentication checks keep their order (a viewer's connect before its disconnect) in a lane of their own.
LANES = {InputOp.OP: "input", ReleaseInputOp.OP: "input", AgentWriteOp.OP: "agent", AgentAckOp.OP: "agent-ack",
         ClipboardSetOp.OP: "clipboard", VncStateOp.OP: "vnc", VncViewerOp.OP: "vnc", VncAuthOp.OP: "vnc"}
DEFAULT_LANE = "control"
#: Attached clients per core; a hello beyond is answered ``busy`` (those attached stay).
MAX_CLIENTS = 64
#: Control connections one process may hold open (a client needs one; a restart briefly two).
MAX_CONNECTIONS_PER_PID = 8
#: Connections that have not said hello this long after they were accepted are closed.
HELLO_DEADLINE = 10.0
#: ZeroMQ's own handshake (ZMTP greeting) deadline, for connections that never even speak ZMTP.
HANDSHAKE_IVL_MS = 10_000
#: File descriptors kept free for everything else the core does (QEMU's sockets, files, QMP peers).
FD_RESERVE = 256
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
#: ZeroMQ's own reconnection attempts, 100 ms doubling to this (a new core is found this soon after it binds).
RECONNECT_MAX_MS = 1000
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_ALL_CAPABILITIES = tuple(sorted(ALL_CAPABILITIES))
#: How long CoreChannel.close() lets requests in progress finish before cancelling them.
_CLOSE_GRACE = 1.0
#: How long close() lets ZeroMQ try to deliver the final ``bye``.
_CLOSE_LINGER_MS = 100


# --- errors ------------------------------------------------------------------------------------------------


class ChannelError(Exception):
    """Root of the control channel's errors."""


class NotAttached(ChannelError):
    """No core is attached (yet, or any more): the request was not sent, or its answer will never come."""


class AttachTimeout(NotAttached):
    """connect() got no welcome before its deadline."""


class VersionMismatch(ChannelError):
    """The core speaks none of the protocol versions this client offered."""


class RequestTimeout(ChannelError):
    """No reply within the request's deadline (the core may still execute it)."""


class RemoteError(ChannelError):
    """The core answered the request with an error: ``error_class`` (QMP style) and ``desc``."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class RemoteProtocolError(RemoteError):
    """The core could not take the request frame at all; ``error_class`` is the error frame's code."""


class RequestError(Exception):
    """Raised by a core request handler: the client gets an error reply with this class and description."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


# --- endpoints and CurveZMQ --------------------------------------------------------------------------------


def control_socket_path(run_dir: RunDir) -> Path:
    return run_dir.root / CONTROL_SOCKET_NAME


def ipc_endpoint(path: Path) -> str:
    """``ipc://PATH``, after checking that PATH fits in a unix socket address."""
    return f"ipc://{check_socket_path(path)}"


@dataclass(frozen=True)
class CurveKeyPair:
    """A CurveZMQ key pair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class CurveServer:
    """The core's keys; with ``authorized`` (client public keys, Z85) only those clients may connect."""

    keys: CurveKeyPair
    authorized: frozenset[bytes] | None = None


@dataclass(frozen=True)
class CurveClient:
    """A client's keys and the core's public key (which the client must know in advance)."""

    keys: CurveKeyPair
    server_public: bytes


def curve_supported() -> bool:
    return bool(zmq.has("curve"))


def generate_curve_keypair() -> CurveKeyPair:
    if not curve_supported():
        raise ChannelError("this libzmq was built without CURVE support: tcp:// control channels are unavailable")
    public, secret = zmq.curve_keypair()
    return CurveKeyPair(public, secret)


def _check_transport(endpoint: str, curve: object) -> Path | None:
    """The ipc path of ``endpoint``, or None for tcp; refuses plain tcp and anything else."""
    if endpoint.startswith("ipc://"):
        path = Path(endpoint.removeprefix("ipc://"))
        if not path.is_absolute():
            raise ChannelError(f"ipc endpoint must be an absolute path: {endpoint}")
        return check_socket_path(path)
    if endpoint.startswith("tcp://"):
        if curve is None:
            raise ChannelError(f"{endpoint}: tcp:// control channels need CurveZMQ keys (anyone could connect)")
        if not curve_supported():
            raise ChannelError("this libzmq was built without CURVE support: tcp:// is unavailable")
        return None
    raise ChannelError(f"unsupported control channel endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")


# --- small helpers -----------------------------------------------------------------------------------------


class _LogLimit:
    """At most one log line per key and period; the next one says how many were suppressed in between."""

    def __init__(self, period: float = 10.0, max_keys: int = 1024) -> None:
        self.period = period
        self.max_keys = max_keys
        self._keys: dict[object, list[float]] = {}

    def check(self, key: object) -> int | None:
        """None: stay quiet. Otherwise log, mentioning the returned count of suppressed lines."""
        now = time.monotonic()
        entry = self._keys.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return None
        if entry is None and len(self._keys) >= self.max_keys:
            self._keys.clear()  # many short-lived peers: forget them rather than grow
        self._keys[key] = [now + self.period, 0]
        return int(entry[1]) if entry is not None else 0


def _send_now(sock: zmq.asyncio.Socket, parts: list[bytes], *, full: str = "not reading (its queue is full)",
              unreachable: str = "disconnected") -> str | None:
    """Send without waiting; None on success, else why not (a non-blocking zmq.asyncio send resolves at once).

    ``full`` words EAGAIN (the peer's queue is full; for a DEALER with IMMEDIATE also: no connection) and
    ``unreachable`` EHOSTUNREACH (ROUTER_MANDATORY: no such peer any more).
    """
    try:
        future = cast("asyncio.Future[object]", sock.send_multipart(parts, flags=zmq.NOBLOCK))
    except zmq.ZMQError as exc:
        return f"send failed: {exc}"
    if not future.done():  # queued behind a blocking send: never done here, but never lose its result either
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return None
    error = future.exception()
    if error is None:
        return None
    if isinstance(error, zmq.Again):
        return full
    if isinstance(error, zmq.ZMQError) and error.errno == zmq.EHOSTUNREACH:
        return unreachable
    return f"send failed: {error}"


async def _call(callback: Callable[..., object] | None, *args: Any, what: str) -> None:
    """Run a user callback, sync or async; its failure is logged, never propagated."""
    if callback is None:
        return
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("control channel: %s callback failed", what)


# --- core side ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreStatus:
    """What the core tells a client in its welcome, read fresh for every hello."""

    run_state: str
    shm: str | None = None
    shm_generation: int | None = None
    display_socket: str | None = None
    capabilities: frozenset[str] = ALL_CAPABILITIES


@dataclass(eq=False)
class ClientInfo:
    """One attached client, as the core sees it. pid and uid are the connection's credentials (SO_PEERCRED, as
    ZeroMQ reports them for ipc://; what the hello claimed only over tcp://); name is what the hello said."""

    identity: bytes
    pid: int
    uid: int
    name: str
    client_version: str
    instance: str
    capabilities: frozenset[str]
    since: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    #: Where the client serves people (its hello's ``endpoints``), e.g. {"vnc": "127.0.0.1:5900"}.
    endpoints: dict[str, str] = field(default_factory=dict)
    #: What the client says is unsafe about how it serves people (its hello's ``warnings``).
    warnings: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The entry for ``state.json`` ``clients``."""
        return {"pid": self.pid, "uid": self.uid, "since": self.since, "name": self.name,
                "endpoints": dict(self.endpoints), "warnings": list(self.warnings)}

    def __str__(self) -> str:
        return f"client {self.name!r} (pid {self.pid}, uid {self.uid})"


#: Executes one request; returns the reply's result (msgpack-able) or raises RequestError.
RequestHandler = Callable[[ClientInfo, str, Op], Awaitable[Any]]
ClientCallback = Callable[[ClientInfo], object]


@dataclass(eq=False)
class _Session:
    info: ClientInfo
    #: One queue per lane (see LANES): a lane's requests run in order, lanes side by side.
    lanes: dict[str, asyncio.Queue[Request | None]] = field(
        default_factory=lambda: {lane: asyncio.Queue() for lane in (*set(LANES.values()), DEFAULT_LANE)})
    task: asyncio.Task[None] | None = None
    gone: bool = False

    @property
    def queued(self) -> int:
        return sum(queue.qsize() for queue in self.lanes.values())


class CoreChannel:
    """The core's end: many clients on one ROUTER socket.

    Each client's requests run in order, one at a time, in a task of its own (so a slow command of one client
    does not hold up another). That task also runs ``on_client_attached`` before the first request and
    ``on_client_gone`` after the last, so a handler never runs for a client that was already reported gone.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        vm_name: str,
        handler: RequestHandler,
        status: Callable[[], CoreStatus],
        interval: float = DEFAULT_INTERVAL,
        curve: CurveServer | None = None,
        on_client_attached: ClientCallback | None = None,
        on_client_gone: ClientCallback | None = None,
        socket_mode: int = 0o660,
        socket_group: int | None = None,
        send_hwm: int = SEND_HWM,
    ) -> None:
        self._ipc_path = _check_transport(endpoint, curve)
        self.endpoint = endpoint
        self.vm_name = vm_name
        #: Changes with every core start: tells a client that the core it talks to is a new one.
        self.instance = os.urandom(8).hex()
        self.interval = interval
        self.expiry = EXPIRY_INTERVALS * interval
        self._handler = handler
        self._status = status
        self._curve = curve
        self._on_attached = on_client_attached
        self._on_gone = on_client_gone
        self._socket_mode = socket_mode
        self._socket_group = socket_group
        self._send_hwm = send_hwm
        self._sessions: dict[bytes, _Session] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._log_limit = _LogLimit()
        self._heartbeat = Heartbeat(self.instance).encode()
        self._has_clients = asyncio.Event()
        self._closed = False
        self._connections = _Connections(max_connections(), self._log_limited)

    @property
    def clients(self) -> list[ClientInfo]:
        return [session.info for session in self._sessions.values()]

    def describe_clients(self) -> list[dict[str, Any]]:
        """``state.json`` ``clients``: every attached client as {pid, uid, since, name}."""
        return [info.describe() for info in self.clients]

    async def start(self) -> None:
        """Bind and start serving. For ipc the socket file is replaced if stale and set to ``socket_mode``."""
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        try:
            for option, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.ROUTER_HANDOVER, 1), (zmq.SNDHWM, self._send_hwm),
                                  (zmq.MAXMSGSIZE, MAX_FRAME), (zmq.LINGER, 0),
                                  (zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)):
                sock.setsockopt(option, value)
            if self._curve is not None:
                sock.curve_secretkey = self._curve.keys.secret
                sock.curve_publickey = self._curve.keys.public
                sock.curve_server = True
                if self._curve.authorized is not None:
                    from zmq.auth.asyncio import AsyncioAuthenticator  # only CURVE listeners: the core stays lean

                    self._auth = AsyncioAuthenticator(ctx)
                    self._auth.start()
                    self._auth.configure_curve_callback("*", _AllowedKeys(self._curve.authorized))
            if self._ipc_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._ipc_path.unlink()
            sock.bind(self.endpoint)
            if self._ipc_path is not None:
                if self._socket_group is not None:
                    os.chown(self._ipc_path, -1, self._socket_group)
                os.chmod(self._ipc_path, self._socket_mode)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except (zmq.ZMQError, OSError) as exc:
            if self._auth is not None:
                self._auth.stop()
            sock.close(linger=0)
            ctx.term()
            raise ChannelError(f"cannot listen on {self.endpoint}: {exc}") from exc
        self._ctx, self._sock = ctx, sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._tick_loop()),
                       loop.create_task(self._watch_disconnects(self._monitor))]
        log.info("control channel for VM %r listening on %s (core instance %s)", self.vm_name, self.endpoint,
                 self.instance)

    def broadcast(self, event: EventBody) -> int:
        """Send an event to every attached client (that was granted its capability); returns how many."""
        needed = KIND_CAPABILITY.get(event.KIND)
        data = Broadcast(event).encode()
        sent = 0
        for session in list(self._sessions.values()):
            if needed is None or needed in session.info.capabilities:
                sent += self._send(session, data)
        return sent

    def send_event(self, client: ClientInfo, event: EventBody) -> bool:
        """Send an event to one client (e.g. guest-agent replies to the client that asked); False if gone."""
        session = self._sessions.get(client.identity)
        if session is None or session.info is not client:
            return False
        return self._send(session, Broadcast(event).encode())

    def disconnect(self, client: ClientInfo, reason: str) -> None:
        """Drop a client now (it gets a ``bye`` and will say hello again if it is still there)."""
        session = self._sessions.get(client.identity)
        if session is not None and session.info is client:
            self._drop(session, reason, bye=reason)

    async def close(self, reason: str = "core stopping") -> None:
        """Say bye to every client (their ``on_client_gone`` runs), stop, remove the socket file."""
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions.values()):
            self._drop(session, f"channel closing: {reason}", bye=reason)
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        if self._workers:  # requests in progress get a moment; then they are cancelled (on_client_gone still runs)
            _done, pending = await asyncio.wait(self._workers, timeout=_CLOSE_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._auth is not None:
            self._auth.stop()
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sock.close(linger=_CLOSE_LINGER_MS)
        if self._ctx is not None:
            self._ctx.term()
        if self._ipc_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._ipc_path.unlink()
        log.info("control channel for VM %r closed (%s)", self.vm_name, reason)

    # --- receiving ---

    async def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frames = await self._sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                log.warning("control channel: receive failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                self._on_parts([frame.bytes for frame in frames], _peer_credentials(frames[-1]))
            except Exception:  # a bug here must not end the channel for every client
                log.exception("control channel: failed to handle a frame")
            await asyncio.sleep(0)  # (see ClientChannel._read_loop)

    def _on_parts(self, parts: list[bytes], credentials: tuple[int, int] | None = None) -> None:
        """One ZeroMQ message: the sender's identity, then frames. ``credentials`` (pid, uid) are the
        connection's as the kernel saw them (ipc://), or None (tcp://)."""
        identity = parts[0]
        if len(parts) != 2:
            self._reject(identity, ProtocolError(
                ErrorCode.MALFORMED, f"expected one frame per ZeroMQ message, got {len(parts) - 1}"))
            return
        try:
            message = decode(parts[1])
        except ProtocolError as exc:
            self._reject(identity, exc)
            return
        session = self._sessions.get(identity)
        if session is not None:
            session.info.last_seen = time.monotonic()
        if isinstance(message, Hello):
            self._on_hello(identity, message, session, credentials)
        elif session is None:
            if not isinstance(message, Bye | ErrorFrame):
                msg_id = message.id if isinstance(message, Request) else None
                self._reject(identity, ProtocolError(
                    ErrorCode.NOT_ATTACHED, "say hello first (the core does not know this client)",
                    msg_id=msg_id, msg_type=message.TYPE))
        elif isinstance(message, Heartbeat):
            pass  # last_seen is updated above, for any frame
        elif isinstance(message, Request):
            self._enqueue(session, message)
        elif isinstance(message, Bye):
            self._drop(session, f"said bye ({message.reason or 'no reason'})")
        elif isinstance(message, ErrorFrame):
            self._log_limited(identity, logging.WARNING, "%s could not take a frame from the core: %s: %s",
                              session.info, message.code, message.detail)
        else:
            self._reject(identity, ProtocolError(
                ErrorCode.UNEXPECTED, f"{message.TYPE!r} frames go from the core to clients",
                msg_type=message.TYPE))

    def _on_hello(self, identity: bytes, hello: Hello, session: _Session | None,
                  credentials: tuple[int, int] | None = None) -> None:
        version = choose_version(hello.versions)
        if version is None:
            self._reject(identity, ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION, f"this core speaks protocol versions {list(SUPPORTED_VERSIONS)}, "
                f"the client offered {list(hello.versions)}", msg_id=hello.id, msg_type=hello.TYPE))
            return
        try:
            status = self._status()
        except Exception:
            log.exception("control channel: the status provider failed")
            self._reject(identity, ProtocolError(ErrorCode.INTERNAL, "the core cannot describe itself right now",
                                                 msg_id=hello.id, msg_type=hello.TYPE))
            return
        granted = tuple(dict.fromkeys(c for c in hello.capabilities if c in status.capabilities))
        welcome = Welcome(
            id=hello.id, version=version, vm=self.vm_name, instance=self.instance, core_pid=os.getpid(),
            run_state=status.run_state, heartbeat_interval=self.interval, shm=status.shm,
            shm_generation=status.shm_generation, display_socket=status.display_socket, capabilities=granted)
        try:
            data = welcome.encode()
        except EncodeError as exc:
            log.error("control channel: cannot encode a welcome: %s", exc)
            self._reject(identity, ProtocolError(ErrorCode.INTERNAL, "the core cannot describe itself right now",
                                                 msg_id=hello.id, msg_type=hello.TYPE))
            return
        if session is not None and session.info.instance == hello.instance:
            # The same client asked again (its hello was retried before our welcome arrived): same session.
            self._send(session, data)
            return
        if session is None and len(self._sessions) >= MAX_CLIENTS:
            self._reject(identity, ProtocolError(
                ErrorCode.BUSY, f"this core already serves {MAX_CLIENTS} clients", msg_id=hello.id,
                msg_type=hello.TYPE))
            return
        previous = None
        if session is not None:
            previous = session.task
            self._drop(session, "said hello again as a new instance")
        pid, uid = credentials if credentials is not None else (hello.pid, hello.uid)
        info = ClientInfo(identity=identity, pid=pid, uid=uid, name=hello.client_name,
                          client_version=hello.client_version, instance=hello.instance,
                          capabilities=frozenset(granted), endpoints=dict(hello.endpoints), warnings=hello.warnings)
        problem = _send_now(self._socket(), [identity, data])
        if problem:
            log.info("%s: cannot send the welcome: %s", info, problem)
            return
        new = _Session(info)
        self._sessions[identity] = new
        new.task = asyncio.get_running_loop().create_task(self._serve(new, previous))
        self._workers.add(new.task)
        new.task.add_done_callback(self._workers.discard)
        self._has_clients.set()
        log.info("%s attached: %s, protocol %d, capabilities %s", info, hello.client_version or "unknown version",
                 version, ",".join(granted) or "none")

    def _enqueue(self, session: _Session, request: Request) -> None:
        if session.queued >= MAX_QUEUED_REQUESTS:
            self._reject(session.info.identity, ProtocolError(
                ErrorCode.BUSY, f"more than {MAX_QUEUED_REQUESTS} requests of this client are waiting",
                msg_id=request.id, msg_type=request.TYPE))
            return
        session.lanes[LANES.get(request.op, DEFAULT_LANE)].put_nowait(request)

    # --- per-client task ---

    async def _serve(self, session: _Session, previous: asyncio.Task[None] | None) -> None:
        attached = False
        try:
            if previous is not None:
                await asyncio.wait({previous})  # the old session's on_client_gone first
            attached = True
            await _call(self._on_attached, session.info, what="on_client_attached")
            await asyncio.gather(*(self._run_lane(session, queue) for queue in session.lanes.values()))
        finally:
            if attached:
                await _call(self._on_gone, session.info, what="on_client_gone")

    async def _run_lane(self, session: _Session, queue: asyncio.Queue[Request | None]) -> None:
        while (request := await queue.get()) is not None:
            await self._execute(session, request)

    async def _execute(self, session: _Session, request: Request) -> None:
        info, op = session.info, request.op
        needed = OP_CAPABILITY.get(op)
        if needed is not None and needed not in info.capabilities:
            reply = Reply(request.id, error=ErrorInfo(
                "CapabilityNotGranted", f"op '{op}' needs the capability '{needed.value}', which this core did not "
                "grant (it does not offer it, or the client did not ask for it)"))
        else:
            try:
                result = await self._handler(info, op, request.body)
            except RequestError as exc:
                reply = Reply(request.id, error=ErrorInfo(exc.error_class, exc.desc))
            except Exception:
                log.exception("%s: request %d (%s) failed in the core", info, request.id, op)
                reply = Reply(request.id, error=ErrorInfo(
                    "GenericError", f"the core failed to handle {op!r} (its log says why)"))
            else:
                reply = Reply(request.id, result=result)
        if session.gone:
            return
        try:
            data = reply.encode()
        except EncodeError as exc:
            log.error("%s: cannot send the reply to request %d (%s): %s", info, request.id, op, exc)
            data = Reply(request.id, error=ErrorInfo("GenericError", f"the result cannot be sent: {exc}")).encode()
        self._send(session, data)

    # --- sending, expiry ---

    def _socket(self) -> zmq.asyncio.Socket:
        assert self._sock is not None, "CoreChannel.start() was not called"
        return self._sock

    def _send(self, session: _Session, data: bytes) -> bool:
        """Send to an attached client; one that cannot take it (gone, not reading) is dropped."""
        if session.gone:
            return False
        problem = _send_now(self._socket(), [session.info.identity, data])
        if problem:
            self._drop(session, problem)
            return False
        return True

    def _drop(self, session: _Session, reason: str, *, bye: str | None = None) -> None:
        """Forget a client now; its task finishes the request in progress and then runs on_client_gone."""
        if session.gone:
            return
        session.gone = True
        identity = session.info.identity
        if self._sessions.get(identity) is session:
            del self._sessions[identity]
        for queue in session.lanes.values():
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
        if bye is not None:  # best effort: it tells a client that is still there to say hello again
            _send_now(self._socket(), [identity, Bye(bye).encode()])
        log.info("%s gone: %s", session.info, reason)

    def _reject(self, identity: bytes, error: ProtocolError) -> None:
        """Answer a bad frame with an error frame (never an error frame with another), logging it sparingly."""
        session = self._sessions.get(identity)
        who = str(session.info) if session else f"unattached peer {identity.hex()}"
        level = logging.INFO if error.code is ErrorCode.NOT_ATTACHED else logging.WARNING
        self._log_limited(identity, level, "%s: rejected a frame: %s", who, error)
        if error.msg_type != ErrorFrame.TYPE:
            _send_now(self._socket(), [identity, ErrorFrame(error.code, error.detail, error.msg_id).encode()])

    def _log_limited(self, key: bytes, level: int, fmt: str, *args: object) -> None:
        suppressed = self._log_limit.check(key)
        if suppressed is not None:
            log.log(level, fmt + (f" ({suppressed} similar lines suppressed)" if suppressed else ""), *args)

    async def _watch_disconnects(self, monitor: zmq.asyncio.Socket) -> None:
        """Connections accepted and closed. A new one over the limits is shut down at once; a closed one (e.g. a
        client was killed) is someone's, but ZeroMQ does not say whose, so every client is probed with a
        heartbeat: the one that is gone fails with EHOSTUNREACH and is dropped now, not at the next beat."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except (zmq.ZMQError, RuntimeError) as exc:  # the monitor only speeds things up: heartbeats suffice
                log.warning("control channel: connection monitor failed: %s", exc)
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._connections.accepted(int(event["value"]))
                self._has_clients.set()  # the tick loop watches the hello deadline
            else:
                self._connections.closed(int(event["value"]))
                loop.call_later(0.01, self._probe)  # after ZeroMQ has removed the peer's routing entry

    def _probe(self) -> None:
        for session in list(self._sessions.values()):
            self._send(session, self._heartbeat)

    async def _tick_loop(self) -> None:
        """Heartbeats out every interval; clients silent for ``expiry`` are dropped, checked exactly on time."""
        next_beat = time.monotonic()
        while True:
            if not self._sessions and not self._connections:  # nobody to watch: an idle core costs nothing
                self._has_clients.clear()
                await self._has_clients.wait()
                next_beat = time.monotonic()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.interval
                for session in list(self._sessions.values()):
                    self._send(session, self._heartbeat)
            for session in list(self._sessions.values()):
                silent = now - session.info.last_seen
                if silent > self.expiry:
                    self._drop(session, f"no heartbeat for {silent:.1f} s", bye="no heartbeat from this client")
            self._connections.close_silent({s.info.pid for s in self._sessions.values()})
            wake = min([next_beat, *(s.info.last_seen + self.expiry for s in self._sessions.values())])
            await asyncio.sleep(max(0.0, wake - time.monotonic()) + 0.005)


def _peer_credentials(frame: zmq.Frame) -> tuple[int, int] | None:
    """(pid, uid) of the connection a message came on: ZeroMQ's ``Peer-Address`` for ipc:// is
    ``host:uid:gid:pid`` from SO_PEERCRED, which the peer cannot forge (tcp:// has none)."""
    try:
        address = str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return None
    fields = address.rsplit(":", 3)
    if len(fields) != 4 or not (fields[1].isdigit() and fields[3].isdigit()):
        return None
    return int(fields[3]), int(fields[1])


def max_connections() -> int:
    """Control connections the core takes before refusing more: within what its file-descriptor limit leaves
    after FD_RESERVE, so that libzmq (which aborts the process when accept() fails with EMFILE) never gets there."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(4096, (soft - FD_RESERVE) // 2))


@dataclass
class _Connection:
    fd: int
    inode: int
    pid: int
    accepted: float


class _Connections:
    """The control socket's accepted connections, as ZeroMQ's monitor reports them (by file descriptor).

    libzmq owns the descriptors; the core never closes one. It shuts a connection down (``shutdown(2)``), after
    checking that the descriptor still is the same socket (inode), and libzmq then closes it as it would any
    connection the peer dropped. Used to refuse connections over the limits (in total, per process) and to close
    those that never said hello (``close_silent``)."""

    def __init__(self, limit: int, log_limited: Callable[..., None]) -> None:
        self.limit = limit
        self._log = log_limited
        self._by_fd: dict[int, _Connection] = {}

    def __bool__(self) -> bool:
        return bool(self._by_fd)

    def accepted(self, fd: int) -> None:
        try:
            inode = os.fstat(fd).st_ino
            with socket.socket(fileno=os.dup(fd)) as sock:
                pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))[0]
        except OSError:
            return  # gone already
        connection = _Connection(fd, inode, pid, time.monotonic())
        if len(self._by_fd) >= self.limit:
            self._log(b"limit", logging.WARNING, "control channel: refusing a connection from pid %d: %d open, "
                      "the limit (from the file-descriptor limit)", pid, len(self._by_fd))
            self._shut(connection)
            return
        if sum(c.pid == pid for c in self._by_fd.values()) >= MAX_CONNECTIONS_PER_PID:
            self._log(b"pid%d" % pid, logging.WARNING, "control channel: refusing a connection from pid %d: it "
                      "already holds %d", pid, MAX_CONNECTIONS_PER_PID)
            self._shut(connection)
            return
        self._by_fd[fd] = connection

    def closed(self, fd: int) -> None:
        self._by_fd.pop(fd, None)

    def close_silent(self, attached_pids: set[int]) -> None:
        """Shut connections older than HELLO_DEADLINE from processes with no attached client."""
        now = time.monotonic()
        for connection in list(self._by_fd.values()):
            if now - connection.accepted > HELLO_DEADLINE and connection.pid not in attached_pids:
                self._log(b"silent", logging.INFO, "control channel: closing a connection from pid %d that did "
                          "not say hello within %.0f s", connection.pid, HELLO_DEADLINE)
                del self._by_fd[connection.fd]
                self._shut(connection)

    @staticmethod
    def _shut(connection: _Connection) -> None:
        try:
            if os.fstat(connection.fd).st_ino != connection.inode:
                return  # closed and the number reused meanwhile: not ours to touch
            with socket.socket(fileno=os.dup(connection.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _AllowedKeys:
    """ZAP credentials provider: CURVE clients whose public key is listed."""

    def __init__(self, keys: Collection[bytes]) -> None:
        self._keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._keys
        if not allowed:
            log.warning("control channel: refused a CURVE client with key %s", key.decode(errors="replace"))
        return allowed


# --- client side -------------------------------------------------------------------------------------------


class ClientState(Enum):
    IDLE = "idle"  # connect() not called yet
    ATTACHING = "attaching"  # saying hello (again), with backoff
    ATTACHED = "attached"
    CLOSED = "closed"


class Subscription:
    """Broadcasts in arrival order, as an async iterator; one that falls ``maxsize`` behind loses the oldest."""

    def __init__(self, owner: ClientChannel, kinds: frozenset[str] | None, maxsize: int) -> None:
        self._owner = owner
        self.kinds = kinds
        self.maxsize = maxsize
        self.dropped = 0
        self._queue: asyncio.Queue[EventBody | None] = asyncio.Queue()
        self._closed = False

    def _deliver(self, event: EventBody) -> None:
        if self._closed or (self.kinds is not None and event.KIND not in self.kinds):
            return
        if self._queue.qsize() >= self.maxsize:
            self._queue.get_nowait()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("control channel: a slow event subscriber lost %d events", self.dropped)
        self._queue.put_nowait(event)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._subscriptions.discard(self)
            self._queue.put_nowait(None)

    async def get(self) -> EventBody:
        """The next event; StopAsyncIteration once closed (by you or by the channel's close())."""
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def __aiter__(self) -> AsyncIterator[EventBody]:
        return self

    async def __anext__(self) -> EventBody:
        return await self.get()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ClientChannel:
    """A client's end: attaches to one core, stays attached across core restarts and moves.

    ``on_reattached(welcome)`` runs after every attach but the first (the core may be a new instance, or the
    old one that dropped us: re-map shm and push a full refresh either way); ``on_detached(reason)`` when the
    core is noticed gone. Both may be async; they run in order in a task of their own, so they may make
    requests. ``on_event(event)`` is called synchronously for every broadcast and must not block.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str,
        client_version: str = "",
        capabilities: Iterable[str] = _ALL_CAPABILITIES,
        curve: CurveClient | None = None,
        request_timeout: float = 10.0,
        on_reattached: Callable[[Welcome], object] | None = None,
        on_detached: Callable[[str], object] | None = None,
        on_event: Callable[[EventBody], object] | None = None,
        versions: Iterable[int] = SUPPORTED_VERSIONS,
        endpoints: Mapping[str, str] | None = None,
        warnings: Iterable[str] = (),
    ) -> None:
        _check_transport(endpoint, curve)
        #: Where this client serves people, told to the core in every hello (``state.json`` shows them).
        self.endpoints = tuple((endpoints or {}).items())
        #: What is unsafe about that, told the same way.
        self.warnings = tuple(warnings)
        self.endpoint = endpoint
        self.name = name
        self.client_version = client_version
        self.capabilities = tuple(capabilities)
        self.versions = tuple(versions)
        self.instance = os.urandom(8).hex()
        self.request_timeout = request_timeout
        self._curve = curve
        self._on_reattached = on_reattached
        self._on_detached = on_detached
        self._on_event = on_event
        self._state = ClientState.IDLE
        self._welcome: Welcome | None = None
        self._attach_count = 0
        self._why_detached = "not connected yet"
        self._interval = DEFAULT_INTERVAL
        self._last_seen = 0.0
        self._ids = itertools.count(1)
        self._hello_ids: deque[int] = deque(maxlen=32)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._subscriptions: set[Subscription] = set()
        self._sock: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._next_hello = 0.0
        self._hello_delay = BACKOFF_MIN
        self._left_endpoints: set[bytes] = set()
        self._first_welcome: asyncio.Future[Welcome] | None = None
        self._notifications: asyncio.Queue[tuple[Callable[..., object] | None, Any, str]] = asyncio.Queue()
        self._log_limit = _LogLimit()
        self._heartbeat = Heartbeat(self.instance).encode()
        self._tag = f"control channel client {name!r} (pid {os.getpid()})"

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def attached(self) -> bool:
        return self._state is ClientState.ATTACHED

    @property
    def welcome(self) -> Welcome | None:
        """The latest welcome: VM name, core instance, shm, capabilities..."""
        return self._welcome

    @property
    def expiry(self) -> float:
        return EXPIRY_INTERVALS * self._interval

    async def connect(self, timeout_s: float = 10.0) -> Welcome:
        """Connect and attach; returns the welcome. From here on the channel re-attaches by itself."""
        if self._state is not ClientState.IDLE:
            raise ChannelError(f"connect() called in state {self._state.value}")
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        for option, value in ((zmq.ROUTING_ID, self.instance.encode()), (zmq.IMMEDIATE, 1),
                              (zmq.MAXMSGSIZE, MAX_FRAME), (zmq.LINGER, 0), (zmq.RECONNECT_IVL, 100),
                              (zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)):
            sock.setsockopt(option, value)
        if self._curve is not None:
            sock.curve_secretkey = self._curve.keys.secret
            sock.curve_publickey = self._curve.keys.public
            sock.curve_serverkey = self._curve.server_public
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise ChannelError(f"cannot connect to {self.endpoint}: {exc}") from exc
        self._sock, self._monitor = sock, monitor
        self._state = ClientState.ATTACHING
        loop = asyncio.get_running_loop()
        self._first_welcome = loop.create_future()
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._supervise()),
                       loop.create_task(self._notify_loop()), loop.create_task(self._watch_connection(monitor))]
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(self._first_welcome)
        except TimeoutError:
            await self.close()
            raise AttachTimeout(f"{self._tag}: no welcome from {self.endpoint} within {timeout_s} s") from None
        except BaseException:
            await self.close()
            raise

    async def request(self, body: Op, *, timeout_s: float | None = None) -> Any:
        """Send one request and wait for its result. Raises RemoteError (the core said no), RequestTimeout,
        NotAttached (no core now, or it went away before answering: the request may or may not have run)."""
        if self._state is not ClientState.ATTACHED:
            raise NotAttached(f"not attached to the core: {self._why_detached}")
        limit = self.request_timeout if timeout_s is None else timeout_s
        request_id = next(self._ids)
        data = Request(request_id, body).encode()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        # Done at once unless ZeroMQ's queue to the core is full (or there is no connection right now).
        sent = cast("asyncio.Future[object]", self._socket().send(data))
        try:
            async with asyncio.timeout(limit):
                if not sent.done():
                    await asyncio.wait((sent, reply), return_when=asyncio.FIRST_COMPLETED)
                if sent.done() and sent.exception() is not None:
                    raise NotAttached(f"cannot send to the core: {sent.exception()}")
                return await reply
        except TimeoutError:
            raise RequestTimeout(f"no reply to {body.OP!r} request {request_id} within {limit} s") from None
        finally:
            self._pending.pop(request_id, None)
            if not sent.done():
                sent.cancel()

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None, *,
                  timeout_s: float | None = None) -> Any:
        """Execute a QMP command through the core's policy; QEMU's ``return`` value, or RemoteError."""
        return await self.request(QmpOp(command, arguments), timeout_s=timeout_s)

    async def send_input(self, events: Iterable[InputEvent], *, source: str = "",
                         timeout_s: float | None = None) -> None:
        await self.request(InputOp(tuple(events), source), timeout_s=timeout_s)

    async def release_input(self, source: str, *, timeout_s: float | None = None) -> None:
        """Release what ``source`` still holds, after the input it sent before."""
        await self.request(ReleaseInputOp(source), timeout_s=timeout_s)

    async def refresh(self, *, timeout_s: float | None = None) -> None:
        await self.request(RefreshOp(), timeout_s=timeout_s)

    async def agent_write(self, data: bytes, *, timeout_s: float | None = None) -> None:
        await self.request(AgentWriteOp(bytes(data)), timeout_s=timeout_s)

    async def agent_ack(self, frames: int, *, timeout_s: float | None = None) -> None:
        await self.request(AgentAckOp(frames), timeout_s=timeout_s)

    def subscribe(self, kinds: Iterable[str] | None = None, *, maxsize: int = 1000) -> Subscription:
        """Broadcasts of ``kinds`` (all if None) from now on; use as ``with ch.subscribe() as s: async for``."""
        subscription = Subscription(self, frozenset(kinds) if kinds is not None else None, maxsize)
        self._subscriptions.add(subscription)
        return subscription

    def move_to(self, endpoint: str) -> None:
        """Follow the VM to another core (after a ``migrated`` broadcast): detach here, attach there."""
        _check_transport(endpoint, self._curve)
        sock = self._socket()
        with contextlib.suppress(zmq.ZMQError):
            sock.disconnect(self.endpoint)
        sock.connect(endpoint)
        log.info("%s: moving from %s to %s", self._tag, self.endpoint, endpoint)
        self._left_endpoints.add(self.endpoint.encode())
        self._left_endpoints.discard(endpoint.encode())
        self.endpoint = endpoint
        self._hello_ids.clear()
        self._detach(f"moved to {endpoint}")
        self._hello_soon()

    async def close(self) -> None:
        """Say bye, fail what is pending, stop. Safe to call more than once."""
        if self._state is ClientState.CLOSED:
            return
        was_attached = self._state is ClientState.ATTACHED
        self._state = ClientState.CLOSED
        self._why_detached = "the channel is closed"
        self._fail_pending("the channel is closed")
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_exception(NotAttached("the channel was closed while attaching"))
            self._first_welcome.exception()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._sock is not None:
            if was_attached:
                _send_now(self._sock, [Bye("client closing").encode()])
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sock.close(linger=_CLOSE_LINGER_MS if was_attached else 0)
        for subscription in list(self._subscriptions):
            subscription.close()
        log.info("%s: closed", self._tag)

    # --- internals ---

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            raise NotAttached("connect() was not called")
        return self._sock

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(NotAttached(reason))

    def _detach(self, reason: str, level: int = logging.WARNING) -> None:
        """The core is gone or does not know us: fail pending requests now, say hello again at once."""
        if self._state is not ClientState.ATTACHED:
            return
        self._state = ClientState.ATTACHING
        self._why_detached = reason
        log.log(level, "%s: detached from the core: %s; re-attaching", self._tag, reason)
        self._fail_pending(f"the core went away before answering: {reason}")
        self._notifications.put_nowait((self._on_detached, reason, "on_detached"))
        self._hello_soon()

    def _attach(self, welcome: Welcome) -> None:
        self._welcome = welcome
        self._state = ClientState.ATTACHED
        self._interval = welcome.heartbeat_interval
        self._last_seen = time.monotonic()
        self._hello_ids.clear()
        self._attach_count += 1
        log.info("%s: attached to VM %r (core pid %d, instance %s, protocol %d)", self._tag, welcome.vm,
                 welcome.core_pid, welcome.instance, welcome.version)
        if self._first_welcome is not None and not self._first_welcome.done():
            self._first_welcome.set_result(welcome)
        if self._attach_count > 1:
            self._notifications.put_nowait((self._on_reattached, welcome, "on_reattached"))
        self._wake.set()

    async def _read_loop(self) -> None:
        sock = self._socket()
        while True:
            try:
                parts = await sock.recv_multipart()
            except zmq.ZMQError as exc:
                log.warning("%s: receive failed: %s", self._tag, exc)
                await asyncio.sleep(0.1)
                continue
            try:
                self._on_parts(parts)
            except Exception:
                log.exception("%s: failed to handle a frame from the core", self._tag)
            # pyzmq resolves a receive at once while messages are queued, so without this a burst (a 64 MiB agent
            # reply is a thousand frames) would be handled in one go, the rest of the loop waiting behind it.
            await asyncio.sleep(0)

    def _on_parts(self, parts: list[bytes]) -> None:
        if len(parts) != 1:
            self._reject(ProtocolError(ErrorCode.MALFORMED, f"expected one frame per message, got {len(parts)}"))
            return
        try:
            message = decode(parts[0])
        except ProtocolError as exc:
            self._reject(exc)
            return
        attached = self._state is ClientState.ATTACHED
        if isinstance(message, Welcome):
            if attached or message.id not in self._hello_ids:
                log.debug("%s: ignoring a welcome to an earlier hello (%d)", self._tag, message.id)
            else:
                self._attach(message)
        elif isinstance(message, Heartbeat):
            if attached and self._welcome is not None and message.instance != self._welcome.instance:
                self._detach(f"the core restarted (instance {message.instance})")
            elif attached:
                self._last_seen = time.monotonic()
        elif isinstance(message, Reply):
            self._last_seen = time.monotonic()
            future = self._pending.get(message.id)
            if future is None or future.done():
                log.debug("%s: late or unknown reply %d", self._tag, message.id)
            elif message.error is None:
                future.set_result(message.result)
            else:
                future.set_exception(RemoteError(message.error.error_class, message.error.desc))
        elif isinstance(message, Broadcast):
            if attached:
                self._last_seen = time.monotonic()
                self._deliver(message.body)
        elif isinstance(message, ErrorFrame):
            self._on_error_frame(message)
        elif isinstance(message, Bye):
            self._detach(f"the core said bye ({message.reason or 'no reason'})", logging.INFO)  # an orderly end
        else:
            self._reject(ProtocolError(ErrorCode.UNEXPECTED, f"{message.TYPE!r} frames go from clients to the core",
                                       msg_type=message.TYPE))

    def _on_error_frame(self, error: ErrorFrame) -> None:
        future = self._pending.get(error.id) if error.id is not None else None
        if error.code == ErrorCode.NOT_ATTACHED:
            if future is not None and not future.done():
                future.set_exception(NotAttached(f"the core does not know this client: {error.detail}"))
            self._detach("the core does not know this client (it restarted or dropped us)")
        elif error.code == ErrorCode.UNSUPPORTED_VERSION and error.id in self._hello_ids:
            mismatch = VersionMismatch(f"{self.endpoint}: {error.detail}")
            if self._first_welcome is not None and not self._first_welcome.done():
                self._first_welcome.set_exception(mismatch)
            else:
                self._log_limited(logging.ERROR, "%s: cannot re-attach: %s", self._tag, mismatch)
        elif future is not None and not future.done():
            future.set_exception(RemoteProtocolError(error.code, error.detail))
        else:
            self._log_limited(logging.WARNING, "%s: the core rejected a frame: %s: %s", self._tag, error.code,
                              error.detail)

    def _deliver(self, event: EventBody) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("%s: on_event callback failed", self._tag)
        for subscription in list(self._subscriptions):
            subscription._deliver(event)

    def _reject(self, error: ProtocolError) -> None:
        self._log_limited(logging.WARNING, "%s: bad frame from the core: %s", self._tag, error)
        if error.msg_type != ErrorFrame.TYPE and self._sock is not None:
            _send_now(self._sock, [ErrorFrame(error.code, error.detail, error.msg_id).encode()])

    def _log_limited(self, level: int, fmt: str, *args: object) -> None:
        suppressed = self._log_limit.check(fmt)
        if suppressed is not None:
            log.log(level, fmt + (f" ({suppressed} similar lines suppressed)" if suppressed else ""), *args)

    def _send_hello(self) -> None:
        hello_id = next(self._ids)
        self._hello_ids.append(hello_id)
        hello = Hello(id=hello_id, versions=self.versions, instance=self.instance, pid=os.getpid(),
                      uid=os.getuid(), client_name=self.name, client_version=self.client_version,
                      capabilities=self.capabilities, endpoints=self.endpoints, warnings=self.warnings)
        problem = _send_now(self._socket(), [hello.encode()], full="no connection")
        if problem:
            log.debug("%s: hello not sent (core not reachable): %s", self._tag, problem)

    def _hello_soon(self) -> None:
        """Say hello now and restart the backoff (detached, or a connection to a core just came up)."""
        self._next_hello = 0.0
        self._hello_delay = BACKOFF_MIN
        self._wake.set()

    async def _watch_connection(self, monitor: zmq.asyncio.Socket) -> None:
        """ZeroMQ's connection events: hello as soon as a core is reachable, detach as soon as it is not."""
        while True:
            try:
                message = parse_monitor_message(await monitor.recv_multipart())
            except (zmq.ZMQError, RuntimeError) as exc:  # the monitor only speeds things up: heartbeats suffice
                log.warning("%s: connection monitor failed: %s", self._tag, exc)
                return
            event = message["event"]
            if message["endpoint"] in self._left_endpoints:
                continue  # news of a connection we left with move_to()
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._state is ClientState.ATTACHING:
                    self._hello_soon()
            elif event == zmq.EVENT_DISCONNECTED:
                self._detach("the connection to the core was lost")
            else:
                self._log_limited(logging.WARNING, "%s: the handshake with %s failed (%s): wrong CurveZMQ keys?",
                                  self._tag, self.endpoint, event)

    async def _supervise(self) -> None:
        """Heartbeats and liveness while attached; hello with backoff while not."""
        next_beat = 0.0
        while self._state is not ClientState.CLOSED:
            self._wake.clear()
            now = time.monotonic()
            if self._state is ClientState.ATTACHED:
                silent = now - self._last_seen
                if silent > self.expiry:
                    self._detach(f"no heartbeat from the core for {silent:.1f} s")
                    continue
                if now >= next_beat:
                    next_beat = now + self._interval
                    problem = _send_now(self._socket(), [self._heartbeat], full="no connection")
                    if problem:
                        self._detach(f"the core is not reachable ({problem})")
                        continue
                timeout = min(next_beat, self._last_seen + self.expiry) - now + 0.005
            else:
                if now >= self._next_hello:
                    self._send_hello()
                    self._next_hello = now + self._hello_delay
                    self._hello_delay = min(self._hello_delay * 2, BACKOFF_MAX)
                timeout = self._next_hello - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, timeout)):
                    await self._wake.wait()

    async def _notify_loop(self) -> None:
        while True:
            callback, argument, what = await self._notifications.get()
            await _call(callback, argument, what=what)


__all__ = [
    "BACKOFF_MAX", "BACKOFF_MIN", "CONTROL_SOCKET_NAME", "DEFAULT_INTERVAL", "EXPIRY_INTERVALS", "PROTOCOL_VERSION",
    "AttachTimeout", "ChannelError", "ClientCallback", "ClientChannel", "ClientInfo", "ClientState", "CoreChannel",
    "CoreStatus", "CurveClient", "CurveKeyPair", "CurveServer", "NotAttached", "RemoteError", "RemoteProtocolError",
    "RequestError", "RequestHandler", "RequestTimeout", "Subscription", "VersionMismatch", "control_socket_path",
    "curve_supported", "generate_curve_keypair", "ipc_endpoint",
]
