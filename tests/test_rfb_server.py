"""The sans-IO RFB server connection: handshakes, VNC authentication, client messages, limits, and fuzzing.

Byte sequences are written out from RFC 6143 / rfbproto here; vncdotool's client checks interoperation
(3.8 handshake with and without a password); the DES check uses VNC challenge/response pairs captured from
real sessions (published in mitchellh/go-vnc's tests) and the FIPS 46 DES example.
"""

from __future__ import annotations

import itertools
import struct
import warnings
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rfb import auth
from rfb.encodings import desktop_size_rect
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
    UpdateRequested,
)
from rfb.pixels import BGR233_PALETTE
from rfb.server import RfbServerConnection, State, negotiate_version
from rfb.wire import BGRX8888, ENCODING_CONTINUOUS_UPDATES, ENCODING_FENCE, PixelFormat, Screen

CHALLENGE = bytes(range(16))
QEMU_FORMAT = bytes.fromhex("2018000100ff00ff00ff100800000000")
SERVER_INIT_64x32 = struct.pack(">HH", 64, 32) + BGRX8888.pack() + struct.pack(">I", 4) + b"test"


def server(**kwargs: object) -> RfbServerConnection:
    params: dict[str, object] = {"width": 64, "height": 32, "name": "test", "challenge": CHALLENGE}
    params.update(kwargs)
    conn = RfbServerConnection(**params)  # type: ignore[arg-type]
    assert conn.data_to_send() == b"RFB 003.008\n"
    return conn


def ready(**kwargs: object) -> RfbServerConnection:
    """A connection past the 3.8 None handshake."""
    conn = server(**kwargs)
    events = conn.receive_data(b"RFB 003.008\n\x01\x01")
    assert isinstance(events[-1], ClientInitReceived)
    conn.data_to_send()
    return conn


# --- handshakes ----------------------------------------------------------------------------------------------


def test_handshake_38_none() -> None:
    conn = server()
    assert conn.receive_data(b"RFB 003.008\n") == []
    assert conn.data_to_send() == b"\x01\x01"  # one type: None
    assert conn.receive_data(b"\x01") == [SecurityNegotiated((3, 8), (3, 8), 1)]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"  # 3.8 sends SecurityResult even for None
    assert conn.receive_data(b"\x00") == [ClientInitReceived(shared=False)]
    assert conn.data_to_send() == SERVER_INIT_64x32
    assert conn.state is State.NORMAL and conn.shared is False


def test_handshake_37_none_has_no_security_result() -> None:
    conn = server()
    conn.receive_data(b"RFB 003.007\n")
    assert conn.data_to_send() == b"\x01\x01"
    assert conn.receive_data(b"\x01") == [SecurityNegotiated((3, 7), (3, 7), 1)]
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"\x01") == [ClientInitReceived(shared=True)]
    assert conn.data_to_send() == SERVER_INIT_64x32


def test_handshake_33_none_server_chooses() -> None:
    conn = server()
    assert conn.receive_data(b"RFB 003.003\n") == [SecurityNegotiated((3, 3), (3, 3), 1)]
    assert conn.data_to_send() == b"\x00\x00\x00\x01"
    assert conn.receive_data(b"\x01") == [ClientInitReceived(shared=True)]
    assert conn.data_to_send() == SERVER_INIT_64x32


@pytest.mark.parametrize("version", [b"003.003", b"003.007", b"003.008"])
def test_vnc_auth_correct_password(version: bytes) -> None:
    conn = server(password="secret")
    response = auth.response_for("secret", CHALLENGE)
    if version == b"003.003":
        conn.receive_data(b"RFB " + version + b"\n")
        assert conn.data_to_send() == b"\x00\x00\x00\x02" + CHALLENGE
    else:
        conn.receive_data(b"RFB " + version + b"\n")
        assert conn.data_to_send() == b"\x01\x02"
        assert conn.receive_data(b"\x02") == []
        assert conn.data_to_send() == CHALLENGE
    minor = int(version[4:])
    assert conn.receive_data(response) == [SecurityNegotiated((3, minor), (3, minor), 2)]
    assert conn.data_to_send() == b"\x00\x00\x00\x00"
    assert conn.receive_data(b"\x01") == [ClientInitReceived(True)]
    assert conn.data_to_send() == SERVER_INIT_64x32


def test_external_auth_waits_for_the_owners_verdict() -> None:
    """The response goes to the owner (the client asks the core, which holds the password); what the viewer
    sends meanwhile waits, and is read once the verdict is in."""
    conn = server(external_auth=True)
    conn.receive_data(b"RFB 003.008\n")
    assert conn.data_to_send() == b"\x01\x02"
    conn.receive_data(b"\x02")
    assert conn.data_to_send() == CHALLENGE
    response = auth.response_for("anything", CHALLENGE)
    assert conn.receive_data(response + b"\x01") == [AuthResponse(CHALLENGE, response)]
    assert conn.state is State.AUTH_PENDING and conn.data_to_send() == b""
    assert conn.receive_data(b"\x03\x01\x00\x00\x00\x00\x00\x40\x00\x20") == []  # queued, not read
    events = conn.auth_result(True)
    assert events[:2] == [SecurityNegotiated((3, 8), (3, 8), 2), ClientInitReceived(True)]
    assert len(events) == 3 and conn.state is State.NORMAL
    assert conn.data_to_send() == b"\x00\x00\x00\x00" + SERVER_INIT_64x32
    with pytest.raises(LocalProtocolError):
        conn.auth_result(True)

    refused = server(external_auth=True)
    refused.receive_data(b"RFB 003.008\n\x02")
    refused.data_to_send()
    refused.receive_data(bytes(16))
    assert refused.auth_result(False, "Too many tries") == [AuthFailed("Too many tries")]
    assert refused.data_to_send() == b"\x00\x00\x00\x01" + struct.pack(">I", 14) + b"Too many tries"
    assert refused.closed
    with pytest.raises(ValueError):
        server(external_auth=True, password="x")


@pytest.mark.parametrize("version", [b"003.003", b"003.007", b"003.008"])
def test_vnc_auth_wrong_password(version: bytes) -> None:
    conn = server(password="secret")
    data = b"RFB " + version + b"\n" + (b"" if version == b"003.003" else b"\x02")
    conn.receive_data(data)
    conn.data_to_send()
    events = conn.receive_data(auth.response_for("Secret", CHALLENGE) + b"\x01")  # ClientInit is ignored
    assert events == [AuthFailed("Authentication failed")]
    expected = b"\x00\x00\x00\x01"
    if version == b"003.008":
        expected += struct.pack(">I", 21) + b"Authentication failed"
    assert conn.data_to_send() == expected
    assert conn.closed
    assert conn.receive_data(b"\x01\x02\x03") == []
    with pytest.raises(LocalProtocolError):
        conn.bell()


def test_handshake_byte_by_byte() -> None:
    conn = server(password="pw")
    stream = b"RFB 003.008\n\x02" + auth.response_for("pw", CHALLENGE) + b"\x01" + b"\x04\x01\x00\x00\x00\x00\x00\x61"
    events: list[Event] = []
    for i in range(len(stream)):
        events += conn.receive_data(stream[i : i + 1])
    assert events == [SecurityNegotiated((3, 8), (3, 8), 2), ClientInitReceived(True), Key(True, 0x61)]


@pytest.mark.parametrize(("written", "spoken"), [
    ((3, 3), (3, 3)), ((3, 4), (3, 3)), ((3, 5), (3, 3)), ((3, 6), (3, 3)), ((3, 7), (3, 7)), ((3, 8), (3, 8)),
    ((3, 9), (3, 8)), ((3, 889), (3, 8)), ((4, 0), (3, 8)), ((4, 1), (3, 8)), ((5, 0), (3, 8)),
    ((3, 2), None), ((3, 0), None), ((2, 9), None), ((0, 0), None),
])
def test_version_mapping(written: tuple[int, int], spoken: tuple[int, int] | None) -> None:
    assert negotiate_version(written) == spoken


def test_apple_and_35_viewers() -> None:
    conn = server()
    assert conn.receive_data(b"RFB 003.889\n") == []
    assert conn.data_to_send() == b"\x01\x01"  # a 3.8 security list
    conn = server()
    assert conn.receive_data(b"RFB 003.005\n") == [SecurityNegotiated((3, 3), (3, 5), 1)]
    assert conn.data_to_send() == b"\x00\x00\x00\x01"  # 3.3: the server chooses


def test_unsupported_version_is_refused_with_a_reason() -> None:
    conn = server()
    with pytest.raises(ProtocolError, match=r"2\.0 is not supported"):
        conn.receive_data(b"RFB 002.000\n")
    reply = conn.data_to_send()
    assert reply[:4] == b"\x00\x00\x00\x00"
    (length,) = struct.unpack(">I", reply[4:8])
    assert b"not supported" in reply[8:] and len(reply) == 8 + length
    assert conn.closed


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"RFB 003.00x\n", b"RFB 003.008\r", b"\x16\x03\x01"])
def test_garbage_instead_of_a_version(data: bytes) -> None:
    conn = server()
    with pytest.raises(ProtocolError):
        conn.receive_data(data)


def test_bad_security_choice() -> None:
    conn = server()
    conn.receive_data(b"RFB 003.008\n")
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="not offered"):
        conn.receive_data(b"\x02")  # VNC auth was not offered
    assert conn.data_to_send() == b"\x00\x00\x00\x01" + struct.pack(">I", 31) + b"security type 2 was not offered"
    conn = server(password="x")
    conn.receive_data(b"RFB 003.007\n")
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x01")  # None was not offered: a password is set
    assert conn.data_to_send() == b""  # 3.7 just closes


def test_empty_password_is_refused() -> None:
    with pytest.raises(ValueError):
        RfbServerConnection(width=1, height=1, password="")


# --- DES ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("password", "challenge", "response"), [
    (".", "7fe2e13da4ae109c54c55f5274aadb31", "1d8692711f00243502d391efe9bcc5d5"),
    ("12345678", "138ea42e0e66f3ad2df308c304cdc42a", "5be156fa4949ef56d3f844977327959f"),
    ("abc123", "c63045d2579ee7f2f90c623e524086c6", "a36359e428c87fb3452cd7e0cad6703e"),
])
def test_vnc_auth_known_vectors(password: str, challenge: str, response: str) -> None:
    """Challenge/response pairs captured from real VNC sessions."""
    assert auth.response_for(password, bytes.fromhex(challenge)) == bytes.fromhex(response)
    assert auth.check_response(password, bytes.fromhex(challenge), bytes.fromhex(response))


def test_des_key_rules() -> None:
    from Crypto.Cipher import DES

    # FIPS 46 worked example: the DES primitive itself.
    cipher = DES.new(bytes.fromhex("133457799bbcdff1"), DES.MODE_ECB)
    assert cipher.encrypt(bytes.fromhex("0123456789abcdef")) == bytes.fromhex("85e813540f0ab405")
    # Bits reversed per byte; truncated to 8 bytes; NUL padded.
    assert auth.des_key(b"\x01\x80\x03") == b"\x80\x01\xc0" + bytes(5)
    assert auth.des_key("password-too-long") == auth.des_key("password")
    assert auth.response_for("password", CHALLENGE) == auth.response_for("password-too-long", CHALLENGE)


def test_des_matches_vncdotool() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vncdotool.rfb import _vnc_des, des_encrypt  # type: ignore[import-untyped]

        for password in ("a", "secret", "12345678", "longer than eight"):
            assert auth.response_for(password, CHALLENGE) == des_encrypt(_vnc_des(password), CHALLENGE)


class _Transport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = False

    def write(self, data: bytes) -> None:
        self.data += data

    def loseConnection(self) -> None:
        self.lost = True


@pytest.mark.parametrize(("server_password", "client_password", "ok"), [
    (None, None, True), ("s3cret", "s3cret", True), ("s3cret", "wrong", False),
])
def test_vncdotool_handshake(server_password: str | None, client_password: str | None, ok: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vncdotool.rfb import RFBClient

        class Client(RFBClient):  # type: ignore[misc]
            made = False
            failed: object = None

            def vncConnectionMade(self) -> None:
                self.made = True

            def vncAuthFailed(self, reason: object) -> None:
                self.failed = reason

        client = Client()
    client.factory = SimpleNamespace(password=client_password, shared=False)
    client.transport = _Transport()
    conn = RfbServerConnection(width=320, height=200, name="vm", password=server_password)
    events: list[Event] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vncdotool's DES goes through cryptography's deprecated TripleDES
        for _ in range(6):
            client.dataReceived(conn.data_to_send())
            events += conn.receive_data(bytes(client.transport.data))
            client.transport.data.clear()
    if ok:
        assert client.made and (client.width, client.height, client.name) == (320, 200, b"vm")
        assert events[-1] == ClientInitReceived(shared=False)
        client.keyEvent(0xFF0D)
        client.pointerEvent(10, 20, 1)
        client.clientCutText("héllo")
        client.framebufferUpdateRequest(0, 0, 320, 200, incremental=True)
        assert conn.receive_data(bytes(client.transport.data)) == [
            Key(True, 0xFF0D), Pointer(1, 10, 20), CutText("héllo"), UpdateRequested(True, 0, 0, 320, 200)]
    else:
        assert events == [AuthFailed("Authentication failed")]
        assert client.failed is not None and not client.made and conn.closed


# --- client messages --------------------------------------------------------------------------------------

RGB565 = PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0)
MESSAGES: list[tuple[bytes, Event]] = [
    (b"\x00\x00\x00\x00" + RGB565.pack(), PixelFormatChanged(RGB565)),
    (b"\x02\x00\x00\x03" + struct.pack(">iii", 16, -239, -258), EncodingsSet((16, -239, -258))),
    (b"\x02\x00\x00\x00", EncodingsSet(())),
    (b"\x03\x01" + struct.pack(">HHHH", 1, 2, 300, 400), UpdateRequested(True, 1, 2, 300, 400)),
    (b"\x03\x00" + struct.pack(">HHHH", 0, 0, 64, 32), UpdateRequested(False, 0, 0, 64, 32)),
    (b"\x04\x01\x00\x00" + struct.pack(">I", 0xFFE1), Key(True, 0xFFE1)),
    (b"\x04\x00\x00\x00" + struct.pack(">I", 0x41), Key(False, 0x41)),
    (b"\x05\x05" + struct.pack(">HH", 65535, 7), Pointer(5, 65535, 7)),
    (b"\x06\x00\x00\x00" + struct.pack(">I", 5) + b"ab\xe9\n\x00", CutText("ab\xe9\n\x00")),
    (b"\x06\x00\x00\x00\x00\x00\x00\x00", CutText("")),
    (b"\xff\x00\x00\x01" + struct.pack(">II", 0x61, 0x1E), ExtendedKey(True, 0x61, 0x1E)),
    (b"\xff\x00\x00\x00" + struct.pack(">II", 0xFF53, 0xCD), ExtendedKey(False, 0xFF53, 0xCD)),
    (b"\x96\x01" + struct.pack(">HHHH", 0, 0, 64, 32), ContinuousUpdates(True, 0, 0, 64, 32)),
    (b"\xf8\x00\x00\x00" + struct.pack(">IB", 0x80000003, 3) + b"abc", Fence(0x80000003, b"abc")),
    (b"\xfb\x00" + struct.pack(">HHBx", 1280, 720, 2) + Screen(7, 0, 0, 640, 720).pack()
     + Screen(8, 640, 0, 640, 720, 1).pack(),
     DesktopSizeRequested(1280, 720, (Screen(7, 0, 0, 640, 720), Screen(8, 640, 0, 640, 720, 1)))),
    (b"\x00\x00\x00\x00" + BGRX8888.pack(), PixelFormatChanged(BGRX8888)),
]
ALL_MESSAGES = b"".join(m for m, _ in MESSAGES)
ALL_EVENTS = [e for _, e in MESSAGES]


def test_every_client_message() -> None:
    conn = ready()
    assert conn.receive_data(ALL_MESSAGES) == ALL_EVENTS
    assert conn.pixel_format == BGRX8888 and conn.encodings == ()


def test_messages_split_at_every_byte_boundary() -> None:
    for cut in range(len(ALL_MESSAGES) + 1):
        conn = ready()
        assert conn.receive_data(ALL_MESSAGES[:cut]) + conn.receive_data(ALL_MESSAGES[cut:]) == ALL_EVENTS
    conn = ready()
    events: list[Event] = []
    for i in range(len(ALL_MESSAGES)):
        events += conn.receive_data(ALL_MESSAGES[i : i + 1])
    assert events == ALL_EVENTS


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, len(ALL_MESSAGES)), max_size=12))
def test_messages_split_anywhere(cuts: list[int]) -> None:
    conn = ready()
    bounds = [0, *sorted(cuts), len(ALL_MESSAGES)]
    events: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        events += conn.receive_data(ALL_MESSAGES[a:b])
    assert events == ALL_EVENTS


def test_colour_map_format_gets_a_colour_map() -> None:
    conn = ready()
    fmt = PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0)
    assert conn.receive_data(b"\x00\x00\x00\x00" + fmt.pack()) == [PixelFormatChanged(fmt)]
    data = conn.data_to_send()
    assert data[:6] == b"\x01\x00\x00\x00\x01\x00" and len(data) == 6 + 256 * 6
    assert struct.unpack(">HHH", data[6 + 6 * 0xFF : 6 + 6 * 0x100]) == BGR233_PALETTE[255] == (65535,) * 3


def test_extensions_announced_once_when_enabled() -> None:
    conn = ready(continuous_updates=True, fences=True)
    setenc = b"\x02\x00\x00\x02" + struct.pack(">ii", ENCODING_CONTINUOUS_UPDATES, ENCODING_FENCE)
    conn.receive_data(setenc)
    assert conn.data_to_send() == b"\x96" + b"\xf8\x00\x00\x00\x80\x00\x00\x00\x00"
    conn.receive_data(setenc)
    assert conn.data_to_send() == b""
    assert conn.end_of_continuous_updates() == b"\x96"
    assert conn.fence(0x3, b"xy") == b"\xf8\x00\x00\x00\x00\x00\x00\x03\x02xy"
    plain = ready()
    plain.receive_data(setenc)
    assert plain.data_to_send() == b""


def test_server_messages() -> None:
    conn = ready()
    assert conn.bell() == b"\x02"
    assert conn.server_cut_text("a\u20acb") == b"\x03\x00\x00\x00\x00\x00\x00\x03a?b"
    assert conn.framebuffer_update([]) == b"\x00\x00\x00\x00"
    rect = desktop_size_rect(800, 600)
    assert conn.framebuffer_update([rect]) == b"\x00\x00\x00\x01" + rect
    with pytest.raises(LocalProtocolError):
        conn.framebuffer_update([rect], last_rect=True)  # the viewer did not ask for LastRect
    with pytest.raises(LocalProtocolError):
        conn.end_of_continuous_updates()
    with pytest.raises(LocalProtocolError):
        conn.fence(0)


def test_send_methods_flush_queued_bytes_first() -> None:
    conn = ready()
    conn.receive_data(b"\x00\x00\x00\x00" + PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0).pack())
    data = conn.bell()
    assert data[:1] == b"\x01" and data[-1:] == b"\x02" and conn.data_to_send() == b""


def test_sending_before_the_handshake_is_local_misuse() -> None:
    conn = server()
    for call in (conn.bell, lambda: conn.framebuffer_update([]), lambda: conn.server_cut_text("x")):
        with pytest.raises(LocalProtocolError):
            call()


def test_update_request_clipping() -> None:
    assert UpdateRequested(True, 10, 10, 100, 100).clipped(64, 32) == (10, 10, 54, 22)
    assert UpdateRequested(True, 100, 0, 10, 10).clipped(64, 32) == (64, 0, 0, 10)
    assert UpdateRequested(False, 0, 0, 64, 32).clipped(64, 32) == (0, 0, 64, 32)


# --- hostile input ------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "unknown type": b"\x07",
    "reserved type 1": b"\x01\x00\x00\x00",
    "too many encodings": b"\x02\x00\x04\x01",  # 1025 > 1024
    "extended clipboard": b"\x06\x00\x00\x00\xff\xff\xff\xfc",
    "24 bpp": b"\x00\x00\x00\x00" + PixelFormat(24, 24, False, True, 255, 255, 255, 16, 8, 0).pack(),
    "bad max": b"\x00\x00\x00\x00" + PixelFormat(32, 24, False, True, 254, 255, 255, 16, 8, 0).pack(),
    "shift overflow": b"\x00\x00\x00\x00" + PixelFormat(16, 16, False, True, 31, 63, 31, 12, 5, 0).pack(),
    "qemu audio": b"\xff\x01\x00\x00",
    "qemu unknown": b"\xff\x07",
    "big fence": b"\xf8\x00\x00\x00\x00\x00\x00\x00\x41",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_protocol_error(name: str) -> None:
    conn = ready()
    before = b"\x04\x01\x00\x00\x00\x00\x00\x61"
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(before + BAD_INPUTS[name] + b"\x00" * 64)
    assert info.value.events == (Key(True, 0x61),)
    assert conn.closed and conn.receive_data(b"\x04") == []


def test_limits_are_configurable() -> None:
    conn = ready(max_cut_text=4, max_encodings=2)
    assert conn.receive_data(b"\x06\x00\x00\x00\x00\x00\x00\x04abcd") == [CutText("abcd")]
    assert conn.receive_data(b"\x02\x00\x00\x02" + bytes(8)) == [EncodingsSet((0, 0))]
    # Over the limit: reported before the text arrives, skipped unbuffered, and the connection goes on.
    assert conn.receive_data(b"\x06\x00\x00\x00\x00\x00\x00\x05") == [CutTextTooLarge(5, 4)]
    assert conn.receive_data(b"abcde\x04\x01\x00\x00\x00\x00\x00\x61") == [Key(True, 0x61)]


def test_oversized_message_is_rejected_before_it_is_buffered() -> None:
    conn = ready()
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x06\x00\x00\x00\xff\xff\xff\xff")  # extended clipboard, never announced
    conn = ready()
    assert conn.receive_data(b"\x06\x00\x00\x00\x00\x20\x00\x00" + bytes(1000)) == [
        CutTextTooLarge(2 << 20, 1 << 20)]
    assert len(conn._buffer) == 0


def _buffer_bound(conn: RfbServerConnection) -> int:
    return max(conn.max_cut_text + 8, conn.max_encodings * 4 + 4, 8 + 255 * 16)


def _feed_expecting_only_protocol_errors(conn: RfbServerConnection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except ProtocolError:
            assert conn.closed
            return
        assert len(conn._buffer) <= _buffer_bound(conn)  # never unbounded buffering
        conn.data_to_send()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_random_bytes_after_handshake(chunks: list[bytes]) -> None:
    _feed_expecting_only_protocol_errors(ready(max_cut_text=4096, max_encodings=64), chunks)


@FUZZ
@given(st.lists(st.binary(max_size=24), max_size=10), st.sampled_from([None, "pw"]))
def test_fuzz_random_bytes_from_the_start(chunks: list[bytes], password: str | None) -> None:
    _feed_expecting_only_protocol_errors(server(password=password), chunks)


HANDSHAKES = {
    None: [b"RFB 003.008\n\x01\x01", b"RFB 003.007\n\x01\x00", b"RFB 003.003\n\x01"],
    "pw": [b"RFB 003.008\n\x02" + auth.response_for("pw", CHALLENGE) + b"\x01",
           b"RFB 003.003\n" + auth.response_for("pw", CHALLENGE) + b"\x00"],
}


@st.composite
def mutated_streams(draw: st.DrawFn, password: str | None) -> bytes:
    """A valid handshake and message stream with a few bytes flipped, inserted or deleted."""
    picks = draw(st.lists(st.sampled_from([m for m, _ in MESSAGES]), max_size=12))
    data = bytearray(draw(st.sampled_from(HANDSHAKES[password])) + b"".join(picks))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "insert" or pos == len(data):
            data[pos:pos] = bytes([draw(st.integers(0, 255))])
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        else:
            del data[pos]
    return bytes(data)


@FUZZ
@given(st.data(), st.sampled_from([None, "pw"]), st.integers(1, 17))
def test_fuzz_mutated_streams(data: st.DataObject, password: str | None, chunk: int) -> None:
    stream = data.draw(mutated_streams(password))
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    _feed_expecting_only_protocol_errors(server(password=password), chunks)


@pytest.mark.parametrize("password", [None, "pw"])
def test_unmutated_handshakes_reach_normal(password: str | None) -> None:
    for handshake in HANDSHAKES[password]:
        conn = server(password=password)
        events = conn.receive_data(handshake + ALL_MESSAGES)
        assert isinstance(events[0], SecurityNegotiated) and events[2:] == ALL_EVENTS


def test_many_messages_in_one_chunk() -> None:
    conn = ready()
    key = b"\x04\x01\x00\x00\x00\x00\x00\x61"
    assert conn.receive_data(key * 10000) == [Key(True, 0x61)] * 10000
    assert len(conn._buffer) == 0
