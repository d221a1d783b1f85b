"""RFB (VNC) client side, without I/O: feed the server's bytes in, get events out; ask for messages, get bytes.

The core reads QEMU's display through QEMU's own VNC server on a private unix socket. This module is the whole
protocol for that: the handshake (RFB 3.3, 3.7, 3.8 with security type None), ServerInit, and the server messages
(FramebufferUpdate with Raw rectangles and the DesktopSize, Cursor and QEMU LED State pseudo-encodings, Bell,
ServerCutText, the Extended Clipboard (rfb.clipboard), SetColourMapEntries). No sockets and no asyncio, so the
same code runs under the capture's asyncio transport, a unit test or a fuzzer.

The server is not trusted: every length is checked before anything is buffered, so a malformed or hostile
message raises :class:`RemoteProtocolError` and never another exception type or an unbounded allocation.
Raw pixels are not collected per rectangle: they come out as :class:`RawPixels` bands of whole rows as soon as
they arrive, so the buffered input never exceeds one row (at most 256 KiB), one cursor, or one cut text.

Typical use::

    conn = RfbClient()
    events = conn.receive_data(data)        # handshake replies queue up: send conn.data_to_send()
    # on ServerInit:
    send(conn.set_pixel_format(BGRX8888) + conn.set_encodings([ENCODING_RAW, ...])
         + conn.framebuffer_update_request(0, 0, w, h, incremental=False))
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

# The wire format, the errors and BGRX8888 are shared with the server role (rfb.wire, rfb.errors).
from rfb import clipboard as extclip
from rfb.errors import AuthenticationFailed, LocalProtocolError, ProtocolError, RfbError
from rfb.events import (
    ClipboardCaps,
    ClipboardEvent,
    ClipboardNotify,
    ClipboardPeek,
    ClipboardProvide,
    ClipboardRequest,
    CutTextTooLarge,
)
from rfb.wire import (
    BGRX8888,
    COLOUR_MAP_HEADER,
    CUT_TEXT_HEADER,
    ENCODING_CURSOR,
    ENCODING_DESKTOP_SIZE,
    ENCODING_EXTENDED_CLIPBOARD,
    ENCODING_QEMU_LED_STATE,
    ENCODING_RAW,
    MSG_BELL,
    MSG_CLIENT_CUT_TEXT,
    MSG_FRAMEBUFFER_UPDATE,
    MSG_FRAMEBUFFER_UPDATE_REQUEST,
    MSG_KEY_EVENT,
    MSG_POINTER_EVENT,
    MSG_SERVER_CUT_TEXT,
    MSG_SET_COLOUR_MAP_ENTRIES,
    MSG_SET_ENCODINGS,
    MSG_SET_PIXEL_FORMAT,
    RECT_HEADER,
    SECURITY_NONE,
    SERVER_INIT,
    U8,
    U32,
    UPDATE_HEADER,
    PixelFormat,
)

_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")

#: Limits on what the server may make us buffer (RFB itself allows up to 4 GiB for each).
DEFAULT_MAX_NAME = 64 << 10
DEFAULT_MAX_CUT_TEXT = 1 << 20
DEFAULT_MAX_CURSOR = 1024  # pixels per side

#: The server broke the protocol (h11's name for the peer's error; the same class as the server role's).
RemoteProtocolError = ProtocolError


# --- events ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerInit:
    """The handshake is done: the framebuffer size, the server's name and its native pixel format."""

    width: int
    height: int
    name: str
    pixel_format: PixelFormat


@dataclass(frozen=True, slots=True)
class RawPixels:
    """A band of whole rows of a Raw rectangle, in the client's pixel format (rows packed, width*bpp bytes).

    One rectangle may arrive as several bands, each a rectangle in its own right; the rectangle as a whole is
    listed in the :class:`UpdateDone` that ends the FramebufferUpdate.
    """

    x: int
    y: int
    width: int
    height: int
    pixels: bytes


@dataclass(frozen=True, slots=True)
class DesktopSize:
    """The framebuffer changed size; the server sends the new content in later updates."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Cursor:
    """A new pointer shape: width*height pixels in the client's format, then a 1-bit mask (rows of
    ceil(width/8) bytes, most significant bit first; 1 = opaque). A 0x0 cursor hides the pointer."""

    hot_x: int
    hot_y: int
    width: int
    height: int
    pixels: bytes
    mask: bytes


@dataclass(frozen=True, slots=True)
class UpdateDone:
    """A FramebufferUpdate message ended; ``rects`` are its Raw rectangles as (x, y, width, height)."""

    rects: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class Bell:
    pass


@dataclass(frozen=True, slots=True)
class ServerCutText:
    """The server's clipboard (ISO 8859-1 text, as RFB defines it)."""

    text: bytes


@dataclass(frozen=True, slots=True)
class LedState:
    """QEMU LED State: the guest keyboard's lock LEDs (bit 0 Scroll, 1 Num, 2 Caps Lock)."""

    leds: int


Event = (ServerInit | RawPixels | DesktopSize | Cursor | UpdateDone | Bell | ServerCutText | LedState
         | ClipboardEvent | CutTextTooLarge)


class State(Enum):
    VERSION = "version"
    SECURITY_TYPES = "security-types"  # 3.7 and 3.8: the server lists its types
    SECURITY_33 = "security-3.3"  # 3.3: the server decides
    SECURITY_RESULT = "security-result"
    FAILURE_REASON = "failure-reason"
    SERVER_INIT = "server-init"
    NORMAL = "normal"  # handshake done: server messages
    CLOSED = "closed"  # the server broke the protocol; nothing more is read


class _Need(Exception):
    """Internal: not enough bytes buffered to go on."""


class RfbClient:
    """One RFB client connection as a state machine over bytes.

    ``receive_data`` returns the events the bytes complete. Replies the handshake requires (version, security
    type, ClientInit) queue up in :meth:`data_to_send`; messages the owner chooses to send are returned as bytes
    by the methods named after them. Raises :class:`RemoteProtocolError` when the server breaks the protocol,
    after which the connection is closed.
    """

    def __init__(
        self,
        *,
        shared: bool = True,
        max_name: int = DEFAULT_MAX_NAME,
        max_cut_text: int = DEFAULT_MAX_CUT_TEXT,
        max_cursor: int = DEFAULT_MAX_CURSOR,
    ) -> None:
        self.shared = shared
        self.max_name = max_name
        self.max_cut_text = max_cut_text
        self.max_cursor = max_cursor
        self.state = State.VERSION
        self.version: tuple[int, int] | None = None
        self.width = 0
        self.height = 0
        self.server_name = ""
        self.pixel_format: PixelFormat | None = None  # what the server sends in: its own, until we set ours
        self._encodings: frozenset[int] = frozenset({ENCODING_RAW})
        self._buf = bytearray()
        self._pos = 0
        self._out = bytearray()
        # The FramebufferUpdate being parsed: rectangles left, Raw rectangles seen, the Raw rectangle in progress.
        self._rects_left = 0
        self._in_update = False
        self._update_rects: list[tuple[int, int, int, int]] = []
        self._raw: tuple[int, int, int, int] | None = None  # x, next row, width, rows left
        self._cursor_header: tuple[int, int, int, int] | None = None
        self._skip = 0  # colour map (or oversized cut text) bytes still to drop

    # --- receiving ---------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the server; returns the events they complete (possibly none)."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed after a protocol error")
        self._buf += data
        events: list[Event] = []
        try:
            while True:
                self._step(events)
        except _Need:
            pass
        except RemoteProtocolError:
            self.state = State.CLOSED
            self._buf.clear()
            self._pos = 0
            raise
        finally:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
        return events

    def data_to_send(self) -> bytes:
        """Replies the handshake produced (empty when there are none); take them after each receive_data."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed: bounded by the limits, whatever the server sends."""
        return len(self._buf) - self._pos

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        if self._available() < n:
            raise _Need
        start = self._pos
        self._pos += n
        with memoryview(self._buf) as view, view[start : self._pos] as part:
            return bytes(part)  # one copy, not two (slicing the bytearray would copy first)

    def _peek(self, n: int) -> bytes:
        if self._available() < n:
            raise _Need
        return bytes(self._buf[self._pos : self._pos + n])

    def _step(self, events: list[Event]) -> None:
        state = self.state
        if state is State.NORMAL:
            self._step_normal(events)
        elif state is State.VERSION:
            self._on_version(self._take(12))
        elif state is State.SECURITY_TYPES:
            count = self._peek(1)[0]
            if count == 0:
                self._take(1)
                self.state = State.FAILURE_REASON
                return
            types = self._take(1 + count)[1:]
            if SECURITY_NONE not in types:
                raise AuthenticationFailed(f"no supported security type offered (server offers {list(types)})")
            self._out += U8.pack(SECURITY_NONE)
            if self.version == (3, 8):
                self.state = State.SECURITY_RESULT
            else:
                self._client_init()
        elif state is State.SECURITY_33:
            (kind,) = U32.unpack(self._take(4))
            if kind == 0:
                self.state = State.FAILURE_REASON
            elif kind == SECURITY_NONE:
                self._client_init()
            else:
                raise AuthenticationFailed(f"server requires security type {kind}")
        elif state is State.SECURITY_RESULT:
            (result,) = U32.unpack(self._take(4))
            if result == 0:
                self._client_init()
            else:
                self.state = State.FAILURE_REASON
        elif state is State.FAILURE_REASON:
            (length,) = U32.unpack(self._peek(4))
            if length > self.max_name:
                raise AuthenticationFailed(f"(reason of {length} bytes not read)")
            reason = self._take(4 + length)[4:]
            raise AuthenticationFailed(reason.decode("utf-8", "replace") or "no reason given")
        elif state is State.SERVER_INIT:
            self._on_server_init(events)
        else:  # pragma: no cover - CLOSED is refused in receive_data
            raise LocalProtocolError(f"cannot receive in state {state}")

    def _on_version(self, line: bytes) -> None:
        match = _VERSION_RE.fullmatch(line)
        if match is None:
            raise RemoteProtocolError(f"not an RFB server (greeting {line!r})")
        major, minor = int(match[1]), int(match[2])
        if major < 3:
            raise RemoteProtocolError(f"RFB version {major}.{minor} is too old")
        # Answer with the highest version both speak; 3.4-3.6 are treated as 3.3 (RFC 6143 section 7.1.1).
        if major > 3 or minor >= 8:
            self.version = (3, 8)
        elif minor == 7:
            self.version = (3, 7)
        else:
            self.version = (3, 3)
        self._out += b"RFB 003.%03d\n" % self.version[1]
        self.state = State.SECURITY_33 if self.version == (3, 3) else State.SECURITY_TYPES

    def _client_init(self) -> None:
        self._out += U8.pack(1 if self.shared else 0)
        self.state = State.SERVER_INIT

    def _on_server_init(self, events: list[Event]) -> None:
        width, height, raw_format, name_length = SERVER_INIT.unpack(self._peek(SERVER_INIT.size))
        if name_length > self.max_name:
            raise RemoteProtocolError(f"server name of {name_length} bytes exceeds the limit of {self.max_name}")
        pixel_format = PixelFormat.unpack(raw_format)
        try:
            pixel_format.check()
        except ValueError as exc:
            raise RemoteProtocolError(f"server's {exc}") from None
        name = self._take(SERVER_INIT.size + name_length)[SERVER_INIT.size :]
        self.width, self.height = width, height
        self.pixel_format = pixel_format
        self.server_name = name.decode("utf-8", "replace")
        self.state = State.NORMAL
        events.append(ServerInit(width, height, self.server_name, pixel_format))

    # --- server messages ---------------------------------------------------------------------------------

    def _step_normal(self, events: list[Event]) -> None:
        if self._raw is not None:
            self._raw_rows(events)
        elif self._cursor_header is not None:
            self._cursor_data(events)
        elif self._skip:
            n = min(self._skip, self._available())
            if n == 0:
                raise _Need
            self._pos += n
            self._skip -= n
        elif self._in_update:
            if self._rects_left == 0:
                self._in_update = False
                events.append(UpdateDone(tuple(self._update_rects)))
                self._update_rects = []
            else:
                self._rect_header(events)
        else:
            self._message(events)

    def _message(self, events: list[Event]) -> None:
        kind = self._peek(1)[0]
        if kind == MSG_FRAMEBUFFER_UPDATE:
            _kind, count = UPDATE_HEADER.unpack(self._take(UPDATE_HEADER.size))
            self._in_update = True
            self._rects_left = count
        elif kind == MSG_BELL:
            self._take(1)
            events.append(Bell())
        elif kind == MSG_SERVER_CUT_TEXT:
            self._cut_text(events)
        elif kind == MSG_SET_COLOUR_MAP_ENTRIES:
            # Meaningless with the true-colour format we use; its length is well defined, so it is skipped.
            _kind, _first, count = COLOUR_MAP_HEADER.unpack(self._take(COLOUR_MAP_HEADER.size))
            self._skip = count * 6
        else:
            raise RemoteProtocolError(f"unknown server message type {kind}")

    def _cut_text(self, events: list[Event]) -> None:
        _kind, field = CUT_TEXT_HEADER.unpack(self._peek(CUT_TEXT_HEADER.size))
        extended, length, limit = extclip.cut_text_length(field, self.max_cut_text)
        if extended and ENCODING_EXTENDED_CLIPBOARD not in self._encodings:
            raise RemoteProtocolError(f"server cut text of {field} bytes (an Extended Clipboard message, "
                                      "which was not asked for)")
        if length > limit:
            self._take(CUT_TEXT_HEADER.size)
            self._skip = length
            events.append(CutTextTooLarge(length, limit))
            return
        payload = self._take(CUT_TEXT_HEADER.size + length)[CUT_TEXT_HEADER.size :]
        events.append(extclip.parse(payload, max_size=self.max_cut_text) if extended else ServerCutText(payload))

    def _rect_header(self, events: list[Event]) -> None:
        x, y, width, height, encoding = RECT_HEADER.unpack(self._take(RECT_HEADER.size))
        self._rects_left -= 1
        if encoding == ENCODING_RAW:
            if x + width > self.width or y + height > self.height:
                raise RemoteProtocolError(f"rectangle {width}x{height}+{x}+{y} outside the "
                                          f"{self.width}x{self.height} framebuffer")
            if self.pixel_format is None:  # pragma: no cover - set at ServerInit
                raise RemoteProtocolError("rectangle before ServerInit")
            self._update_rects.append((x, y, width, height))
            if width and height:
                self._raw = (x, y, width, height)
        elif encoding not in self._encodings:
            raise RemoteProtocolError(f"server used encoding {encoding}, which was not requested")
        elif encoding == ENCODING_DESKTOP_SIZE:
            if width == 0 or height == 0:
                raise RemoteProtocolError(f"desktop size {width}x{height}")
            self.width, self.height = width, height
            events.append(DesktopSize(width, height))
        elif encoding == ENCODING_QEMU_LED_STATE:
            events.append(LedState(self._take(1)[0]))
        elif encoding == ENCODING_CURSOR:
            if width > self.max_cursor or height > self.max_cursor:
                raise RemoteProtocolError(f"cursor {width}x{height} larger than the limit of {self.max_cursor}")
            self._cursor_header = (x, y, width, height)
        else:  # pragma: no cover - set_encodings only accepts encodings parsed here
            raise RemoteProtocolError(f"encoding {encoding} is not implemented")

    def _raw_rows(self, events: list[Event]) -> None:
        assert self._raw is not None and self.pixel_format is not None
        x, y, width, rows_left = self._raw
        row = width * self.pixel_format.bytes_per_pixel
        rows = min(rows_left, self._available() // row)
        if rows == 0:
            raise _Need
        events.append(RawPixels(x, y, width, rows, self._take(rows * row)))
        self._raw = (x, y + rows, width, rows_left - rows) if rows < rows_left else None

    def _cursor_data(self, events: list[Event]) -> None:
        assert self._cursor_header is not None and self.pixel_format is not None
        hot_x, hot_y, width, height = self._cursor_header
        image = width * height * self.pixel_format.bytes_per_pixel
        mask = (width + 7) // 8 * height
        data = self._take(image + mask)
        self._cursor_header = None
        events.append(Cursor(hot_x, hot_y, width, height, data[:image], data[image:]))

    # --- client messages ---------------------------------------------------------------------------------

    def _require_normal(self, what: str) -> None:
        if self.state is not State.NORMAL:
            raise LocalProtocolError(f"cannot send {what} in state {self.state.value}")

    def set_pixel_format(self, pixel_format: PixelFormat) -> bytes:
        """SetPixelFormat. Later server messages are parsed in this format, so send it before any
        SetEncodings or FramebufferUpdateRequest (the server may answer those at once)."""
        self._require_normal("SetPixelFormat")
        pixel_format.check()
        if not pixel_format.true_colour:
            raise LocalProtocolError("colour-map pixel formats are not supported")
        self.pixel_format = pixel_format
        return U8.pack(MSG_SET_PIXEL_FORMAT) + b"\x00" * 3 + pixel_format.pack()

    def set_encodings(self, encodings: Iterable[int]) -> bytes:
        """SetEncodings; afterwards the server may use exactly these (and Raw, which is always allowed)."""
        self._require_normal("SetEncodings")
        chosen = list(dict.fromkeys(encodings))
        unknown = set(chosen) - {ENCODING_RAW, ENCODING_DESKTOP_SIZE, ENCODING_CURSOR, ENCODING_QEMU_LED_STATE,
                                 ENCODING_EXTENDED_CLIPBOARD}
        if unknown:
            raise LocalProtocolError(f"encodings {sorted(unknown)} are not implemented by this client")
        self._encodings = frozenset([ENCODING_RAW, *chosen])
        return struct.pack(f">BxH{len(chosen)}i", MSG_SET_ENCODINGS, len(chosen), *chosen)

    def framebuffer_update_request(self, x: int, y: int, width: int, height: int, *, incremental: bool) -> bytes:
        self._require_normal("FramebufferUpdateRequest")
        return struct.pack(">BBHHHH", MSG_FRAMEBUFFER_UPDATE_REQUEST, incremental, x, y, width, height)

    def key_event(self, keysym: int, down: bool) -> bytes:
        self._require_normal("KeyEvent")
        return struct.pack(">BBxxI", MSG_KEY_EVENT, down, keysym)

    def pointer_event(self, x: int, y: int, button_mask: int) -> bytes:
        self._require_normal("PointerEvent")
        return struct.pack(">BBHH", MSG_POINTER_EVENT, button_mask, x, y)

    def client_cut_text(self, text: bytes) -> bytes:
        self._require_normal("ClientCutText")
        return struct.pack(">B3xI", MSG_CLIENT_CUT_TEXT, len(text)) + text

    def clipboard(self, payload: bytes) -> bytes:
        """An Extended Clipboard message (rfb.clipboard builds the payload) as ClientCutText; the server may
        take it once we asked for the pseudo-encoding (QEMU registers its clipboard peer then)."""
        self._require_normal("ClientCutText")
        if ENCODING_EXTENDED_CLIPBOARD not in self._encodings:
            raise LocalProtocolError("the Extended Clipboard pseudo-encoding was not set")
        return extclip.message(MSG_CLIENT_CUT_TEXT, payload)


__all__ = [
    "BGRX8888", "DEFAULT_MAX_CURSOR", "DEFAULT_MAX_CUT_TEXT", "DEFAULT_MAX_NAME", "ENCODING_CURSOR",
    "ENCODING_DESKTOP_SIZE", "ENCODING_EXTENDED_CLIPBOARD", "ENCODING_QEMU_LED_STATE", "ENCODING_RAW",
    "AuthenticationFailed", "Bell", "ClipboardCaps", "ClipboardNotify", "ClipboardPeek", "ClipboardProvide",
    "ClipboardRequest", "Cursor", "CutTextTooLarge", "DesktopSize", "Event", "LedState", "LocalProtocolError",
    "ProtocolError", "RawPixels", "RemoteProtocolError", "RfbClient", "RfbError", "ServerCutText", "ServerInit",
    "State", "UpdateDone",
]
