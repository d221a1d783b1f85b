"""Fuzz targets: one function per parser that sees bytes from outside the process (and one encoder: Hextile's C
part, fed the guest's pixels).

Each target takes arbitrary bytes, feeds them to a fresh parser (whole, and again split at points derived from
the data, so a crash always reproduces from the same bytes), and lets only the parser's documented exception
type escape as "fine". Anything else escaping a target is a crash. Some targets check one more property the
module documents (e.g. QMP framing does not depend on how the bytes were split, a decoded control frame
re-encodes to itself).

The targets are plain functions so they run under atheris, under hypothesis (``fuzz/run.py``) and in pytest
(``tests/test_fuzz_targets.py``) alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clients.agent.protocol import AgentConnection, AgentServerConnection, Answer, ConnState
from clients.monitor import commands as monitor_commands
from core_daemon.guest_reads import parse_cpu_states
from core_daemon.qmp_protocol import Command, QmpServerConnection
from core_daemon.qmp_values import arguments_problem
from ipc import messages as ipc_messages
from ipc.channel import RemoteError
from rfb import clipboard as extclip
from rfb import vencrypt
from rfb.client import (
    BGRX8888,
    ENCODING_CURSOR,
    ENCODING_DESKTOP_SIZE,
    ENCODING_EXTENDED_CLIPBOARD,
    ENCODING_QEMU_LED_STATE,
    ENCODING_RAW,
    RemoteProtocolError,
    RfbClient,
)
from rfb.client import State as RfbClientState
from rfb.encodings import HextileEncoder
from rfb.encodings.base import Arena
from rfb.encodings.hextile_reference import ReferenceHextileEncoder
from rfb.errors import ProtocolError as RfbServerProtocolError
from rfb.events import TlsRequested
from rfb.server import RfbServerConnection
from rfb.server import State as RfbServerState
from rfb.wire import ENCODING_HEXTILE, RECT_HEADER, PixelFormat, rect_header

#: ``FUZZ_SKIP_KNOWN=1`` (``fuzz/run.py --skip-known``) steps over the reported, not yet fixed bugs listed in
#: tests/test_fuzz_targets.py KNOWN_CRASHES, so a long run goes on looking for new ones.
SKIP_KNOWN = os.environ.get("FUZZ_SKIP_KNOWN") == "1"

#: What a valid QMP greeting of QEMU 7.2 looks like (the core re-exports QEMU's).
_QMP_GREETING: dict[str, Any] = {
    "QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}


def chunks(data: bytes, max_pieces: int = 16) -> Iterator[bytes]:
    """``data`` split at up to ``max_pieces - 1`` points derived from the data itself (deterministic)."""
    if len(data) < 2:
        yield data
        return
    rng = random.Random(zlib.crc32(data))
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(max_pieces))))
    start = 0
    for cut in [*cuts, len(data)]:
        yield data[start:cut]
        start = cut


def _flag(data: bytes, bit: int) -> bool:
    """A bit of the data's checksum: picks a parser variant (e.g. with or without a password) reproducibly."""
    return bool(zlib.adler32(data) >> bit & 1)


# --- QMP from peers (core_daemon/qmp_protocol.py) -----------------------------------------------------------------


def _qmp_events(pieces: Iterator[bytes] | list[bytes], max_message: int) -> list[str]:
    conn = QmpServerConnection(_QMP_GREETING, max_message=max_message)
    conn.greeting_bytes()
    out: list[str] = []
    biggest = 0
    for piece in pieces:
        biggest = max(biggest, len(piece))
        for event in conn.receive_data(piece):
            out.append(repr(event))
            if isinstance(event, Command):
                _check_strict(event.arguments)
        # Bounded by the limit plus one read (whitespace before a value is kept until the value completes);
        # a closed connection reads nothing more, so what it holds no longer grows.
        if not conn.closed:
            assert len(conn._framer.buffer) <= max_message + biggest, "QMP framer buffers past its limit"
    return out


def _check_strict(arguments: dict[str, Any] | None) -> None:
    """The core's check of what may reach QEMU (core_daemon/qmp_values.py) never raises, and whatever it lets
    through serialises as strict JSON in UTF-8, which is what QEMU's parser takes."""
    if arguments_problem(arguments) is None:
        json.dumps(arguments, allow_nan=False).encode("utf-8")


def fuzz_qmp(data: bytes) -> None:
    """QmpServerConnection.receive_data never raises; whole or split, the peer gets the same answers."""
    max_message = 1 << 20 if _flag(data, 0) else 64
    whole = _qmp_events([data], max_message)
    split = _qmp_events(chunks(data), max_message)
    if max_message > len(data):  # below the limit, where the split falls must not matter
        assert whole == split, f"QMP events depend on how the bytes were split:\n{whole}\n{split}"


# --- RFB from QEMU's VNC server, read by the core (rfb/client.py) --------------------------------------


def fuzz_rfb_client(data: bytes) -> None:
    """RfbClient.receive_data raises only RemoteProtocolError (and AuthenticationFailed, a subclass).

    The handshake is fed a byte at a time (it is short), so the owner turns on the pseudo-encodings right after
    ServerInit, as the capture does; the rest goes in data-derived chunks.
    """
    conn = RfbClient(max_name=256, max_cut_text=4096, max_cursor=64)
    pos = 0
    try:
        while pos < len(data) and pos < 1024 and conn.state is not RfbClientState.NORMAL:
            conn.receive_data(data[pos : pos + 1])
            conn.data_to_send()
            pos += 1
        if conn.state is RfbClientState.NORMAL:
            conn.set_pixel_format(BGRX8888)
            conn.set_encodings([ENCODING_RAW, ENCODING_DESKTOP_SIZE, ENCODING_CURSOR, ENCODING_QEMU_LED_STATE,
                                ENCODING_EXTENDED_CLIPBOARD])
            conn.framebuffer_update_request(0, 0, max(conn.width, 1), max(conn.height, 1), incremental=False)
        for piece in chunks(data[pos:]):
            conn.receive_data(piece)
            conn.data_to_send()
            # The bound the module promises: a row of pixels, a cursor, a name or a cut text at most is buffered.
            assert conn.buffered <= 0xFFFF * 4 + 64, conn.buffered
    except RemoteProtocolError:
        assert conn.state is RfbClientState.CLOSED


# --- RFB from viewers (rfb/server.py) ---------------------------------------------------------------------


def _rfb_server_events(pieces: Iterator[bytes] | list[bytes], password: str | None) -> list[str]:
    conn = RfbServerConnection(width=640, height=480, name="fuzz", password=password, max_cut_text=4096,
                               max_encodings=64, continuous_updates=True, fences=True, clipboard=True,
                               challenge=bytes(range(16)))
    conn.data_to_send()
    out: list[str] = []
    for piece in pieces:
        try:
            out.extend(repr(event) for event in conn.receive_data(piece))
        except RfbServerProtocolError as exc:
            assert conn.state is RfbServerState.CLOSED
            out.extend(repr(event) for event in exc.events)
            out.append("ProtocolError")
            conn.data_to_send()
            break
        conn.data_to_send()
    return out


def _vencrypt_events(data: bytes, split: bool) -> list[str]:
    """The VeNCrypt variant: the handshake a byte at a time (a real owner runs TLS after ``TlsRequested``, so
    nothing follows the subtype in one read; here ``tls_established`` stands for the handshake), the rest whole or
    in data-derived chunks."""
    password = "secret" if data[15:19] in (struct.pack(">I", vencrypt.TLS_VNC), struct.pack(">I", vencrypt.X509_VNC)) \
        else None
    subtypes = (vencrypt.X509_VNC, vencrypt.TLS_VNC) if password else (vencrypt.X509_NONE, vencrypt.TLS_NONE)
    conn = RfbServerConnection(width=640, height=480, name="fuzz", password=password, max_cut_text=4096,
                               max_encodings=64, challenge=bytes(range(16)), vencrypt_subtypes=subtypes,
                               plain_too=_flag(data, 3))
    conn.data_to_send()
    out: list[str] = []
    pos = 0
    pieces = iter([data[pos:]])
    try:
        while pos < len(data) and pos < 128 and conn.state not in (RfbServerState.NORMAL, RfbServerState.CLOSED):
            for event in conn.receive_data(data[pos : pos + 1]):
                out.append(repr(event))
                if isinstance(event, TlsRequested):
                    out.extend(repr(later) for later in conn.tls_established())
            conn.data_to_send()
            pos += 1
        pieces = chunks(data[pos:]) if split else iter([data[pos:]])
        for piece in pieces:
            out.extend(repr(event) for event in conn.receive_data(piece))
            conn.data_to_send()
    except RfbServerProtocolError as exc:
        assert conn.state is RfbServerState.CLOSED
        out.extend(repr(event) for event in exc.events)
        out.append("ProtocolError")
    return out


def fuzz_rfb_server(data: bytes) -> None:
    """RfbServerConnection.receive_data raises only ProtocolError; whole or split, the same events. Inputs that
    choose security type 19 (or a checksum bit) run the VeNCrypt variant."""
    if data[12:13] == b"\x13" or _flag(data, 2):
        whole, split = _vencrypt_events(data, False), _vencrypt_events(data, True)
    else:
        password = "secret" if _flag(data, 1) else None
        whole = _rfb_server_events([data], password)
        split = _rfb_server_events(chunks(data), password)
    assert whole == split, f"RFB server events depend on how the bytes were split:\n{whole}\n{split}"


# --- Extended Clipboard payloads (rfb/clipboard.py) --------------------------------------------------------------


def fuzz_clipboard(data: bytes) -> None:
    """parse() raises only ProtocolError; a provide's text never exceeds the limit (inflating stops there), and
    decode_text takes whatever bytes it returns. The data is one payload, or a provide of it compressed (so the
    inflater sees valid streams of anything, not only garbage)."""
    limit = 4096
    payload = extclip.provide_text(data) if _flag(data, 2) else data
    try:
        event = extclip.parse(payload, max_size=limit)
    except RfbServerProtocolError:
        return
    text = getattr(event, "text", None)
    if text is not None:
        assert len(text) <= limit, len(text)
        extclip.decode_text(text)


# --- control channel frames (ipc/messages.py) ---------------------------------------------------------------------


def fuzz_ipc(data: bytes) -> None:
    """decode() raises only ipc.messages.ProtocolError; whatever it accepts re-encodes to an equal message."""
    try:
        message = ipc_messages.decode(data)
    except ipc_messages.ProtocolError as exc:
        assert isinstance(exc.code, ipc_messages.ErrorCode)
        return
    if SKIP_KNOWN and isinstance(message, ipc_messages.Welcome) \
            and message.version not in ipc_messages.SUPPORTED_VERSIONS:
        return  # known: decode accepts a welcome whose "version" the frame's "v" does not match
    again = ipc_messages.decode(message.encode())
    assert repr(again) == repr(message), f"{message!r} re-encodes to {again!r}"
    if isinstance(message, ipc_messages.Request) and isinstance(message.body, ipc_messages.QmpOp):
        _check_strict(message.body.arguments)  # what a client asks the core to send QEMU


# --- qemu-ga bytes relayed from the guest (clients/agent/protocol.py) ----------------------------------------------

_SYNC_ID = 42  # the seeds answer guest-sync-delimited with this id


def _proxy_replies(pieces: Iterator[bytes] | list[bytes], max_token_size: int, max_token_count: int) -> list[bytes]:
    conn = AgentServerConnection(max_token_size=max_token_size, max_token_count=max_token_count)
    out: list[bytes] = []
    for piece in pieces:
        for event in conn.receive_data(piece):
            if isinstance(event, Answer):
                reply = json.loads(event.data.lstrip(b"\xff"))  # what qemu-ga answers itself: one JSON line
                assert event.data.endswith(b"\n") and ("error" in reply or "return" in reply), event.data
                out.append(event.data)
            else:  # a request the proxy runs: its reply echoes the id, whatever value it is
                out.append(conn.return_bytes(event, {"command": event.command, "arguments": event.arguments}))
        # Bounded by the limits: the value's tokens and the one token being read.
        assert conn.buffered <= 2 * max_token_size + 1, "agent proxy reader buffers past its limit"
    return out


def fuzz_agent(data: bytes) -> None:
    """Both sides of the qemu-ga protocol never raise.

    The host side (AgentConnection, the agent's replies): the owner's next step is always a valid call. The
    agent side (AgentServerConnection, a script's requests on the proxy, QEMU's JSON reader): what it answers
    does not depend on how the bytes were split, its answers are JSON lines, and its memory is bounded.
    """
    conn = AgentConnection(max_line=256 if _flag(data, 2) else 1 << 16)
    conn.sync(_SYNC_ID)
    for piece in chunks(data):
        for event in conn.receive_data(piece):
            assert event is not None
        # What the service does next: a command when synchronised, a new sync when the stream was lost.
        if conn.state is ConnState.IDLE:
            conn.command("guest-ping" if _flag(piece, 3) else "guest-info", {"x": 1} if _flag(piece, 4) else None)
        elif conn.state is ConnState.UNSYNCED:
            conn.sync(_SYNC_ID)
        assert len(conn._buf) <= conn.max_line, "agent line buffer past its limit"
    size, count = (64, 16) if _flag(data, 5) else (1 << 16, 4096)
    whole = _proxy_replies([data], size, count)
    split = _proxy_replies(chunks(data), size, count)
    assert whole == split, f"agent proxy answers depend on how the bytes were split:\n{whole}\n{split}"


# --- monitor input (clients/monitor/parser.py through commands.execute) -------------------------------------------


class _RefusingBackend:
    """Every QMP command fails the way a policy denial does: the parsing and error paths run, no I/O."""

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise RemoteError("GenericError", f"fuzz: {command} not executed")

    async def screendump(self, path: Path, image_format: str) -> None:
        return None

    def vnc_servers(self) -> list[dict[str, Any]]:
        return [{"id": "default", "server": [{"host": "127.0.0.1", "service": "5900", "family": "ipv4",
                                               "websocket": False, "auth": "none"}], "clients": []}]


_monitor_loop: asyncio.AbstractEventLoop | None = None


def _run(coro: Any) -> None:
    """Drive a handler coroutine; none of them should block when every QMP call fails at once."""
    global _monitor_loop
    if _monitor_loop is None:
        _monitor_loop = asyncio.new_event_loop()
    _monitor_loop.run_until_complete(asyncio.wait_for(coro, timeout=5))


def fuzz_monitor(data: bytes) -> None:
    """Monitor lines (decoded as the service does) never raise out of execute(); completion never raises.

    ``help_text`` is reached through ``execute("help ...")`` only: it takes the stripped, non-empty ``S`` argument.
    """
    text = data.decode("utf-8", errors="replace")
    output: list[str] = []
    for raw in text.split("\n")[:8]:
        line = raw.rstrip("\r")
        session = monitor_commands.Session(_RefusingBackend(), output.append)
        _run(monitor_commands.execute(session, line))
        monitor_commands.completions(line)  # what `vmfront monitor` asks on TAB, with the line typed so far


# --- QEMU's guest-memory dump, read by the core for the CPU state (core_daemon/guest_reads.py) -------------------


def fuzz_dump(data: bytes) -> None:
    """parse_cpu_states raises only ValueError; what it returns holds 64-bit registers and 32-bit selectors."""
    try:
        _, cpus = parse_cpu_states(data)
    except ValueError:
        return
    for cpu in cpus:
        assert all(0 <= cpu[name] < 1 << 64 for name in ("rax", "rip", "rflags", "cr0", "cr4"))
        assert all(0 <= cpu[seg]["selector"] < 1 << 32 for seg in ("cs", "ss", "gdt"))


# --- guest pixels encoded as Hextile (rfb/encodings/_hextile.c against rfb/encodings/hextile_reference.py) ------

#: A pixel format of each size the encoders take (the bytes only serve as identities to Hextile).
_HEXTILE_FORMATS = {1: PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),
                    2: PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),
                    4: PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)}


def hextile_frame(data: bytes) -> tuple[np.ndarray[Any, Any], int]:
    """(a (height, width) view inside a wider array, bytes per pixel) from fuzz bytes.

    Byte 0: bits 0-1 the pixel size (1, 2, else 4), bit 2 raw pixel values (else palette indices), bits 3-7
    how many pixels the view starts into its row. Byte 1 and 2: width and height - 1 (modulo 64). Byte 3: the
    palette's size - 1 (modulo 20). Then the palette's pixels and one index byte per pixel (or the pixels),
    repeated as needed.
    """
    head = data[:4].ljust(4, b"\x00")
    bpp = {0: 1, 1: 2}.get(head[0] & 3, 4)
    raw_values, pad = bool(head[0] & 4), head[0] >> 3
    width, height, colours = 1 + head[1] % 64, 1 + head[2] % 64, 1 + head[3] % 20
    body = data[4:] or b"\x00"
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[bpp]
    count = width * height
    if raw_values:
        values = np.frombuffer((body * (count * bpp // len(body) + 1))[: count * bpp], dtype=dtype)
    else:
        palette_bytes = (body * (colours * bpp // len(body) + 1))[: colours * bpp]
        palette = np.frombuffer(palette_bytes, dtype=dtype)
        rest = body[colours * bpp :] or b"\x00"
        indices = np.frombuffer((rest * (count // len(rest) + 1))[:count], dtype=np.uint8) % colours
        values = palette[indices]
    whole = np.zeros((height, pad + width), dtype=dtype)
    whole[:, pad:] = values.reshape(height, width)
    return whole[:, pad:], bpp


def fuzz_hextile(data: bytes) -> None:
    """The C Hextile encoder writes exactly the reference's bytes, for any pixels of any size, from a strided
    view, to the heap and into a worker's arena; nothing raises."""
    view, bpp = hextile_frame(data)
    height, width = view.shape
    fmt = _HEXTILE_FORMATS[bpp]
    reference = ReferenceHextileEncoder().encode(view, width, height, fmt)
    assert HextileEncoder().encode(view, width, height, fmt) == reference, "C and reference Hextile differ"
    encoder = HextileEncoder()
    encoder.arena = Arena(memoryview(bytearray(64 + RECT_HEADER.size + width * height * (bpp + 1))), 64)
    [piece], _ = encoder.pieces(1, 2, width, height, view, fmt)
    assert bytes(piece) == rect_header(1, 2, width, height, ENCODING_HEXTILE) + reference
    assert encoder.arena.offset == 64 + len(piece), "the arena was not used as it should"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "qmp": fuzz_qmp,
    "rfb_client": fuzz_rfb_client,
    "rfb_server": fuzz_rfb_server,
    "clipboard": fuzz_clipboard,
    "ipc": fuzz_ipc,
    "agent": fuzz_agent,
    "monitor": fuzz_monitor,
    "dump": fuzz_dump,
    "hextile": fuzz_hextile,
}
