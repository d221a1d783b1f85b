"""The qemu-ga wire protocol, sans-IO: feed the agent's bytes in, get events out; ask for a command's bytes.

qemu-ga speaks JSON objects, one per line (``\\n``-terminated), and its replies carry no id: with one command in
flight at a time, the next reply is that command's. Synchronisation is ``guest-sync-delimited``: the request is
preceded by ``0xFF`` (so the agent flushes a half-read request of an earlier peer), and the agent answers with a
``0xFF`` sentinel and then ``{"return": ID}``. Everything up to and including the last sentinel is stale and is
dropped; replies that do not carry our ID are stale too. Commands also carry an ``id`` member, which qemu-ga
echoes in its reply: a reply with another id is stale and ignored (one without an id is taken as the
answer). Any timeout, garbage or oversized line leaves the
connection *unsynchronised*, and the next command must resynchronise first.

Replies may be as long as qemu-ga's (a 48 MiB guest-file-read: a 64 MiB line). A line over 64 KiB is read as it
arrives by QEMU's JSON streamer, its long base64 strings kept as they came (``RawJson``), so no reply is ever
parsed or copied whole at its newline, and garbage is known as such early.

Nothing here does IO or raises on what the agent sends: bad input becomes ``Garbage``/``Oversize`` events.
``AgentProtocolError`` is raised only when the API is misused (a command while not synchronised).

:class:`AgentServerConnection` is the other side, qemu-ga's, for the agent proxy: it reads a script's requests
the way qemu-ga reads them (QEMU's JSON streamer, :mod:`.qemu_json`), answers what qemu-ga answers without running
a command (malformed input, malformed requests, ``guest-sync``) byte for byte as qemu-ga does, and hands the rest
over as :class:`Request` events.
"""

from __future__ import annotations

import enum
import json
import secrets
from dataclasses import dataclass
from typing import Any

from .qemu_json import (
    QEMU_MAX_TOKEN_SIZE,
    JsonStreamer,
    ParseError,
    RawJson,
    Value,
    qdict_ordered,
    to_json,
    to_json_pieces,
)

SENTINEL = 0xFF
#: qemu-ga's largest read (qga/commands.c GUEST_FILE_READ_COUNT_MAX: "48MB + Base64 3:4 overhead = JSON parser
#: 64 MB limit"); it refuses a bigger ``count`` itself.
QGA_READ_COUNT_MAX = 48 << 20
#: Default bound on one reply line: a 48 MiB guest-file-read (64 MiB of base64, plus its few members) and
#: guest-exec-status with qemu-ga's 16 MiB of stdout and of stderr (43 MiB) fit.
DEFAULT_MAX_LINE = QEMU_MAX_TOKEN_SIZE + (64 << 10)
#: A reply line longer than this is read as it arrives, by QEMU's JSON streamer (:mod:`.qemu_json`), a frame
#: (64 KiB) at a time, instead of being parsed whole at its newline: a 64 MiB reply (or a hostile one of a
#: million tiny tokens) then never stalls the event loop for long, and its big strings (base64 data) stay as
#: they came (:class:`~.qemu_json.RawJson`), to be passed on without re-printing.
STREAM_FROM = 64 << 10
#: Tokens in one streamed reply (a hostile agent's 64 MiB of ``1,1,1...`` is refused after this many, not kept:
#: a token costs the reader about 50 bytes; big replies are big strings).
REPLY_MAX_TOKENS = 256 << 10
#: Strings at least this long stay raw in a streamed reply.
RAW_STRINGS_FROM = 64 << 10
#: The start of a line kept to say what an over-long reply was (a guest-file-read's ``count`` is in it).
_HEAD = 256
#: A number or keyword in a streamed reply longer than this is garbage (QEMU prints none longer than 24 bytes).
_MAX_SCALAR = 64
#: Bytes handed to the reply reader at a time.
_FEED = 64 << 10
#: Commands after which qemu-ga sends nothing when they succeed (QAPI ``success-response: false``).
NO_REPLY_COMMANDS = frozenset({"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"})


class AgentProtocolError(Exception):
    """The protocol object was used wrongly (local error); the agent's misbehaviour never raises."""


class ConnState(enum.Enum):
    UNSYNCED = "unsynced"  # must sync before the next command
    SYNCING = "syncing"    # sent guest-sync-delimited, waiting for the sentinel and our id
    IDLE = "idle"          # synchronised, nothing in flight
    AWAITING = "awaiting"  # one command in flight


@dataclass(frozen=True)
class Reply:
    """The in-flight command succeeded. A streamed (big) reply's long strings are :class:`~.qemu_json.RawJson`."""

    value: Any


@dataclass(frozen=True)
class ErrorReply:
    """The in-flight command failed in the guest (qemu-ga's error class and description)."""

    error_class: str
    desc: str


@dataclass(frozen=True)
class SyncDone:
    sync_id: int


@dataclass(frozen=True)
class Garbage:
    """Bytes that are not a reply we can use (``lines``: how many, ``reason``: the first one's problem)."""

    reason: str
    lines: int = 1


@dataclass(frozen=True)
class Oversize:
    """A line longer than the limit: it is being dropped up to its end. ``head``: its first bytes."""

    limit: int
    head: bytes = b""


Event = Reply | ErrorReply | SyncDone | Garbage | Oversize


class AgentConnection:
    """One side of one qemu-ga conversation (the host's)."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 64:
            raise AgentProtocolError("max_line must be at least 64 bytes")
        self.max_line = max_line
        self.state = ConnState.UNSYNCED
        self.sync_id: int | None = None
        self.command_name: str | None = None
        self.command_id = 0
        self._ids = secrets.randbits(20)
        self.stale = 0  # replies dropped for carrying another command's id
        self._buf = bytearray()
        self._discarding = False  # dropping the rest of an oversized line
        self._line_size = 0  # bytes of the line being read
        self._head = b""
        self._streamed = False  # the line is long: read as it arrives
        self._reader: JsonStreamer | None = None  # ... by this (None once it is not one JSON value)
        self._read: list[Value | ParseError] = []  # ... what it read so far
        self._seen_sentinel = False
        self.sentinels = 0  # 0xFF bytes seen (statistics)
        self.dropped = 0    # bytes dropped (statistics)

    # -- outgoing -------------------------------------------------------------------------------------------

    def sync(self, sync_id: int | None = None) -> bytes:
        """Start (re)synchronisation; returns the bytes to send. Valid in any state."""
        self.sync_id = sync_id if sync_id is not None else secrets.randbits(31)
        self.state = ConnState.SYNCING
        self.command_name = None
        self._seen_sentinel = False
        self._reset_line()
        request = {"execute": "guest-sync-delimited", "arguments": {"id": self.sync_id}}
        return bytes([SENTINEL]) + to_json(request) + b"\n"

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> bytes:
        """The bytes of one command; the connection must be synchronised and idle."""
        return b"".join(self.command_pieces(name, arguments))

    def command_pieces(self, name: str, arguments: dict[str, Any] | None = None) -> list[bytes | bytearray]:
        """:meth:`command` in pieces: a big :class:`~.qemu_json.RawJson` argument is one piece, as it is."""
        if self.state is not ConnState.IDLE:
            raise AgentProtocolError(f"cannot send {name!r} while {self.state.value}")
        self._ids += 1
        self.command_id = self._ids
        request: dict[str, Any] = {"execute": name, "id": self.command_id}
        if arguments:
            request["arguments"] = arguments
        self.state = ConnState.AWAITING
        self.command_name = name
        return [*to_json_pieces(request), b"\n"]

    @property
    def line_bytes(self) -> int:
        """Bytes of the reply line being received (0 between lines): a big reply's progress."""
        return self._line_size

    def abandon(self) -> None:
        """The in-flight exchange timed out or was given up: the next command must resynchronise."""
        self.state = ConnState.UNSYNCED
        self.command_name = None
        self._reset_line()

    def no_reply_done(self) -> None:
        """A command that answers only on error went by without an answer: treat it as done (and resync)."""
        self.abandon()

    # -- incoming -------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the agent; returns what they complete. Never raises for any input."""
        events: list[Event] = []
        garbage: list[str] = []
        view = memoryview(data)
        start = 0
        next_nl = -1
        while start < len(view):
            if self.state is ConnState.UNSYNCED:
                # Nobody waits, and the next sync drops everything before its sentinel anyway: drop it now, cheaply.
                self.dropped += len(view) - start + len(self._buf)
                self._reset_line()
                break
            if self.state is ConnState.SYNCING and not self._seen_sentinel:
                # Drop everything until the sentinel (stale replies of an earlier peer or command).
                idx = data.find(b"\xff", start)
                next_nl = -1
                if idx < 0:
                    self.dropped += len(view) - start
                    break
                self.dropped += idx - start
                self._sentinel()
                self._seen_sentinel = True
                start = idx + 1
                continue
            if next_nl < start:  # memchr-speed searches; the newline position is reused across sentinels
                next_nl = data.find(b"\n", start)
                if next_nl < 0:
                    next_nl = len(view)
            ff = data.rfind(b"\xff", start, next_nl)  # only the last sentinel before the newline matters
            end = ff if ff >= 0 else next_nl
            nl = next_nl if ff < 0 and next_nl < len(view) else -1
            if ff >= 0:
                # Sentinels in the middle of a line: flush our parser state (the spec's instruction).
                self.sentinels += data.count(b"\xff", start, ff) + 1
                self.dropped += ff - start + len(self._buf)
                self._reset_line()
                start = ff + 1
                continue
            chunk = view[start:end]
            if self._discarding:
                self.dropped += len(chunk)
            elif self._line_size + len(chunk) > self.max_line:
                self.dropped += self._line_size + len(chunk)
                head = (self._head + chunk[:_HEAD])[:_HEAD]
                self._reset_line()
                self._discarding = True
                events.extend(self._oversize(head))
            else:
                self._take(chunk)
                if self._streamed and self._reader is None:  # a long line that is not one JSON value: said now
                    what = f"{self._head[:60]!r}... (at least {self._line_size} bytes)"
                    self._reset_line()
                    self._discarding = True
                    self._message(None, what, events, garbage)
            if nl < 0:
                break
            start = nl + 1
            if self._discarding:
                self._reset_line()
                continue
            self._end_of_line(events, garbage)
        # Robustness: a complete JSON object without its newline (not what qemu-ga does, but cheap to accept: a
        # short line is at most STREAM_FROM bytes to parse again, a long one's reader says when it is complete).
        if self.state is not ConnState.UNSYNCED and not self._discarding:
            if self._streamed:
                if self._reader is not None and self._reader.buffered == 0 and len(self._read) == 1:
                    self._end_of_line(events, garbage)
            elif self._buf and self._buf[-16:].rstrip().endswith(b"}"):
                try:
                    json.loads(self._buf)
                except ValueError:
                    pass
                else:
                    self._end_of_line(events, garbage)
        if garbage:
            events.append(Garbage(garbage[0], len(garbage)))
        return events

    def _take(self, chunk: memoryview) -> None:
        """Part of a line: kept whole while it is short, read as it arrives once it is long."""
        if self._line_size < _HEAD:
            self._head += chunk[:_HEAD - self._line_size]
        self._line_size += len(chunk)
        if self._streamed:
            if self._reader is not None:
                self._read_more(chunk)
            return
        self._buf += chunk
        if len(self._buf) <= STREAM_FROM:
            return
        if self.state is not ConnState.AWAITING:
            # Too long to be a sync reply (or anything else we wait for): dropped up to its end unread.
            self.dropped += len(self._buf)
            self._buf.clear()
            self._discarding = True
            return
        self._streamed = True
        self._reader = JsonStreamer(max_token_size=self.max_line, max_token_count=REPLY_MAX_TOKENS,
                                    raw_strings_from=RAW_STRINGS_FROM, max_scalar=_MAX_SCALAR)
        data, self._buf = self._buf, bytearray()
        self._read_more(data)

    def _read_more(self, data: memoryview | bytearray) -> None:
        reader = self._reader
        assert reader is not None
        view = memoryview(data)
        for start in range(0, len(view), _FEED):  # (so the reader stops soon after the first error)
            self._read += reader.feed(view[start:start + _FEED])
            if len(self._read) > 1 or (self._read and isinstance(self._read[0], ParseError)):
                self._reader = None  # not one JSON value: the rest of the line is not worth reading
                return

    def _end_of_line(self, events: list[Event], garbage: list[str]) -> None:
        streamed, read, head, size = self._streamed, self._read, self._head, self._line_size
        line = b"" if streamed else bytes(self._buf)
        self._reset_line()
        if not streamed:
            self._line(line, events, garbage)
            return
        value = read[0].value if len(read) == 1 and isinstance(read[0], Value) else None
        self._message(value, f"{head[:60]!r}... ({size} bytes)", events, garbage)

    def _reset_line(self) -> None:
        self._buf.clear()
        self._discarding = False
        self._line_size = 0
        self._head = b""
        self._streamed = False
        self._reader = None
        self._read = []

    def _sentinel(self) -> None:
        self.sentinels += 1
        self._reset_line()

    def _oversize(self, head: bytes) -> list[Event]:
        if self.state is ConnState.SYNCING:
            return []  # still waiting for our sync reply: stale, whatever its size
        if self.state is ConnState.AWAITING:
            self.state = ConnState.UNSYNCED
            self.command_name = None
        return [Oversize(self.max_line, head)]

    def _line(self, line: bytes, events: list[Event], garbage: list[str]) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            message = None
        self._message(message, _describe(line), events, garbage)

    def _message(self, message: Any, what: str, events: list[Event], garbage: list[str]) -> None:
        """One line's JSON value (None: it was not JSON), ``what``: the line, described for a log."""
        if self.state is ConnState.SYNCING:
            if isinstance(message, dict) and message.get("return") == self.sync_id \
                    and type(message.get("return")) is int:
                self.state = ConnState.IDLE
                events.append(SyncDone(message["return"]))
            # Anything else while syncing is stale: dropped silently (wrong ids, error replies to our 0xFF).
            return
        if self.state is not ConnState.AWAITING:
            # Nothing was asked: an unsolicited line means we no longer know where the stream is.
            self.state = ConnState.UNSYNCED
            garbage.append(f"unsolicited {what}")
            return
        if not isinstance(message, dict):
            self.state = ConnState.UNSYNCED
            self.command_name = None
            garbage.append(f"not a JSON object: {what}")
            return
        if "id" in message and message["id"] != self.command_id:
            self.stale += 1  # an answer to an earlier command (or a lie): not ours
            return
        if "return" in message:
            self.state = ConnState.IDLE
            self.command_name = None
            events.append(Reply(message["return"]))
        elif isinstance(message.get("error"), dict):
            error = message["error"]
            self.state = ConnState.IDLE
            self.command_name = None
            events.append(ErrorReply(str(error.get("class", "GenericError"))[:256], str(error.get("desc", ""))[:65536]))
        else:
            self.state = ConnState.UNSYNCED
            self.command_name = None
            garbage.append(f"neither return nor error: {what}")


def _describe(line: bytes) -> str:
    return repr(line[:60]) + (f"... ({len(line)} bytes)" if len(line) > 60 else "")


# -- qemu-ga's side, for the agent proxy --------------------------------------------------------------------------

#: Commands qemu-ga answers from their arguments alone; the proxy answers them itself (a script synchronises
#: with the proxy, which keeps itself in sync with the agent).
SYNC_COMMANDS = frozenset({"guest-sync", "guest-sync-delimited"})


@dataclass(frozen=True)
class Request:
    """A well-formed request to execute; answer it with :meth:`AgentServerConnection.return_bytes` or
    :meth:`~AgentServerConnection.error_bytes` (they echo its ``id``)."""

    command: str
    arguments: dict[str, Any] | None  # None: the request had none
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True)
class Answer:
    """What qemu-ga sends for this input without running anything: send ``data`` as it is."""

    data: bytes


ServerEvent = Request | Answer


class AgentServerConnection:
    """qemu-ga's side of one connection: a script's bytes in, :class:`Request` and :class:`Answer` out, in order.

    Framing, errors and replies are qemu-ga's (qga/main.c process_event, qapi/qmp-dispatch.c); limits are the
    ``JsonStreamer``'s, refused with qemu-ga's error texts and, like qemu-ga, without closing the connection.
    """

    def __init__(self, *, max_token_size: int, max_token_count: int, raw_strings_from: int | None = None) -> None:
        """``raw_strings_from``: a request's strings this long or longer that need no decoding stay
        :class:`~.qemu_json.RawJson` (a guest-file-write's data goes on to the agent as it came)."""
        self._streamer = JsonStreamer(max_token_size=max_token_size, max_token_count=max_token_count,
                                      raw_strings_from=raw_strings_from)
        self._last_error: tuple[str, Answer] = ("", Answer(b""))

    @property
    def buffered(self) -> int:
        """Bytes held for a request not yet complete."""
        return self._streamer.buffered

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        """Feed a script's bytes; returns what they complete. Never raises for any input."""
        events: list[ServerEvent] = []
        for item in self._streamer.feed(data):
            if isinstance(item, ParseError):
                if item.desc != self._last_error[0]:  # (a 0xFF flood is one error many times over)
                    self._last_error = (item.desc, Answer(self.error_bytes(None, "GenericError", item.desc)))
                events.append(self._last_error[1])
            else:
                events.append(self._dispatch(item.value))
        return events

    def return_bytes(self, request: Request | None, value: Any, *, delimited: bool = False) -> bytes:
        """``{"return": value}`` (with the request's id), as qemu-ga prints it; ``delimited``: 0xFF first."""
        return b"".join(self.return_pieces(request, value, delimited=delimited))

    def return_pieces(self, request: Request | None, value: Any, *, delimited: bool = False
                      ) -> list[bytes | bytearray]:
        """:meth:`return_bytes` in pieces: a big :class:`~.qemu_json.RawJson` string is one, as it is."""
        return self._response({"return": value}, request, delimited)

    def error_bytes(self, request: Request | None, error_class: str, desc: str) -> bytes:
        return b"".join(self._response({"error": qdict_ordered({"class": error_class, "desc": desc})}, request,
                                       False))

    @staticmethod
    def _response(body: dict[str, Any], request: Request | None, delimited: bool) -> list[bytes | bytearray]:
        if request is not None and request.has_id:
            body = qdict_ordered({**body, "id": request.id})
        return [bytes([SENTINEL]) if delimited else b"", *to_json_pieces(body), b"\n"]

    def _dispatch(self, message: Any) -> ServerEvent:
        """qmp_dispatch(): the request's shape, then the commands answered here."""
        if not isinstance(message, dict):
            return Answer(self.error_bytes(None, "GenericError", "QMP input must be a JSON object"))
        request = Request("", None, message.get("id"), "id" in message)
        for key, value in message.items():  # in QDict order: the member named is qemu-ga's
            if key == "execute":
                if isinstance(value, RawJson):  # (a command name that long is no command qemu-ga knows either)
                    value = message[key] = value.decode()
                if not isinstance(value, str):
                    return Answer(self.error_bytes(request, "GenericError",
                                                   "QMP input member 'execute' must be a string"))
            elif key == "arguments":
                if not isinstance(value, dict):
                    return Answer(self.error_bytes(request, "GenericError",
                                                   "QMP input member 'arguments' must be an object"))
            elif key != "id":  # "exec-oob" included: qemu-ga does not offer out-of-band execution
                return Answer(self.error_bytes(request, "GenericError", f"QMP input member '{key}' is unexpected"))
        if "execute" not in message:
            return Answer(self.error_bytes(request, "GenericError", "QMP input lacks member 'execute'"))
        request = Request(message["execute"], message.get("arguments"), request.id, request.has_id)
        if request.command in SYNC_COMMANDS:
            return Answer(self._sync(request))
        return request

    def _sync(self, request: Request) -> bytes:
        """guest-sync / guest-sync-delimited: ``{'id': 'int'}`` checked as QEMU's input visitor does."""
        arguments = request.arguments or {}
        if "id" not in arguments:
            return self.error_bytes(request, "GenericError", "Parameter 'id' is missing")
        sync_id = arguments["id"]
        if type(sync_id) is not int or not -(1 << 63) <= sync_id < 1 << 63:
            return self.error_bytes(request, "GenericError", "Invalid parameter type for 'id', expected: integer")
        for key in arguments:
            if key != "id":
                return self.error_bytes(request, "GenericError", f"Parameter '{key}' is unexpected")
        return self.return_bytes(request, sync_id, delimited=request.command == "guest-sync-delimited")
