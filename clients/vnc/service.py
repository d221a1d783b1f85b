"""The VNC server of the client process: asyncio transports (TCP, unix, WebSocket) driving the sans-IO
``RfbServerConnection`` of rfb, pixels from the shared framebuffer, input through the core.

Per viewer there are three tasks: the reader (bytes → events → state), the sender (at most one update in
flight: it is built only when the viewer asked for one, and only once the transport has drained what was
written before, so a slow viewer skips frames instead of buffering them) and the input sender (batches of
input events to the core, one request at a time). Updates are encoded by worker processes
(encoder_pool.py), never on this loop; only Raw in the framebuffer's own format is copied here. Viewers that
take CopyRect are served from the service's frame copy, where scrolls are found (framecopy.py). The clipboard
(clipboard.py) and the guest's keyboard LEDs (QEMU LED State) come from the core.

The core holds VNC's credentials and tells the service how viewers authenticate (``vnc_settings``); a viewer's
VNC authentication response (in the clear or inside VeNCrypt's TLS) is checked by the core. Every connection is
reported to the core (``vnc_viewer``: connected, initialized, disconnected), which answers QMP's ``query-vnc*``
and emits the ``VNC_*`` events. Like QEMU's VNC server: the shared flag follows ``share``, at most
``connections`` connections may be in their handshake (a newcomer evicts the oldest of them) and as many viewers
share the screen; and unlike it, a handshake that is not done within ``handshake_timeout`` is closed. See
docs/vnc.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ipc.channel import ChannelError
from ipc.messages import (
    MAX_SOURCE,
    MAX_VNC_SERVERS,
    Capability,
    InputEvent,
    Migrated,
    PointerEvent,
    VncAddress,
    VncAuthOp,
    VncReload,
    VncSettings,
    VncStateOp,
    VncViewer,
    VncViewerOp,
    Welcome,
    WheelEvent,
)
from ipc.messages import EventBody as CoreEvent
from ipc.rundir import listen_unix
from rfb import ProtocolError, RfbServerConnection, Screen, State, vencrypt
from rfb import events as ev
from rfb.encodings import (
    NegotiatedEncoders,
    copyrect_rect,
    cursor_rect,
    desktop_size_rect,
    encode_frame_rects,
    extended_desktop_size_rect,
    qemu_extended_key_event_rect,
    qemu_led_state_rect,
)
from rfb.pixels import is_native
from rfb.wire import (
    EDS_REASON_CLIENT,
    EDS_STATUS_PROHIBITED,
    ENCODING_COPYRECT,
    ENCODING_CURSOR,
    ENCODING_DESKTOP_SIZE,
    ENCODING_EXTENDED_DESKTOP_SIZE,
    ENCODING_QEMU_EXTENDED_KEY_EVENT,
    ENCODING_QEMU_LED_STATE,
    ENCODING_RAW,
    rect_header,
)
from shm import (
    CursorShapeRecord,
    DamageRecord,
    KeyboardLedsRecord,
    LayoutError,
    Mode,
    ModeRecord,
    Overrun,
    Record,
    ShmReader,
)

from .clipboard import ClipboardHub, ViewerClipboard
from .encoder_pool import EncodeRequest, EncoderPool, EncoderUnavailable
from .framecopy import Frame, FrameCopy, Move, frame_array
from .keyboard import Keyboard
from .keymap import Keymap, KeymapError, scancode_for
from .region import DirtyRegion, Rect, contains, intersect
from .tls import HANDSHAKE_TIMEOUT_S as TLS_HANDSHAKE_TIMEOUT_S
from .tls import TlsCredentials, TlsError, TlsSettings, peer_dname, start_tls

if TYPE_CHECKING:
    from clients.main import ClientContext

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:5900"
#: Connections in their handshake at once, and viewers sharing the screen (QEMU's -vnc connections= default).
DEFAULT_CONNECTIONS = 32
#: A connection that has not finished its handshake and authentication this long after it came is closed (a
#: viewer that connects before the display exists, or before the core said how to authenticate, waits within it).
HANDSHAKE_TIMEOUT_S = 10.0
#: TCP connections on the WebSocket listener (before and after their upgrade): at the limit the oldest not yet
#: upgraded is closed (clients/connection_guard.py), so silent connections cannot take the file descriptors.
MAX_WEBSOCKET_CONNECTIONS = 256
#: Bits of the guest keyboard's LED state (QEMU LED State pseudo-encoding; bit 0 is Scroll Lock).
LED_NUM_LOCK, LED_CAPS_LOCK = 0x2, 0x4
#: How viewers authenticate (the core's ``vnc_settings``; QEMU's VncPrimaryAuth names).
AUTH_NONE, AUTH_VNC = "none", "vnc"
#: QEMU's -vnc share= policies.
SHARE_POLICIES = ("allow-exclusive", "force-shared", "ignore")
#: Reports to the core waiting to be sent; beyond, the next attach's full state puts the core right.
MAX_PENDING_REPORTS = 1024
#: How long the core may take to check a VNC authentication response.
AUTH_TIMEOUT_S = 5.0
#: After following a migration: how long viewers keep the last picture while the destination shows QEMU's
#: placeholder instead of the guest's display (see ``VncService.attached``).
HOLD_MAX_S = 1.0
#: Write-buffer high-water mark per viewer: above it nothing new is built for that viewer.
WRITE_HIGH_WATER = 256 * 1024
READ_CHUNK = 64 * 1024
#: How long a viewer that left may take to have its queued input delivered (4096 key events at 10 ms: 41 s).
INPUT_FLUSH_S = 60.0
#: Input events queued per viewer while the core is busy with the previous batch; beyond, input is dropped.
MAX_PENDING_INPUT = 4096
#: Clipboard text a viewer may paste (and we send), as QEMU's VNC: larger pastes are refused and logged.
DEFAULT_MAX_CLIPBOARD = 1 << 20
#: Protocol replies (not updates) queued for a viewer that does not read them; beyond, it is disconnected.
MAX_OUTBOX = 1 << 20
SINGLE_SCREEN_ID = 0
#: After an update could not be encoded (its worker died), try again this much later.
ENCODE_RETRY_S = 0.05
#: Updates of at most this many pixels are encoded on the loop (well under a millisecond: a typed character,
#: a cursor blink), where a worker's round trip would cost more than the encoding.
IN_LOOP_PIXELS = 64 * 64


class VncError(Exception):
    """The VNC service cannot start (bad listen address, port taken, unreadable keymap)."""


# --- listen addresses and passwords ------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenAddress:
    host: str | None = None
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


#: ``--vnc :N`` is QEMU's display numbering: port 5900 + N.
VNC_DISPLAY_BASE = 5900


def parse_listen(text: str, *, display_numbers: bool = False) -> ListenAddress:
    """``HOST:PORT`` (``[v6]:PORT`` too) or ``unix:PATH``. Without a host the address is loopback, never every
    interface; with ``display_numbers`` (``--vnc``) ``:N`` is QEMU's display N, port 5900 + N."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise VncError(f"no path in {text!r}")
        return ListenAddress(path=Path(text[5:]))
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise VncError(f"expected HOST:PORT, :DISPLAY or unix:PATH, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    number = int(port)
    if not host and display_numbers:
        if number >= VNC_DISPLAY_BASE:
            raise VncError(f"{text!r} is display {number} (port {VNC_DISPLAY_BASE}+{number}), as in QEMU; "
                           f"for port {number} write 127.0.0.1:{number}")
        number += VNC_DISPLAY_BASE
    return ListenAddress(host=host or "127.0.0.1", port=number)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(address: ListenAddress) -> socket.socket:
    try:
        if address.path is not None:
            return listen_unix(address.path, mode=None)  # a stale socket from an earlier client is replaced
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        raise VncError(f"cannot listen on {address}: {exc}") from exc
    return sock


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"unix:{name}" if sock.family == socket.AF_UNIX else f"{name[0]}:{name[1]}"


def vnc_address(family: int, address: Any, websocket: bool = False, vencrypt: str = "") -> VncAddress:
    """A socket address as QAPI's VncBasicInfo has it: numeric host and port; a unix socket's path as the
    service, with an empty host (as QEMU). ``vencrypt``: the VeNCrypt sub-auth a listener requires."""
    if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        return VncAddress(str(address[0]), str(address[1]), "ipv6" if family == socket.AF_INET6 else "ipv4",
                          websocket, vencrypt)
    if family == socket.AF_UNIX:
        path = address.decode(errors="replace") if isinstance(address, bytes) else str(address or "")
        return VncAddress("", path, "unix", websocket, vencrypt)
    return VncAddress("", "", "unknown", websocket, vencrypt)


# --- transports --------------------------------------------------------------------------------------------


class Transport(Protocol):
    peer: str
    #: Already inside TLS (``wss://``): RFB's own security types are not in the clear.
    encrypted: bool
    #: The viewer's address, as QMP shows it.
    address: VncAddress

    async def recv(self) -> bytes:
        """Bytes from the viewer; b"" at the end."""

    async def send(self, data: bytes) -> None:
        """Write, then wait while the write buffer is above its high-water mark."""

    async def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """:meth:`send` for a message in pieces (a large rectangle is not copied into one buffer)."""

    def write_nowait(self, data: bytes) -> None:
        """Best effort, no waiting (a last message before closing)."""

    def close(self) -> None:
        """Drop the connection now (whatever is unsent is lost)."""

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Run the server side of a TLS handshake (VeNCrypt); later bytes go through it."""

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, if the connection is in one."""


class StreamTransport:
    encrypted = False

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"unix:{peer or '?'}"
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._tls: ssl.SSLObject | None = None
        sock = writer.get_extra_info("socket")
        self.address = vnc_address(sock.family if sock is not None else -1, peer)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv(self) -> bytes:
        return await self._reader.read(READ_CHUNK)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        self._writer.writelines(parts)
        await self._writer.drain()

    def write_nowait(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def close(self) -> None:
        self._writer.transport.abort()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self._reader, self._writer = await start_tls(self._reader, self._writer, context)
        self._writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._tls = self._writer.get_extra_info("ssl_object")
        self.encrypted = True

    def ssl_object(self) -> ssl.SSLObject | None:
        return self._tls


class WebSocketTransport:
    """RFB over WebSocket binary messages (noVNC); message boundaries mean nothing to RFB."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        peer = ws.remote_address
        self.peer = f"ws:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "ws:unix"
        transport = getattr(ws, "transport", None)
        self._tls: ssl.SSLObject | None = transport.get_extra_info("ssl_object") if transport is not None else None
        self.encrypted = self._tls is not None
        sock = transport.get_extra_info("socket") if transport is not None else None
        self.address = vnc_address(sock.family if sock is not None else -1, peer, websocket=True)

    async def recv(self) -> bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            message = await self._ws.recv()
        except ConnectionClosed:
            return b""
        if isinstance(message, str):
            raise ProtocolError("text WebSocket message (RFB needs binary frames)")
        return bytes(message)

    async def send(self, data: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._ws.send(data)
        except ConnectionClosed as exc:
            raise ConnectionResetError(str(exc)) from exc

    async def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        await self.send(b"".join(parts))  # one WebSocket message per update

    def write_nowait(self, data: bytes) -> None:
        pass  # a WebSocket frame cannot be written without awaiting; the close reason goes in the log

    def close(self) -> None:
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        raise ProtocolError("VeNCrypt inside a WebSocket is not supported: use wss:// (--vnc-tls-creds)")

    def ssl_object(self) -> ssl.SSLObject | None:
        return self._tls


def _binary_subprotocol(connection: Any, offered: Any) -> Any:
    """"binary" if the browser offers it (older noVNC, websockify's convention); none is fine too (noVNC ≥ 1.0
    offers none). The ``base64`` subprotocol of very old noVNC is not supported."""
    return "binary" if "binary" in offered else None


# --- one viewer --------------------------------------------------------------------------------------------


def raw_pieces(framebuffer: memoryview, mode: Mode, rects: list[Rect]) -> list[bytes | bytearray | memoryview]:
    """Raw rectangles in the framebuffer's own format as slices of the mapping itself: the socket copies the
    pixels once, and nothing else does (they may tear; a later damage record repaints them)."""
    if mode.bytes_per_pixel != 4 or mode.stride * mode.height > len(framebuffer):
        raise LayoutError(f"mode {mode} does not fit the framebuffer")
    pieces: list[bytes | bytearray | memoryview] = []
    for x, y, w, h in rects:
        pieces.append(rect_header(x, y, w, h, ENCODING_RAW))
        start, row = y * mode.stride + x * 4, w * 4
        if row == mode.stride:
            pieces.append(framebuffer[start : start + row * h])
        else:
            pieces += [framebuffer[o : o + row] for o in range(start, start + h * mode.stride, mode.stride)]
    return pieces


_connection_numbers = itertools.count(1)


class Connection:
    """One VNC connection from accept to close: what the core is told about (so QMP shows it), and what the
    connection limit, the share policy and the handshake deadline act on, before and while a Viewer serves it."""

    def __init__(self, transport: Transport, server: int) -> None:
        self.id = next(_connection_numbers)
        self.transport = transport
        self.server = server  # index of the listener it came in on
        self.since = time.monotonic()
        self.initialized = False  # handshake and authentication done (QEMU's VNC_INITIALIZED)
        self.exclusive = False
        self.closed = asyncio.Event()
        self.reason = ""
        #: The subject of the viewer's verified client certificate (QEMU's ``x509_dname``), once known.
        self.x509_dname: str | None = None

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.reason = reason
            self.closed.set()

    def report(self) -> VncViewer:
        return VncViewer(self.id, self.transport.address, self.server, self.initialized, self.x509_dname or "")


class Viewer:
    def __init__(self, service: VncService, connection: Connection) -> None:
        self.service = service
        self.connection = connection
        self.transport = connection.transport
        self.peer = self.transport.peer
        #: Names this viewer's input at the core, which tracks what it holds and releases that when it goes.
        self.source = f"vnc#{connection.id} {self.peer}"[:MAX_SOURCE]
        mode = service.mode
        tls = service.tls if not self.transport.encrypted else None  # inside wss://, RFB's own types are not clear
        self.conn = RfbServerConnection(width=mode.width if mode else 0, height=mode.height if mode else 0,
                                        name=service.vm_name, external_auth=service.auth == AUTH_VNC,
                                        vencrypt_subtypes=tls.subtypes(service.auth == AUTH_VNC)
                                        if tls is not None else (),
                                        plain_too=service.tls_settings.plain_too, clipboard=True,
                                        max_cut_text=service.max_clipboard)
        connection.x509_dname = peer_dname(self.transport.ssl_object())
        self.encoders = NegotiatedEncoders()
        self.dirty = DirtyRegion()
        self.size: tuple[int, int] | None = None  # what the viewer was last told
        self.requested: Rect | None = None  # union of outstanding update requests
        self.full = False  # the next update must repaint everything requested (no incremental state)
        self.eds_answer = False  # a non-incremental request: send the ExtendedDesktopSize layout
        self.cursor_changed = False
        self.ext_key_ack = False  # -258 seen, acknowledgement not yet sent
        self.ext_key_acked = False
        self._outbox = bytearray()
        self._wake = asyncio.Event()
        self.clipboard = ViewerClipboard(service.clipboard, self.conn, self.peer, self.source, self._wake,
                                         self._outbox)
        self.leds_told: int | None = None  # the LED state this viewer was last sent
        self._input: list[InputEvent] = []
        self._input_wake = asyncio.Event()
        self._input_idle = asyncio.Event()  # nothing queued and nothing being sent
        self._input_idle.set()
        self._buttons = 0
        self.updates_sent = 0
        self.copyrects_sent = 0
        self.copy_source = False  # served from the service's frame copy (the viewer takes CopyRect)
        self.pending_copy: Move | None = None  # a scroll to send as CopyRect before the dirty region
        self.in_flight: list[Rect] = []  # rectangles of the update being encoded
        self._tasks: list[asyncio.Task[None]] = []
        #: Done once the display is current (the core was pacing it when this viewer came); None: it is.
        self.fresh: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<viewer {self.peer}>"

    # --- lifetime -------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        input_loop = loop.create_task(self._input_loop())
        self._tasks = [loop.create_task(self._send_loop()), input_loop]
        self._outbox += self.conn.data_to_send()
        self._wake.set()
        reason = "viewer closed the connection"
        reader = loop.create_task(self._read_loop())
        closer = loop.create_task(self.connection.closed.wait())
        try:
            done, _ = await asyncio.wait([reader, closer, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is closer:
                    reason = self.connection.reason or "disconnected by the server"
                elif not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if isinstance(exc, ProtocolError):
                        reason = f"protocol error: {exc}"
                        self.transport.write_nowait(self.conn.data_to_send())
                        log.warning("viewer %s: %s; closing it", self.peer, exc)
                    elif isinstance(exc, ConnectionError | OSError):
                        reason = f"connection lost: {exc}"
                    else:
                        reason = f"internal error: {exc!r}"
                        log.error("viewer %s: internal error", self.peer, exc_info=exc)
        finally:
            for task in (reader, closer, *self._tasks):
                if task is not input_loop:
                    task.cancel()
            self.conn.close()
            self.transport.close()
            # Every key the viewer sent reaches the guest, in order; then what it still holds is released.
            if not input_loop.done():
                await self._flush_input()
            input_loop.cancel()
            # Forgotten here as the release is sent: a later viewer's keys queue behind it at the core.
            self.service.keyboard.viewer_gone(self.source)
            await self.service.release_input(self.source, self.peer)
            log.info("viewer %s gone (%s; %d updates sent, %d scrolls by CopyRect)", self.peer, reason,
                     self.updates_sent, self.copyrects_sent)

    def disconnect(self, reason: str = "disconnected by the server") -> None:
        self.connection.close(reason)

    # --- reading --------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            data = await self.transport.recv()
            if not data:
                return
            events = self.conn.receive_data(data)
            batch: list[InputEvent] = []
            while events:
                event = events.pop(0)
                if isinstance(event, ev.AuthResponse):  # checked by the core, which holds the password
                    ok, reason = await self.service.check_auth(self.connection, event.challenge, event.response)
                    events += self.conn.auth_result(ok, reason)
                elif isinstance(event, ev.TlsRequested):  # always the last event: nothing is read after it
                    events += await self._start_tls(event)
                else:
                    self._handle(event, batch)
            if self.connection.closed.is_set():  # refused at ClientInit (share policy, too many viewers)
                return
            if self.conn.closed:  # refused (auth failure): the reason is queued
                self.transport.write_nowait(self.conn.data_to_send())
                self.disconnect("authentication failed")
                return
            self._outbox += self.conn.data_to_send()
            if len(self._outbox) > MAX_OUTBOX:
                raise ProtocolError(f"viewer does not read its replies ({len(self._outbox)} bytes queued)")
            if batch:
                self._queue_input(batch)
            self._wake.set()

    async def _start_tls(self, event: ev.TlsRequested) -> list[ev.Event]:
        """VeNCrypt: our accept byte goes out in the clear, then the handshake; the rest of RFB runs inside."""
        assert self.service.tls is not None
        self.transport.write_nowait(bytes(self._outbox) + self.conn.data_to_send())
        self._outbox.clear()
        try:
            await self.transport.start_tls(self.service.tls.context_for(event.subtype))
        except (ssl.SSLError, ConnectionError, TimeoutError, TlsError) as exc:
            raise ProtocolError(f"TLS handshake failed: {exc}") from exc
        dname = self.connection.x509_dname = peer_dname(self.transport.ssl_object())
        tls = self.transport.ssl_object()
        log.info("viewer %s: TLS (%s, %s%s)", self.peer, vencrypt.describe(event.subtype),
                 tls.version() if tls is not None else "?", f", client certificate {dname}" if dname else "")
        return self.conn.tls_established()

    def _handle(self, event: ev.Event, batch: list[InputEvent]) -> None:
        if isinstance(event, ev.UpdateRequested):
            self._on_request(event)
        elif isinstance(event, ev.Pointer):
            self._on_pointer(event, batch)
        elif isinstance(event, ev.Key | ev.ExtendedKey):
            self._on_key(event, batch)
        elif isinstance(event, ev.EncodingsSet):
            self.encoders.set_encodings(event.encodings)
            copy_source = self.service.use_copy(self.conn.supports(ENCODING_COPYRECT))
            if copy_source != self.copy_source:
                self.copy_source = copy_source
                self.full = True  # the other source may differ from what the viewer has: repaint from it
                self.pending_copy = None
            if self.conn.supports(ENCODING_CURSOR):
                self.cursor_changed = True
            if self.conn.supports(ENCODING_QEMU_EXTENDED_KEY_EVENT) and not self.ext_key_acked:
                self.ext_key_ack = True
            self.leds_told = None
            self.send_leds()
            log.debug("viewer %s: encodings %s", self.peer, event.encodings)
        elif isinstance(event, ev.PixelFormatChanged):
            self.full = True  # updates after this are in the new format; repaint with it
            log.debug("viewer %s: pixel format %s", self.peer, event.fmt)
        elif isinstance(event, ev.ClientInitReceived):
            refused = self.service.admit_viewer(self.connection, event.shared)
            if refused is not None:
                log.warning("viewer %s refused: %s", self.peer, refused)
                self.disconnect(refused)
                return
            self.size = (self.conn.width, self.conn.height)
            self.full = True
            log.info("viewer %s: connected (RFB %d.%d, %s, %dx%d)", self.peer, *(self.conn.version or (0, 0)),
                     "shared" if event.shared else "exclusive", *self.size)
        elif isinstance(event, ev.DesktopSizeRequested):
            if self.conn.supports(ENCODING_EXTENDED_DESKTOP_SIZE) and self.size is not None:
                w, h = self.size
                rect = extended_desktop_size_rect(w, h, [Screen(SINGLE_SCREEN_ID, 0, 0, w, h)],
                                                  reason=EDS_REASON_CLIENT, status=EDS_STATUS_PROHIBITED)
                self._outbox += self.conn.framebuffer_update([rect])
        elif isinstance(event, ev.AuthFailed):
            log.warning("viewer %s: authentication failed (%s)", self.peer, event.reason)
        elif isinstance(event, ev.SecurityNegotiated):
            log.debug("viewer %s: RFB %s, security type %d", self.peer, event.version, event.security_type)
        elif isinstance(event, ev.TlsRequested):
            pass  # _read_loop runs the handshake
        elif isinstance(event, ev.CutText | ev.CutTextTooLarge | ev.ClipboardCaps | ev.ClipboardNotify
                        | ev.ClipboardRequest | ev.ClipboardPeek | ev.ClipboardProvide):
            self.clipboard.handle(event)
        else:  # ContinuousUpdates and Fence (never announced)
            log.debug("viewer %s: ignoring %s", self.peer, type(event).__name__)

    def send_leds(self) -> None:
        """The guest's keyboard LEDs to a viewer that asked for QEMU's LED State, when they changed."""
        leds = self.service.keyboard_leds
        if leds is None or leds == self.leds_told or not self.conn.supports(ENCODING_QEMU_LED_STATE) \
                or self.conn.state is not State.NORMAL:
            return
        self.leds_told = leds
        self._outbox += self.conn.framebuffer_update([qemu_led_state_rect(leds)])
        self._wake.set()

    def _on_request(self, event: ev.UpdateRequested) -> None:
        mode = self.service.mode
        if self.size is None:
            return
        x, y, w, h = event.clipped(*self.size)
        rect: Rect = (x, y, w, h)
        if self.requested is None:
            self.requested = rect
        else:
            x0, y0 = min(self.requested[0], x), min(self.requested[1], y)
            x1 = max(self.requested[0] + self.requested[2], x + w)
            y1 = max(self.requested[1] + self.requested[3], y + h)
            self.requested = (x0, y0, x1 - x0, y1 - y0)
        if not event.incremental:
            if mode is not None and (mode.width, mode.height) == self.size:
                self.dirty.add(x, y, w, h)
            self.eds_answer = self.conn.supports(ENCODING_EXTENDED_DESKTOP_SIZE)

    def _on_key(self, event: ev.Key | ev.ExtendedKey, batch: list[InputEvent]) -> None:
        """Keys by the physical key (Extended Key Event) or through the keymap, with QEMU's lock-key sync
        (keyboard.py) for viewers that do not take the LED state pseudo-encoding: those that do keep the locks
        in step themselves (as QEMU: no sync with VNC_FEATURE_LED_STATE)."""
        keyboard = self.service.keyboard
        sync = not self.conn.supports(ENCODING_QEMU_LED_STATE)
        if isinstance(event, ev.ExtendedKey):
            code = scancode_for(event.keycode)
            if code is not None:
                batch += keyboard.scancode(event.keysym, code, event.down, self.source, sync=sync)
                return
        batch += keyboard.key(event.keysym, event.down, self.source, sync=sync)

    def _on_pointer(self, event: ev.Pointer, batch: list[InputEvent]) -> None:
        pressed = event.buttons & ~self._buttons
        if pressed & 0x08:
            batch.append(WheelEvent(1))
        if pressed & 0x10:
            batch.append(WheelEvent(-1))
        buttons = event.buttons & 0x07
        self._buttons = event.buttons
        x, y = event.x, event.y
        if self.size is not None:
            x, y = min(x, max(self.size[0] - 1, 0)), min(y, max(self.size[1] - 1, 0))
        batch.append(PointerEvent(x, y, buttons))

    # --- input to the core ----------------------------------------------------------------------------

    def _queue_input(self, batch: list[InputEvent]) -> None:
        room = MAX_PENDING_INPUT - len(self._input)
        if room < len(batch):
            log.warning("viewer %s: core not keeping up with input; dropping %d events", self.peer,
                        len(batch) - max(room, 0))
            batch = batch[: max(room, 0)]
        self._input += batch
        self._input_idle.clear()
        self._input_wake.set()

    async def _input_loop(self) -> None:
        while True:
            await self._input_wake.wait()
            self._input_wake.clear()
            batch, self._input = self._input, []
            if batch:
                log.debug("viewer %s: input %s", self.peer, batch)
                await self.service.send_input(batch, self.peer, self.source)
            if not self._input:
                self._input_idle.set()

    async def _flush_input(self) -> None:
        """Wait (bounded) until the input this viewer queued has been delivered."""
        try:
            await asyncio.wait_for(self._input_idle.wait(), INPUT_FLUSH_S)
        except TimeoutError:
            log.warning("viewer %s: %d input events not delivered within %.0f s of its leaving", self.peer,
                        len(self._input), INPUT_FLUSH_S)

    # --- updates --------------------------------------------------------------------------------------

    def display_changed(self, damage: list[Rect], full: bool, cursor: bool,
                        copy_changes: tuple[list[Move], list[Rect]] | None = None) -> None:
        """New damage. ``copy_changes`` (the frame copy's moves and really changed rows) replace ``damage`` for a
        viewer served from the copy: the first move is sent as CopyRect if nothing else is pending."""
        if full:
            self.full = True
            self.pending_copy = None
        elif self.copy_source and copy_changes is not None:
            moves, changed = copy_changes
            taken = moves[0] if moves and not self.full and self.pending_copy is None else None
            if taken is not None:
                self._take_move(taken)
            for move in moves:
                if move is not taken:
                    self.dirty.add(*move.dest)
            for rect in changed:
                self.dirty.add(*rect)
        else:
            for rect in damage:
                self.dirty.add(*rect)
        if cursor and self.conn.supports(ENCODING_CURSOR):
            self.cursor_changed = True
        if self.conn.state is State.NORMAL:
            self._wake.set()
        elif self.service.mode is not None and self.conn.state is not State.CLOSED:
            self.conn.width, self.conn.height = self.service.mode.width, self.service.mode.height

    def _take_move(self, move: Move) -> None:
        """Send ``move`` as CopyRect. Where the viewer's copy of the source is stale (dirty, or in an update
        still being encoded, whose pixels may already be the new ones), the destination is repainted too."""
        stale = [*self.dirty.rects, *self.in_flight]
        for rect in stale:
            part = intersect(rect, move.source)
            if part is not None:
                self.dirty.add(part[0], part[1] - move.dy, part[2], part[3])
        self.pending_copy = move

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._outbox:
                data = bytes(self._outbox)
                self._outbox.clear()
                await self.transport.send(data)
            if self.fresh is not None and self.requested is not None:
                await asyncio.wait([self.fresh])  # the core's fresh frame (or its timeout) before the first update
                self.fresh = None
            update = await self._build_update()
            if update is not None:
                self.updates_sent += 1
                await self.transport.send_parts(update)
                log.debug("viewer %s: update %d sent (%d bytes)", self.peer, self.updates_sent, sum(map(len, update)))

    async def _build_update(self) -> list[bytes | bytearray | memoryview] | None:
        """The next FramebufferUpdate in pieces, or None if the viewer did not ask or there is nothing to say."""
        if self.requested is None or self.conn.state is not State.NORMAL or self.size is None:
            return None
        if self.service.holding:  # the segment is not the guest's picture (yet): answer once it is
            return None
        mode = self.service.mode
        display = self.service.ctx.display if self.service.ctx is not None else None
        if mode is None or display is None or mode.width == 0:
            return None
        if (mode.width, mode.height) != self.size:
            resize = self._resize(mode)
            return None if resize is None else [resize]
        rects: list[bytes] = []
        if self.ext_key_ack:
            rects.append(qemu_extended_key_event_rect())
            self.ext_key_ack, self.ext_key_acked = False, True
        if self.eds_answer:
            rects.append(extended_desktop_size_rect(mode.width, mode.height,
                                                    [Screen(SINGLE_SCREEN_ID, 0, 0, mode.width, mode.height)]))
            self.eds_answer = False
        if self.cursor_changed:
            self.cursor_changed = False
            try:
                image = display.reader.cursor()
            except (LayoutError, TimeoutError) as exc:
                log.debug("viewer %s: no cursor (%s)", self.peer, exc)
            else:
                rects.append(cursor_rect(image.hot_x, image.hot_y, image.width, image.height, image.pixels,
                                         self.conn.pixel_format))
        if self.full:
            self.full = False
            self.pending_copy = None
            self.dirty.clear()
            self.dirty.add(0, 0, mode.width, mode.height)
        parts: list[bytes | bytearray | memoryview] = list(rects)
        count = len(rects)
        move, self.pending_copy = self.pending_copy, None
        if move is not None:
            if contains(self.requested, move.dest) and contains(self.requested, move.source):
                parts.append(copyrect_rect(*move.dest, move.x, move.y + move.dy))
                count += 1
                self.copyrects_sent += 1
            else:
                self.dirty.add(*move.dest)
        damaged = self.dirty.take(self.requested)
        if damaged:
            encoded = await self._encode(damaged, mode, display.reader)
            if encoded is None:
                return None
            parts.extend(encoded[0])
            count += encoded[1]
        if not count:
            return None
        self.requested = None
        return [self.conn.framebuffer_update_header(count), *parts]

    async def _encode(self, damaged: list[Rect], mode: Mode,
                      reader: ShmReader) -> tuple[list[bytes | bytearray | memoryview], int] | None:
        """(pieces, rectangle count) for the damaged rectangles: Raw in the framebuffer's own format is sent from
        the mapping, tiny updates are encoded here, everything else by a worker process while this loop goes on."""
        fmt = self.conn.pixel_format
        settings = self.encoders.settings()
        copy = self.service.frame_copy if self.copy_source else None
        if copy is not None and copy.mode != mode:
            copy = None  # the copy does not hold this mode (yet): serve from the segment
        try:
            if settings.encoding == ENCODING_RAW and is_native(fmt):
                if copy is not None:  # copied now: a slice still queued at the socket would show later changes
                    pieces = raw_pieces(copy.buffer, mode, damaged)
                    return [bytes(p) for p in pieces], len(damaged)
                return raw_pieces(reader.framebuffer, mode, damaged), len(damaged)
            pool = self.service.pool
            if sum(w * h for _, _, w, h in damaged) <= IN_LOOP_PIXELS or pool is None or not pool.ready:
                # Tiny, or no worker has started yet (the first second of the client): here.
                frame: Frame = copy.array(mode) if copy is not None else frame_array(reader.framebuffer, mode)
                pieces, count, after = encode_frame_rects(settings, fmt, frame, damaged)
                del frame
                self.encoders.advance(after)
                return [bytes(p) for p in pieces], count
            request = EncodeRequest("copy" if copy is not None else "segment",
                                    str(copy.key) if copy is not None else reader.name, mode.width,
                                    mode.height, mode.stride, fmt, settings, tuple(damaged))
            before = (fmt, mode, self.size)
            self.in_flight = list(damaged)
            try:
                result = await pool.encode(request)
            finally:
                self.in_flight = []
        except (LayoutError, ValueError) as exc:  # the segment changed under us: a mode record follows
            log.debug("viewer %s: frame copy failed (%s); waiting for the next mode", self.peer, exc)
            self.full = True
            return None
        except EncoderUnavailable as exc:
            log.info("viewer %s: update not encoded (%s); repainting", self.peer, exc)
            self.full = True
            asyncio.get_running_loop().call_later(ENCODE_RETRY_S, self._wake.set)
            return None
        if before != (self.conn.pixel_format, self.service.mode, self.size) or self.conn.state is not State.NORMAL:
            self.full = True  # the viewer or the display changed while this was encoded: repaint from scratch
            self._wake.set()
            return None
        self.encoders.advance(result.settings)
        return [result.data], result.count

    def _resize(self, mode: Mode) -> bytes | None:
        w, h = mode.width, mode.height
        if self.conn.supports(ENCODING_EXTENDED_DESKTOP_SIZE):
            rect = extended_desktop_size_rect(w, h, [Screen(SINGLE_SCREEN_ID, 0, 0, w, h)])
        elif self.conn.supports(ENCODING_DESKTOP_SIZE):
            rect = desktop_size_rect(w, h)
        else:
            log.warning("viewer %s: the guest changed mode to %dx%d and the viewer cannot resize; closing",
                        self.peer, w, h)
            self.disconnect()
            return None
        log.info("viewer %s: resized to %dx%d", self.peer, w, h)
        self.size = (w, h)
        self.requested = None
        self.dirty.clear()
        self.full = True
        self.cursor_changed = self.conn.supports(ENCODING_CURSOR)
        return self.conn.framebuffer_update([rect])


# --- the service -------------------------------------------------------------------------------------------


class VncService:
    """``Service`` for clients.main.Client: VNC on TCP or a unix socket, and optionally WebSocket."""

    name = "vnc"
    #: Asked for in the hello beyond the defaults: vnc_reload broadcasts, and clipboard broadcasts (up to 1 MiB).
    capabilities = (Capability.VNC, Capability.CLIPBOARD)

    def __init__(self, listen: str | None = DEFAULT_LISTEN, *, websocket: str | None = None,
                 share: str = "allow-exclusive", connections: int = DEFAULT_CONNECTIONS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S, keymap: str | None = None,
                 encoder_workers: int | None = None, tls: TlsSettings | None = None,
                 max_clipboard: int = DEFAULT_MAX_CLIPBOARD, pool: EncoderPool | None = None,
                 websocket_url: str | None = None, listen_socket: socket.socket | None = None,
                 credentials: TlsCredentials | None = None) -> None:
        """``listen`` None: no listener of its own, or ``listen_socket`` (bound by a fleet client, from its port
        range); viewers may also come through a fleet client's WebSocket router, which ``websocket_url`` names for
        state.json. ``pool``: encoder workers shared with other VMs' services. ``credentials``: TLS loaded by a
        fleet client for every VM (instead of ``tls``, which this service would load itself)."""
        self.listen = parse_listen(listen, display_numbers=True) if listen is not None else None
        self._listen_socket = listen_socket
        self.websocket = parse_listen(websocket) if websocket else None
        self.websocket_url = websocket_url
        if share not in SHARE_POLICIES:
            raise VncError(f"unknown share policy {share!r} (known: {', '.join(SHARE_POLICIES)})")
        if connections < 1 or handshake_timeout <= 0:
            raise VncError("the connection limit and the handshake timeout must be positive")
        self.share = share
        self.connections_limit = connections
        self.handshake_timeout = handshake_timeout
        try:
            self.keyboard = Keyboard(Keymap.load(keymap))
        except KeymapError as exc:
            raise VncError(str(exc)) from exc
        self.tls_settings = credentials.settings if credentials is not None else tls or TlsSettings()
        self.tls: TlsCredentials | None = credentials
        if credentials is None and self.tls_settings.enabled:
            self.tls = TlsCredentials(self.tls_settings)
        self._loads_tls = credentials is None
        self.ctx: ClientContext | None = None
        self.vm_name = "vmfront"
        self.mode: Mode | None = None
        #: How viewers authenticate, as the core last said (None: not heard yet, so nobody is served).
        self.auth: str | None = None
        self._settings_known = asyncio.Event()
        #: Every connection from accept to close, in the order they came (viewers are those being served).
        self.connections: dict[int, Connection] = {}
        self.viewers: set[Viewer] = set()
        self._mode_known = asyncio.Event()
        self._socks: list[socket.socket] = []
        self._sock_kinds: list[str] = []  # "vnc" or "websocket", for each of _socks
        #: WebSocket ports outside this service that hand it viewers (a fleet client's router, the web console):
        #: the core lists them with our own listeners, as QEMU lists its WebSocket listener.
        self._entries: list[socket.socket] = []
        self._servers: list[Any] = []
        self._handlers: set[asyncio.Task[None]] = set()
        #: Reports for the core, sent in order by one task (see _report_loop).
        self._reports: asyncio.Queue[VncViewerOp | VncStateOp] = asyncio.Queue(MAX_PENDING_REPORTS)
        self._reporter: asyncio.Task[None] | None = None
        #: Viewers keep their picture: the display after a migration is still QEMU's placeholder (see ``attached``).
        self.holding = False
        self._hold_timer: asyncio.TimerHandle | None = None
        self._following_migration = False
        self.encoder_workers = encoder_workers
        self._shared_pool = pool
        self.pool: EncoderPool | None = None
        self.frame_copy: FrameCopy | None = None
        self.max_clipboard = max_clipboard
        self.clipboard = ClipboardHub()
        #: The guest keyboard's lock LEDs (bit 0 Scroll, 1 Num, 2 Caps Lock), None until the core learned them.
        #: What lock-key sync compares a viewer's lock keys with.
        self.keyboard_leds: int | None = None

    # --- Service protocol -----------------------------------------------------------------------------

    def endpoints(self) -> dict[str, str]:
        """Where viewers connect (for ``state.json`` and ``vmfront list``), once bound."""
        found = {kind: describe(sock) for kind, sock in zip(self._sock_kinds, self._socks, strict=True)}
        if self.websocket_url is not None:
            found["websocket"] = self.websocket_url
        return found

    def warnings(self) -> list[str]:
        """What makes this VNC server unsafe where it listens (logged at start; ``vmfront status`` shows them)."""
        found = []
        for address, what, tls in ((self.listen, "VNC", self.tls is not None),
                                   (self.websocket, "VNC over WebSocket", self._websocket_tls() is not None)):
            if address is None or address.host is None or is_loopback(address.host):
                continue
            if not tls:  # the password, if any, is the core's: it may be set or cleared at any time
                found.append(f"{what} listens on {address}, not only on loopback, without TLS: unless the core asks "
                             "for a VNC password (8 characters, DES challenge) whoever reaches it sees and controls "
                             "the guest, and every pixel and key crosses the network in the clear")
            elif self.tls_settings.plain_too and not self.tls_settings.anonymous:
                found.append(f"{what} on {address} also offers security types in the clear (--vnc-tls-plain-too): "
                             "anyone on the path can make a viewer use them")
        return found

    def _websocket_tls(self) -> ssl.SSLContext | None:
        """The WebSocket listener speaks TLS (wss://) when X.509 credentials are configured."""
        return self.tls.x509 if self.tls is not None and self.websocket is not None else None

    async def bind(self, ctx: ClientContext) -> None:
        self.ctx = ctx
        self.vm_name = ctx.config.name
        if self.tls is not None and self._loads_tls:
            try:
                self.tls.load()  # before privileges are dropped: the key may be root's alone
            except TlsError as exc:
                raise VncError(str(exc)) from exc
        for warning in self.warnings():
            log.warning("%s", warning)
        if self._listen_socket is not None:
            self._socks.append(self._listen_socket)
            self._sock_kinds.append("vnc")
        for address, kind in ((self.listen, "vnc"), (self.websocket, "websocket")):
            if address is not None:
                self._socks.append(bind_socket(address))
                self._sock_kinds.append(kind)

    def reload(self) -> str | None:
        """Re-read the TLS certificates (QMP display-reload, SIGHUP): None if done, else why not. Connected
        viewers keep their sessions; new handshakes use the new certificates."""
        if self.tls is None:
            log.info("VNC: nothing to reload (no TLS configured)")
            return "VNC TLS is not enabled"
        problem = self.tls.reload()
        if problem is None:
            log.info("VNC: TLS credentials reloaded (%d viewers stay connected)", len(self.viewers))
        return problem

    async def start(self) -> None:
        assert self.ctx is not None
        self.clipboard.start(self.ctx)
        self.frame_copy = FrameCopy()
        if self._shared_pool is not None:
            self.pool = self._shared_pool
        else:
            self.pool = EncoderPool(self.encoder_workers)
            self.pool.start()
        self.pool.add_copy(self.frame_copy.key, self.frame_copy.fd)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop(), name="vnc-reports")
        socks = dict(zip(self._sock_kinds, self._socks, strict=True))
        if "vnc" in socks:
            sock = socks["vnc"]
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._on_stream, sock=sock)
            else:
                server = await asyncio.start_server(self._on_stream, sock=sock)
            self._servers.append(server)
            log.info("VNC: listening on %s (%s; %d connections in handshake at most, share policy %s)",
                     describe(sock), self._vencrypt_name() or "authentication as the core says",
                     self.connections_limit, self.share)
        if "websocket" in socks:
            from websockets.asyncio.server import serve

            ws_sock = socks["websocket"]
            logging.getLogger("websockets").setLevel(max(logging.INFO, log.getEffectiveLevel()))
            context = self._websocket_tls()
            tls: dict[str, Any] = {"ssl": context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S} if context else {}
            from clients.connection_guard import ConnectionGuard, websocket_connection

            guard = ConnectionGuard(MAX_WEBSOCKET_CONNECTIONS, "VNC WebSocket")
            ws_server = await serve(self._on_websocket, sock=ws_sock, select_subprotocol=_binary_subprotocol,
                                    compression=None, max_size=1 << 20, ping_interval=None,
                                    create_connection=websocket_connection(guard), **tls)
            self._servers.append(ws_server)
            log.info("VNC: WebSocket on %s%s", describe(ws_sock), " (TLS: wss://)" if context else "")

    def attached(self, welcome: Welcome) -> None:
        # The new display subscription starts with Overrun(0): every viewer gets a full update. But the core a
        # migration moved the guest to may still show QEMU's first surface, its 640x480 placeholder, not the guest:
        # after following a migration, viewers would flicker to it (and one that cannot resize would be closed).
        # So they keep the last picture until the guest's own display arrives there (a later mode generation),
        # or HOLD_MAX_S passed (a guest whose mode has the placeholder's size brings no new generation).
        self.clipboard.attached(welcome)
        self._release_hold()
        self._resend_state()  # this core may be new: it learns our listeners and viewers, without events
        followed, self._following_migration = self._following_migration, False
        if (followed or welcome.run_state == "incoming") and self.mode is not None:
            log.info("VNC: the guest arrives from a migration: viewers keep their picture until its display is there")
            self.holding = True
            self._hold_timer = asyncio.get_running_loop().call_later(HOLD_MAX_S, self._release_hold, True)

    def detached(self, reason: str) -> None:
        log.info("VNC: core gone (%s): viewers stay, input is dropped until it is back", reason)
        self.clipboard.detached(reason)

    def event(self, body: CoreEvent) -> None:
        self.clipboard.event(body)
        if isinstance(body, Migrated):
            self._following_migration = True  # the next attach is to the destination core
        elif isinstance(body, VncReload) and body.tls_certs:
            log.info("VNC: the core asks to reload the TLS certificates (QMP display-reload)")
            self.reload()
        elif isinstance(body, VncSettings):
            if body.auth not in (AUTH_NONE, AUTH_VNC):
                log.error("VNC: the core asks for authentication %r, which this client cannot do: serving no "
                          "viewer", body.auth)
                self.auth = None
                self._settings_known.clear()
                return
            changed = body.auth != self.auth
            if changed:
                log.info("VNC: viewers authenticate with %s", "a VNC password" if body.auth == AUTH_VNC else "none")
            self.auth = body.auth
            self._settings_known.set()
            if changed and self.tls is not None:
                self._resend_state()  # the VeNCrypt sub-auth our listeners require changed with it

    # --- what the core is told ------------------------------------------------------------------------

    def _vencrypt_name(self) -> str:
        """The VeNCrypt sub-auth a plain listener requires (QAPI's name, e.g. ``x509-vnc``), or "" (in the clear
        allowed)."""
        subtypes = self.tls.subtypes(self.auth == AUTH_VNC) if self.tls is not None else ()
        return vencrypt.describe(subtypes[0]) if subtypes and not self.tls_settings.plain_too else ""

    def add_entry(self, sock: socket.socket) -> None:
        """A WebSocket port bound elsewhere (the fleet router, the web console) that brings viewers through
        :meth:`serve_transport`: shown to the core as one of our servers, so management sees those viewers too.
        Before :meth:`start`, or the core learns it with the next whole state."""
        if sock not in self._entries:
            self._entries.append(sock)

    def servers(self) -> tuple[VncAddress, ...]:
        """Our listeners, then the entries, as the core shows them; a wss:// listener runs RFB's own types inside
        its TLS, as QEMU's WebSocket with tls-creds does. The entries speak RFB's own security types."""
        found = []
        for sock, kind in zip(self._socks, self._sock_kinds, strict=True):
            websocket = kind == "websocket"
            sub = "" if websocket and self._websocket_tls() is not None else self._vencrypt_name()
            found.append(vnc_address(sock.family, sock.getsockname(), websocket=websocket, vencrypt=sub))
        found += [vnc_address(sock.family, sock.getsockname(), websocket=True) for sock in self._entries]
        return tuple(found[:MAX_VNC_SERVERS])

    def _resend_state(self) -> None:
        """Whatever was still queued is superseded: the core gets our whole VNC server as it is now."""
        while not self._reports.empty():
            self._reports.get_nowait()
        viewers = tuple(c.report() for c in self.connections.values())
        self._reports.put_nowait(VncStateOp(self.servers(), viewers))

    def _report(self, event: str, connection: Connection) -> None:
        try:
            self._reports.put_nowait(VncViewerOp(event, connection.report()))
        except asyncio.QueueFull:
            log.warning("VNC: the core does not take reports; sending it the whole state instead")
            self._resend_state()

    async def _report_loop(self) -> None:
        """One report at a time, in order; none while detached (the next attach sends the whole state)."""
        while True:
            report = await self._reports.get()
            channel = self.ctx.channel if self.ctx is not None else None
            if channel is None or not channel.attached:
                continue
            try:
                await channel.request(report, timeout_s=10.0)
            except ChannelError as exc:
                log.debug("VNC: report %s not delivered: %s", report.OP, exc)

    async def check_auth(self, connection: Connection, challenge: bytes, response: bytes) -> tuple[bool, str]:
        """The core's verdict on a VNC authentication response: (accepted, what to tell the viewer)."""
        channel = self.ctx.channel if self.ctx is not None else None
        if channel is None or not channel.attached:
            log.warning("viewer %s: cannot authenticate it: the core is not attached", connection.transport.peer)
            return False, "Authentication unavailable, try again later"
        try:
            result = await channel.request(VncAuthOp(connection.id, connection.transport.address.host, challenge,
                                                     response), timeout_s=AUTH_TIMEOUT_S)
        except ChannelError as exc:
            log.warning("viewer %s: authentication check failed: %s", connection.transport.peer, exc)
            return False, "Authentication unavailable, try again later"
        if not isinstance(result, dict) or result.get("ok") is not True:
            reason = result.get("reason") if isinstance(result, dict) else None
            return False, str(reason or "Authentication failed")
        return True, ""

    def _release_hold(self, repaint: bool = False) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.holding:
            self.holding = False
            log.info("VNC: %s: repainting viewers", "hold timed out" if repaint else "the guest's display is there")
            if repaint:
                self.display_records(Overrun(0))

    def display_records(self, records: list[Record] | Overrun) -> None:
        self._follow_leds(records)
        if self.holding:
            if isinstance(records, Overrun):
                display = self.ctx.display if self.ctx is not None else None
                try:
                    arrived = display is not None and display.reader.mode().generation > 1
                except (LayoutError, TimeoutError):
                    arrived = False
            else:
                arrived = any(isinstance(r, ModeRecord) for r in records)
            if not arrived:
                return  # still QEMU's first surface (generation 1): the placeholder
            self._release_hold(repaint=False)
            records = Overrun(0)  # the guest's display: repaint everything from the segment as it is now
        display = self.ctx.display if self.ctx is not None else None
        full = False
        cursor = False
        damage: list[Rect] = []
        if isinstance(records, Overrun):
            full = cursor = True
            if display is not None:
                try:
                    self._set_mode(display.reader.mode())
                except (LayoutError, TimeoutError) as exc:
                    log.warning("VNC: cannot read the display mode: %s", exc)
        else:
            for record in records:
                if isinstance(record, DamageRecord):
                    if self.mode is not None and record.generation == self.mode.generation:
                        damage.append((record.x, record.y, record.width, record.height))
                elif isinstance(record, ModeRecord):
                    self._set_mode(Mode(record.generation, record.width, record.height, record.stride,
                                        record.pixel_format))
                    full = True
                    damage.clear()
                elif isinstance(record, CursorShapeRecord):
                    cursor = True
        if self.mode is not None:
            clip = (0, 0, self.mode.width, self.mode.height)
            damage = [r for r in (intersect(d, clip) for d in damage) if r is not None]
        if not (damage or full or cursor):
            return
        copy_changes = self._refresh_copy(damage, full)
        for viewer in list(self.viewers):
            viewer.display_changed(damage, full, cursor, copy_changes)

    def _follow_leds(self, records: list[Record] | Overrun) -> None:
        leds = self.keyboard_leds
        if isinstance(records, Overrun):
            display = self.ctx.display if self.ctx is not None else None
            try:
                leds = display.reader.state().keyboard_leds if display is not None else None
            except (LayoutError, TimeoutError):
                return
        else:
            for record in records:
                if isinstance(record, KeyboardLedsRecord):
                    leds = record.leds
        if leds != self.keyboard_leds:
            log.debug("VNC: guest keyboard LEDs %s", leds)
            self.keyboard_leds = leds
            if leds is not None:  # what lock-key sync compares a viewer's keysyms with from now on
                self.keyboard.guest_leds(caps_lock=bool(leds & LED_CAPS_LOCK), num_lock=bool(leds & LED_NUM_LOCK))
            for viewer in self.viewers:
                viewer.send_leds()

    # --- the frame copy (viewers that take CopyRect) --------------------------------------------------

    def use_copy(self, takes_copyrect: bool) -> bool:
        """Whether a viewer is to be served from the frame copy; loads the copy if it was not kept."""
        if not takes_copyrect or self.frame_copy is None:
            return False
        if self.frame_copy.mode is None:
            self._refresh_copy([], True, needed=True)
        return True

    def _refresh_copy(self, damage: list[Rect], full: bool, *,
                      needed: bool = False) -> tuple[list[Move], list[Rect]] | None:
        """Bring the frame copy up to the segment (while a viewer is served from it); returns the scrolls found
        in the damage and the rows that really changed, or None when the copy was (re)loaded whole or is not
        kept. Runs here, in the loop, between updates: see framecopy.py for why."""
        copy = self.frame_copy
        display = self.ctx.display if self.ctx is not None else None
        if copy is None:
            return None
        if not needed and not any(v.copy_source for v in self.viewers):
            if copy.mode is not None:
                copy.forget()
            return None
        mode = self.mode
        if display is None or mode is None or not copy.fits(mode):
            copy.mode = None
            return None
        try:
            source = frame_array(display.reader.framebuffer, mode)
            if full or copy.mode != mode:
                copy.load(source, mode)
                if not full:  # viewers served from the segment meanwhile may hold newer pixels than the copy
                    for viewer in self.viewers:
                        if viewer.copy_source:
                            viewer.full = True
                return None
            region = DirtyRegion()
            for rect in damage:
                region.add(*rect)
            return copy.apply(source, region.rects)
        except (LayoutError, ValueError) as exc:
            log.debug("VNC: frame copy not refreshed (%s)", exc)
            copy.mode = None
            return None

    async def close(self) -> None:
        await self.clipboard.close()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        if self.pool is not None and self.pool is not self._shared_pool:
            await self.pool.close()
        for server in self._servers:
            server.close()
        for connection in list(self.connections.values()):
            connection.close("the client is stopping")
        if self._reporter is not None:
            self._reporter.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)
        for sock in self._socks:
            with contextlib.suppress(OSError):
                if sock.family == socket.AF_UNIX:
                    os.unlink(sock.getsockname())
            sock.close()
        if self.frame_copy is not None:
            if self.pool is not None:
                self.pool.forget_copy(self.frame_copy.key)
            self.frame_copy.close()

    # --- helpers for viewers --------------------------------------------------------------------------

    def _set_mode(self, mode: Mode) -> None:
        if mode.generation == 0 or mode.width == 0 or mode.height == 0:
            return
        if self.mode != mode:
            log.info("VNC: display mode %dx%d (generation %d)", mode.width, mode.height, mode.generation)
        self.mode = mode
        self._mode_known.set()

    def admit_viewer(self, connection: Connection, shared: bool) -> str | None:
        """A viewer finished its handshake (ClientInit): may it stay, by the share policy and the viewer limit?
        Returns why not, or None (it is then initialised, and the core told). As QEMU's protocol_client_init."""
        others = [c for c in self.connections.values() if c.initialized and c is not connection]
        exclusive = not shared
        if self.share == "allow-exclusive":
            if exclusive:
                if others:
                    log.info("viewer %s asked for exclusive use: disconnecting %d other viewers",
                             connection.transport.peer, len(others))
                for other in others:
                    other.close("another viewer asked for exclusive use")
                others = []
            elif any(c.exclusive for c in others):
                return "a viewer has exclusive use (share policy allow-exclusive)"
        elif self.share == "force-shared" and exclusive:
            return "exclusive use is not allowed (share policy force-shared)"
        if shared and sum(not c.exclusive for c in others) >= self.connections_limit:
            return f"{self.connections_limit} viewers share the screen already"
        connection.initialized, connection.exclusive = True, exclusive
        self._report("initialized", connection)
        return None

    async def send_input(self, events: list[InputEvent], peer: str, source: str) -> None:
        channel = self.ctx.channel if self.ctx is not None else None
        if channel is None or not channel.attached:
            log.debug("viewer %s: core not attached; dropping %d input events", peer, len(events))
            return
        try:
            # The core paces keys (10 ms per key event, others' input first): give the reply time to come.
            await channel.send_input(events, source=source, timeout_s=10.0 + 0.05 * len(events))
        except ChannelError as exc:
            log.debug("viewer %s: input not delivered: %s", peer, exc)

    async def release_input(self, source: str, peer: str) -> None:
        channel = self.ctx.channel if self.ctx is not None else None
        if channel is None or not channel.attached:
            return  # no core: nothing was delivered through this one (a new core releases on its own)
        try:
            await channel.release_input(source, timeout_s=10.0)
        except ChannelError as exc:
            log.warning("viewer %s: releasing its keys failed: %s", peer, exc)

    # --- connections ----------------------------------------------------------------------------------

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(StreamTransport(reader, writer), 0)

    async def _on_websocket(self, ws: Any) -> None:
        await self.serve_transport(WebSocketTransport(ws))

    async def serve_transport(self, transport: Transport, entry: socket.socket | None = None) -> None:
        """Serve a viewer whose connection arrived elsewhere: our own WebSocket listener, or ``entry`` (see
        :meth:`add_entry`). The core's reports name the server it came through."""
        if entry is not None and entry in self._entries:
            server = len(self._socks) + self._entries.index(entry)
        else:
            server = self._sock_kinds.index("websocket") if "websocket" in self._sock_kinds else 0
        await self._serve(transport, min(server, MAX_VNC_SERVERS - 1))

    async def _serve(self, transport: Transport, server: int) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        connection = Connection(transport, server)
        self._make_room(connection)
        self.connections[connection.id] = connection
        self._report("connected", connection)
        deadline = asyncio.get_running_loop().call_later(self.handshake_timeout, self._handshake_overdue,
                                                         connection)
        try:
            if await self._ready_for(connection):
                await self._serve_viewer(Viewer(self, connection))
        finally:
            deadline.cancel()
            transport.close()
            del self.connections[connection.id]
            self._report("disconnected", connection)
            if task is not None:
                self._handlers.discard(task)

    async def _serve_viewer(self, viewer: Viewer) -> None:
        tls = viewer.transport.ssl_object()
        log.info("viewer %s: connection%s", viewer.peer, f" (TLS: {tls.version()})" if tls is not None else "")
        self.viewers.add(viewer)
        self.clipboard.viewers.add(viewer.clipboard)
        if self.pool is not None:
            self.pool.start()  # a lazy (fleet) pool starts its workers with the first viewer
        demand = self.ctx.demand if self.ctx is not None else None
        # The core stops pacing its capture; the viewer's first update waits for the fresh frame.
        viewer.fresh = self.ctx.acquire_live() if self.ctx is not None else None
        try:
            await viewer.run()
        finally:
            self.viewers.discard(viewer)
            self.clipboard.viewers.discard(viewer.clipboard)
            if viewer.fresh is not None:
                viewer.fresh.cancel()
            if demand is not None:
                demand.release()

    def _make_room(self, newcomer: Connection) -> None:
        """At the limit of connections in their handshake, the oldest of them goes (as QEMU's VNC): a flood of
        connections that never speak cannot keep a real viewer out, and viewers being served are never evicted."""
        waiting = [c for c in self.connections.values() if not c.initialized and not c.closed.is_set()]
        if len(waiting) >= self.connections_limit:
            oldest = min(waiting, key=lambda c: c.since)
            log.warning("viewer %s: closed to make room for %s (%d connections in handshake)",
                        oldest.transport.peer, newcomer.transport.peer, len(waiting))
            oldest.close("evicted: too many connections in handshake")

    def _handshake_overdue(self, connection: Connection) -> None:
        if not connection.initialized:
            log.info("viewer %s: no handshake within %.0f s; closing it", connection.transport.peer,
                     self.handshake_timeout)
            connection.close(f"handshake not done within {self.handshake_timeout:.0f} s")

    async def _ready_for(self, connection: Connection) -> bool:
        """Wait (within the handshake deadline) until there is a display and the core said how viewers
        authenticate; False if the connection was closed first."""
        for known, what in ((self._settings_known, "the core's VNC settings"), (self._mode_known, "the display")):
            if known.is_set():
                continue
            log.info("viewer %s: waiting for %s", connection.transport.peer, what)
            closed = asyncio.ensure_future(connection.closed.wait())
            ready = asyncio.ensure_future(known.wait())
            await asyncio.wait((closed, ready), return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            ready.cancel()
            if connection.closed.is_set():
                log.warning("viewer %s refused: %s (still waiting for %s)", connection.transport.peer,
                            connection.reason, what)
                return False
        return True


def service_from_args(listen: str | None, websocket: str | None, *, share: str = "allow-exclusive",
                      connections: int = DEFAULT_CONNECTIONS, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                      keymap: str | None = None, tls: TlsSettings | None = None,
                      web_console: bool = False) -> VncService | None:
    """Build the service from the client's command line: None when neither --vnc nor --websocket is given,
    unless the web console (``web_console``) needs one without a listener of its own."""
    if listen is None and websocket is None and not web_console:
        return None
    return VncService(listen or (DEFAULT_LISTEN if websocket is not None else None), websocket=websocket,
                      share=share, connections=connections, handshake_timeout=handshake_timeout, keymap=keymap,
                      tls=tls)
