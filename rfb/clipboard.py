"""The Extended Clipboard extension (pseudo-encoding 0xC0A1E5CE), for both roles, without I/O.

Once both sides know of it (the client listed the pseudo-encoding; the server answered with its caps), a
ServerCutText or ClientCutText whose S32 length is negative carries -length bytes of extended payload instead
of Latin-1 text (rfbproto, "Extended Clipboard Pseudo-Encoding"). The payload starts with a U32 of flags:
formats in the low 16 bits, actions in the top byte, then

- caps: one U32 per format bit set, lowest bit first: the largest size of that format sent unasked;
- request, peek, notify: nothing more;
- provide: one zlib stream holding, per format bit set, a U32 size and that many bytes.

Text is UTF-8; the spec asks for CRLF line ends and a NUL terminator. QEMU passes on what its vdagent got from
the guest (LF, no NUL), so :func:`decode_text` takes both and :func:`encode_text` writes either.

The peer is not trusted: :func:`parse` raises :class:`ProtocolError` for anything malformed, and a provide
larger than the limit is inflated only up to the limit (zlib's ``max_length``) and reported as
:class:`CutTextTooLarge`, never buffered whole.
"""

from __future__ import annotations

import struct
import zlib

from rfb.errors import ProtocolError
from rfb.events import (
    ClipboardCaps,
    ClipboardEvent,
    ClipboardNotify,
    ClipboardPeek,
    ClipboardProvide,
    ClipboardRequest,
    CutTextTooLarge,
)
from rfb.wire import CUT_TEXT_HEADER, ENCODING_EXTENDED_CLIPBOARD, U32

# --- flags -----------------------------------------------------------------------------------------------------
FORMAT_TEXT = 1 << 0
FORMAT_RTF = 1 << 1
FORMAT_HTML = 1 << 2
FORMAT_DIB = 1 << 3
FORMAT_FILES = 1 << 4
FORMAT_MASK = 0xFFFF
ACTION_CAPS = 1 << 24
ACTION_REQUEST = 1 << 25
ACTION_PEEK = 1 << 26
ACTION_NOTIFY = 1 << 27
ACTION_PROVIDE = 1 << 28
ACTION_MASK = 0xFF00_0000
#: What this package takes and answers: text only, every action but peek is ours to send.
OUR_ACTIONS = ACTION_CAPS | ACTION_REQUEST | ACTION_PEEK | ACTION_NOTIFY | ACTION_PROVIDE

#: QEMU's own limit, and the default here: text of up to 1 MiB (inflated).
DEFAULT_MAX_SIZE = 1 << 20
#: A message other than provide is its flags and at most 16 sizes: anything longer is malformed.
MAX_SMALL_PAYLOAD = 4 + 16 * 4

PSEUDO_ENCODING = ENCODING_EXTENDED_CLIPBOARD
_SIZE = struct.Struct(">I")


def payload_limit(max_size: int) -> int:
    """The largest extended payload worth reading for a text limit of ``max_size`` (zlib can expand a little
    and there is the flags word and the size word): beyond it, the message is skipped unread."""
    return 4 + max_size + max_size // 1000 + 64


def cut_text_length(field: int, max_size: int) -> tuple[bool, int, int]:
    """A cut-text message's U32 length ``field`` read as the extension says, for either role: (extended, bytes
    that follow, the most worth reading). A negative S32 is an extended message of ``-field`` bytes; the caller
    refuses one it did not agree to."""
    if field & 0x8000_0000:
        return True, (1 << 32) - field, payload_limit(max_size)
    return False, field, max_size


def parse(payload: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> ClipboardEvent | CutTextTooLarge:
    """One extended message's payload (after the 8-byte cut-text header) as an event."""
    if len(payload) < 4:
        raise ProtocolError(f"extended clipboard message of {len(payload)} bytes has no flags")
    (flags,) = U32.unpack_from(payload)
    formats, actions = flags & FORMAT_MASK, flags & ACTION_MASK
    rest = payload[4:]
    action = actions & -actions  # the lowest action bit decides; the spec allows only one per message
    if action == ACTION_PROVIDE:
        return _parse_provide(formats, rest, max_size)
    if len(payload) > MAX_SMALL_PAYLOAD:
        raise ProtocolError(f"extended clipboard message of {len(payload)} bytes (only a provide may be longer "
                            f"than {MAX_SMALL_PAYLOAD})")
    if action == ACTION_CAPS:
        bits = [1 << i for i in range(16) if formats >> i & 1]
        if len(rest) < 4 * len(bits):
            raise ProtocolError(f"extended clipboard caps list {len(bits)} formats but carry {len(rest) // 4} sizes")
        sizes = tuple((bit, _SIZE.unpack_from(rest, 4 * i)[0]) for i, bit in enumerate(bits))
        return ClipboardCaps(formats, actions, sizes)
    if action == ACTION_REQUEST:
        return ClipboardRequest(formats)
    if action == ACTION_PEEK:
        return ClipboardPeek(formats)
    if action == ACTION_NOTIFY:
        return ClipboardNotify(formats)
    raise ProtocolError(f"extended clipboard message with no known action (flags {flags:#010x})")


def _parse_provide(formats: int, compressed: bytes, max_size: int) -> ClipboardProvide | CutTextTooLarge:
    if not formats & FORMAT_TEXT:
        return ClipboardProvide(formats, None)  # text comes first; other formats are not read at all
    inflater = zlib.decompressobj()
    try:
        head = inflater.decompress(compressed, 4)
        if len(head) < 4:
            raise ProtocolError("extended clipboard provide ends before its text size")
        (size,) = _SIZE.unpack(head)
        if size > max_size:
            return CutTextTooLarge(size, max_size)
        text = inflater.decompress(inflater.unconsumed_tail, size)
    except zlib.error as exc:
        raise ProtocolError(f"extended clipboard provide is not a zlib stream: {exc}") from None
    if len(text) < size:
        raise ProtocolError(f"extended clipboard provide holds {len(text)} bytes of text, not {size}")
    return ClipboardProvide(formats, text)


# --- messages we send ------------------------------------------------------------------------------------------


def message(msg_type: int, payload: bytes) -> bytes:
    """A whole ServerCutText (3) or ClientCutText (6) carrying ``payload``: its length goes negative."""
    return CUT_TEXT_HEADER.pack(msg_type, (-len(payload)) & 0xFFFF_FFFF) + payload


def caps(max_text: int = DEFAULT_MAX_SIZE, actions: int = OUR_ACTIONS) -> bytes:
    """Our capabilities: text only, up to ``max_text`` bytes unasked."""
    return U32.pack(actions | ACTION_CAPS | FORMAT_TEXT) + _SIZE.pack(max_text)


def request(formats: int = FORMAT_TEXT) -> bytes:
    return U32.pack(ACTION_REQUEST | formats)


def peek() -> bytes:
    return U32.pack(ACTION_PEEK)


def notify(formats: int = FORMAT_TEXT) -> bytes:
    """The clipboard changed and holds ``formats`` (0: it is empty)."""
    return U32.pack(ACTION_NOTIFY | formats)


def provide_text(text: bytes | None, level: int = 6) -> bytes:
    """The clipboard's text (``None``: no text, an empty provide)."""
    if text is None:
        return U32.pack(ACTION_PROVIDE)
    return U32.pack(ACTION_PROVIDE | FORMAT_TEXT) + zlib.compress(_SIZE.pack(len(text)) + text, level)


def caps_text_size(event: ClipboardCaps) -> int | None:
    """The most text the peer takes unasked (None: it did not list text)."""
    return next((size for bit, size in event.sizes if bit == FORMAT_TEXT), None)


def decode_text(data: bytes) -> str:
    """Text as it travels (UTF-8, CRLF or LF, maybe NUL-terminated) as a Python string with LF line ends."""
    end = data.find(b"\x00")
    if end >= 0:
        data = data[:end]
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def encode_text(text: str, *, spec: bool = True) -> bytes:
    """Text for the wire: the spec's CRLF and NUL for viewers (``spec``), or LF and no NUL for QEMU's vdagent
    (what a guest's X clipboard holds)."""
    if spec:
        return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8") + b"\x00"
    return text.encode("utf-8")
