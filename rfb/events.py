"""What a viewer told the server: small immutable values returned by ``RfbServerConnection.receive_data``.

Each event is one complete client message (or one handshake milestone), already validated; the owner acts on
it (forward input to the guest, schedule an update, ...). Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from rfb.wire import PixelFormat, Screen


@dataclass(frozen=True, slots=True)
class SecurityNegotiated:
    """The handshake passed security: ``version`` is what both sides now speak, e.g. (3, 8).

    ``client_version`` is what the viewer wrote, before mapping (e.g. (3, 889) for Apple's viewer).
    """

    version: tuple[int, int]
    client_version: tuple[int, int]
    security_type: int


@dataclass(frozen=True, slots=True)
class TlsRequested:
    """The viewer chose VeNCrypt ``subtype`` and our accept byte is in ``data_to_send()``: send it, run the TLS
    handshake as the server (with anonymous or X.509 credentials), then call ``tls_established()``. The
    connection reads no more bytes in the clear: anything the viewer sends before TLS is a protocol error."""

    subtype: int
    anonymous: bool


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A viewer's VNC authentication response, for the owner to check (``external_auth``): answer with
    ``auth_result``. ``challenge`` is what the viewer was sent."""

    challenge: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """VNC authentication failed; the failure result is in ``data_to_send()`` and the connection is closed."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientInitReceived:
    """ClientInit arrived and ServerInit is queued in ``data_to_send()``.

    ``shared`` false asks the server to disconnect every other viewer (or, by policy, to refuse this one by
    closing it); true asks to share the desktop.
    """

    shared: bool


@dataclass(frozen=True, slots=True)
class PixelFormatChanged:
    """Updates from now on must use ``fmt``. For a colour-map format, SetColourMapEntries is queued in
    ``data_to_send()`` and pixels.convert maps to the fixed BGR233 palette."""

    fmt: PixelFormat


@dataclass(frozen=True, slots=True)
class EncodingsSet:
    """The viewer's encodings in its order of preference (pseudo-encodings included)."""

    encodings: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UpdateRequested:
    """FramebufferUpdateRequest, as sent. The spec says to crop it to the framebuffer: see :meth:`clipped`."""

    incremental: bool
    x: int
    y: int
    width: int
    height: int

    def clipped(self, fb_width: int, fb_height: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) cropped to a framebuffer of that size; width or height may be 0."""
        x, y = min(self.x, fb_width), min(self.y, fb_height)
        return x, y, max(0, min(self.x + self.width, fb_width) - x), max(0, min(self.y + self.height, fb_height) - y)


@dataclass(frozen=True, slots=True)
class Key:
    """KeyEvent: an X11 keysym pressed or released."""

    down: bool
    keysym: int


@dataclass(frozen=True, slots=True)
class ExtendedKey:
    """QEMU Extended Key Event: keysym plus the XT scancode (0xe0-prefixed codes have the high bit set)."""

    down: bool
    keysym: int
    keycode: int


@dataclass(frozen=True, slots=True)
class Pointer:
    """PointerEvent: buttons 1..8 in bits 0..7, absolute position (or S16 deltas in QEMU relative mode)."""

    buttons: int
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class CutText:
    """ClientCutText: the viewer's clipboard, ISO 8859-1 as RFB defines it (decoded losslessly)."""

    text: str


@dataclass(frozen=True, slots=True)
class CutTextTooLarge:
    """Cut text (legacy or an Extended Clipboard provide) over the connection's limit: its bytes were skipped
    without being buffered or inflated, and the connection goes on. ``size`` is what the peer announced (for a
    provide: the inflated size, or the compressed one when that alone is over the limit)."""

    size: int
    limit: int


# Extended Clipboard (rfb.clipboard), either direction: the same messages travel as ClientCutText and
# ServerCutText. ``formats`` holds the format bits (rfb.clipboard.FORMAT_*).


@dataclass(frozen=True, slots=True)
class ClipboardCaps:
    """The peer's Extended Clipboard capabilities: the actions it takes and, per format, the largest size it
    accepts unasked (``sizes``: (format bit, bytes) pairs, lowest bit first)."""

    formats: int
    actions: int
    sizes: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ClipboardRequest:
    """The peer asks for the clipboard's content in these formats: answer with a provide."""

    formats: int


@dataclass(frozen=True, slots=True)
class ClipboardPeek:
    """The peer asks which formats the clipboard holds: answer with a notify."""

    formats: int


@dataclass(frozen=True, slots=True)
class ClipboardNotify:
    """The peer's clipboard changed and holds these formats (none: it is empty); request what you want."""

    formats: int


@dataclass(frozen=True, slots=True)
class ClipboardProvide:
    """The peer's clipboard content. ``text`` is the text format's bytes as sent (None if not included; see
    rfb.clipboard.decode_text); other formats are not kept."""

    formats: int
    text: bytes | None


ClipboardEvent = ClipboardCaps | ClipboardRequest | ClipboardPeek | ClipboardNotify | ClipboardProvide


@dataclass(frozen=True, slots=True)
class ContinuousUpdates:
    """EnableContinuousUpdates. When ``enable`` is false the owner must send
    ``end_of_continuous_updates()`` at once (even if they were already off)."""

    enable: bool
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class DesktopSizeRequested:
    """SetDesktopSize. Every one must be answered with an ExtendedDesktopSize rect (reason 1, a status code)."""

    width: int
    height: int
    screens: tuple[Screen, ...]


@dataclass(frozen=True, slots=True)
class Fence:
    """ClientFence. If ``flags`` has FENCE_REQUEST, answer with ``fence(flags & supported, payload)``."""

    flags: int
    payload: bytes


Event = (
    SecurityNegotiated | TlsRequested | AuthResponse | AuthFailed | ClientInitReceived | PixelFormatChanged
    | EncodingsSet | UpdateRequested | Key | ExtendedKey | Pointer | CutText | ContinuousUpdates
    | DesktopSizeRequested | Fence | CutTextTooLarge | ClipboardCaps | ClipboardRequest | ClipboardPeek
    | ClipboardNotify | ClipboardProvide
)
