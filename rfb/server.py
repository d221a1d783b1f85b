"""RFB (VNC) server side of one viewer connection, without I/O: feed the viewer's bytes, get events; ask for
messages, get bytes.

Handshake (RFC 6143 section 7.1-7.3): the server offers 3.8 and speaks 3.3, 3.7 or 3.8, mapping other versions
to the nearest one the way the community spec asks (3.4-3.6, e.g. the 3.5 some old viewers send, speak 3.3;
3.9 and up, e.g. Apple's 3.889, speak 3.8; below 3.3 or a major version under 3 is refused with a reason).
Security is None, or VNC Authentication (checked here against a password the owner gives, or by the owner:
``external_auth``, the response comes out as an :class:`AuthResponse` event and the owner answers with
:meth:`RfbServerConnection.auth_result`, e.g. after asking whoever holds the password), or VeNCrypt
(rfb.vencrypt) when the owner offers its subtypes: then the connection stops at ``TlsRequested`` while the owner
runs the TLS handshake on its transport, and goes on (in the clear no more) once it calls
:meth:`tls_established`. Then ClientInit / ServerInit and the client messages: SetPixelFormat, SetEncodings,
FramebufferUpdateRequest, KeyEvent, PointerEvent, ClientCutText, EnableContinuousUpdates, ClientFence,
SetDesktopSize and QEMU's Extended Key Event.

The viewer is not trusted: every message is checked and bounded before anything is buffered, and anything
RFB does not allow raises :class:`ProtocolError` (never another exception type), after which the connection
is closed. Typical use::

    conn = RfbServerConnection(width=1024, height=768, name="vm1", password=None)
    send(conn.data_to_send())                       # our ProtocolVersion
    for each read:
        try:
            events = conn.receive_data(data)
        except ProtocolError:
            send(conn.data_to_send()); close(); return  # a handshake refusal may be queued
        send(conn.data_to_send())                     # handshake replies, ServerInit, colour map
        for event in events: ...                      # input, update requests, ...
    send(conn.framebuffer_update(rects))              # rects from rfb.encodings

Every method that returns bytes puts anything still queued for ``data_to_send()`` in front, so the bytes
leave in protocol order even if the owner forgot to drain the queue.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from enum import Enum

from rfb import auth, vencrypt
from rfb import clipboard as extclip
from rfb.encodings.update import framebuffer_update_message, update_header
from rfb.errors import LocalProtocolError, ProtocolError
from rfb.events import (
    AuthFailed,
    AuthResponse,
    ClientInitReceived,
    ContinuousUpdates,
    CutText,
    CutTextTooLarge,
    DesktopSizeRequested,
    EncodingsSet,
    Event,
    ExtendedKey,
    Fence,
    Key,
    PixelFormatChanged,
    Pointer,
    SecurityNegotiated,
    TlsRequested,
    UpdateRequested,
)
from rfb.pixels import BGR233_PALETTE, pack_colour_map
from rfb.wire import (
    BGRX8888,
    CLIENT_CUT_TEXT_HEADER,
    CLIENT_FENCE_HEADER,
    COLOUR_MAP_HEADER,
    CONTINUOUS_UPDATES_MSG,
    CUT_TEXT_HEADER,
    ENCODING_CONTINUOUS_UPDATES,
    ENCODING_EXTENDED_CLIPBOARD,
    ENCODING_FENCE,
    ENCODING_LAST_RECT,
    FENCE_HEADER,
    FENCE_MAX_PAYLOAD,
    FENCE_REQUEST,
    KEY_EVENT_MSG,
    MSG_BELL,
    MSG_CLIENT_CUT_TEXT,
    MSG_CLIENT_FENCE,
    MSG_ENABLE_CONTINUOUS_UPDATES,
    MSG_END_OF_CONTINUOUS_UPDATES,
    MSG_FRAMEBUFFER_UPDATE_REQUEST,
    MSG_KEY_EVENT,
    MSG_POINTER_EVENT,
    MSG_QEMU,
    MSG_SERVER_CUT_TEXT,
    MSG_SERVER_FENCE,
    MSG_SET_COLOUR_MAP_ENTRIES,
    MSG_SET_DESKTOP_SIZE,
    MSG_SET_ENCODINGS,
    MSG_SET_PIXEL_FORMAT,
    POINTER_EVENT_MSG,
    QEMU_EXTENDED_KEY_EVENT,
    QEMU_EXTENDED_KEY_MSG,
    QEMU_HEADER,
    RFB_3_3,
    RFB_3_7,
    RFB_3_8,
    SCREEN,
    SECURITY_INVALID,
    SECURITY_NONE,
    SECURITY_RESULT_FAILED,
    SECURITY_RESULT_OK,
    SECURITY_VENCRYPT,
    SECURITY_VNC_AUTH,
    SERVER_INIT,
    SERVER_VERSION,
    SET_DESKTOP_SIZE_HEADER,
    SET_ENCODINGS_HEADER,
    SET_PIXEL_FORMAT_MSG,
    U8,
    U32,
    UPDATE_REQUEST_MSG,
    VERSION_LENGTH,
    VNC_AUTH_CHALLENGE_SIZE,
    PixelFormat,
    Screen,
    version_bytes,
)

#: Default limits on what a viewer may make us buffer (RFB itself allows up to 4 GiB of cut text).
DEFAULT_MAX_CUT_TEXT = 1 << 20
DEFAULT_MAX_ENCODINGS = 1024  # real viewers send 10-60
MAX_NAME = 1 << 16

_VERSION_TEMPLATE = b"RFB 000.000\n"
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_AUTH_FAILED_REASON = "Authentication failed"


class State(Enum):
    """Where the connection is; each state names what the server waits for next."""

    VERSION = "version"  # the viewer's ProtocolVersion
    SECURITY_TYPE = "security-type"  # 3.7/3.8: the viewer's choice from our list
    VENCRYPT_VERSION = "vencrypt-version"  # the viewer's VeNCrypt version
    VENCRYPT_SUBTYPE = "vencrypt-subtype"  # the viewer's choice from our VeNCrypt subtypes
    TLS_HANDSHAKE = "tls-handshake"  # the owner runs the TLS handshake: no RFB bytes until tls_established()
    VNC_AUTH = "vnc-auth"  # the 16-byte challenge response
    AUTH_PENDING = "auth-pending"  # the owner's verdict on the response (external_auth)
    CLIENT_INIT = "client-init"  # the shared flag
    NORMAL = "normal"  # client messages; the owner may send updates
    CLOSED = "closed"  # failed or closed: nothing more is read or sent


def negotiate_version(client: tuple[int, int]) -> tuple[int, int] | None:
    """The version to speak for what the viewer wrote, or None to refuse.

    3.3, 3.7 and 3.8 are the published versions; the community spec says 3.5 (and other unknown versions
    below 3.7) must be read as 3.3. A viewer must not answer above what we offered (3.8), but some write
    3.889 (Apple) or 4.x: they can speak 3.8, so they get it. Below 3.3 nothing was ever published.
    """
    major, minor = client
    if major > 3:
        return RFB_3_8
    if major < 3 or minor < 3:
        return None
    if minor < 7:
        return RFB_3_3
    if minor == 7:
        return RFB_3_7
    return RFB_3_8


class RfbServerConnection:
    """One viewer's RFB session as a state machine over bytes (see the module docstring)."""

    def __init__(
        self,
        *,
        width: int,
        height: int,
        name: str = "vmfront",
        password: str | bytes | None = None,
        max_cut_text: int = DEFAULT_MAX_CUT_TEXT,
        max_encodings: int = DEFAULT_MAX_ENCODINGS,
        continuous_updates: bool = False,
        fences: bool = False,
        clipboard: bool = False,
        challenge: bytes | None = None,
        vencrypt_subtypes: tuple[int, ...] = (),
        plain_too: bool = False,
        external_auth: bool = False,
    ) -> None:
        """``width``/``height``/``name`` go into ServerInit (update them if the mode changes before ClientInit).

        A ``password`` turns on VNC Authentication (and is then the only type offered); so does ``external_auth``,
        with the owner checking the response (no password here). ``continuous_updates``
        and ``fences`` announce those extensions to a viewer that asks for them (EndOfContinuousUpdates /
        a ServerFence queued after its SetEncodings); the owner must then honour them. ``clipboard`` announces
        the Extended Clipboard (our caps, queued after a SetEncodings that lists it): from then on the viewer's
        cut text may come as extended messages, of at most ``max_cut_text`` bytes of text. Cut text over that
        limit is skipped and reported (:class:`CutTextTooLarge`), the connection goes on. ``challenge`` fixes
        the VNC challenge, for tests only.

        ``vencrypt_subtypes`` offers VeNCrypt with those subtypes (preference order; the *Vnc ones need the
        ``password``, the *None ones must not have one, or they would skip it). Then None / VNC Authentication in
        the clear are not offered, unless ``plain_too`` (a downgrade anyone on the path can force).
        """
        if password is not None and not auth.password_bytes(password).rstrip(b"\x00"):
            raise ValueError("an empty VNC password would let anyone in; use password=None for no authentication")
        if not 0 <= max_cut_text <= 0xFFFF_FFFF or not 0 <= max_encodings <= 0xFFFF:
            raise ValueError("limits out of range")
        if external_auth and password is not None:
            raise ValueError("external_auth checks responses outside: give no password")
        if challenge is not None and len(challenge) != VNC_AUTH_CHALLENGE_SIZE:
            raise ValueError(f"challenge must be {VNC_AUTH_CHALLENGE_SIZE} bytes")
        for subtype in vencrypt_subtypes:
            if subtype not in vencrypt.SUBTYPES:
                raise ValueError(f"VeNCrypt subtype {subtype} is not supported")
            if (subtype in vencrypt.WITH_VNC_AUTH) != (password is not None or external_auth):
                raise ValueError(f"VeNCrypt {vencrypt.describe(subtype)} " +
                                 ("would skip the password" if subtype not in vencrypt.WITH_VNC_AUTH
                                  else "needs a password or external_auth"))
        self.width = width
        self.height = height
        self.name = name
        self.max_cut_text = max_cut_text
        self.max_encodings = max_encodings
        self._password = password
        self._external_auth = external_auth
        self._vnc_auth = password is not None or external_auth
        self._announce_continuous_updates = continuous_updates
        self._announce_fences = fences
        self._announce_clipboard = clipboard
        #: We sent our Extended Clipboard caps: the viewer's negative cut-text lengths are extended messages.
        self.extended_clipboard = False
        self._skip = 0  # bytes of an oversized cut text still to drop
        self._challenge = challenge if challenge is not None else auth.new_challenge()
        self._vencrypt_subtypes = tuple(vencrypt_subtypes)
        self._plain = plain_too or not vencrypt_subtypes
        #: The VeNCrypt subtype the viewer chose (its TLS session carries the rest), or None.
        self.vencrypt_subtype: int | None = None
        self.state = State.VERSION
        self.version: tuple[int, int] | None = None
        self.client_version: tuple[int, int] | None = None
        self.security_type: int | None = None
        self.shared: bool | None = None
        self.pixel_format: PixelFormat = BGRX8888
        self.encodings: tuple[int, ...] = ()
        self._buffer = bytearray()
        self._outbox = bytearray(version_bytes(SERVER_VERSION))

    # --- properties -------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def security_types(self) -> tuple[int, ...]:
        """What the server offers, in preference order."""
        plain = (SECURITY_VNC_AUTH,) if self._vnc_auth else (SECURITY_NONE,)
        secure = (SECURITY_VENCRYPT,) if self._vencrypt_subtypes else ()
        return secure + plain if self._plain else secure

    def supports(self, encoding: int) -> bool:
        """True if the viewer listed ``encoding`` (a genuine or pseudo-encoding) in its last SetEncodings."""
        return encoding in self.encodings

    # --- input ------------------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the viewer; return the events they complete (possibly none).

        Raises :class:`ProtocolError` if the viewer broke the protocol; the events completed before the
        error are on the exception. After the connection closed (an error, a failed authentication or
        :meth:`close`) bytes are ignored.
        """
        if self.state is State.CLOSED:
            return []
        self._buffer += data
        return self._process()

    def _process(self) -> list[Event]:
        events: list[Event] = []
        pos = 0
        try:
            while not self.closed:
                used = self._step(pos, events)
                if used == 0:
                    break
                pos += used
        except ProtocolError as exc:
            self.state = State.CLOSED
            self._buffer.clear()
            exc.events = tuple(events)
            raise
        if self.closed:
            self._buffer.clear()
        else:
            del self._buffer[:pos]
        return events

    def _need(self, pos: int, size: int) -> bool:
        return len(self._buffer) - pos >= size

    def _step(self, pos: int, events: list[Event]) -> int:
        """Handle one message starting at ``pos``: the bytes it used, or 0 if it is not complete yet."""
        if self.state is State.VERSION:
            return self._read_version(pos, events)
        if self.state is State.SECURITY_TYPE:
            return self._read_security_type(pos, events)
        if self.state is State.VNC_AUTH:
            return self._read_auth_response(pos, events)
        if self.state is State.VENCRYPT_VERSION:
            return self._read_vencrypt_version(pos)
        if self.state is State.VENCRYPT_SUBTYPE:
            return self._read_vencrypt_subtype(pos, events)
        if self.state is State.TLS_HANDSHAKE:
            if self._need(pos, 1):  # a viewer waits for our accept byte: these would be plaintext spliced into TLS
                raise ProtocolError("bytes in the clear after the VeNCrypt subtype, before the TLS handshake")
            return 0
        if self.state is State.AUTH_PENDING:
            return 0  # what the viewer sends meanwhile waits for the verdict
        if self.state is State.CLIENT_INIT:
            return self._read_client_init(pos, events)
        return self._read_message(pos, events)

    # --- handshake --------------------------------------------------------------------------------------------

    def _refuse_version(self, reason: str) -> ProtocolError:
        # The viewer's version is unusable, so no later handshake format applies: use 3.3's, the most basic.
        encoded = reason.encode()
        self._outbox += U32.pack(SECURITY_INVALID) + U32.pack(len(encoded)) + encoded
        return ProtocolError(reason)

    def _read_version(self, pos: int, events: list[Event]) -> int:
        head = bytes(self._buffer[pos : pos + VERSION_LENGTH])
        if not _VERSION_TEMPLATE.startswith(head.translate(_DIGITS_TO_ZERO)):
            raise self._refuse_version(f"not an RFB ProtocolVersion message: {head!r}")
        if len(head) < VERSION_LENGTH:
            return 0
        client = (int(head[4:7]), int(head[8:11]))
        version = negotiate_version(client)
        if version is None:
            raise self._refuse_version(f"RFB version {client[0]}.{client[1]} is not supported (3.3, 3.7, 3.8 are)")
        self.client_version, self.version = client, version
        if version == RFB_3_3:
            # 3.3: the server decides the security type, and 3.3 has no VeNCrypt.
            if not self._plain:
                raise self._refuse_version("this server requires VeNCrypt (TLS), which needs RFB 3.7 or later")
            chosen = self.security_types[-1]
            self._outbox += U32.pack(chosen)
            self._start_security(chosen, events)
        else:
            types = self.security_types
            self._outbox += U8.pack(len(types)) + bytes(types)
            self.state = State.SECURITY_TYPE
        return VERSION_LENGTH

    def _read_security_type(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, 1):
            return 0
        chosen = self._buffer[pos]
        if chosen not in self.security_types:
            reason = f"security type {chosen} was not offered"
            if self.version == RFB_3_8:
                self._queue_security_failure(reason)
            raise ProtocolError(reason)
        if chosen == SECURITY_NONE and self.version == RFB_3_8:
            self._outbox += U32.pack(SECURITY_RESULT_OK)  # 3.7 sends no SecurityResult for None
        self._start_security(chosen, events)
        return 1

    def _start_security(self, chosen: int, events: list[Event]) -> None:
        self.security_type = chosen
        if chosen == SECURITY_VNC_AUTH:
            self._outbox += self._challenge
            self.state = State.VNC_AUTH
        elif chosen == SECURITY_VENCRYPT:
            self._outbox += vencrypt.server_version()
            self.state = State.VENCRYPT_VERSION
        else:
            self._security_done(events)

    def _security_done(self, events: list[Event]) -> None:
        assert self.version is not None and self.client_version is not None and self.security_type is not None
        self.state = State.CLIENT_INIT
        events.append(SecurityNegotiated(self.version, self.client_version, self.security_type))

    def _queue_security_failure(self, reason: str) -> None:
        self._outbox += U32.pack(SECURITY_RESULT_FAILED)
        if self.version == RFB_3_8:  # only 3.8 carries a reason
            encoded = reason.encode()
            self._outbox += U32.pack(len(encoded)) + encoded

    def _read_vencrypt_version(self, pos: int) -> int:
        version = vencrypt.read_client_version(self._buffer, pos)
        if version is None:
            return 0
        if version != vencrypt.VERSION:
            self._outbox += vencrypt.version_ack(None)
            raise ProtocolError(f"VeNCrypt version {version[0]}.{version[1]} is not supported (0.2 is)")
        self._outbox += vencrypt.version_ack(self._vencrypt_subtypes)
        self.state = State.VENCRYPT_SUBTYPE
        return vencrypt.VERSION_MSG.size

    def _read_vencrypt_subtype(self, pos: int, events: list[Event]) -> int:
        subtype = vencrypt.read_subtype(self._buffer, pos)
        if subtype is None:
            return 0
        if subtype not in self._vencrypt_subtypes:
            self._outbox += vencrypt.subtype_ack(False)
            raise ProtocolError(f"VeNCrypt {vencrypt.describe(subtype)} was not offered")
        self._outbox += vencrypt.subtype_ack(True)
        self.vencrypt_subtype = subtype
        self.state = State.TLS_HANDSHAKE
        events.append(TlsRequested(subtype, anonymous=subtype in vencrypt.ANONYMOUS))
        return U32.size

    def tls_established(self) -> list[Event]:
        """The owner's TLS handshake succeeded: every byte from now on goes through it, and the subtype's own
        authentication starts (its first bytes are in ``data_to_send()``). Returns the events that completes."""
        if self.state is not State.TLS_HANDSHAKE or self.vencrypt_subtype is None:
            raise LocalProtocolError(f"no TLS handshake is due in state {self.state.value}")
        events: list[Event] = []
        if self.vencrypt_subtype in vencrypt.WITH_VNC_AUTH:
            self._outbox += self._challenge
            self.state = State.VNC_AUTH
        else:
            self._outbox += U32.pack(SECURITY_RESULT_OK)  # not type None: 3.7 sends a SecurityResult too
            self._security_done(events)
        return events

    def _read_auth_response(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, VNC_AUTH_CHALLENGE_SIZE):
            return 0
        response = bytes(self._buffer[pos : pos + VNC_AUTH_CHALLENGE_SIZE])
        if self._external_auth:
            self.state = State.AUTH_PENDING
            events.append(AuthResponse(self._challenge, response))
            return VNC_AUTH_CHALLENGE_SIZE
        assert self._password is not None
        self._auth_verdict(auth.check_response(self._password, self._challenge, response), _AUTH_FAILED_REASON,
                           events)
        return VNC_AUTH_CHALLENGE_SIZE

    def _auth_verdict(self, ok: bool, reason: str, events: list[Event]) -> None:
        if ok:
            self._outbox += U32.pack(SECURITY_RESULT_OK)
            self._security_done(events)
        else:
            self._queue_security_failure(reason)
            self.state = State.CLOSED
            events.append(AuthFailed(reason))

    def auth_result(self, ok: bool, reason: str = _AUTH_FAILED_REASON) -> list[Event]:
        """The owner's verdict on an :class:`AuthResponse` (``external_auth``); returns the events it completes:
        SecurityNegotiated and what the viewer sent meanwhile, or AuthFailed (the failure is then queued in
        ``data_to_send()`` and the connection closed)."""
        if self.state is not State.AUTH_PENDING:
            raise LocalProtocolError(f"no authentication response is waiting (state {self.state.value})")
        events: list[Event] = []
        self._auth_verdict(ok, reason or _AUTH_FAILED_REASON, events)
        if self.closed:
            self._buffer.clear()
            return events
        return events + self._process()

    def _read_client_init(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, 1):
            return 0
        self.shared = self._buffer[pos] != 0
        name = self.name.encode("utf-8")[:MAX_NAME]
        self._outbox += SERVER_INIT.pack(self.width, self.height, BGRX8888.pack(), len(name)) + name
        self.state = State.NORMAL
        events.append(ClientInitReceived(self.shared))
        return 1

    # --- client messages --------------------------------------------------------------------------------------

    def _read_message(self, pos: int, events: list[Event]) -> int:
        if self._skip:
            dropped = min(self._skip, len(self._buffer) - pos)
            self._skip -= dropped
            return dropped  # 0 when nothing is buffered: wait for more
        if not self._need(pos, 1):
            return 0
        buf = self._buffer
        kind = buf[pos]
        if kind == MSG_FRAMEBUFFER_UPDATE_REQUEST:
            if not self._need(pos, UPDATE_REQUEST_MSG.size):
                return 0
            _, incremental, x, y, w, h = UPDATE_REQUEST_MSG.unpack_from(buf, pos)
            events.append(UpdateRequested(incremental != 0, x, y, w, h))
            return UPDATE_REQUEST_MSG.size
        if kind == MSG_POINTER_EVENT:
            if not self._need(pos, POINTER_EVENT_MSG.size):
                return 0
            _, buttons, x, y = POINTER_EVENT_MSG.unpack_from(buf, pos)
            events.append(Pointer(buttons, x, y))
            return POINTER_EVENT_MSG.size
        if kind == MSG_KEY_EVENT:
            if not self._need(pos, KEY_EVENT_MSG.size):
                return 0
            _, down, keysym = KEY_EVENT_MSG.unpack_from(buf, pos)
            events.append(Key(down != 0, keysym))
            return KEY_EVENT_MSG.size
        if kind == MSG_QEMU:
            return self._read_qemu(pos, events)
        if kind == MSG_SET_PIXEL_FORMAT:
            return self._read_set_pixel_format(pos, events)
        if kind == MSG_SET_ENCODINGS:
            return self._read_set_encodings(pos, events)
        if kind == MSG_CLIENT_CUT_TEXT:
            return self._read_cut_text(pos, events)
        if kind == MSG_ENABLE_CONTINUOUS_UPDATES:
            if not self._need(pos, CONTINUOUS_UPDATES_MSG.size):
                return 0
            _, enable, x, y, w, h = CONTINUOUS_UPDATES_MSG.unpack_from(buf, pos)
            events.append(ContinuousUpdates(enable != 0, x, y, w, h))
            return CONTINUOUS_UPDATES_MSG.size
        if kind == MSG_CLIENT_FENCE:
            return self._read_fence(pos, events)
        if kind == MSG_SET_DESKTOP_SIZE:
            return self._read_set_desktop_size(pos, events)
        raise ProtocolError(f"unknown client message type {kind}")

    def _read_qemu(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, QEMU_HEADER.size):
            return 0
        _, subtype = QEMU_HEADER.unpack_from(self._buffer, pos)
        if subtype != QEMU_EXTENDED_KEY_EVENT:
            raise ProtocolError(f"unsupported QEMU client message subtype {subtype}")
        if not self._need(pos, QEMU_EXTENDED_KEY_MSG.size):
            return 0
        _, _, down, keysym, keycode = QEMU_EXTENDED_KEY_MSG.unpack_from(self._buffer, pos)
        events.append(ExtendedKey(down != 0, keysym, keycode))
        return QEMU_EXTENDED_KEY_MSG.size

    def _read_set_pixel_format(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, SET_PIXEL_FORMAT_MSG.size):
            return 0
        _, raw = SET_PIXEL_FORMAT_MSG.unpack_from(self._buffer, pos)
        fmt = PixelFormat.unpack(raw)
        problem = fmt.problem()
        if problem is not None:
            raise ProtocolError(f"SetPixelFormat: {problem}")
        self.pixel_format = fmt
        if not fmt.true_colour:
            # The colour map is empty after SetPixelFormat (rfbproto); fill it before any update uses it.
            self._outbox += COLOUR_MAP_HEADER.pack(MSG_SET_COLOUR_MAP_ENTRIES, 0, len(BGR233_PALETTE))
            self._outbox += pack_colour_map(BGR233_PALETTE)
        events.append(PixelFormatChanged(fmt))
        return SET_PIXEL_FORMAT_MSG.size

    def _read_set_encodings(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, SET_ENCODINGS_HEADER.size):
            return 0
        count: int = SET_ENCODINGS_HEADER.unpack_from(self._buffer, pos)[1]
        if count > self.max_encodings:
            raise ProtocolError(f"SetEncodings lists {count} encodings, more than the limit of {self.max_encodings}")
        size = SET_ENCODINGS_HEADER.size + 4 * count
        if not self._need(pos, size):
            return 0
        encodings = struct.unpack_from(f">{count}i", self._buffer, pos + SET_ENCODINGS_HEADER.size)
        before = self.encodings
        self.encodings = encodings
        if self._announce_continuous_updates and ENCODING_CONTINUOUS_UPDATES in encodings \
                and ENCODING_CONTINUOUS_UPDATES not in before:
            self._outbox += U8.pack(MSG_END_OF_CONTINUOUS_UPDATES)
        if self._announce_fences and ENCODING_FENCE in encodings and ENCODING_FENCE not in before:
            self._outbox += FENCE_HEADER.pack(MSG_SERVER_FENCE, FENCE_REQUEST, 0)
        if self._announce_clipboard and ENCODING_EXTENDED_CLIPBOARD in encodings and not self.extended_clipboard:
            self._outbox += extclip.message(MSG_SERVER_CUT_TEXT, extclip.caps(self.max_cut_text))
            self.extended_clipboard = True
        events.append(EncodingsSet(encodings))
        return size

    def _read_cut_text(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, CLIENT_CUT_TEXT_HEADER.size):
            return 0
        field: int = CLIENT_CUT_TEXT_HEADER.unpack_from(self._buffer, pos)[1]
        extended, length, limit = extclip.cut_text_length(field, self.max_cut_text)
        if extended and not self.extended_clipboard:  # allowed once we announced it
            raise ProtocolError(f"ClientCutText of {field} bytes (an Extended Clipboard message, which was "
                                "not announced)")
        if length > limit:
            self._skip = length
            events.append(CutTextTooLarge(length, limit))
            return CLIENT_CUT_TEXT_HEADER.size
        size = CLIENT_CUT_TEXT_HEADER.size + length
        if not self._need(pos, size):
            return 0
        payload = bytes(self._buffer[pos + CLIENT_CUT_TEXT_HEADER.size : pos + size])
        if extended:
            events.append(extclip.parse(payload, max_size=self.max_cut_text))
        else:
            events.append(CutText(payload.decode("latin-1")))
        return size

    def _read_fence(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, CLIENT_FENCE_HEADER.size):
            return 0
        flags: int
        length: int
        _, flags, length = CLIENT_FENCE_HEADER.unpack_from(self._buffer, pos)
        if length > FENCE_MAX_PAYLOAD:
            raise ProtocolError(f"ClientFence payload of {length} bytes exceeds {FENCE_MAX_PAYLOAD}")
        size = CLIENT_FENCE_HEADER.size + length
        if not self._need(pos, size):
            return 0
        events.append(Fence(flags, bytes(self._buffer[pos + CLIENT_FENCE_HEADER.size : pos + size])))
        return size

    def _read_set_desktop_size(self, pos: int, events: list[Event]) -> int:
        if not self._need(pos, SET_DESKTOP_SIZE_HEADER.size):
            return 0
        count: int
        _, width, height, count = SET_DESKTOP_SIZE_HEADER.unpack_from(self._buffer, pos)
        size = SET_DESKTOP_SIZE_HEADER.size + SCREEN.size * count  # count is a U8: at most 4 KiB
        if not self._need(pos, size):
            return 0
        screens = tuple(Screen(*SCREEN.unpack_from(self._buffer, pos + SET_DESKTOP_SIZE_HEADER.size + i * SCREEN.size))
                        for i in range(count))
        events.append(DesktopSizeRequested(width, height, screens))
        return size

    # --- output -----------------------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the connection queued itself (handshake replies, ServerInit, colour map); send them first."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def _message(self, body: bytes) -> bytes:
        if self.state is not State.NORMAL:
            raise LocalProtocolError(f"cannot send messages in state {self.state.value}")
        return self.data_to_send() + body

    def framebuffer_update(self, rects: Iterable[bytes], *, last_rect: bool = False) -> bytes:
        """A FramebufferUpdate of complete rectangles (header + payload each, see rfb.encodings).

        ``last_rect`` ends the message with a LastRect pseudo-rectangle instead of counting (the viewer must
        have asked for it); more than 65535 rectangles need it.
        """
        if last_rect and not self.supports(ENCODING_LAST_RECT):
            raise LocalProtocolError("the viewer did not ask for the LastRect pseudo-encoding")
        return self._message(framebuffer_update_message(rects, last_rect_terminated=last_rect))

    def framebuffer_update_header(self, count: int) -> bytes:
        """The start of a FramebufferUpdate of ``count`` complete rectangles that the owner sends after it as
        they are (so a large rectangle is not copied into one message)."""
        return self._message(update_header(count))

    def bell(self) -> bytes:
        return self._message(U8.pack(MSG_BELL))

    def server_cut_text(self, text: str) -> bytes:
        """The server's clipboard; RFB carries ISO 8859-1, so other characters become '?'."""
        data = text.encode("latin-1", errors="replace")
        return self._message(CUT_TEXT_HEADER.pack(MSG_SERVER_CUT_TEXT, len(data)) + data)

    def clipboard(self, payload: bytes) -> bytes:
        """An Extended Clipboard message (rfb.clipboard builds the payload) as ServerCutText."""
        if not self.extended_clipboard:
            raise LocalProtocolError("the Extended Clipboard was not negotiated with this viewer")
        return self._message(extclip.message(MSG_SERVER_CUT_TEXT, payload))

    def end_of_continuous_updates(self) -> bytes:
        """The answer to EnableContinuousUpdates with enable false (and the extension's announcement)."""
        if not self.supports(ENCODING_CONTINUOUS_UPDATES):
            raise LocalProtocolError("the viewer did not ask for the ContinuousUpdates pseudo-encoding")
        return self._message(U8.pack(MSG_END_OF_CONTINUOUS_UPDATES))

    def fence(self, flags: int, payload: bytes = b"") -> bytes:
        """A ServerFence (a request if ``flags`` has FENCE_REQUEST, else the answer to a ClientFence)."""
        if not self.supports(ENCODING_FENCE):
            raise LocalProtocolError("the viewer did not ask for the Fence pseudo-encoding")
        if len(payload) > FENCE_MAX_PAYLOAD or not 0 <= flags <= 0xFFFF_FFFF:
            raise ValueError("fence payload over 64 bytes or flags out of range")
        return self._message(FENCE_HEADER.pack(MSG_SERVER_FENCE, flags, len(payload)) + payload)

    def close(self) -> None:
        """Stop reading; later :meth:`receive_data` calls ignore their bytes."""
        self.state = State.CLOSED
        self._buffer.clear()
