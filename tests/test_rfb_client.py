"""The sans-IO RFB client: handshakes, server messages, limits, and a fuzz of hostile servers."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rfb import client as rfb
from rfb.client import (
    BGRX8888,
    ENCODING_CURSOR,
    ENCODING_DESKTOP_SIZE,
    ENCODING_RAW,
    AuthenticationFailed,
    Bell,
    Cursor,
    DesktopSize,
    LocalProtocolError,
    PixelFormat,
    RawPixels,
    RemoteProtocolError,
    RfbClient,
    ServerCutText,
    ServerInit,
    State,
    UpdateDone,
)

QEMU_FORMAT = bytes.fromhex("2018000100ff00ff00ff100800000000")  # what QEMU 7.2 sends in ServerInit


def server_init(width: int = 64, height: int = 32, name: bytes = b"QEMU", fmt: bytes = QEMU_FORMAT) -> bytes:
    return struct.pack(">HH", width, height) + fmt + struct.pack(">I", len(name)) + name


def handshake_38(width: int = 64, height: int = 32) -> bytes:
    return b"RFB 003.008\n" + b"\x01\x01" + b"\x00\x00\x00\x00" + server_init(width, height)


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


def raw_rect(x: int, y: int, w: int, h: int, fill: int = 0) -> bytes:
    pixels = bytes((fill + i) & 0xFF for i in range(w * h * 4))
    return struct.pack(">HHHHi", x, y, w, h, ENCODING_RAW) + pixels


def ready_client(width: int = 64, height: int = 32) -> RfbClient:
    """A client past the handshake, in BGRX with DesktopSize and Cursor enabled."""
    conn = RfbClient()
    events = conn.receive_data(handshake_38(width, height))
    assert isinstance(events[-1], ServerInit)
    conn.data_to_send()
    conn.set_pixel_format(BGRX8888)
    conn.set_encodings([ENCODING_RAW, ENCODING_DESKTOP_SIZE, ENCODING_CURSOR])
    return conn


def coalesce(events: list[rfb.Event]) -> list[object]:
    """Merge consecutive RawPixels bands of one rectangle, so event lists compare across chunkings."""
    out: list[object] = []
    for event in events:
        last = out[-1] if out else None
        if (isinstance(event, RawPixels) and isinstance(last, RawPixels) and last.x == event.x
                and last.width == event.width and last.y + last.height == event.y):
            out[-1] = RawPixels(last.x, last.y, last.width, last.height + event.height, last.pixels + event.pixels)
        else:
            out.append(event)
    return out


# --- handshake --------------------------------------------------------------------------------------------


def test_handshake_38_as_qemu_speaks_it() -> None:
    conn = RfbClient()
    assert conn.receive_data(b"RFB 003.008\n") == []
    assert conn.data_to_send() == b"RFB 003.008\n"
    assert conn.receive_data(b"\x01\x01") == []
    assert conn.data_to_send() == b"\x01"
    assert conn.receive_data(b"\x00\x00\x00\x00") == []
    assert conn.data_to_send() == b"\x01"  # ClientInit, shared
    events = conn.receive_data(server_init(720, 400))
    assert events == [ServerInit(720, 400, "QEMU", PixelFormat.unpack(QEMU_FORMAT))]
    assert conn.state is State.NORMAL
    assert isinstance(events[0], ServerInit) and events[0].pixel_format == BGRX8888  # QEMU: already ours


@pytest.mark.parametrize(("greeting", "answer", "security"), [
    (b"RFB 003.007\n", b"RFB 003.007\n", b"\x02\x02\x01"),  # 3.7: no SecurityResult for None
    (b"RFB 003.003\n", b"RFB 003.003\n", b"\x00\x00\x00\x01"),  # 3.3: the server picks None
    (b"RFB 003.005\n", b"RFB 003.003\n", b"\x00\x00\x00\x01"),  # 3.5 is spoken as 3.3
    (b"RFB 004.001\n", b"RFB 003.008\n", b"\x01\x01\x00\x00\x00\x00"),
    (b"RFB 003.889\n", b"RFB 003.008\n", b"\x01\x01\x00\x00\x00\x00"),  # Apple's
])  # fmt: skip
def test_older_and_newer_versions(greeting: bytes, answer: bytes, security: bytes) -> None:
    conn = RfbClient()
    events = conn.receive_data(greeting + security + server_init())
    assert conn.data_to_send().startswith(answer)
    assert isinstance(events[0], ServerInit)


def test_handshake_byte_by_byte() -> None:
    conn = RfbClient()
    events: list[rfb.Event] = []
    for byte in handshake_38():
        events += conn.receive_data(bytes([byte]))
    assert [type(e) for e in events] == [ServerInit]


def test_server_refusal_reasons_are_reported() -> None:
    conn = RfbClient()
    with pytest.raises(AuthenticationFailed, match="too many clients"):
        conn.receive_data(b"RFB 003.008\n\x00" + struct.pack(">I", 16) + b"too many clients")
    conn = RfbClient()
    with pytest.raises(AuthenticationFailed, match="go away"):
        conn.receive_data(b"RFB 003.008\n\x01\x01" + struct.pack(">II", 1, 7) + b"go away")
    conn = RfbClient()
    with pytest.raises(AuthenticationFailed, match="no supported security type"):
        conn.receive_data(b"RFB 003.008\n\x01\x02")  # VNC authentication only
    conn = RfbClient()
    with pytest.raises(AuthenticationFailed, match="requires security type 2"):
        conn.receive_data(b"RFB 003.003\n\x00\x00\x00\x02")
    assert conn.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


@pytest.mark.parametrize("greeting", [b"HTTP/1.1 200\n", b"RFB 002.000\n", b"RFB 3.8\n\n\n\n\n"])
def test_not_an_rfb_server(greeting: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        RfbClient().receive_data(greeting)


def test_messages_refused_before_the_handshake() -> None:
    conn = RfbClient()
    with pytest.raises(LocalProtocolError):
        conn.framebuffer_update_request(0, 0, 1, 1, incremental=True)


# --- server messages --------------------------------------------------------------------------------------


def test_raw_rect_and_update_done() -> None:
    conn = ready_client()
    rect = raw_rect(2, 3, 4, 5)
    events = conn.receive_data(update(rect))
    assert events == [RawPixels(2, 3, 4, 5, rect[12:]), UpdateDone(((2, 3, 4, 5),))]


def test_raw_rows_come_out_as_they_arrive_and_buffering_stays_below_a_row() -> None:
    conn = ready_client(width=1000, height=100)
    data = update(raw_rect(0, 0, 1000, 100))
    events: list[rfb.Event] = []
    for start in range(0, len(data), 6000):  # 1.5 rows per read
        events += conn.receive_data(data[start : start + 6000])
        assert conn.buffered < 1000 * 4
    bands = [e for e in events if isinstance(e, RawPixels)]
    assert len(bands) > 50 and sum(b.height for b in bands) == 100
    assert coalesce(events) == [RawPixels(0, 0, 1000, 100, data[16:]), UpdateDone(((0, 0, 1000, 100),))]


def test_empty_update_and_empty_rects() -> None:
    conn = ready_client()
    assert conn.receive_data(update()) == [UpdateDone(())]
    assert conn.receive_data(update(raw_rect(5, 5, 0, 3))) == [UpdateDone(((5, 5, 0, 3),))]


def test_desktop_size_changes_the_bounds() -> None:
    conn = ready_client(64, 32)
    resize = struct.pack(">HHHHi", 0, 0, 200, 100, ENCODING_DESKTOP_SIZE)
    events = conn.receive_data(update(resize, raw_rect(100, 50, 100, 50)))
    assert events[0] == DesktopSize(200, 100)
    assert events[-1] == UpdateDone(((100, 50, 100, 50),))
    assert (conn.width, conn.height) == (200, 100)


def test_cursor_shape() -> None:
    conn = ready_client()
    pixels = bytes(range(3 * 2 * 4))
    mask = bytes([0b10100000, 0b01000000])
    events = conn.receive_data(update(struct.pack(">HHHHi", 1, 0, 3, 2, ENCODING_CURSOR) + pixels + mask))
    assert events == [Cursor(1, 0, 3, 2, pixels, mask), UpdateDone(())]


def test_bell_cut_text_and_colour_map() -> None:
    conn = ready_client()
    colour_map = struct.pack(">BxHH", 1, 0, 2) + bytes(12)
    data = b"\x02" + struct.pack(">B3xI", 3, 5) + b"hello" + colour_map + update()
    assert conn.receive_data(data) == [Bell(), ServerCutText(b"hello"), UpdateDone(())]


def test_client_messages() -> None:
    conn = ready_client()
    assert conn.set_pixel_format(BGRX8888) == bytes.fromhex("00000000") + bytes.fromhex(
        "2018000100ff00ff00ff100800000000")
    assert conn.set_encodings([0, -223, -239]) == struct.pack(">BxHiii", 2, 3, 0, -223, -239)
    assert conn.framebuffer_update_request(1, 2, 3, 4, incremental=True) == struct.pack(">BBHHHH", 3, 1, 1, 2, 3, 4)
    assert conn.key_event(0xFF0D, True) == struct.pack(">BBxxI", 4, 1, 0xFF0D)
    assert conn.pointer_event(10, 20, 5) == struct.pack(">BBHH", 5, 5, 10, 20)
    assert conn.client_cut_text(b"x") == struct.pack(">B3xI", 6, 1) + b"x"
    with pytest.raises(LocalProtocolError):
        conn.set_encodings([7])  # Tight is not implemented here


# --- a server breaking the protocol -------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    (update(raw_rect(60, 0, 5, 1)), "outside"),
    (update(raw_rect(0, 30, 1, 3)), "outside"),
    (update(struct.pack(">HHHHi", 0, 0, 1, 1, 16)), "not requested"),  # ZRLE
    (update(struct.pack(">HHHHi", 0, 0, 1, 1, -224)), "not requested"),  # LastRect
    (update(struct.pack(">HHHHi", 0, 0, 0, 10, ENCODING_DESKTOP_SIZE)), "desktop size"),
    (update(struct.pack(">HHHHi", 0, 0, 2000, 1, ENCODING_CURSOR)), "cursor"),
    (struct.pack(">B3xI", 3, 0xFFFFFFFF), "cut text"),
    (b"\x07", "unknown server message"),
])  # fmt: skip
def test_protocol_violations(data: bytes, message: str) -> None:
    conn = ready_client()
    with pytest.raises(RemoteProtocolError, match=message):
        conn.receive_data(data)
    assert conn.state is State.CLOSED


def test_unrequested_pseudo_encodings_are_refused() -> None:
    conn = RfbClient()
    conn.receive_data(handshake_38())
    with pytest.raises(RemoteProtocolError, match="not requested"):
        conn.receive_data(update(struct.pack(">HHHHi", 0, 0, 10, 10, ENCODING_DESKTOP_SIZE)))


def test_huge_server_name_is_refused_before_buffering() -> None:
    conn = RfbClient()
    with pytest.raises(RemoteProtocolError, match="server name"):
        conn.receive_data(b"RFB 003.008\n\x01\x01\x00\x00\x00\x00" + struct.pack(">HH", 1, 1) + QEMU_FORMAT
                          + struct.pack(">I", 0xFFFFFFFF))


def test_unusable_server_pixel_format() -> None:
    bad = bytes.fromhex("1818000100ff00ff00ff100800000000")  # 24 bits per pixel
    with pytest.raises(RemoteProtocolError, match="pixel format"):
        RfbClient().receive_data(b"RFB 003.008\n\x01\x01\x00\x00\x00\x00" + server_init(fmt=bad))


# --- fuzz ---------------------------------------------------------------------------------------------------

MAX_BUFFERED = rfb.DEFAULT_MAX_CURSOR ** 2 * 4 + 128 * rfb.DEFAULT_MAX_CURSOR + 16  # largest single item


def feed_all(conn: RfbClient, chunks: list[bytes]) -> list[rfb.Event]:
    events: list[rfb.Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8))
def test_fuzz_random_server_bytes_after_handshake(data: bytes, cuts: list[int]) -> None:
    """Whatever the server sends, the client raises RemoteProtocolError or keeps going, with bounded buffering."""
    conn = ready_client(width=300, height=200)
    try:
        for chunk in split(data, cuts):
            conn.receive_data(chunk)
            assert conn.buffered <= MAX_BUFFERED
    except RemoteProtocolError:
        assert conn.state is State.CLOSED


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_fuzz_random_handshake_bytes(data: bytes, cuts: list[int]) -> None:
    conn = RfbClient()
    try:
        for chunk in split(b"RFB 003.008\n" + data, cuts):
            conn.receive_data(chunk)
            assert conn.buffered <= rfb.DEFAULT_MAX_NAME + 64
    except RemoteProtocolError:
        pass


_HEADER_FIELD = st.integers(0, 0xFFFF)


@st.composite
def server_messages(draw: st.DrawFn) -> bytes:
    """Well-formed and slightly malformed messages: valid structure with hostile field values."""
    kind = draw(st.sampled_from(["update", "bell", "cut", "colours", "junk"]))
    if kind == "bell":
        return b"\x02"
    if kind == "cut":
        text = draw(st.binary(max_size=40))
        return struct.pack(">B3xI", 3, len(text)) + text
    if kind == "colours":
        count = draw(st.integers(0, 20))
        return struct.pack(">BxHH", 1, draw(_HEADER_FIELD), count) + bytes(6 * count)
    if kind == "junk":
        return draw(st.binary(min_size=1, max_size=16))
    rects = []
    for _ in range(draw(st.integers(0, 4))):
        x, y = draw(st.integers(0, 70)), draw(st.integers(0, 40))
        w, h = draw(st.integers(0, 20)), draw(st.integers(0, 20))
        encoding = draw(st.sampled_from([ENCODING_RAW, ENCODING_DESKTOP_SIZE, ENCODING_CURSOR, 5, -224]))
        payload = b""
        if encoding == ENCODING_RAW:
            payload = bytes(w * h * 4)
        elif encoding == ENCODING_CURSOR:
            payload = bytes(w * h * 4 + (w + 7) // 8 * h)
        rects.append(struct.pack(">HHHHi", x, y, w, h, encoding) + payload)
    return update(*rects)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(server_messages(), max_size=6), st.lists(st.integers(0, 10000), max_size=10))
def test_fuzz_structured_messages_same_events_however_split(messages: list[bytes], cuts: list[int]) -> None:
    """Chunking never changes the outcome: same events (bands merged) and the same error, if any."""
    data = b"".join(messages)

    def run(chunks: list[bytes]) -> tuple[list[object], str | None]:
        conn = ready_client()
        events: list[rfb.Event] = []
        try:
            for chunk in chunks:
                events += conn.receive_data(chunk)
        except RemoteProtocolError as exc:
            return coalesce(events), str(exc)
        return coalesce(events), None

    whole_events, whole_error = run([data])
    split_events, split_error = run(split(data, cuts))
    assert split_error == whole_error
    if whole_error is None:
        assert split_events == whole_events
    else:  # an error may be found before all the events of the same read were returned
        assert whole_events[: len(split_events)] == split_events[: len(whole_events)]
