"""What may be sent to QEMU: strict JSON, within QEMU's own parser limits. Sans-IO.

Every command a peer asks the core to run (QMP socket, control channel, hence the monitor) is checked here before
it reaches QEMU. Python's JSON and msgpack accept values QEMU's parser rejects: ``NaN``/``Infinity`` (and
``1e400``, which Python reads as infinity), integers beyond int64/uint64, lone UTF-16 surrogates, ``\\u0000``,
and more tokens or deeper nesting than QEMU's json-streamer takes. QEMU answers such input with an error that has
no ``id``; a QMP client (qemu.qmp, hence the core) cannot route that and drops its connection. So nothing of the
kind is ever sent: the peer gets an ordinary error for its own request and stays connected.

The QMP socket's JSON reader does not fail on these literals either (it would lose the request's ``id``): it
reads them as :class:`InvalidLiteral` markers, which :func:`arguments_problem` then reports with the request.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

#: QEMU's json-streamer limits (qobject/json-streamer.c): tokens and nesting per message, bytes of token text.
QEMU_MAX_TOKENS = 2 << 20
QEMU_MAX_NESTING = 1 << 10
QEMU_MAX_TOKEN_BYTES = 64 << 20
#: What the core forwards: QEMU's limits less room for the envelope it adds ({"execute", "arguments", "id"}).
MAX_TOKENS = QEMU_MAX_TOKENS - 64
#: Far below QEMU's 1024 (no QAPI type nests a tenth as deep), and shallow enough to walk without recursion limits.
MAX_DEPTH = 128
MAX_TEXT_BYTES = QEMU_MAX_TOKEN_BYTES // 2
INT_MIN = -(1 << 63)
UINT_MAX = (1 << 64) - 1
#: Longest integer literal read as a number: 20 digits and a sign cover int64 and uint64 (Python's own int()
#: refuses more than 4300 digits with a ValueError that would otherwise escape the JSON reader).
_MAX_INT_LITERAL = 21


@dataclass(frozen=True)
class InvalidLiteral:
    """A JSON number or constant QEMU would not take, kept in place of its value so the request can be answered."""

    text: str
    why: str


INVALID_KEYWORD = "is not a JSON value"


def _parse_constant(text: str) -> InvalidLiteral:
    return InvalidLiteral(text, INVALID_KEYWORD)


def _parse_int(text: str) -> int | InvalidLiteral:
    if len(text) > _MAX_INT_LITERAL:
        return InvalidLiteral(text[:24] + "...", "is out of range")
    value = int(text)
    return value if INT_MIN <= value <= UINT_MAX else InvalidLiteral(text, "is out of range")


def _parse_float(text: str) -> float | InvalidLiteral:
    value = float(text)
    return value if math.isfinite(value) else InvalidLiteral(text[:24], "is out of range")


#: A JSON reader that never raises on a literal QEMU rejects (it yields an InvalidLiteral instead).
lenient_decoder = json.JSONDecoder(parse_constant=_parse_constant, parse_int=_parse_int, parse_float=_parse_float)


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains \\u0000, which QEMU does not accept"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


#: Where a value sits, as a chain of (parent, key) links: built only when a problem is reported.
_Path = tuple["_Path", str | int] | None


def _describe(path: _Path) -> str:
    parts: list[str | int] = []
    while path is not None:
        path, part = path
        parts.append(part)
    out = ""
    for part in reversed(parts):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "arguments"


def _scalar_problem(value: Any) -> str | None:
    """Why a non-container value cannot go to QEMU, or None."""
    kind = type(value)
    if kind is str:
        problem = None if value.isascii() and "\x00" not in value else _string_problem(value)
        return f" {problem}" if problem else None
    if kind is int:
        return None if INT_MIN <= value <= UINT_MAX else f": integer {value} is out of range"
    if kind is float:
        return None if math.isfinite(value) else f": {value} is not a JSON number"
    if value is None or kind is bool:
        return None
    if isinstance(value, InvalidLiteral):
        return f": {value.text} {value.why}"
    return f": a {kind.__name__} is not a JSON value"


class _Refused(Exception):
    """Ends the walk: ``args[0]`` says why."""


_TOO_MANY_TOKENS = f"too many JSON tokens (more than {MAX_TOKENS}, QEMU's parser limit)"


class _Walk:
    """One check of one argument object: counts QEMU's tokens and text bytes as it goes."""

    def __init__(self) -> None:
        self.tokens = 0
        self.text = 0

    def container(self, value: dict[str, Any] | list[Any] | tuple[Any, ...], depth: int, path: _Path) -> None:
        if depth > MAX_DEPTH:
            raise _Refused(f"'{_describe(path)}' is nested deeper than {MAX_DEPTH} levels")
        is_dict = type(value) is dict
        # Brackets, and per item its value and a comma (per member also its key and colon): counted before the
        # items are visited, so an oversized container is refused at once.
        self.tokens += 2 + (4 if is_dict else 2) * len(value)
        if self.tokens > MAX_TOKENS:
            raise _Refused(_TOO_MANY_TOKENS)
        for key, item in (value.items() if is_dict else enumerate(value)):  # type: ignore[union-attr]
            if is_dict:
                if type(key) is not str:
                    raise _Refused(f"'{_describe(path)}' has a key that is not a string")
                if not key.isascii() or "\x00" in key:
                    problem = _string_problem(key)
                    if problem:
                        raise _Refused(f"a key of '{_describe(path)}' {problem}")
                self.text += len(key)
            kind = type(item)
            if kind is dict or kind is list or kind is tuple:
                if item:
                    self.tokens += 1  # the closing bracket (the opening one was counted as the value)
                    self.container(item, depth + 1, (path, key))
                else:
                    self.tokens += 1
                continue
            if kind is str:
                self.text += len(item)
                if item.isascii() and "\x00" not in item:
                    continue
            elif kind is int and INT_MIN <= item <= UINT_MAX:
                continue
            problem = _scalar_problem(item)
            if problem:
                raise _Refused(f"'{_describe((path, key))}'{problem}")
        if self.tokens > MAX_TOKENS:
            raise _Refused(_TOO_MANY_TOKENS)
        if self.text > MAX_TEXT_BYTES:
            raise _Refused(f"more than {MAX_TEXT_BYTES} bytes of text (QEMU's parser limit)")


def arguments_problem(arguments: dict[str, Any] | None) -> str | None:
    """Why QEMU's parser would reject these command arguments, or None (a walk as tight as Python allows: it
    runs on the core's loop for every command, and hostile input may be as large as the frame limits allow)."""
    if arguments is None:
        return None
    try:
        _Walk().container(arguments, 1, None)
    except _Refused as refused:
        return str(refused.args[0])
    return None


def contains_invalid(value: Any) -> bool:
    """Whether a value read by :data:`lenient_decoder` holds an InvalidLiteral anywhere (e.g. a request ``id``)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, InvalidLiteral):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


#: What a QMP command name can look like (QAPI names, and downstream extensions such as ``__org.vmfront_x``).
COMMAND_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
#: Ids of what the core itself adds to QEMU (its QMP chardev, the agent's chardev and port): no peer may cut them.
RESERVED_ID_PREFIX = "vmfront-"
#: Commands that name a chardev or device by ``id``, and so could remove or replace one of the core's.
_ID_COMMANDS = frozenset({"chardev-remove", "chardev-change", "device_del"})


def reserved_problem(name: str, arguments: dict[str, Any] | None) -> str | None:
    """Why a command would cut one of the core's own links to QEMU, or None.

    The core's QMP connection, its display capture (QEMU's VNC server on a private socket) and the agent's
    channel are the core's, not the VM's: removing, yanking or re-addressing them would end supervision or lock
    the core out of the display. (A peer with ``human-monitor-command`` can still do so through HMP; the core then
    reconnects to QEMU's monitor.)"""
    args = arguments or {}
    if name in _ID_COMMANDS and str(args.get("id", "")).startswith(RESERVED_ID_PREFIX):
        return f"'{args['id']}' is the core's own link to QEMU"
    if name == "yank":
        for instance in args.get("instances") or ():
            if isinstance(instance, dict) and str(instance.get("id", "")).startswith(RESERVED_ID_PREFIX):
                return f"'{instance['id']}' is the core's own link to QEMU"
    # (The VNC password commands never get here: the core answers them, core_daemon/vnc_state.py.)
    if name == "display-update" or (name == "display-reload" and args.get("type") == "vnc"):
        return "QEMU's VNC server is the core's private display capture (the VNC viewers use is the client's)"
    return None
