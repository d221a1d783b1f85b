"""Display capture: QEMU's screen, read over a private VNC connection, written into the shm segment.

QEMU runs with ``-vnc unix:RUN_DIR/private/vnc.sock``; only the core can reach that socket. The core connects
as an RFB client (``rfb_client``) asking for 32-bit BGRX pixels, Raw rectangles and the DesktopSize and Cursor
pseudo-encodings. QEMU already tracks dirty regions, so each Raw rectangle is copied into the framebuffer and
becomes a damage record; a DesktopSize becomes a mode record, a cursor a cursor-shape record. One incremental
FramebufferUpdateRequest is kept outstanding (the next goes out as soon as an update ends), so QEMU sends
changes at its own refresh rate (every 30 ms while the screen changes, backing off to 3 s when it does not)
and nothing at all while nothing changes. Readers are told once per batch of input that produced records.
While no reader needs live pixels (``set_live(False)``: no viewer anywhere), the next request waits
``pacing`` seconds, or (0, the default) is not sent at all: a guest whose screen never rests (the demo guest's
counter) then costs nothing, not eighteen updates a second. A reader turning live gets the whole frame at once.

If the VNC connection drops while the core runs, the capture reconnects with backoff and, after the new
connection's first update, appends one full-frame damage record so every reader repaints.

The same connection carries what else QEMU's VNC offers its clients: the keyboard LEDs (QEMU's LED State
pseudo-encoding, into the segment's state block and a KEYBOARD_LEDS record) and the clipboard (the Extended
Clipboard; QEMU's ``qemu-vdagent`` chardev joins it to the guest's spice-vdagent). QEMU's clipboard has peers:
this connection is one (QEMU registers it when we ask for the pseudo-encoding), the vdagent another. When the
guest copies, QEMU notifies us; we request the text at once and hand it to ``on_clipboard`` (the control
channel's ``clipboard`` broadcast). :meth:`set_clipboard` makes us the clipboard's owner (notify, then provide
the text eagerly; a later request from QEMU is answered from what we keep), so the vdagent offers it to the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from rfb import client as rfb
from rfb import clipboard as extclip
from shm import QMP_RUN_STATES, RunState, ShmWriter
from shm.layout import RUN_CODE_SIZE

#: Framebuffer the shm segment is sized for by default (pages never written cost nothing).
DEFAULT_MAX_WIDTH = 2560
DEFAULT_MAX_HEIGHT = 1600
#: More rectangles than this in one update are merged into their bounding box (one damage record).
MAX_DAMAGE_RECTS = 32
READ_SIZE = 256 << 10
XK_SHIFT_L = 0xFFE1  # the keysym input_hint releases
HINT_INTERVAL = 0.01  # at most one input hint per 10 ms: QEMU's base refresh interval is 30 ms
ENCODINGS = (rfb.ENCODING_RAW, rfb.ENCODING_DESKTOP_SIZE, rfb.ENCODING_CURSOR, rfb.ENCODING_QEMU_LED_STATE,
             rfb.ENCODING_EXTENDED_CLIPBOARD)
#: Clipboard text QEMU takes (its inflate stops at 1 MiB, the 4-byte size word included).
MAX_CLIPBOARD_TO_QEMU = extclip.DEFAULT_MAX_SIZE - 4
#: Seconds between updates requested from QEMU while no reader is live; 0: none until a reader turns live.
PACING_S = 0.0

Rect = tuple[int, int, int, int]


class DisplayError(Exception):
    """The display could not be captured (no VNC connection within the deadline); the message says why."""


class ClipboardError(Exception):
    """The guest clipboard cannot be set now (no connection to QEMU, or text over QEMU's limit)."""


def cursor_to_bgra(width: int, height: int, pixels: bytes, mask: bytes) -> bytes:
    """An RFB cursor (BGRX pixels + 1-bit mask, MSB first) as B,G,R,A bytes with alpha 255 where the mask is set."""
    out = bytearray(pixels)
    row_bytes = (width + 7) // 8
    for y in range(height):
        base = y * row_bytes
        for x in range(width):
            opaque = mask[base + (x >> 3)] & (0x80 >> (x & 7))
            out[(y * width + x) * 4 + 3] = 0xFF if opaque else 0
    return bytes(out)


def clip_rect(rect: Rect, width: int, height: int) -> Rect | None:
    x, y, w, h = rect
    w, h = min(w, width - x), min(h, height - y)
    return (x, y, w, h) if w > 0 and h > 0 else None


def merge_rects(rects: list[Rect]) -> Rect:
    x0 = min(r[0] for r in rects)
    y0 = min(r[1] for r in rects)
    x1 = max(r[0] + r[2] for r in rects)
    y1 = max(r[1] + r[3] for r in rects)
    return (x0, y0, x1 - x0, y1 - y0)


class DisplayCapture:
    """Follows QEMU's display through its VNC socket and mirrors it into ``writer``.

    ``notify`` is called once per batch of records (the readers' doorbell, e.g. ``DisplaySocket.notify``).
    ``await start()`` returns once the first connection has delivered the screen size; ``close()`` stops.
    """

    def __init__(
        self,
        writer: ShmWriter,
        socket_path: Path,
        *,
        notify: Callable[[], None] | None = None,
        on_clipboard: Callable[[str], None] | None = None,
        connect_timeout: float = 30.0,
        max_backoff: float = 5.0,
        name: str = "display",
        pacing: float = PACING_S,
    ) -> None:
        self.pacing = pacing
        self.live = True  # until the display socket says no reader is
        self._paced_request: asyncio.TimerHandle | None = None
        self._waiting_for_live = False  # no request outstanding: the next goes out when a reader turns live
        self.writer = writer
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self._notify_cb = notify
        self._on_clipboard = on_clipboard
        #: The guest's clipboard as last learned (from the guest, or as set through set_clipboard).
        self.clipboard: str | None = None
        self._clipboard_out: bytes | None = None  # what we own in QEMU's clipboard, as QEMU gets it
        self.log = logging.getLogger(f"{__name__}.{name}")
        #: The guest's framebuffer size as QEMU reports it (the shm mode may be clamped to fit).
        self.screen_size: tuple[int, int] | None = None
        self.updates = 0  # FramebufferUpdate messages received
        self.connections = 0
        self._conn: rfb.RfbClient | None = None
        self._transport: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._closing = False
        self._full_damage = False
        self._run: tuple[RunState, str] | None = None
        self._next_hint = 0.0
        #: QEMU announced its shutdown (SHUTDOWN event): losing its VNC connection is then no surprise.
        self.qemu_ending = False

    # --- lifetime ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying until the socket appears) and wait for the screen size, up to the deadline."""
        if self._task is not None:
            raise RuntimeError("display capture already started")
        self._ready = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run_forever(), name="display-capture")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            done, _ = await asyncio.wait({ready, self._task}, timeout=self.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if ready not in done or not self._ready.is_set():
            await self.close()
            raise DisplayError(f"no display from QEMU's VNC socket {self.socket_path} within "
                               f"{self.connect_timeout:.0f} s")

    async def close(self) -> None:
        """Stop capturing; the segment stays as it is (the owner closes and unlinks it)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop_transport()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.state is rfb.State.NORMAL

    async def _run_forever(self) -> None:
        delay = 0.01
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=READ_SIZE)
            except OSError as exc:
                # QEMU creates the socket early in start-up; until then (or while it restarts) try again.
                self.log.debug("VNC socket %s not reachable yet: %s", self.socket_path, exc)
            else:
                started = time.monotonic()
                try:
                    await self._session(reader, writer)
                except (rfb.RfbError, OSError, EOFError, TimeoutError) as exc:
                    # Expected when QEMU is shutting down (every stop); worth a warning only otherwise.
                    self.log.log(logging.INFO if self.qemu_ending else logging.WARNING,
                                 "VNC connection to QEMU lost after %.1f s: %s", time.monotonic() - started, exc)
                except Exception:  # a bug here must not take the core down: log it and start over
                    self.log.exception("display capture failed; reconnecting")
                finally:
                    self._drop_transport()
                if time.monotonic() - started > 5:
                    delay = 0.01  # it was working: reconnect quickly
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    def _drop_transport(self) -> None:
        if self._paced_request is not None:
            self._paced_request.cancel()
            self._paced_request = None
        self._waiting_for_live = False
        if self._transport is not None:
            self._transport.close()
        self._transport = None
        self._conn = None

    # --- one connection ----------------------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = rfb.RfbClient(max_cursor=rfb.DEFAULT_MAX_CURSOR)
        self._conn, self._transport = conn, writer
        handshake_deadline = time.monotonic() + self.connect_timeout
        while True:
            if conn.state is rfb.State.NORMAL:
                data = await reader.read(READ_SIZE)
            else:
                remaining = handshake_deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"VNC handshake did not finish within {self.connect_timeout:.0f} s")
                data = await asyncio.wait_for(reader.read(READ_SIZE), remaining)
            if not data:
                raise EOFError("QEMU closed the VNC connection")
            before = self.writer.write_seq
            events = conn.receive_data(data)
            out = bytearray(conn.data_to_send())
            for event in events:
                out += self._handle(conn, event)
            if out:
                writer.write(out)
            if self.writer.write_seq != before:
                self._notify()

    def _handle(self, conn: rfb.RfbClient, event: rfb.Event) -> bytes:
        """Apply one event to the segment; returns what to send back."""
        if isinstance(event, rfb.RawPixels):
            self._put(event)
        elif isinstance(event, rfb.UpdateDone):
            self.updates += 1
            self._damage(list(event.rects))
            if not self.live:
                if self.pacing > 0:
                    self._paced_request = asyncio.get_running_loop().call_later(self.pacing, self._request_update)
                else:
                    self._waiting_for_live = True
                return b""
            return conn.framebuffer_update_request(0, 0, conn.width, conn.height, incremental=True)
        elif isinstance(event, rfb.DesktopSize):
            self.log.info("guest display is now %dx%d", event.width, event.height)
            self._set_size(event.width, event.height)
            return conn.framebuffer_update_request(0, 0, conn.width, conn.height, incremental=False)
        elif isinstance(event, rfb.ServerInit):
            self.connections += 1
            self.log.info("VNC connection to QEMU %s: %dx%d, server %r", "re-established" if self.connections > 1
                          else "established", event.width, event.height, event.name)
            self._set_size(event.width, event.height)
            self._full_damage = True
            assert self._ready is not None
            self._ready.set()
            return (conn.set_pixel_format(rfb.BGRX8888) + conn.set_encodings(ENCODINGS)
                    + conn.framebuffer_update_request(0, 0, event.width, event.height, incremental=False))
        elif isinstance(event, rfb.Cursor):
            self._set_cursor(event)
        elif isinstance(event, rfb.LedState):
            self.log.debug("guest keyboard LEDs %#x", event.leds)
            self.writer.set_keyboard_leds(event.leds)
        elif isinstance(event, rfb.Bell):
            self.log.debug("guest rang the bell")
        else:
            return self._clipboard_event(conn, event)
        return b""

    # --- clipboard ---------------------------------------------------------------------------------------

    def _clipboard_event(self, conn: rfb.RfbClient, event: rfb.Event) -> bytes:
        if isinstance(event, rfb.ClipboardNotify):
            # The guest copied something: ask for the text now (QEMU asks the vdagent, which asks the guest).
            return conn.clipboard(extclip.request()) if event.formats & extclip.FORMAT_TEXT else b""
        if isinstance(event, rfb.ClipboardProvide):
            if event.text is not None:
                self._guest_copied(extclip.decode_text(event.text))
        elif isinstance(event, rfb.ClipboardRequest):
            # The guest pastes what we set: QEMU asks its owner, us, for it.
            return conn.clipboard(extclip.provide_text(self._clipboard_out))
        elif isinstance(event, rfb.ClipboardCaps):
            self.log.debug("QEMU's clipboard: actions %#x, formats %#x", event.actions, event.formats)
            return conn.clipboard(extclip.caps())
        elif isinstance(event, rfb.ServerCutText):
            self._guest_copied(event.text.decode("latin-1"))
        elif isinstance(event, rfb.CutTextTooLarge):
            self.log.warning("guest clipboard of %d bytes not taken: over the limit of %d bytes", event.size,
                             event.limit)
        return b""

    def _guest_copied(self, text: str) -> None:
        self.clipboard = text
        self._clipboard_out = None  # the guest owns QEMU's clipboard now, not us
        self.log.info("guest clipboard: %d characters", len(text))
        if self._on_clipboard is not None:
            try:
                self._on_clipboard(text)
            except Exception:
                self.log.exception("passing on the guest clipboard failed")

    def set_clipboard(self, text: str) -> None:
        """Offer ``text`` to the guest as its clipboard: QEMU's vdagent grabs the guest's clipboard for it."""
        data = extclip.encode_text(text, spec=False)
        if len(data) > MAX_CLIPBOARD_TO_QEMU:
            raise ClipboardError(f"clipboard text of {len(data)} bytes is over QEMU's limit of "
                                 f"{MAX_CLIPBOARD_TO_QEMU} bytes")
        if not self.connected or self._transport is None or self._conn is None:
            raise ClipboardError("no connection to QEMU's display right now")
        self._clipboard_out = data
        self.clipboard = text
        self._transport.write(self._conn.clipboard(extclip.notify()) + self._conn.clipboard(
            extclip.provide_text(data)))

    def input_hint(self) -> None:
        """Input just went to the guest by QMP: have QEMU look at the screen again within its base interval.

        QEMU's VNC server backs its refresh off to 3 s while the screen does not change, and only RFB client
        messages (not QMP input) reset that. So this sends one that changes nothing: the release of a key
        that is not pressed (QEMU filters such key-ups before they reach the guest). Without it the guest's
        answer to a keystroke after an idle spell would show up to 3 s late.
        """
        now = time.monotonic()
        if self.connected and self._transport is not None and self._conn is not None and now >= self._next_hint:
            self._next_hint = now + HINT_INTERVAL
            self._transport.write(self._conn.key_event(XK_SHIFT_L, False))

    def set_live(self, live: bool) -> None:
        """Whether some reader needs live pixels. Turning live, a paced capture asks QEMU for the whole frame now
        (a reader that just attached reads a current frame after its first wake-up)."""
        self.live = live
        if live and (self._paced_request is not None or self._waiting_for_live):
            if self._paced_request is not None:
                self._paced_request.cancel()
            self._request_update(incremental=False)

    def _request_update(self, incremental: bool = True) -> None:
        self._paced_request = None
        self._waiting_for_live = False
        conn = self._conn
        if self.connected and conn is not None and self._transport is not None:
            self._transport.write(conn.framebuffer_update_request(0, 0, conn.width, conn.height,
                                                                  incremental=incremental))

    def request_refresh(self) -> None:
        """Publish a full-frame damage record now (a client re-attached or overran its ring).

        The framebuffer is always current (the core is its only writer), so no round trip to QEMU is needed.
        """
        mode = self.writer.mode
        if mode.generation:
            self.writer.damage(0, 0, mode.width, mode.height)
            self._notify()

    # --- into the segment ---------------------------------------------------------------------------------

    def _set_size(self, width: int, height: int) -> None:
        """Switch the shm mode; a mode that does not fit the segment is clamped (top-left part shown)."""
        if width == 0 or height == 0:
            self.log.warning("QEMU reports an empty %dx%d display; keeping the current mode", width, height)
            return
        self.screen_size = (width, height)
        g = self.writer.geometry
        if width * 4 * height > g.fb_size:
            clamped = (min(width, g.fb_max_width), min(height, g.fb_max_height))
            self.log.error("guest display %dx%d does not fit the shared framebuffer (sized for %dx%d): "
                           "showing its top-left %dx%d only", width, height, g.fb_max_width, g.fb_max_height,
                           *clamped)
            width, height = clamped
        mode = self.writer.mode
        if mode.generation == 0 or (mode.width, mode.height) != (width, height):
            self.writer.set_mode(width, height)

    def _put(self, band: rfb.RawPixels) -> None:
        mode = self.writer.mode
        clipped = clip_rect((band.x, band.y, band.width, band.height), mode.width, mode.height)
        if clipped is None:
            return
        x, y, w, h = clipped
        pixels: bytes = band.pixels
        if w != band.width:
            row, keep = band.width * 4, w * 4
            pixels = b"".join([pixels[i * row : i * row + keep] for i in range(h)])
        elif h != band.height:
            pixels = pixels[: w * 4 * h]
        self.writer.put_rect(x, y, w, h, pixels)

    def _damage(self, rects: list[Rect]) -> None:
        mode = self.writer.mode
        if self._full_damage and rects:
            self._full_damage = False
            self.writer.damage(0, 0, mode.width, mode.height)
            return
        clipped = [r for r in (clip_rect(rect, mode.width, mode.height) for rect in rects) if r is not None]
        if len(clipped) > MAX_DAMAGE_RECTS:
            clipped = [merge_rects(clipped)]
        for x, y, w, h in clipped:
            self.writer.damage(x, y, w, h)

    def _set_cursor(self, cursor: rfb.Cursor) -> None:
        g = self.writer.geometry
        w, h = min(cursor.width, g.cursor_max_width), min(cursor.height, g.cursor_max_height)
        if (w, h) != (cursor.width, cursor.height):
            self.log.warning("cursor %dx%d larger than the shm cursor area: cropped to %dx%d",
                             cursor.width, cursor.height, w, h)
        if w == 0 or h == 0:
            self.writer.set_cursor_shape(0, 0, 0, 0, b"")
            return
        bgra = cursor_to_bgra(cursor.width, cursor.height, cursor.pixels, cursor.mask)
        if w != cursor.width or h != cursor.height:
            row = cursor.width * 4
            bgra = b"".join([bgra[i * row : i * row + w * 4] for i in range(h)])
        self.writer.set_cursor_shape(min(cursor.hot_x, w - 1), min(cursor.hot_y, h - 1), w, h, bgra)

    def note_qemu_ending(self) -> None:
        """QEMU announced its shutdown: losing its VNC connection next is expected."""
        self.qemu_ending = True

    def set_run_state(self, qmp_status: str) -> None:
        """Record the guest's run state (QMP ``query-status`` name) and wake the readers; repeats are dropped."""
        state = QMP_RUN_STATES.get(qmp_status, RunState.UNKNOWN)
        code = qmp_status.encode("ascii", "replace")[:RUN_CODE_SIZE].decode("ascii")
        if self._run == (state, code):
            return
        self._run = (state, code)
        self.log.debug("run state %s (%s)", state.name, code)
        self.writer.set_run_state(state, code)
        self._notify()
        if state is RunState.RUNNING:
            self.input_hint()  # a resumed guest redraws; QEMU 7.2 may have backed its refresh off while paused

    def _notify(self) -> None:
        if self._notify_cb is not None:
            try:
                self._notify_cb()
            except Exception:
                self.log.exception("notifying display readers failed")
