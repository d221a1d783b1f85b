"""The control channel's wire format, without I/O: the one place that says what every frame means.

docs/control.md mirrors this module (tests check that every type, field, op and kind is documented there);
change both together and follow the version rule written there. A frame is one msgpack map::

    {"v": 1, "t": "request", "id": 7, "op": "qmp", "args": {"command": "query-status"}}

``v`` is the protocol version, ``t`` the message type, ``id`` pairs requests (and hellos) with their answers.
:func:`decode` validates a frame strictly and raises :class:`ProtocolError` for anything wrong, never another
exception, so a receiver can answer every bad frame with an ``error`` frame and carry on. Unknown keys are
ignored (new optional keys need no version change); unknown types, ops and event kinds are errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, NoReturn, TypeGuard

import msgpack

#: The version this code writes. Bump it on any incompatible change (see docs/control.md, "Versions").
PROTOCOL_VERSION = 1
#: Every version this code can speak; a core picks the highest one the client also offers.
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

#: Largest frame either side sends or accepts, in bytes (ZMQ_MAXMSGSIZE is set to it as well).
MAX_FRAME = 4 << 20
#: Names: message types, ops, kinds, error classes, QMP commands, client and VM names.
MAX_NAME = 256
#: Free text: error descriptions and details, reasons, paths, endpoints.
MAX_TEXT = 64 << 10
#: Free-form values (QMP arguments, results, events) may nest this deep.
MAX_DEPTH = 32
#: Items of one array or map, checked by msgpack from the header before anything is built.
MAX_CONTAINER = 1 << 16
#: Objects in one frame (every array and map item), counted while decoding: without it a 4 MiB frame of empty maps
#: would be four million dicts (~300 MB, a second of the loop) before any check could look at it.
MAX_ELEMENTS = 1 << 17
MAX_VERSIONS = 16
MAX_CAPABILITIES = 64
MAX_INPUT_EVENTS = 4096
#: An input source's name (one per VNC viewer, say).
MAX_SOURCE = 64
MAX_AGENT_CHUNK = 1 << 20
#: ``agent_data`` frames a client that acknowledges them (op ``agent_ack``) may have unacknowledged: the core reads
#: no more of the agent's channel until it acknowledges (a 64 MiB reply never fills the 1000-frame send queue).
AGENT_WINDOW = 64
MAX_CONSOLE_CHUNK = 64 << 10
#: Clipboard text, in bytes of UTF-8 (QEMU's own VNC limit: it inflates no more than 1 MiB).
MAX_CLIPBOARD = 1 << 20
MAX_ENDPOINTS = 16
#: Warnings a client gives about how it is exposed (e.g. VNC on a public address without TLS or a password).
MAX_WARNINGS = 16
#: VNC listeners one client reports, and viewers (a client closes its VNC connections beyond its own limit).
MAX_VNC_SERVERS = 16
MAX_VNC_VIEWERS = 4096
#: The VNC authentication challenge and response (RFC 6143 7.2.2).
VNC_CHALLENGE_SIZE = 16
MAX_ID = (1 << 63) - 1
#: Pointer coordinates are framebuffer pixels (shm allows up to 16384) and wheel steps clicks.
MAX_COORDINATE = 0xFFFF
MAX_WHEEL_STEPS = 64
MAX_PID = (1 << 31) - 1
MAX_UID = (1 << 32) - 1
MAX_GENERATION = (1 << 32) - 1

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1


class Capability(StrEnum):
    """What a client may ask for in its hello; the welcome says which ones the core granted."""

    QMP = "qmp"  # the ``qmp`` op
    QMP_EVENTS = "qmp-events"  # ``qmp_event`` broadcasts
    INPUT = "input"  # the ``input`` op
    DISPLAY = "display"  # the ``refresh`` op and ``display`` broadcasts
    AGENT = "agent"  # the ``agent_write`` op and ``agent_data`` broadcasts
    CONSOLE = "console"  # the ``console_write`` op and ``console_data`` broadcasts
    VNC = "vnc"  # the ``vnc_*`` ops, ``vnc_settings`` and ``vnc_reload`` broadcasts: the client serves VNC
    CLIPBOARD = "clipboard"  # the ``clipboard_set`` op and ``clipboard`` broadcasts


ALL_CAPABILITIES = frozenset(Capability)


class ErrorCode(StrEnum):
    """``code`` of an ``error`` frame: what was wrong with the frame it answers."""

    MALFORMED = "malformed"  # not one msgpack map with string keys, or not one ZMQ frame per message
    TOO_LARGE = "too-large"  # over MAX_FRAME (larger frames are dropped by ZMQ before they are read)
    UNSUPPORTED_VERSION = "unsupported-version"  # no common protocol version, or a frame in a version not spoken
    UNKNOWN_TYPE = "unknown-type"
    UNKNOWN_OP = "unknown-op"
    UNKNOWN_KIND = "unknown-kind"
    INVALID = "invalid"  # a field is missing, of the wrong type, or out of range
    UNEXPECTED = "unexpected"  # a valid frame the receiver does not take (wrong direction)
    NOT_ATTACHED = "not-attached"  # the core does not know this client: say hello (again)
    BUSY = "busy"  # too many requests of this client are queued in the core
    INTERNAL = "internal"  # the receiver failed to build its answer (its log says why)


class ProtocolError(Exception):
    """The peer sent a frame that breaks the protocol. ``msg_id`` and ``msg_type`` are set when readable."""

    def __init__(self, code: ErrorCode, detail: str, *, msg_id: int | None = None,
                 msg_type: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.msg_id = msg_id
        self.msg_type = msg_type


class EncodeError(ValueError):
    """We tried to send something that cannot be a frame (not msgpack-serialisable, or over MAX_FRAME)."""


# --- request bodies ("op") ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEvent:
    """A key pressed or released, by QEMU qcode name or by XT scancode (exactly one of them)."""

    down: bool
    qcode: str | None = None
    scancode: int | None = None


@dataclass(frozen=True)
class PointerEvent:
    """Absolute pointer position in framebuffer pixels with the RFB button mask held (bit 0 = left)."""

    x: int
    y: int
    buttons: int = 0


@dataclass(frozen=True)
class WheelEvent:
    """Wheel clicks at the current position: positive scrolls up, negative down."""

    steps: int


InputEvent = KeyEvent | PointerEvent | WheelEvent


@dataclass(frozen=True)
class QmpOp:
    """Execute one QMP command through the core's ``client`` policy; the result is QEMU's ``return``."""

    OP: ClassVar[str] = "qmp"
    command: str
    arguments: dict[str, Any] | None = None


@dataclass(frozen=True)
class InputOp:
    """Keyboard and pointer events for the guest, applied in order. ``source`` names who sent them within the
    client (e.g. one VNC viewer), so that what that source still holds can be released when it goes."""

    OP: ClassVar[str] = "input"
    events: tuple[InputEvent, ...]
    source: str = ""


@dataclass(frozen=True)
class ReleaseInputOp:
    """Release every key and button ``source`` pressed and did not release (the viewer went away), after all the
    input it sent before."""

    OP: ClassVar[str] = "input_release"
    source: str = ""


@dataclass(frozen=True)
class RefreshOp:
    """Ask the core to publish the whole screen again (after a ring overrun or a re-attach)."""

    OP: ClassVar[str] = "refresh"


@dataclass(frozen=True)
class AgentWriteOp:
    """Bytes for the guest agent's channel, relayed unparsed."""

    OP: ClassVar[str] = "agent_write"
    data: bytes


@dataclass(frozen=True)
class AgentAckOp:
    """The client has handled ``frames`` more ``agent_data`` frames (flow control, see ``AGENT_WINDOW``)."""

    OP: ClassVar[str] = "agent_ack"
    frames: int


@dataclass(frozen=True)
class ConsoleWriteOp:
    """Bytes typed on the guest's serial console, relayed unparsed."""

    OP: ClassVar[str] = "console_write"
    data: bytes


@dataclass(frozen=True)
class ClipboardSetOp:
    """Set the guest's clipboard to ``text`` (through QEMU's vdagent; at most MAX_CLIPBOARD bytes of UTF-8).
    ``source`` names who pasted within the client (a viewer), so the ``clipboard`` broadcast that follows can
    skip it."""

    OP: ClassVar[str] = "clipboard_set"
    text: str
    source: str = ""


@dataclass(frozen=True)
class VncAddress:
    """A VNC listener or a viewer's address, as QAPI's ``VncBasicInfo`` has it: ``host`` and ``service`` as
    numbers (a unix socket: empty host, the path as service), ``family`` one of ``ipv4 ipv6 unix unknown``."""

    host: str
    service: str
    family: str
    websocket: bool = False
    #: A listener that requires VeNCrypt: its sub-auth as QAPI names it (``x509-vnc``...); "" in the clear.
    vencrypt: str = ""


@dataclass(frozen=True)
class VncViewer:
    """One connection to the client's VNC server: ``id`` is the client's own number for it, ``server`` the index
    of the listener it came in on (in the client's ``vnc_state``), ``initialized`` whether it passed the
    handshake and authentication (QEMU's VNC_INITIALIZED)."""

    id: int
    address: VncAddress
    server: int = 0
    initialized: bool = False
    #: The subject of its verified client certificate (QAPI's ``x509_dname``), "" without one.
    x509_dname: str = ""


#: What a ``vnc_viewer`` request reports, as QEMU's events: VNC_CONNECTED, VNC_INITIALIZED, VNC_DISCONNECTED.
VNC_VIEWER_EVENTS = ("connected", "initialized", "disconnected")


@dataclass(frozen=True)
class VncStateOp:
    """The client's VNC server as it is now: its listeners and every viewer. Replaces what the core knew of this
    client (sent after each attach and whenever a listener changes); raises no events."""

    OP: ClassVar[str] = "vnc_state"
    servers: tuple[VncAddress, ...]
    viewers: tuple[VncViewer, ...] = ()


@dataclass(frozen=True)
class VncViewerOp:
    """A viewer connected, passed authentication, or left: the core tells QMP peers (VNC_* events)."""

    OP: ClassVar[str] = "vnc_viewer"
    event: str
    viewer: VncViewer


@dataclass(frozen=True)
class VncAuthOp:
    """Check a viewer's VNC authentication response against the credentials the core holds (the password never
    leaves the core). The result is a map: ``ok`` (bool) and ``reason`` (str, for the viewer when not ok)."""

    OP: ClassVar[str] = "vnc_auth"
    viewer: int
    host: str
    challenge: bytes
    response: bytes


Op = (QmpOp | InputOp | ReleaseInputOp | RefreshOp | AgentWriteOp | AgentAckOp | ConsoleWriteOp | ClipboardSetOp
      | VncStateOp | VncViewerOp | VncAuthOp)

#: The capability a client must have been granted to use an op.
OP_CAPABILITY: dict[str, Capability] = {
    QmpOp.OP: Capability.QMP,
    InputOp.OP: Capability.INPUT,
    ReleaseInputOp.OP: Capability.INPUT,
    RefreshOp.OP: Capability.DISPLAY,
    AgentWriteOp.OP: Capability.AGENT,
    AgentAckOp.OP: Capability.AGENT,
    ConsoleWriteOp.OP: Capability.CONSOLE,
    ClipboardSetOp.OP: Capability.CLIPBOARD,
    VncStateOp.OP: Capability.VNC,
    VncViewerOp.OP: Capability.VNC,
    VncAuthOp.OP: Capability.VNC,
}


# --- broadcast bodies ("kind") -----------------------------------------------------------------------------


@dataclass(frozen=True)
class QmpEvent:
    """A QEMU event as QMP delivers it (``event``, ``data``, ``timestamp``)."""

    KIND: ClassVar[str] = "qmp_event"
    event: dict[str, Any]


@dataclass(frozen=True)
class RunStateChanged:
    """The VM's vmfront run state (``core_daemon.state.RunState`` values) and QEMU's own status."""

    KIND: ClassVar[str] = "run_state"
    state: str
    qemu_status: str | None = None


@dataclass(frozen=True)
class Migrating:
    """An outgoing migration started: stateful agent operations should wait or fail as busy."""

    KIND: ClassVar[str] = "migrating"


@dataclass(frozen=True)
class Migrated:
    """The guest now runs under the core at ``endpoint`` (a control-channel endpoint): re-attach there."""

    KIND: ClassVar[str] = "migrated"
    endpoint: str


@dataclass(frozen=True)
class AgentData:
    """Bytes the guest agent sent, relayed unparsed."""

    KIND: ClassVar[str] = "agent_data"
    data: bytes


@dataclass(frozen=True)
class DisplayChanged:
    """The display's shared memory appeared, changed or went away (same fields as in the welcome)."""

    KIND: ClassVar[str] = "display"
    shm: str | None
    shm_generation: int | None
    display_socket: str | None


@dataclass(frozen=True)
class Shutdown:
    """The VM is ending (QEMU exited or is being stopped): do not expect it back from this core."""

    KIND: ClassVar[str] = "shutdown"
    reason: str


@dataclass(frozen=True)
class ConsoleData:
    """Bytes the guest wrote to its serial port, relayed unparsed, to every client granted ``console``."""

    KIND: ClassVar[str] = "console_data"
    data: bytes


@dataclass(frozen=True)
class VncReload:
    """QMP ``display-reload`` of ``vnc``, answered by the core: every client re-reads its VNC TLS certificates
    (``tls_certs``), keeping the viewers it has."""

    KIND: ClassVar[str] = "vnc_reload"
    tls_certs: bool


@dataclass(frozen=True)
class ClipboardChanged:
    """The guest's clipboard now holds ``text``: copied in the guest (``origin`` empty), or set by a client's
    ``clipboard_set`` (``origin`` is that client's instance and the op's source, "INSTANCE/SOURCE")."""

    KIND: ClassVar[str] = "clipboard"
    text: str
    origin: str = ""


@dataclass(frozen=True)
class VncSettings:
    """How the client's VNC server is to authenticate viewers, decided by the core (which holds the credentials):
    ``auth`` is ``none`` or ``vnc`` (QEMU's VncPrimaryAuth names). Sent to a client when it attaches and to every
    client when it changes; a client serves no viewer before it has heard it."""

    KIND: ClassVar[str] = "vnc_settings"
    auth: str


EventBody = (QmpEvent | RunStateChanged | Migrating | Migrated | AgentData | DisplayChanged | Shutdown | ConsoleData
             | VncReload | ClipboardChanged | VncSettings)

#: Broadcasts of these kinds go only to clients granted the capability; the others go to every client.
KIND_CAPABILITY: dict[str, Capability] = {
    QmpEvent.KIND: Capability.QMP_EVENTS,
    AgentData.KIND: Capability.AGENT,
    DisplayChanged.KIND: Capability.DISPLAY,
    ConsoleData.KIND: Capability.CONSOLE,
    VncReload.KIND: Capability.VNC,
    ClipboardChanged.KIND: Capability.CLIPBOARD,
    VncSettings.KIND: Capability.VNC,
}


# --- messages (frames) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfo:
    """A failed request's error, QMP style: ``error_class`` (e.g. ``GenericError``) and a description."""

    error_class: str
    desc: str


@dataclass(frozen=True)
class Hello:
    """Client → core, first: who the client is, which protocol versions it speaks, what it wants."""

    TYPE: ClassVar[str] = "hello"
    id: int
    versions: tuple[int, ...]
    instance: str
    pid: int
    uid: int
    client_name: str
    client_version: str = ""
    capabilities: tuple[str, ...] = ()
    #: Where the client serves people, e.g. (("vnc", "127.0.0.1:5900"), ("monitor", "unix:/run/...")): the core
    #: shows them in ``state.json``, so ``vmfront list`` and ``vmfront monitor`` find them.
    endpoints: tuple[tuple[str, str], ...] = ()
    #: What is unsafe about how the client serves people (``state.json`` and ``vmfront status`` show it).
    warnings: tuple[str, ...] = ()

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "id": self.id, "versions": list(self.versions), "instance": self.instance, "pid": self.pid,
            "uid": self.uid, "client_name": self.client_name, "client_version": self.client_version,
            "capabilities": list(self.capabilities)}
        if self.endpoints:
            fields["endpoints"] = dict(self.endpoints)
        if self.warnings:
            fields["warnings"] = [_clip(w) for w in self.warnings]
        return _pack(self.TYPE, fields)


@dataclass(frozen=True)
class Welcome:
    """Core → client, the answer to a hello: the chosen version and what the client needs to start."""

    TYPE: ClassVar[str] = "welcome"
    id: int
    version: int
    vm: str
    instance: str
    core_pid: int
    run_state: str
    heartbeat_interval: float
    shm: str | None = None
    shm_generation: int | None = None
    display_socket: str | None = None
    capabilities: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return _pack(self.TYPE, {
            "id": self.id, "version": self.version, "vm": self.vm, "instance": self.instance,
            "core_pid": self.core_pid, "run_state": self.run_state,
            "heartbeat_interval": float(self.heartbeat_interval), "shm": self.shm,
            "shm_generation": self.shm_generation, "display_socket": self.display_socket,
            "capabilities": list(self.capabilities)}, version=self.version)


@dataclass(frozen=True)
class Heartbeat:
    """Both ways, every heartbeat interval: the sender is alive; ``instance`` says which incarnation."""

    TYPE: ClassVar[str] = "heartbeat"
    instance: str

    def encode(self) -> bytes:
        return _pack(self.TYPE, {"instance": self.instance})


@dataclass(frozen=True)
class Request:
    """Client → core: one operation; answered by exactly one reply or error frame with the same id."""

    TYPE: ClassVar[str] = "request"
    id: int
    body: Op

    @property
    def op(self) -> str:
        return self.body.OP

    def encode(self) -> bytes:
        return _pack(self.TYPE, {"id": self.id, "op": self.body.OP, "args": _op_args(self.body)})


@dataclass(frozen=True)
class Reply:
    """Core → client: the result of request ``id`` (``error`` is None) or why it failed."""

    TYPE: ClassVar[str] = "reply"
    id: int
    result: Any = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        if self.error is None:
            return _pack(self.TYPE, {"id": self.id, "ok": True, "result": self.result})
        return _pack(self.TYPE, {"id": self.id, "ok": False,
                                 "error": {"class": self.error.error_class[:MAX_NAME],
                                           "desc": _clip(self.error.desc)}})


@dataclass(frozen=True)
class Broadcast:
    """Core → every attached client (wire type ``event``): something happened."""

    TYPE: ClassVar[str] = "event"
    body: EventBody

    @property
    def kind(self) -> str:
        return self.body.KIND

    def encode(self) -> bytes:
        return _pack(self.TYPE, {"kind": self.body.KIND, "data": _event_data(self.body)})


@dataclass(frozen=True)
class ErrorFrame:
    """Either way (wire type ``error``): a frame could not be taken; ``id`` is the offending frame's, if known."""

    TYPE: ClassVar[str] = "error"
    code: str
    detail: str
    id: int | None = None

    def encode(self) -> bytes:
        return _pack(self.TYPE, {"code": self.code[:MAX_NAME], "detail": _clip(self.detail), "id": self.id})


@dataclass(frozen=True)
class Bye:
    """Either way: the sender is leaving on purpose; the receiver forgets it at once."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""

    def encode(self) -> bytes:
        return _pack(self.TYPE, {"reason": _clip(self.reason)})


Message = Hello | Welcome | Heartbeat | Request | Reply | Broadcast | ErrorFrame | Bye

#: Types whose shape is frozen across protocol versions, so any version can read them.
VERSION_INDEPENDENT_TYPES = frozenset({Hello.TYPE, ErrorFrame.TYPE})


def choose_version(offered: Iterable[int], supported: Iterable[int] = SUPPORTED_VERSIONS) -> int | None:
    """The highest version both sides speak, or None."""
    common = set(offered) & set(supported)
    return max(common) if common else None


# --- encoding ----------------------------------------------------------------------------------------------


def _pack(msg_type: str, fields: dict[str, Any], *, version: int = PROTOCOL_VERSION) -> bytes:
    try:
        data: bytes = msgpack.packb({"v": version, "t": msg_type, **fields}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode a {msg_type!r} frame: {exc}") from exc
    if len(data) > MAX_FRAME:
        raise EncodeError(f"{msg_type!r} frame of {len(data)} bytes exceeds the limit of {MAX_FRAME} bytes")
    return data


def _clip(text: str) -> str:
    """Free text comes from exception messages and the like: cut it to what the peer accepts."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _input_event_map(event: InputEvent) -> dict[str, Any]:
    if isinstance(event, KeyEvent):
        key: dict[str, Any] = {"type": "key", "down": event.down}
        if event.qcode is not None:
            key["qcode"] = event.qcode
        if event.scancode is not None:
            key["scancode"] = event.scancode
        return key
    if isinstance(event, PointerEvent):
        return {"type": "pointer", "x": event.x, "y": event.y, "buttons": event.buttons}
    return {"type": "wheel", "steps": event.steps}


def _op_args(body: Op) -> dict[str, Any]:
    if isinstance(body, QmpOp):
        return {"command": body.command} if body.arguments is None else {
            "command": body.command, "arguments": body.arguments}
    if isinstance(body, InputOp):
        fields: dict[str, Any] = {"events": [_input_event_map(e) for e in body.events]}
        if body.source:
            fields["source"] = body.source
        return fields
    if isinstance(body, ReleaseInputOp):
        return {"source": body.source}
    if isinstance(body, AgentWriteOp | ConsoleWriteOp):
        return {"data": bytes(body.data)}
    if isinstance(body, ClipboardSetOp):
        return {"text": body.text, "source": body.source}
    if isinstance(body, AgentAckOp):
        return {"frames": body.frames}
    if isinstance(body, VncStateOp):
        return {"servers": [_vnc_address_map(a) for a in body.servers],
                "viewers": [_vnc_viewer_map(v) for v in body.viewers]}
    if isinstance(body, VncViewerOp):
        return {"event": body.event, "viewer": _vnc_viewer_map(body.viewer)}
    if isinstance(body, VncAuthOp):
        return {"viewer": body.viewer, "host": body.host, "challenge": bytes(body.challenge),
                "response": bytes(body.response)}
    return {}


def _vnc_address_map(address: VncAddress) -> dict[str, Any]:
    return {"host": address.host, "service": address.service, "family": address.family,
            "websocket": address.websocket, "vencrypt": address.vencrypt}


def _vnc_viewer_map(viewer: VncViewer) -> dict[str, Any]:
    return {"id": viewer.id, **_vnc_address_map(viewer.address), "server": viewer.server,
            "initialized": viewer.initialized, "x509_dname": viewer.x509_dname}


def _event_data(body: EventBody) -> dict[str, Any]:
    if isinstance(body, QmpEvent):
        return {"event": body.event}
    if isinstance(body, RunStateChanged):
        return {"state": body.state, "qemu_status": body.qemu_status}
    if isinstance(body, Migrated):
        return {"endpoint": body.endpoint}
    if isinstance(body, AgentData | ConsoleData):
        return {"data": bytes(body.data)}
    if isinstance(body, DisplayChanged):
        return {"shm": body.shm, "shm_generation": body.shm_generation, "display_socket": body.display_socket}
    if isinstance(body, Shutdown):
        return {"reason": _clip(body.reason)}
    if isinstance(body, VncReload):
        return {"tls_certs": body.tls_certs}
    if isinstance(body, ClipboardChanged):
        return {"text": body.text, "origin": body.origin}
    if isinstance(body, VncSettings):
        return {"auth": body.auth}
    return {}


# --- decoding ----------------------------------------------------------------------------------------------


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one frame; :class:`ProtocolError` for anything that is not a valid message."""
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(ErrorCode.MALFORMED, "a frame must be bytes")
    if len(frame) > MAX_FRAME:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {MAX_FRAME} bytes")
    budget = _ElementBudget()
    try:
        obj = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, max_str_len=MAX_FRAME, max_bin_len=MAX_FRAME,
            max_array_len=MAX_CONTAINER, max_map_len=MAX_CONTAINER, max_ext_len=0,
            list_hook=budget.array, object_hook=budget.map)
    except _TooManyElements:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame holds more than {MAX_ELEMENTS} values",
                            **_salvage_id(frame)) from None
    except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, ExtraData, StackError...
        # Refused from the header, before anything was built:
        if isinstance(exc, ValueError) and ("max_array_len" in str(exc) or "max_map_len" in str(exc)):
            raise ProtocolError(ErrorCode.TOO_LARGE, f"an array or map of more than {MAX_CONTAINER} items",
                                **_salvage_id(frame)) from None
        raise ProtocolError(ErrorCode.MALFORMED, f"not one msgpack value ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"a frame must be a msgpack map, not {_kind(obj)}")
    raw_id = obj.get("id")
    msg_id = raw_id if _is_int(raw_id) and 0 <= raw_id <= MAX_ID else None
    raw_type = obj.get("t")
    msg_type = raw_type if isinstance(raw_type, str) and len(raw_type) <= MAX_NAME else None
    fields = _Fields(obj, msg_type or "frame", msg_id)
    version: int = fields.integer("v", 0, _UINT64_MAX)
    if msg_type is None:
        fields.fail(ErrorCode.INVALID, f"field 't' must be a string of at most {MAX_NAME} characters")
    parser = _PARSERS.get(msg_type)
    if parser is None:
        fields.fail(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type!r}")
    if msg_type not in VERSION_INDEPENDENT_TYPES and version not in SUPPORTED_VERSIONS:
        fields.fail(ErrorCode.UNSUPPORTED_VERSION,
                    f"protocol version {version} is not spoken here (versions: {list(SUPPORTED_VERSIONS)})")
    return parser(fields)


class _TooManyElements(Exception):
    pass


def _salvage_id(frame: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The ``id`` and ``t`` of a frame refused for its size, so the error names the request (and the sender's
    request fails at once instead of timing out): read from the map's leading entries, where senders put them,
    stopping at the first other key (whose value may be the huge one)."""
    found: dict[str, Any] = {}
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame), max_str_len=MAX_NAME, max_bin_len=0,
                                    max_array_len=0, max_map_len=16, max_ext_len=0)
        unpacker.feed(frame)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key not in ("v", "t", "id"):
                break
            value = unpacker.unpack()
            if key == "id" and _is_int(value) and 0 <= value <= MAX_ID:
                found["msg_id"] = value
            elif key == "t" and isinstance(value, str):
                found["msg_type"] = value
    except Exception:  # a best effort on a frame already refused
        pass
    return found


class _ElementBudget:
    """msgpack calls these as each array and map is completed: count their items, stop at MAX_ELEMENTS."""

    def __init__(self) -> None:
        self.left = MAX_ELEMENTS

    def array(self, items: list[Any]) -> list[Any]:
        self.left -= len(items) + 1
        if self.left < 0:
            raise _TooManyElements
        return items

    def map(self, items: dict[str, Any]) -> dict[str, Any]:
        self.left -= len(items) + 1
        if self.left < 0:
            raise _TooManyElements
        return items


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    names = {dict: "a map", list: "an array", str: "a string", bytes: "binary", bool: "a boolean",
             int: "an integer", float: "a float", type(None): "nil"}
    return names.get(type(value), type(value).__name__)


class _Fields:
    """Typed, range-checked access to one frame's (or sub-map's) fields; every failure is a ProtocolError."""

    def __init__(self, data: Mapping[str, Any], where: str, msg_id: int | None,
                 msg_type: str | None = None) -> None:
        self.data = data
        self.where = where
        self.msg_id = msg_id
        self.msg_type = msg_type if msg_type is not None else where

    def fail(self, code: ErrorCode, detail: str) -> NoReturn:
        raise ProtocolError(code, f"{self.where}: {detail}", msg_id=self.msg_id, msg_type=self.msg_type)

    def sub(self, value: Any, where: str) -> _Fields:
        if not isinstance(value, dict):
            self.fail(ErrorCode.INVALID, f"{where} must be a map, not {_kind(value)}")
        return _Fields(value, f"{self.where}.{where}", self.msg_id, self.msg_type)

    def get(self, key: str, *, optional: bool) -> Any:
        if key not in self.data:
            if optional:
                return None
            self.fail(ErrorCode.INVALID, f"field {key!r} is missing")
        return self.data[key]

    def integer(self, key: str, lo: int, hi: int, *, optional: bool = False) -> Any:
        value = self.get(key, optional=optional)
        if value is None and optional:
            return None
        if not _is_int(value) or not lo <= value <= hi:
            self.fail(ErrorCode.INVALID, f"field {key!r} must be an integer in [{lo}, {hi}], not {_kind(value)}")
        return value

    def string(self, key: str, max_len: int = MAX_NAME, *, optional: bool = False, nonempty: bool = False) -> Any:
        value = self.get(key, optional=optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > max_len or (nonempty and not value):
            self.fail(ErrorCode.INVALID, f"field {key!r} must be a{' non-empty' if nonempty else ''} string of at "
                                         f"most {max_len} characters, not {_kind(value)}")
        return value

    def clipboard_text(self, key: str) -> str:
        """Clipboard text: a string of at most MAX_CLIPBOARD bytes once encoded as UTF-8."""
        value = self.string(key, MAX_CLIPBOARD)
        size = len(value.encode("utf-8"))  # msgpack decoded it from UTF-8: it has no lone surrogates
        if size > MAX_CLIPBOARD:
            self.fail(ErrorCode.INVALID, f"field {key!r} holds {size} bytes of UTF-8, over {MAX_CLIPBOARD}")
        return str(value)

    def boolean(self, key: str) -> bool:
        value = self.get(key, optional=False)
        if not isinstance(value, bool):
            self.fail(ErrorCode.INVALID, f"field {key!r} must be a boolean, not {_kind(value)}")
        return value

    def binary(self, key: str, max_len: int) -> bytes:
        value = self.get(key, optional=False)
        if not isinstance(value, bytes) or len(value) > max_len:
            self.fail(ErrorCode.INVALID, f"field {key!r} must be binary of at most {max_len} bytes")
        return bytes(value)

    def number(self, key: str, lo: float, hi: float) -> float:
        value = self.get(key, optional=False)
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) \
                or not lo <= value <= hi:
            self.fail(ErrorCode.INVALID, f"field {key!r} must be a number in [{lo}, {hi}]")
        return float(value)

    def array(self, key: str, max_len: int, *, optional: bool = False) -> list[Any]:
        value = self.get(key, optional=optional)
        if value is None and optional:
            return []
        if not isinstance(value, list) or len(value) > max_len:
            self.fail(ErrorCode.INVALID, f"field {key!r} must be an array of at most {max_len} items")
        return value

    def strings(self, key: str, max_len: int, item_len: int = MAX_NAME, *, optional: bool = False) -> tuple[str, ...]:
        items = self.array(key, max_len, optional=optional)
        if not all(isinstance(item, str) and len(item) <= item_len for item in items):
            self.fail(ErrorCode.INVALID, f"field {key!r} must hold strings of at most {item_len} characters")
        return tuple(items)

    def value(self, key: str, *, optional: bool = False, json_like: bool = True) -> Any:
        """A free-form value: nesting and, for QMP (JSON) values, types are checked."""
        value = self.get(key, optional=optional)
        problem = _check_value(value, MAX_DEPTH, json_like)
        if problem:
            self.fail(ErrorCode.INVALID, f"field {key!r}: {problem}")
        return value

    def submap(self, key: str, *, optional: bool = False) -> _Fields:
        value = self.get(key, optional=optional)
        return self.sub({} if value is None and optional else value, key)


def _check_value(value: Any, depth: int, json_like: bool) -> str | None:
    """Why ``value`` cannot be carried (too deep, not JSON-compatible), or None."""
    if isinstance(value, dict):
        if depth <= 0:
            return f"nested deeper than {MAX_DEPTH} levels"
        for key, item in value.items():
            if json_like and not isinstance(key, str):
                return "map keys must be strings"
            problem = _check_value(item, depth - 1, json_like)
            if problem:
                return problem
    elif isinstance(value, list):
        if depth <= 0:
            return f"nested deeper than {MAX_DEPTH} levels"
        for item in value:
            problem = _check_value(item, depth - 1, json_like)
            if problem:
                return problem
    elif isinstance(value, bytes):
        if json_like:
            return "binary is not allowed in a QMP value"
    elif isinstance(value, float):
        if json_like and not math.isfinite(value):
            return "non-finite numbers are not allowed in a QMP value"
    elif value is not None and not isinstance(value, bool | int | str):
        return f"{_kind(value)} is not allowed"
    return None


def _parse_hello(f: _Fields) -> Hello:
    versions = f.array("versions", MAX_VERSIONS)
    if not versions or not all(_is_int(v) and 1 <= v <= 0xFFFF for v in versions):
        f.fail(ErrorCode.INVALID, f"field 'versions' must list 1 to {MAX_VERSIONS} integers in [1, 65535]")
    return Hello(
        id=f.integer("id", 0, MAX_ID), versions=tuple(versions), instance=f.string("instance", nonempty=True),
        pid=f.integer("pid", 0, MAX_PID), uid=f.integer("uid", 0, MAX_UID), client_name=f.string("client_name"),
        client_version=f.string("client_version"),
        capabilities=f.strings("capabilities", MAX_CAPABILITIES, optional=True),
        endpoints=_parse_endpoints(f), warnings=f.strings("warnings", MAX_WARNINGS, MAX_TEXT, optional=True))


def _parse_endpoints(f: _Fields) -> tuple[tuple[str, str], ...]:
    endpoints = f.submap("endpoints", optional=True)
    if len(endpoints.data) > MAX_ENDPOINTS:
        f.fail(ErrorCode.INVALID, f"field 'endpoints' must have at most {MAX_ENDPOINTS} entries")
    for key in endpoints.data:
        if not isinstance(key, str) or not key or len(key) > MAX_NAME:
            f.fail(ErrorCode.INVALID, f"field 'endpoints' keys must be non-empty strings of at most {MAX_NAME} "
                                      "characters")
    return tuple((key, endpoints.string(key, MAX_TEXT)) for key in endpoints.data)


def _parse_welcome(f: _Fields) -> Welcome:
    if f.data.get("version") != f.data.get("v"):
        f.fail(ErrorCode.INVALID, "field 'version' must equal the frame's protocol version 'v'")
    return Welcome(
        id=f.integer("id", 0, MAX_ID), version=f.integer("version", 1, 0xFFFF), vm=f.string("vm", nonempty=True),
        instance=f.string("instance", nonempty=True), core_pid=f.integer("core_pid", 0, MAX_PID),
        run_state=f.string("run_state", 32, nonempty=True),
        heartbeat_interval=f.number("heartbeat_interval", 0.01, 60.0),
        shm=f.string("shm", optional=True),
        shm_generation=f.integer("shm_generation", 0, MAX_GENERATION, optional=True),
        display_socket=f.string("display_socket", MAX_TEXT, optional=True),
        capabilities=f.strings("capabilities", MAX_CAPABILITIES, optional=True))


def _parse_heartbeat(f: _Fields) -> Heartbeat:
    return Heartbeat(instance=f.string("instance", nonempty=True))


def _fast_input_event(item: Any) -> InputEvent | None:
    """A valid input event without _Fields' bookkeeping (a hot path: up to 4096 per frame); None lets the
    checked parser below decide, and say what is wrong. Accepts a subset of what that parser accepts."""
    if type(item) is not dict:
        return None
    kind = item.get("type")
    if kind == "key":
        down, qcode, scancode = item.get("down"), item.get("qcode"), item.get("scancode")
        if type(down) is bool:
            if scancode is None and type(qcode) is str and 0 < len(qcode) <= 32:
                return KeyEvent(down, qcode)
            if qcode is None and type(scancode) is int and 1 <= scancode <= 0xE07F:
                return KeyEvent(down, None, scancode)
    elif kind == "pointer":
        x, y, buttons = item.get("x"), item.get("y"), item.get("buttons")
        if (type(x) is int and type(y) is int and type(buttons) is int and 0 <= x <= MAX_COORDINATE
                and 0 <= y <= MAX_COORDINATE and 0 <= buttons <= 0xFF):
            return PointerEvent(x, y, buttons)
    elif kind == "wheel":
        steps = item.get("steps")
        if type(steps) is int and -MAX_WHEEL_STEPS <= steps <= MAX_WHEEL_STEPS:
            return WheelEvent(steps)
    return None


def _parse_input_event(f: _Fields, item: Any, index: int) -> InputEvent:
    fast = _fast_input_event(item)
    if fast is not None:
        return fast
    e = f.sub(item, f"events[{index}]")
    kind = e.string("type")
    if kind == "key":
        down = e.boolean("down")
        qcode = e.string("qcode", 32, optional=True, nonempty=True)
        scancode = e.integer("scancode", 1, 0xE07F, optional=True)
        if (qcode is None) == (scancode is None):
            e.fail(ErrorCode.INVALID, "a key event needs exactly one of 'qcode' and 'scancode'")
        return KeyEvent(down=down, qcode=qcode, scancode=scancode)
    if kind == "pointer":
        return PointerEvent(x=e.integer("x", 0, MAX_COORDINATE), y=e.integer("y", 0, MAX_COORDINATE),
                            buttons=e.integer("buttons", 0, 0xFF))
    if kind == "wheel":
        return WheelEvent(steps=e.integer("steps", -MAX_WHEEL_STEPS, MAX_WHEEL_STEPS))
    e.fail(ErrorCode.INVALID, f"unknown input event type {kind!r} (key, pointer, wheel)")


def _parse_qmp_op(a: _Fields) -> Op:
    arguments = a.value("arguments", optional=True)
    if arguments is not None and not isinstance(arguments, dict):
        a.fail(ErrorCode.INVALID, "field 'arguments' must be a map")
    return QmpOp(command=a.string("command", nonempty=True), arguments=arguments)


def _parse_input_op(a: _Fields) -> Op:
    return InputOp(events=tuple(
        _parse_input_event(a, item, i) for i, item in enumerate(a.array("events", MAX_INPUT_EVENTS))),
        source=a.string("source", MAX_SOURCE, optional=True) or "")


#: Families a VNC address may name (QAPI's NetworkAddressFamily, less vsock, which VNC never listens on).
VNC_FAMILIES = ("ipv4", "ipv6", "unix", "unknown")


def _parse_vnc_address(f: _Fields) -> VncAddress:
    family = f.string("family", 16)
    if family not in VNC_FAMILIES:
        f.fail(ErrorCode.INVALID, f"field 'family' must be one of {', '.join(VNC_FAMILIES)}")
    return VncAddress(host=f.string("host", MAX_TEXT), service=f.string("service", MAX_TEXT), family=family,
                      websocket=f.boolean("websocket"), vencrypt=f.string("vencrypt", 32, optional=True) or "")


def _parse_vnc_viewer(f: _Fields, item: Any, where: str) -> VncViewer:
    v = f.sub(item, where)
    return VncViewer(id=v.integer("id", 0, MAX_ID), address=_parse_vnc_address(v),
                     server=v.integer("server", 0, MAX_VNC_SERVERS - 1), initialized=v.boolean("initialized"),
                     x509_dname=v.string("x509_dname", MAX_TEXT, optional=True) or "")


def _parse_vnc_state_op(a: _Fields) -> Op:
    servers = a.array("servers", MAX_VNC_SERVERS)
    viewers = a.array("viewers", MAX_VNC_VIEWERS, optional=True)
    return VncStateOp(servers=tuple(_parse_vnc_address(a.sub(item, f"servers[{i}]"))
                                    for i, item in enumerate(servers)),
                      viewers=tuple(_parse_vnc_viewer(a, item, f"viewers[{i}]") for i, item in enumerate(viewers)))


def _parse_vnc_viewer_op(a: _Fields) -> Op:
    event = a.string("event", 32)
    if event not in VNC_VIEWER_EVENTS:
        a.fail(ErrorCode.INVALID, f"field 'event' must be one of {', '.join(VNC_VIEWER_EVENTS)}")
    return VncViewerOp(event=event, viewer=_parse_vnc_viewer(a, a.get("viewer", optional=False), "viewer"))


def _parse_vnc_auth_op(a: _Fields) -> Op:
    challenge, response = a.binary("challenge", VNC_CHALLENGE_SIZE), a.binary("response", VNC_CHALLENGE_SIZE)
    if len(challenge) != VNC_CHALLENGE_SIZE or len(response) != VNC_CHALLENGE_SIZE:
        a.fail(ErrorCode.INVALID, f"fields 'challenge' and 'response' must be {VNC_CHALLENGE_SIZE} bytes each")
    return VncAuthOp(viewer=a.integer("viewer", 0, MAX_ID), host=a.string("host", MAX_TEXT), challenge=challenge,
                     response=response)


_OP_PARSERS: dict[str, Callable[[_Fields], Op]] = {
    QmpOp.OP: _parse_qmp_op,
    InputOp.OP: _parse_input_op,
    ReleaseInputOp.OP: lambda a: ReleaseInputOp(source=a.string("source", MAX_SOURCE, optional=True) or ""),
    RefreshOp.OP: lambda a: RefreshOp(),
    AgentWriteOp.OP: lambda a: AgentWriteOp(data=a.binary("data", MAX_AGENT_CHUNK)),
    AgentAckOp.OP: lambda a: AgentAckOp(frames=a.integer("frames", 1, MAX_ID)),
    ConsoleWriteOp.OP: lambda a: ConsoleWriteOp(data=a.binary("data", MAX_CONSOLE_CHUNK)),
    ClipboardSetOp.OP: lambda a: ClipboardSetOp(text=a.clipboard_text("text"),
                                                source=a.string("source", MAX_SOURCE, optional=True) or ""),
    VncStateOp.OP: _parse_vnc_state_op,
    VncViewerOp.OP: _parse_vnc_viewer_op,
    VncAuthOp.OP: _parse_vnc_auth_op,
}


def _parse_request(f: _Fields) -> Request:
    request_id = f.integer("id", 0, MAX_ID)
    op = f.string("op")
    parser = _OP_PARSERS.get(op)
    if parser is None:
        f.fail(ErrorCode.UNKNOWN_OP, f"unknown op {op!r} (known: {', '.join(sorted(_OP_PARSERS))})")
    return Request(id=request_id, body=parser(f.submap("args", optional=True)))


def _parse_reply(f: _Fields) -> Reply:
    reply_id = f.integer("id", 0, MAX_ID)
    if f.boolean("ok"):
        return Reply(id=reply_id, result=f.value("result", optional=True, json_like=False))
    error = f.submap("error")
    return Reply(id=reply_id, error=ErrorInfo(error.string("class", nonempty=True), error.string("desc", MAX_TEXT)))


def _parse_qmp_event(d: _Fields) -> EventBody:
    event = d.value("event")
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        d.fail(ErrorCode.INVALID, "field 'event' must be a QMP event map with a string 'event'")
    return QmpEvent(event=event)


_KIND_PARSERS: dict[str, Callable[[_Fields], EventBody]] = {
    QmpEvent.KIND: _parse_qmp_event,
    RunStateChanged.KIND: lambda d: RunStateChanged(
        state=d.string("state", 32, nonempty=True), qemu_status=d.string("qemu_status", 32, optional=True)),
    Migrating.KIND: lambda d: Migrating(),
    Migrated.KIND: lambda d: Migrated(endpoint=d.string("endpoint", MAX_TEXT, nonempty=True)),
    AgentData.KIND: lambda d: AgentData(data=d.binary("data", MAX_AGENT_CHUNK)),
    ConsoleData.KIND: lambda d: ConsoleData(data=d.binary("data", MAX_CONSOLE_CHUNK)),
    DisplayChanged.KIND: lambda d: DisplayChanged(
        shm=d.string("shm", optional=True),
        shm_generation=d.integer("shm_generation", 0, MAX_GENERATION, optional=True),
        display_socket=d.string("display_socket", MAX_TEXT, optional=True)),
    Shutdown.KIND: lambda d: Shutdown(reason=d.string("reason", MAX_TEXT)),
    VncReload.KIND: lambda d: VncReload(tls_certs=d.boolean("tls_certs")),
    ClipboardChanged.KIND: lambda d: ClipboardChanged(
        text=d.clipboard_text("text"), origin=d.string("origin", MAX_TEXT, optional=True) or ""),
    VncSettings.KIND: lambda d: VncSettings(auth=d.string("auth", 32, nonempty=True)),
}


def _parse_event(f: _Fields) -> Broadcast:
    kind = f.string("kind")
    parser = _KIND_PARSERS.get(kind)
    if parser is None:
        f.fail(ErrorCode.UNKNOWN_KIND, f"unknown event kind {kind!r}")
    return Broadcast(body=parser(f.submap("data", optional=True)))


def _parse_error(f: _Fields) -> ErrorFrame:
    return ErrorFrame(code=f.string("code", nonempty=True), detail=f.string("detail", MAX_TEXT),
                      id=f.integer("id", 0, MAX_ID, optional=True))


_PARSERS: dict[str, Callable[[_Fields], Message]] = {
    Hello.TYPE: _parse_hello,
    Welcome.TYPE: _parse_welcome,
    Heartbeat.TYPE: _parse_heartbeat,
    Request.TYPE: _parse_request,
    Reply.TYPE: _parse_reply,
    Broadcast.TYPE: _parse_event,
    ErrorFrame.TYPE: _parse_error,
    Bye.TYPE: lambda f: Bye(reason=f.string("reason", MAX_TEXT, optional=True) or ""),
}

#: Wire names, for docs and tests.
MESSAGE_TYPES: tuple[type[Message], ...] = (Hello, Welcome, Heartbeat, Request, Reply, Broadcast, ErrorFrame, Bye)
OPS: tuple[type[Op], ...] = (QmpOp, InputOp, ReleaseInputOp, RefreshOp, AgentWriteOp, AgentAckOp, ConsoleWriteOp,
                             ClipboardSetOp, VncStateOp, VncViewerOp, VncAuthOp)
EVENT_KINDS: tuple[type[EventBody], ...] = (
    QmpEvent, RunStateChanged, Migrating, Migrated, AgentData, DisplayChanged, Shutdown, ConsoleData, VncReload,
    ClipboardChanged, VncSettings)

__all__ = [
    "AGENT_WINDOW", "ALL_CAPABILITIES", "EVENT_KINDS", "KIND_CAPABILITY", "MAX_FRAME", "MESSAGE_TYPES", "OPS",
    "OP_CAPABILITY", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "AgentAckOp", "AgentData", "AgentWriteOp",
    "Broadcast", "Bye", "Capability", "ClipboardChanged", "ClipboardSetOp", "ConsoleData", "ConsoleWriteOp",
    "DisplayChanged", "EncodeError", "ErrorCode", "ErrorFrame", "ErrorInfo", "EventBody", "Heartbeat", "Hello",
    "InputEvent", "InputOp", "KeyEvent", "Message", "Migrated", "Migrating", "Op", "PointerEvent", "ProtocolError",
    "QmpEvent", "QmpOp", "RefreshOp", "ReleaseInputOp", "Reply", "Request", "RunStateChanged", "Shutdown",
    "VncAddress", "VncAuthOp", "VncReload", "VncSettings", "VncStateOp", "VncViewer", "VncViewerOp", "Welcome",
    "WheelEvent", "choose_version", "decode",
]
