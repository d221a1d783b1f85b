"""QMP, server side, without I/O: feed a peer's bytes in, get events out; give replies, get bytes back.

It speaks the wire protocol as QEMU 7.2 does: the greeting, ``qmp_capabilities`` negotiation, QEMU's framing
(JSON values split on balanced braces, no newline needed), and QEMU's error replies for malformed input with the
same classes, and the same texts for the common cases (checked side by side against QEMU in the tests; rarer
JSON syntax errors carry Python's wording, see docs/policy.md). What the connection can answer
itself (negotiation, malformed input) it answers; a well-formed command becomes a :class:`Command` event for
the owner to execute.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .qmp_values import INVALID_KEYWORD, InvalidLiteral, contains_invalid, lenient_decoder

#: QEMU ends every message with CRLF; so do we.
_TERMINATOR = b"\r\n"

# Bytes that matter to the framer, outside and inside a JSON string.
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\\x00-\x1f]')
_TOKEN_END = re.compile(rb'[ \t\r\n{}\[\]"]')  # JSON whitespace only: \v and \f belong to a (bad) token
_WHITESPACE = b" \t\r\n"

_ALLOWED_MEMBERS = frozenset({"execute", "exec-oob", "arguments", "id"})


class ConnectionState(Enum):
    """Where the peer is in the QMP session."""

    CAPABILITIES = "capabilities"  # greeted, waiting for qmp_capabilities
    COMMAND = "command"  # negotiated: commands run and events flow
    CLOSED = "closed"  # the peer broke a hard limit or hung up; nothing more is read


@dataclass(frozen=True)
class Command:
    """A well-formed command for the owner to execute. ``id`` is echoed in the reply if ``has_id``."""

    name: str
    arguments: dict[str, Any] | None
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True)
class Answer:
    """Bytes the connection produced itself (negotiation reply, parse error): send them to the peer."""

    data: bytes


@dataclass(frozen=True)
class Negotiated:
    """The peer finished capabilities negotiation: it now receives events."""


@dataclass(frozen=True)
class MessageTooLarge:
    """The peer sent a message over the size limit; the answer is in ``data`` and the peer must be closed."""

    data: bytes
    limit: int


Event = Command | Answer | Negotiated | MessageTooLarge


def encode(message: dict[str, Any]) -> bytes:
    """Serialise one QMP message the way QEMU lays it out on the wire."""
    return json.dumps(message).encode() + _TERMINATOR


def error_message(error_class: str, desc: str, msg_id: Any = None, *, has_id: bool = False) -> dict[str, Any]:
    """A QMP error reply; the id goes first, as QEMU writes it."""
    reply: dict[str, Any] = {"id": msg_id} if has_id else {}
    reply["error"] = {"class": error_class, "desc": desc}
    return reply


def return_message(value: Any, msg_id: Any = None, *, has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"return": value}
    if has_id:
        reply["id"] = msg_id
    return reply


@dataclass
class _Framer:
    """Splits a byte stream into top-level JSON values the way QEMU's json-streamer does."""

    buffer: bytearray = field(default_factory=bytearray)
    pos: int = 0  # next byte to scan
    start: int = -1  # start of the current value, -1 when between values
    string_start: int = 0  # start of the string being scanned, for error messages
    depth: int = 0
    in_string: bool = False

    def reset_value(self, end: int) -> None:
        del self.buffer[:end]
        self.pos = 0
        self.start = -1
        self.depth = 0
        self.in_string = False

    def next_value(self) -> tuple[bytes | None, str | None]:
        """Return (complete value bytes, None), (None, parse error text), or (None, None) when more is needed."""
        buf = self.buffer
        while True:
            if self.start < 0:
                # Between values: skip whitespace and find what starts the next one.
                while self.pos < len(buf) and buf[self.pos] in _WHITESPACE:
                    self.pos += 1
                if self.pos >= len(buf):
                    self.reset_value(self.pos)
                    return None, None
                ch = buf[self.pos]
                if ch in b"{[":
                    self.start, self.depth = self.pos, 1
                    self.pos += 1
                elif ch == ord('"'):
                    self.start = self.string_start = self.pos
                    self.in_string = True
                    self.pos += 1
                elif ch in b"}]":
                    self.reset_value(self.pos + 1)
                    return None, "JSON parse error, expecting value"
                else:
                    m = _TOKEN_END.search(buf, self.pos)
                    if m is None:
                        return None, None  # a bare token still arriving
                    token = bytes(buf[self.pos : m.start()])
                    self.reset_value(m.start())
                    return token, None
            if self.in_string:
                m = _IN_STRING.search(buf, self.pos)
                if m is None:
                    self.pos = len(buf)
                    return None, None
                ch = buf[m.start()]
                if ch == ord("\\"):
                    if m.start() + 1 >= len(buf):
                        self.pos = m.start()  # rescan the escape when its second byte arrives
                        return None, None
                    self.pos = m.start() + 2
                    continue
                if ch == ord('"'):
                    self.in_string = False
                    self.pos = m.start() + 1
                    if self.depth == 0:
                        value = bytes(buf[self.start : self.pos])
                        self.reset_value(self.pos)
                        return value, None
                    continue
                # A raw control character inside a string: QEMU's lexer rejects it at once.
                text = bytes(buf[self.string_start : m.start() + 1]).decode("utf-8", "replace")
                self.reset_value(m.start() + 1)
                return None, f"JSON parse error, stray '{text}'"
            m = _STRUCTURAL.search(buf, self.pos)
            if m is None:
                self.pos = len(buf)
                return None, None
            ch = buf[m.start()]
            self.pos = m.start() + 1
            if ch == ord('"'):
                self.in_string = True
                self.string_start = m.start()
            elif ch in b"{[":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    value = bytes(buf[self.start : self.pos])
                    self.reset_value(self.pos)
                    return value, None

    @property
    def pending_size(self) -> int:
        """Bytes of the value being received (what the size limit applies to)."""
        return len(self.buffer) if self.start < 0 else len(self.buffer) - self.start


class QmpServerConnection:
    """One peer's QMP session, as a state machine over bytes.

    Typical use: send :meth:`greeting_bytes` on accept, then for each read call :meth:`receive_data` and
    handle :meth:`events` until it is empty; :class:`Answer` and :class:`MessageTooLarge` carry bytes to send.
    """

    def __init__(self, greeting: dict[str, Any], *, max_message: int = 1 << 20) -> None:
        self._greeting = greeting
        self.max_message = max_message
        self.state = ConnectionState.CAPABILITIES
        self._framer = _Framer()
        self._events: list[Event] = []

    def greeting_bytes(self) -> bytes:
        return encode(self._greeting)

    @property
    def offered_capabilities(self) -> list[str]:
        caps = self._greeting.get("QMP", {}).get("capabilities", [])
        return [c for c in caps if isinstance(c, str)]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return the events they complete."""
        if self.closed:
            return []
        if not self._framer.buffer and data.endswith(b"\n") and data.count(b"\n") == 1 \
                and len(data) <= self.max_message:
            # Fast path for the common case, one whole message per read: if it parses as exactly one JSON value,
            # the framer would have produced that same value; anything else goes the framer's way.
            try:
                message = lenient_decoder.decode(data.decode("utf-8"))
            except (ValueError, RecursionError):
                pass
            else:
                return self._handle_message(message)
        self._framer.buffer += data
        events: list[Event] = []
        while not self.closed:
            value, error = self._framer.next_value()
            if error is not None:
                events.append(Answer(encode(error_message("GenericError", error))))
            elif value is not None:
                events.extend(self._handle_value(value))
            else:
                if self._framer.pending_size > self.max_message:
                    self.state = ConnectionState.CLOSED
                    desc = f"QMP message exceeds the limit of {self.max_message} bytes; closing the connection"
                    events.append(MessageTooLarge(encode(error_message("GenericError", desc)), self.max_message))
                break
        return events

    def _handle_value(self, raw: bytes) -> list[Event]:
        if len(raw) > self.max_message:
            self.state = ConnectionState.CLOSED
            desc = f"QMP message exceeds the limit of {self.max_message} bytes; closing the connection"
            return [MessageTooLarge(encode(error_message("GenericError", desc)), self.max_message)]
        try:
            message = lenient_decoder.decode(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return [Answer(encode(error_message("GenericError", "JSON parse error, invalid UTF-8 sequence")))]
        except (json.JSONDecodeError, RecursionError) as exc:
            desc = f"JSON parse error, {exc.msg if isinstance(exc, json.JSONDecodeError) else 'nesting too deep'}"
            if raw[:1] not in b'{["' and isinstance(exc, json.JSONDecodeError):
                desc = f"JSON parse error, invalid keyword '{raw.decode('utf-8', 'replace')}'"
            return [Answer(encode(error_message("GenericError", desc)))]
        return self._handle_message(message)

    def _handle_message(self, message: Any) -> list[Event]:
        if isinstance(message, InvalidLiteral) and message.why == INVALID_KEYWORD:
            desc = f"JSON parse error, invalid keyword '{message.text}'"
            return [Answer(encode(error_message("GenericError", desc)))]
        if not isinstance(message, dict):
            return [Answer(encode(error_message("GenericError", "QMP input must be a JSON object")))]
        has_id = "id" in message
        msg_id = message.get("id")
        if has_id and contains_invalid(msg_id):  # it could not be echoed as JSON: answer without it
            return [Answer(encode(error_message(
                "GenericError", "QMP input member 'id' holds a number or constant that is not valid JSON")))]

        def fail(error_class: str, desc: str) -> list[Event]:
            return [Answer(encode(error_message(error_class, desc, msg_id, has_id=has_id)))]

        for key, value in message.items():
            if key not in _ALLOWED_MEMBERS:
                return fail("GenericError", f"QMP input member '{key}' is unexpected")
            if key in ("execute", "exec-oob") and not isinstance(value, str):
                return fail("GenericError", f"QMP input member '{key}' must be a string")
            if key == "arguments" and not isinstance(value, dict):
                return fail("GenericError", "QMP input member 'arguments' must be an object")
        if "execute" in message and "exec-oob" in message:
            return fail("GenericError", "QMP input must not have both 'execute' and 'exec-oob'")
        if "exec-oob" in message:
            # The re-exported monitor does not offer the 'oob' capability, so it was never negotiated.
            return fail("GenericError", "QMP input member 'exec-oob' is unexpected")
        if "execute" not in message:
            return fail("GenericError", "QMP input lacks member 'execute'")
        name: str = message["execute"]
        arguments: dict[str, Any] | None = message.get("arguments")

        if self.state is ConnectionState.CAPABILITIES:
            if name != "qmp_capabilities":
                return fail("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
            for key, value in (arguments or {}).items():
                if key != "enable":
                    return fail("GenericError", f"Parameter '{key}' is unexpected")
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    return fail("GenericError", "Invalid parameter type for 'enable', expected: array")
                for cap in value:
                    if cap not in self.offered_capabilities:
                        return fail("GenericError", f"Capability '{cap}' not available")
            self.state = ConnectionState.COMMAND
            return [Answer(encode(return_message({}, msg_id, has_id=has_id))), Negotiated()]
        if name == "qmp_capabilities":
            return fail("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        return [Command(name, arguments, msg_id, has_id)]

    def reply_bytes(self, command: Command, reply: dict[str, Any]) -> bytes:
        """Bytes for QEMU's reply to ``command`` (a dict with ``return`` or ``error``), with the peer's id."""
        if "error" in reply:
            return encode(error_message(reply["error"].get("class", "GenericError"),
                                        reply["error"].get("desc", ""), command.id, has_id=command.has_id))
        return encode(return_message(reply.get("return", {}), command.id, has_id=command.has_id))

    @property
    def closed(self) -> bool:
        return self.state is ConnectionState.CLOSED

    def close(self) -> None:
        self.state = ConnectionState.CLOSED
