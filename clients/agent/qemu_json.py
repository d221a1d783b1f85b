"""QEMU's JSON as qemu-ga reads and writes it, sans-IO: a streamer you feed bytes, and QEMU's way of printing.

qemu-ga reads requests with QEMU's JSON *streamer* (``qobject/json-lexer.c``, ``json-streamer.c``,
``json-parser.c``), not line by line: no newline is needed, one read may hold any number of values and a value
may be split across reads. :class:`JsonStreamer` is a port of those three files, so the proxy splits and rejects
input exactly where qemu-ga does, with qemu-ga's error texts:

- The lexer is QEMU's state machine: a byte that cannot start or continue a token (``0xFF``, ``0xFE``, a control
  character, a stray ``A``...) is a lexical error, answered ``JSON parse error, stray '...'``; the lexer then skips
  to the next structural character (``{}[]:,``), control character or ``0xFE``/``0xFF`` (the resync bytes: every
  ``0xFF`` is answered with an error of its own, wherever it is, and leaves the lexer in a known state).
- The streamer counts braces and brackets: a value is complete when they balance (a top-level scalar is a value
  of its own). Limits, with QEMU's texts: total token size (``JSON token size limit exceeded``), token count
  (``JSON token count limit exceeded``) and nesting (``JSON nesting depth limit exceeded``); an error drops the
  value so far and reading goes on with the bytes after it, as qemu-ga does (it never closes for bad input).
- The parser is QEMU's (single-quoted strings, ``\\'``, modified UTF-8, the first error wins, duplicate keys
  refused, integers beyond 64 bits become doubles) and builds objects in the order QEMU's ``QDict`` iterates them,
  so what is printed back (an echoed ``id``) and which member an error names match qemu-ga's.

:func:`to_json` prints like QEMU's ``qobject_to_json`` (``", "`` and ``": "``, ``\\uXXXX`` in upper case for
everything outside printable ASCII, ``%.17g`` doubles). Feeding never raises, whatever the bytes; memory is
bounded by the token size and count limits.

Big strings (a ``guest-file-write``'s data, a ``guest-file-read``'s reply: up to 64 MiB) can stay as they were
read: with ``raw_strings_from`` set, a string token at least that long that is already printed the way
:func:`to_json` prints it (double quotes, printable ASCII, no escapes: base64 is) becomes a :class:`RawJson`,
which keeps the token's bytes and is printed back as they are. Decoding such a string and printing it again
would cost the event loop about a second per 64 MiB; keeping it costs a few checks at C speed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_basestring_ascii
from typing import Any

#: QEMU's limits (json-streamer.c): a value's tokens in bytes, its token count, and brace/bracket nesting.
QEMU_MAX_TOKEN_SIZE = 64 << 20
QEMU_MAX_TOKEN_COUNT = 2 << 20
QEMU_MAX_NESTING = 1 << 10

# Token types (json-parser-int.h).
_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA, _INTEGER, _FLOAT, _KEYWORD, _STRING = range(10)

# Lexer states between feeds: outside a token, skipping after an error, or inside a string/number/keyword.
_IN_START, _IN_RECOVERY, _IN_STRING, _IN_NUMBER, _IN_KEYWORD = range(5)
_WAIT = -1  # a lexer step's "the token needs more bytes, its scan position is saved"
# Number sub-states (json-lexer.c's IN_SIGN ... IN_EXP_DIGITS).
_SIGN, _ZERO, _DIGITS, _MANTISSA, _MANTISSA_DIGITS, _EXP_E, _EXP_SIGN, _EXP_DIGITS = range(8)

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_DIGITS_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")
# What error recovery skips: everything but structural characters, control characters other than \t, 0xFE, 0xFF.
_RECOVERY_SKIP = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]*")
# Inside a string, the bytes that end the plain run: the quote, a backslash, or a byte the lexer refuses.
_STRING_SPECIAL = {ord('"'): re.compile(rb'["\\\x00-\x1f\xfe\xff]'),
                   ord("'"): re.compile(rb"['\\\x00-\x1f\xfe\xff]")}
#: The same as translation tables that map those bytes to 0 (and no other byte): on a long run of plain bytes
#: (base64 data), ``translate`` and ``find`` are several times faster than the regular expression.
_STRING_SPECIAL_TABLE = {quote: bytes(0 if byte < 0x20 or byte in (quote, 0x5C, 0xFE, 0xFF) else byte
                                      for byte in range(256)) for quote in (ord('"'), ord("'"))}
_NONCHARACTER = re.compile("[\ufdd0-\ufdef\ufffe\uffff" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17)) + "]")
_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f",
                   ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
# Noncharacters in UTF-8 all contain one of these (U+FDD0..FDEF: EF B7 90..AF; U+xFFFE/xFFFF: .. BF BE/BF).
_NONCHARACTER_HINTS = (b"\xef\xb7", b"\xbf\xbe", b"\xbf\xbf")
# The common tokens whole, in one match (a fast path: anything else goes through the state machine): a
# structural character, a string without escapes, an integer, a double, a keyword, each with the byte after it
# when the lexer needs that byte to know the token ended (a byte that might continue it: the state machine).
# "0e5" is no double here: after "0" QEMU's lexer takes no "e". Runs are possessive and numbers and keywords
# short: a long run of digits or letters goes to the state machine in one scan, never rescanned by backtracking.
_SIMPLE_TOKEN = re.compile(rb'''[ \t\r\n]*+(?:
    (\{) | (\}) | (\[) | (\]) | (:) | (,)
  | ("[^"\\\x00-\x1f\xfe\xff]*+")
  | (-?(?:0|[1-9][0-9]{0,63}+))(?=[^0-9.eE+\-])
  | (-?(?:0\.[0-9]{1,64}+(?:[eE][-+]?[0-9]{1,64}+)?
        |[1-9][0-9]{0,63}+(?:\.[0-9]{1,64}+(?:[eE][-+]?[0-9]{1,64}+)?|[eE][-+]?[0-9]{1,64}+)))(?=[^0-9.eE+\-])
  | ([a-z]{1,8}+)(?=[^a-z])
)''', re.VERBOSE)
# Token kind by group number.
_GROUP_KIND = (-1, _LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA, _STRING, _INTEGER, _FLOAT, _KEYWORD)
_DEPTH = {_LCURLY: (1, 0), _RCURLY: (-1, 0), _LSQUARE: (0, 1), _RSQUARE: (0, -1)}
_STRUCTURAL_TEXT = {_LCURLY: b"{", _RCURLY: b"}", _LSQUARE: b"[", _RSQUARE: b"]", _COLON: b":", _COMMA: b","}
# Bytes that are a lexical error at the start of a token and end error recovery at once: each is one error.
_RESYNC_RUN = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]+")
_ONE_BYTE = [bytes([i]) for i in range(256)]


class RawJson:
    """A JSON string kept as the bytes it was read as, quotes included: already in :func:`to_json`'s form.

    ``text`` is owned by this object (the reader hands over its buffer rather than copy 64 MiB).
    """

    __slots__ = ("text",)

    def __init__(self, text: bytes | bytearray) -> None:
        self.text = text

    def __len__(self) -> int:
        """The string's length in characters (one byte each: it is ASCII)."""
        return len(self.text) - 2

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawJson) and self.text == other.text

    __hash__ = None  # type: ignore[assignment]  # mutable bytes inside

    def __repr__(self) -> str:
        return f"RawJson({len(self)} characters)"

    def decode(self) -> str:
        return self.text[1:-1].decode("ascii")


def _printed_as_read(token: bytes | bytearray) -> bool:
    """Whether a string token from the lexer (which refuses control characters in strings) is what
    :func:`to_json` prints for its value: double quotes, ASCII, no escapes, no DEL (checked at C speed)."""
    return token[0] == 0x22 and token.isascii() and b"\\" not in token and b"\x7f" not in token


def plain(value: Any) -> Any:
    """``value`` with every :class:`RawJson` decoded to a ``str``, for callers that want plain Python values
    (containers are copied; iterative: values nest as deep as the reader allows)."""
    if isinstance(value, RawJson):
        return value.decode()
    holder = [value]
    todo: list[tuple[Any, Any]] = [(holder, 0)]
    while todo:
        container, key = todo.pop()
        item = container[key]
        if isinstance(item, RawJson):
            container[key] = item.decode()
        elif isinstance(item, dict):
            container[key] = item = dict(item)
            todo.extend((item, name) for name in item)
        elif isinstance(item, list):
            container[key] = item = list(item)
            todo.extend((item, index) for index in range(len(item)))
    return holder[0]


@dataclass(frozen=True)
class Value:
    """A complete JSON value (objects are dicts in QEMU's iteration order)."""

    value: Any


@dataclass(frozen=True)
class ParseError:
    """Input QEMU's reader rejects; ``desc`` is qemu-ga's error text for it."""

    desc: str


Event = Value | ParseError


class _Failed(Exception):
    """The parser's first error (QEMU keeps only the first one)."""


class JsonStreamer:
    """QEMU's JSONMessageParser: feed bytes, get :class:`Value` and :class:`ParseError` events in input order.

    The result depends only on the bytes, never on how they were split across :meth:`feed` calls.
    """

    def __init__(self, *, max_token_size: int = QEMU_MAX_TOKEN_SIZE, max_token_count: int = QEMU_MAX_TOKEN_COUNT,
                 max_nesting: int = QEMU_MAX_NESTING, raw_strings_from: int | None = None,
                 max_scalar: int | None = None) -> None:
        """``max_scalar``: a number or keyword longer than this is refused at once (not QEMU's rule, which lets
        them grow to the token size limit: for reading what an agent sends, where 64 MiB of ``xxx...`` is
        garbage to say early, not a token to keep)."""
        self.max_token_size = max_token_size
        self._scalar_limit = min(max_token_size, max_scalar) if max_scalar is not None else max_token_size
        #: String tokens this long or longer that need no decoding stay :class:`RawJson` (None: never).
        self.raw_strings_from = raw_strings_from
        self.max_token_count = max_token_count
        self.max_nesting = max_nesting
        # Lexer: unread bytes start at the current token (or at the read position between tokens).
        self._buf = bytearray()
        self._state = _IN_START
        self._sub = _SIGN      # number sub-state
        self._quote = 0        # the string's quote byte
        self._scan = 0         # where the string/number/keyword scan resumes, relative to the token's start
        # Streamer: the tokens of the value being read.
        self._types = bytearray()
        self._texts: list[bytes | bytearray] = []
        self._token_size = 0
        self._braces = 0
        self._brackets = 0

    @property
    def buffered(self) -> int:
        """Bytes held for the value being read (its tokens, and the token being lexed)."""
        return self._token_size + len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes; returns what they complete. Never raises for any input."""
        events: list[Event] = []
        buf = self._buf
        buf += data
        pos = self._scan if self._state in (_IN_STRING, _IN_NUMBER, _IN_KEYWORD) else 0
        end = len(buf)
        limit = self.max_token_size
        while pos < end:
            state = self._state
            if state == _IN_START:
                pos = self._simple_tokens(buf, pos, events)  # (structural characters always go that way)
                pos = _WHITESPACE.match(buf, pos).end()  # type: ignore[union-attr]  # always matches
                if pos >= end:
                    break
                byte = buf[pos]
                if byte in (0x22, 0x27) or 0x30 <= byte <= 0x39 or byte == 0x2D or 0x61 <= byte <= 0x7A:
                    del buf[:pos]  # the token starts at buf[0] from now on (a cheap delete from the front)
                    pos, end = 1, len(buf)
                    if byte in (0x22, 0x27):  # " '
                        self._state, self._quote = _IN_STRING, byte
                    elif byte <= 0x39 or byte == 0x2D:  # 0-9 -
                        self._state = _IN_NUMBER
                        self._sub = _ZERO if byte == 0x30 else _SIGN if byte == 0x2D else _DIGITS
                    else:  # a-z
                        self._state = _IN_KEYWORD
                    continue
                self._state = _IN_RECOVERY
                resync = _RESYNC_RUN.match(buf, pos)
                if resync is None:
                    self._stray(_ONE_BYTE[byte], events)
                    pos += 1
                    continue
                # A run of 0xFF (or control bytes): one error each, as QEMU; the value is dropped once.
                events.extend(map(_STRAY_BYTE.__getitem__, resync.group()))
                self._reset_value()
                pos = resync.end()
                continue
            if state == _IN_RECOVERY:
                pos = _RECOVERY_SKIP.match(buf, pos).end()  # type: ignore[union-attr]  # always matches
                if pos < end:
                    self._state = _IN_START
                continue
            # Inside a token that starts at buf[0].
            if state == _IN_STRING:
                pos = self._lex_string(buf, pos, limit, events)
                buf = self._buf  # (a big string takes the buffer with it)
            elif state == _IN_NUMBER:
                pos = self._lex_number(buf, pos, self._scalar_limit, events)
            else:
                # (the scan stops past the limit: a long run is refused without being read to its end)
                run_end = _KEYWORD_RUN.match(buf, pos, self._scalar_limit + 1).end()  # type: ignore[union-attr]
                if run_end > self._scalar_limit:
                    pos = self._overlong(self._scalar_limit, events)
                elif run_end < end:
                    self._token(_KEYWORD, bytes(buf[:run_end]), events)
                    pos = self._end_token(run_end)
                else:
                    pos = run_end
            if pos == _WAIT:
                break
            end = len(buf)
        if self._state not in (_IN_STRING, _IN_NUMBER, _IN_KEYWORD):
            buf.clear()
        elif pos != _WAIT:
            self._scan = pos
        return events

    # -- lexer ----------------------------------------------------------------------------------------------------

    def _end_token(self, length: int) -> int:
        """The token ended after ``length`` bytes; returns the read position (0) in the remaining bytes."""
        del self._buf[:length]
        self._state = _IN_START
        return 0

    def _overlong(self, limit: int, events: list[Event]) -> int:
        """The lexer's own bound: a token still growing past the limit is flushed as an over-size token (QEMU
        hands it to the streamer, which refuses it) and lexing starts afresh after its last byte."""
        self._error("JSON token size limit exceeded", events)
        return self._end_token(limit + 1)

    def _lex_string(self, buf: bytearray, pos: int, limit: int, events: list[Event]) -> int:
        end = len(buf)
        while True:
            at = _find_special(buf, pos, min(end, limit + 1), self._quote)
            if at < 0:
                if end <= limit:
                    return end  # the rest of the string has not arrived
                return self._overlong(limit, events)  # the byte at the limit is a plain one
            byte = buf[at]
            if byte == self._quote:
                if self.raw_strings_from is not None and at + 1 >= self.raw_strings_from:
                    # A big string: the token takes the buffer itself (no copy of up to 64 MiB), the bytes
                    # after it move to a new one.
                    self._buf = buf[at + 1:]
                    del buf[at + 1:]
                    self._state = _IN_START
                    self._token(_STRING, buf, events)
                    return 0
                self._token(_STRING, bytes(buf[:at + 1]), events)
                return self._end_token(at + 1)
            if byte < 0x20 or byte >= 0xFE:  # refused inside a string: the error token includes it
                self._stray(bytes(buf[:at + 1]), events)
                self._state = _IN_RECOVERY
                del buf[:at + 1]
                return 0
            if at >= limit:  # a plain byte (or a backslash) that makes the token too long
                return self._overlong(limit, events)
            # A backslash: the next byte is taken as it is (0x20..0xFD), anything else is an error.
            if at + 1 >= end:
                self._scan = at  # rescan the backslash when its second byte arrives
                return _WAIT
            escaped = buf[at + 1]
            if escaped < 0x20 or escaped >= 0xFE:
                self._stray(bytes(buf[:at + 2]), events)
                self._state = _IN_RECOVERY
                del buf[:at + 2]
                return 0
            if at + 1 >= limit:
                return self._overlong(limit, events)
            pos = at + 2

    def _lex_number(self, buf: bytearray, pos: int, limit: int, events: list[Event]) -> int:
        end = len(buf)
        while pos < end:
            sub = self._sub
            if sub in (_DIGITS, _MANTISSA_DIGITS, _EXP_DIGITS):
                run_end = _DIGITS_RUN.match(buf, pos, limit + 1).end()  # type: ignore[union-attr]  # always matches
                if run_end > limit:
                    return self._overlong(limit, events)
                pos = run_end
                if pos >= end:
                    break
            byte = buf[pos]
            digit = 0x30 <= byte <= 0x39
            if sub == _SIGN:
                nxt = _ZERO if byte == 0x30 else _DIGITS if digit else -1
            elif sub == _ZERO:
                nxt = -1 if digit else _MANTISSA if byte == 0x2E else -2
            elif sub == _DIGITS:
                nxt = _EXP_E if byte in (0x45, 0x65) else _MANTISSA if byte == 0x2E else -2
            elif sub == _MANTISSA:
                nxt = _MANTISSA_DIGITS if digit else -1
            elif sub == _MANTISSA_DIGITS:
                nxt = _EXP_E if byte in (0x45, 0x65) else -2
            elif sub == _EXP_E:
                nxt = _EXP_SIGN if byte in (0x2B, 0x2D) else _EXP_DIGITS if digit else -1
            elif sub == _EXP_SIGN:
                nxt = _EXP_DIGITS if digit else -1
            else:  # _EXP_DIGITS, after its run
                nxt = -2
            if nxt == -1:  # the byte cannot continue the number: an error token that includes it
                self._stray(bytes(buf[:pos + 1]), events)
                self._state = _IN_RECOVERY
                del buf[:pos + 1]
                return 0
            if nxt == -2:  # the number is complete; the byte belongs to what follows
                kind = _INTEGER if sub in (_ZERO, _DIGITS) else _FLOAT
                self._token(kind, bytes(buf[:pos]), events)
                return self._end_token(pos)
            if pos >= limit:
                return self._overlong(limit, events)
            self._sub = nxt
            pos += 1
        return pos

    # -- streamer -------------------------------------------------------------------------------------------------

    def _stray(self, text: bytes, events: list[Event]) -> None:
        """A lexical error: QEMU prints the token as a C string (up to a NUL byte)."""
        self._error(b"JSON parse error, stray '" + text.split(b"\0", 1)[0] + b"'", events)

    def _error(self, desc: bytes | str, events: list[Event]) -> None:
        events.append(ParseError(desc if isinstance(desc, str) else _from_modified_utf8(desc)))
        self._reset_value()

    def _reset_value(self) -> None:
        self._types.clear()
        self._texts.clear()
        self._token_size = 0
        self._braces = 0
        self._brackets = 0

    def _token(self, kind: int, text: bytes | bytearray, events: list[Event]) -> None:
        """json_message_process_token(): count, check the limits, keep the token, parse a complete value."""
        if kind == _LCURLY:
            self._braces += 1
        elif kind == _RCURLY:
            self._braces -= 1
        elif kind == _LSQUARE:
            self._brackets += 1
        elif kind == _RSQUARE:
            self._brackets -= 1
        if self._token_size + len(text) + 1 > self.max_token_size:
            self._error("JSON token size limit exceeded", events)
            return
        if len(self._types) + 1 > self.max_token_count:
            self._error("JSON token count limit exceeded", events)
            return
        if self._brackets + self._braces > self.max_nesting:
            self._error("JSON nesting depth limit exceeded", events)
            return
        self._types.append(kind)
        self._texts.append(text)
        self._token_size += len(text)
        # Complete when balanced, and at once when a closer has no opener ("[}" is an error at the "}").
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        try:
            events.append(Value(_parse(self._types, self._texts, self.raw_strings_from)))
        except _Failed as exc:
            events.append(ParseError(str(exc)))
        self._reset_value()

    def _simple_tokens(self, buf: bytearray, pos: int, events: list[Event]) -> int:
        """The common tokens one after the other, without the state machine; returns where it takes over.

        Only tokens inside a value that meet no limit are kept here; one that completes a value or meets a limit
        goes through :meth:`_token`.
        """
        match = _SIMPLE_TOKEN.match
        types, texts = self._types, self._texts
        limit, max_count, max_nesting = self.max_token_size, self.max_token_count, self.max_nesting
        braces, brackets, size = self._braces, self._brackets, self._token_size
        while (found := match(buf, pos)) is not None:
            group: int = found.lastindex  # type: ignore[assignment]  # set when it matched
            kind = _GROUP_KIND[group]
            if kind <= _COMMA:
                text = _STRUCTURAL_TEXT[kind]
                if kind <= _RSQUARE:
                    more_braces, more_brackets = _DEPTH[kind]
                    new_braces, new_brackets = braces + more_braces, brackets + more_brackets
                else:
                    new_braces, new_brackets = braces, brackets
            else:
                text = found.group(group)
                if len(text) > limit:  # the lexer's own bound applies: the state machine
                    break
                new_braces, new_brackets = braces, brackets
            if (new_braces > 0 or new_brackets > 0) and new_braces >= 0 and new_brackets >= 0 \
                    and size + len(text) + 1 <= limit and len(types) < max_count \
                    and new_braces + new_brackets <= max_nesting:
                types.append(kind)
                texts.append(text)
                size += len(text)
                braces, brackets = new_braces, new_brackets
            else:
                self._braces, self._brackets, self._token_size = braces, brackets, size
                self._token(kind, text, events)
                braces, brackets, size = self._braces, self._brackets, self._token_size
            pos = found.end()
        self._braces, self._brackets, self._token_size = braces, brackets, size
        return pos


# -- parser (json-parser.c) ---------------------------------------------------------------------------------------


def _find_special(buf: bytearray, pos: int, stop: int, quote: int) -> int:
    """Where in ``buf[pos:stop]`` a string's plain run ends (its quote, a backslash, a refused byte), or -1."""
    if stop - pos < 4096:
        found = _STRING_SPECIAL[quote].search(buf, pos, stop)
        return -1 if found is None else found.start()
    at = buf[pos:stop].translate(_STRING_SPECIAL_TABLE[quote]).find(0)
    return -1 if at < 0 else pos + at


def _fail(message: str) -> _Failed:
    """parse_error(): the message goes through a 1024-byte buffer first."""
    raw = message.encode()
    if len(raw) > 1023:
        message = _from_modified_utf8(raw[:1023])
    return _Failed(f"JSON parse error, {message}")


def _parse(types: bytearray, texts: list[bytes | bytearray], raw_from: int | None = None) -> Any:
    """One value from a balanced token list, iteratively (nesting may reach the streamer's limit); string values
    of ``raw_from`` bytes or more that need no decoding stay :class:`RawJson` (keys are always decoded)."""
    count = len(types)
    i = 0
    # Open containers: [dict, pending key or None] or [list].
    stack: list[list[Any]] = []
    while True:
        # -- parse_value at token i
        if i >= count:
            raise _fail("premature EOI")
        kind = types[i]
        value: Any
        if kind in (_LCURLY, _LSQUARE):
            i += 1
            if i >= count:
                raise _fail("premature EOI")
            if types[i] == (_RCURLY if kind == _LCURLY else _RSQUARE):
                i += 1
                value = {} if kind == _LCURLY else []
            else:
                stack.append([{}, None] if kind == _LCURLY else [[]])
                continue  # the first key, or the first element
        elif kind == _STRING:
            text = texts[i]
            if raw_from is not None and len(text) >= raw_from and _printed_as_read(text) and not (
                    stack and len(stack[-1]) == 2 and stack[-1][1] is None):  # (not in a key's place)
                value = RawJson(text)
            else:
                value = _parse_string(text)
            i += 1
        elif kind in (_INTEGER, _FLOAT):
            value = _parse_number(bytes(texts[i]), kind == _INTEGER)  # (only big strings are bytearrays)
            i += 1
        elif kind == _KEYWORD:
            word = texts[i]
            if word not in (b"true", b"false", b"null"):
                raise _fail(f"invalid keyword '{word.decode()}'")
            value = True if word == b"true" else False if word == b"false" else None
            i += 1
        else:
            raise _fail("expecting value")
        # -- hand the value to the containers it completes
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if len(frame) == 1:  # a list
                frame[0].append(value)
                if i >= count:
                    raise _fail("premature EOI")
                separator = types[i]
                i += 1
                if separator == _RSQUARE:
                    value = stack.pop()[0]
                    continue
                if separator != _COMMA:
                    raise _fail("expected separator in list")
                break
            obj, key = frame
            if key is None:  # value is the key of a pair
                if not isinstance(value, str):
                    raise _fail("key is not a string in object")
                if i >= count:
                    raise _fail("premature EOI")
                if types[i] != _COLON:
                    raise _fail("missing : in object pair")
                i += 1
                frame[1] = value
                break
            if key in obj:
                raise _fail("duplicate key")
            obj[key] = value
            frame[1] = None
            if i >= count:
                raise _fail("premature EOI")
            separator = types[i]
            i += 1
            if separator == _RCURLY:
                stack.pop()
                value = qdict_ordered(obj)
                continue
            if separator != _COMMA:
                raise _fail("expected separator in dict")
            break


def _parse_number(text: bytes, integer: bool) -> int | float:
    """Integers in int64 or uint64 stay integers; anything else is a double (json-parser.c parse_literal)."""
    if integer and len(text) <= 20:
        number = int(text)
        if -(1 << 63) <= number < (1 << 64) and not (number >= 1 << 63 and text[:1] == b"-"):
            return number
    return float(text)


def _parse_string(token: bytes | bytearray) -> str:
    """json-parser.c parse_string(): escapes, modified UTF-8, no noncharacters or surrogates."""
    token = bytes(token)
    body = token[1:-1]
    if b"\\" not in body:
        return _decode_plain(body)
    parts: list[str] = []
    pos = 0
    while True:
        backslash = body.find(b"\\", pos)
        if backslash < 0:
            parts.append(_decode_plain(body[pos:]))
            return "".join(parts)
        parts.append(_decode_plain(body[pos:backslash]))
        code = body[backslash + 1]  # the lexer guarantees a byte after a backslash
        simple = _SIMPLE_ESCAPES.get(code)
        if simple is not None:
            parts.append(simple)
            pos = backslash + 2
            continue
        if code != ord("u"):
            raise _fail("invalid escape sequence in string")
        end = backslash + 6
        point = _hex4(body, backslash + 2)
        if 0xD800 <= point <= 0xDBFF and body[end:end + 2] == b"\\u":
            trailing = _hex4(body, end + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                point = 0x10000 + ((point & 0x3FF) << 10) + (trailing & 0x3FF)
                end += 6
            else:
                point = -1
        if not _valid_codepoint(point):
            # QEMU prints the escape from the token (its closing quote included, if the escape ran into it).
            escape = token[backslash + 1:backslash + 1 + (end - backslash)]
            raise _fail(f"{_from_modified_utf8(escape)} is not a valid Unicode character")
        parts.append(chr(point))
        pos = end


def _hex4(body: bytes, pos: int) -> int:
    return int(body[pos:pos + 4], 16) if _HEX4.fullmatch(body, pos, pos + 4) else -1


def _valid_codepoint(point: int) -> bool:
    return 0 <= point <= 0x10FFFF and not (0xD800 <= point <= 0xDFFF) and not (
        0xFDD0 <= point <= 0xFDEF or point & 0xFFFE == 0xFFFE)


def _decode_plain(raw: bytes) -> str:
    """Modified UTF-8 (``C0 80`` is U+0000) without noncharacters, or the parser's UTF-8 error."""
    try:
        text = raw.decode() if b"\xc0" not in raw else raw.replace(b"\xc0\x80", b"\0").decode()
    except UnicodeDecodeError:
        raise _fail("invalid UTF-8 sequence in string") from None
    if _has_noncharacter(raw, text):
        raise _fail("invalid UTF-8 sequence in string")
    return text


def _has_noncharacter(raw: bytes, text: str) -> bool:
    return any(hint in raw for hint in _NONCHARACTER_HINTS) and _NONCHARACTER.search(text) is not None


def _from_modified_utf8(raw: bytes) -> str:
    """A C string (up to its NUL) the way qobject_to_json reads it: one U+FFFD per invalid sequence."""
    raw = raw.split(b"\0", 1)[0]
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        pass
    else:
        if not _has_noncharacter(raw, text):
            return text
    out: list[str] = []
    pos, end = 0, len(raw)
    while pos < end:
        point, pos = _mod_utf8_codepoint(raw, pos)
        out.append(chr(point) if point >= 0 else "\ufffd")
    return "".join(out)


def _mod_utf8_codepoint(raw: bytes, pos: int) -> tuple[int, int]:
    """util/unicode.c mod_utf8_codepoint(): (codepoint or -1, position after the sequence)."""
    byte = raw[pos]
    pos += 1
    if byte < 0x80:
        return byte, pos
    if byte >= 0xFE or not byte & 0x40:
        return -1, pos
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    point = byte & (mask - 1)
    for _ in range(1, length):
        if pos >= len(raw) or raw[pos] & 0xC0 != 0x80:
            return -1, pos
        point = point << 6 | raw[pos] & 0x3F
        pos += 1
    minimum = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
    if not _valid_codepoint(point) or (point < minimum and not (point == 0 and length == 2)):
        return -1, pos
    return point, pos


#: The error for each byte that is a token of its own (a 0xFF flood costs no formatting).
_STRAY_BYTE = [ParseError(_from_modified_utf8(b"JSON parse error, stray '" + bytes([i]).strip(b"\0") + b"'"))
               for i in range(256)]


# -- QDict order and printing (qobject/qdict.c, qobject/qjson.c) --------------------------------------------------


def _qdict_bucket(key: str) -> int:
    """qdict.c: tdb_hash(key) % 512, over the key's modified UTF-8."""
    data = key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")
    value = 0x238F13AF * len(data)
    if len(data) <= 24:
        for i, byte in enumerate(data):
            value += byte << (i * 5 % 24)
    else:  # the shifts repeat every 24 bytes: sum each residue class at C speed
        for residue in range(24):
            value += sum(data[residue::24]) << (residue * 5 % 24)
    return ((1103515243 * (value & 0xFFFFFFFF) + 12345) & 0xFFFFFFFF) % 512


def qdict_ordered(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its members in the order QEMU iterates a QDict built by inserting them in ``obj``'s order:
    by hash bucket, and the latest insertion first within a bucket."""
    if len(obj) < 2:
        return obj
    keys = list(obj)
    ranked = sorted(range(len(keys)), key=lambda i: (_qdict_bucket(keys[i]), -i))
    return {keys[i]: obj[keys[i]] for i in ranked}


_UNICODE_ESCAPE = re.compile(r"(\\\\)|\\u([0-9a-f]{4})")


def _quote(text: str) -> str:
    """A JSON string as qobject_to_json prints it: Python's ASCII escapes, with upper-case hex digits."""
    # json.encoder's C function, not json.dumps(): the same output without its per-call overhead.
    quoted: str = _encode_basestring_ascii(text)
    if "\\u" not in quoted:
        return quoted
    return _UNICODE_ESCAPE.sub(lambda m: m[1] or "\\u" + m[2].upper(), quoted)


def to_json(value: Any) -> bytes:
    """``value`` printed as qobject_to_json prints it (dicts in their own order: see :func:`qdict_ordered`)."""
    return b"".join(to_json_pieces(value))


def to_json_pieces(value: Any) -> list[bytes | bytearray]:
    """:func:`to_json` in pieces, :class:`RawJson` strings among them as they are (write them one by one and
    a 64 MiB string is never copied into one big result).

    Iterative: an echoed ``id`` may be nested as deep as the reader allows, deeper than Python's recursion.
    """
    pieces: list[bytes | bytearray] = []
    out: list[str] = []
    todo: list[tuple[bool, Any]] = [(False, value)]  # (is printed text, item), last first
    while todo:
        printed, item = todo.pop()
        if printed:
            out.append(item)
        elif isinstance(item, str):
            out.append(_quote(item))
        elif isinstance(item, RawJson):
            pieces.append("".join(out).encode())
            out.clear()
            pieces.append(item.text)
        elif item is None or item is True or item is False:
            out.append("null" if item is None else "true" if item else "false")
        elif isinstance(item, int):
            out.append(str(item))
        elif isinstance(item, float):
            out.append(f"{item:.17g}")  # C printf("%.17g"), as QEMU
        elif isinstance(item, dict):
            if not item:
                out.append("{}")
                continue
            out.append("{")
            todo.append((True, "}"))
            entries = list(item.items())
            for n in range(len(entries) - 1, -1, -1):
                todo.append((False, entries[n][1]))
                todo.append((True, f"{', ' if n else ''}{_quote(str(entries[n][0]))}: "))
        elif isinstance(item, list | tuple):
            if not item:
                out.append("[]")
                continue
            out.append("[")
            todo.append((True, "]"))
            for n in range(len(item) - 1, -1, -1):
                todo.append((False, item[n]))
                if n:
                    todo.append((True, ", "))
        else:
            raise TypeError(f"cannot print {type(item).__name__} as JSON")
    pieces.append("".join(out).encode())
    return pieces
