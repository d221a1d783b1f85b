"""Display capture into shm, the display socket's notifications, the input API and the shm screendump.

Three tiers: a scripted fake VNC server (reconnects, clamping, cursors, hostile servers), the display socket
on its own (hello, eventfd coalescing, hostile and killed readers), and the real thing: QEMU with the demo
guest and ``-vnc unix:...`` captured by DisplayCapture (tests marked ``needs_qemu``). Every wait has a
deadline; nothing asserts on durations, only on what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from displaylib import WAIT_S, frame_image, running_display, wait_frame, wait_until
from guestlib import TEXT_BOXES, TEXT_SIZE, VGA_SIZE, crop
from PIL import Image
from qemu.qmp import ExecuteError, Message
from qemu.qmp.models import ErrorResponse

from clients.screendump import ScreendumpError, screendump, write_screendump
from core_daemon.display import DisplayCapture, DisplayError, cursor_to_bgra
from core_daemon.display_socket import DisplaySocket
from core_daemon.input import ABS_MAX, GuestInput, InputError, scale_axis
from rfb import client as rfb
from shm import (
    CursorShapeRecord,
    DamageRecord,
    ModeRecord,
    Overrun,
    Record,
    RunState,
    RunStateRecord,
    ShmReader,
    ShmWriter,
    segment_name,
)
from shm.notify import (
    HELLO_VERSION,
    DisplayClosed,
    DisplaySubscription,
    Hello,
    HelloError,
    decode_hello,
    read_hello,
    receive_hello,
)

ROOT = Path(__file__).resolve().parent.parent
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None or shutil.which("nasm") is None,
                                reason="qemu-system-x86_64 and nasm are needed")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def writer() -> Iterator[ShmWriter]:
    with ShmWriter(segment_name("t-display"), 64, 32) as w:
        yield w


def records_of(result: list[Record] | Overrun) -> list[Record]:
    assert isinstance(result, list), result
    return result


# --- a scripted VNC server ------------------------------------------------------------------------------------

Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def server_init(width: int, height: int) -> bytes:
    return struct.pack(">HH", width, height) + rfb.BGRX8888.pack() + struct.pack(">I", 4) + b"fake"


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


def raw_rect(x: int, y: int, w: int, h: int, pixel: bytes) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, rfb.ENCODING_RAW) + pixel * (w * h)


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, width: int, height: int) -> None:
    writer.write(b"RFB 003.008\n")
    await reader.readexactly(12)
    writer.write(b"\x01\x01")
    await reader.readexactly(1)
    writer.write(b"\x00\x00\x00\x00")
    await reader.readexactly(1)  # ClientInit
    writer.write(server_init(width, height))
    await reader.readexactly(20 + 4 + 3 * 4 + 10)  # SetPixelFormat, SetEncodings (3), the first request


@contextlib.asynccontextmanager
async def fake_vnc(path: Path, sessions: list[Session]) -> AsyncIterator[list[int]]:
    """Serve ``sessions`` in order, one per connection; yields the list of sessions started so far."""
    started: list[int] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(started)
        started.append(index)
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            if index < len(sessions):
                await sessions[index](reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield started
    finally:
        server.close()
        pending = [task for task in handlers if not task.done()]
        if pending:  # the client hung up: the sessions see EOF and end
            await asyncio.wait(pending, timeout=WAIT_S)


async def hold_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep the connection until the client goes, ignoring what it sends (update requests)."""
    while await reader.read(4096):
        pass


RED, BLUE = b"\x00\x00\xff\x00", b"\xff\x00\x00\x00"  # BGRX


async def test_reconnects_after_the_connection_drops_and_damages_the_whole_frame(
        short_dir: Path, writer: ShmWriter) -> None:
    async def first(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 64, 32)
        w.write(update(raw_rect(0, 0, 64, 32, RED)) + update(raw_rect(8, 8, 4, 4, BLUE)))
        await w.drain()
        await reader.readexactly(10)  # the next incremental request: both updates arrived

    async def second(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 64, 32)
        w.write(update(raw_rect(0, 0, 64, 16, BLUE), raw_rect(0, 16, 64, 16, RED)))
        await hold_open(reader, w)

    reader = ShmReader(writer.name)
    async with fake_vnc(short_dir / "vnc.sock", [first, second]) as started:
        capture = DisplayCapture(writer, short_dir / "vnc.sock", connect_timeout=WAIT_S, max_backoff=0.2)
        await capture.start()
        try:
            await wait_until(lambda: capture.connections == 2 and capture.updates == 3, what="the reconnect")
        finally:
            await capture.close()
    assert started == [0, 1]
    records = records_of(reader.read_records())
    assert [type(r) for r in records] == [ModeRecord, DamageRecord, DamageRecord, DamageRecord]
    assert isinstance(records[0], ModeRecord) and (records[0].width, records[0].height) == (64, 32)
    damage = [(r.x, r.y, r.width, r.height) for r in records if isinstance(r, DamageRecord)]
    assert damage == [(0, 0, 64, 32), (8, 8, 4, 4), (0, 0, 64, 32)]  # full frame after (re)connecting
    frame = reader.copy_frame()
    assert frame[: 64 * 16 * 4] == BLUE * 64 * 16 and frame[64 * 16 * 4 :] == RED * 64 * 16
    reader.close()


async def test_a_mode_larger_than_the_segment_is_clamped_with_an_error(
        short_dir: Path, writer: ShmWriter, caplog: pytest.LogCaptureFixture) -> None:
    async def big(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 32, 16)
        resize = struct.pack(">HHHHi", 0, 0, 100, 50, rfb.ENCODING_DESKTOP_SIZE)
        w.write(update(resize, raw_rect(0, 0, 100, 50, RED)) + update(raw_rect(60, 20, 10, 10, BLUE)))
        await hold_open(reader, w)

    reader = ShmReader(writer.name)
    async with fake_vnc(short_dir / "vnc.sock", [big]):
        capture = DisplayCapture(writer, short_dir / "vnc.sock", connect_timeout=WAIT_S)
        await capture.start()
        try:
            await wait_until(lambda: capture.updates == 2, what="the updates")
        finally:
            await capture.close()
    assert capture.screen_size == (100, 50)
    assert (writer.mode.width, writer.mode.height) == (64, 32)  # the segment's maximum
    assert "does not fit the shared framebuffer" in caplog.text
    records = records_of(reader.read_records())
    modes = [(r.width, r.height) for r in records if isinstance(r, ModeRecord)]
    damage = [(r.x, r.y, r.width, r.height) for r in records if isinstance(r, DamageRecord)]
    assert modes == [(32, 16), (64, 32)]
    assert damage == [(0, 0, 64, 32), (60, 20, 4, 10)]  # the full first frame, then clipped to the clamped mode
    frame = reader.copy_frame()
    assert frame[(20 * 64 + 60) * 4 : (20 * 64 + 64) * 4] == BLUE * 4
    reader.close()


async def test_cursor_shape_becomes_bgra_with_alpha_from_the_mask(short_dir: Path, writer: ShmWriter) -> None:
    pixels = RED * 3 + BLUE * 3
    mask = bytes([0b10100000, 0b01000000])

    async def cursor(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 64, 32)
        w.write(update(struct.pack(">HHHHi", 2, 1, 3, 2, rfb.ENCODING_CURSOR) + pixels + mask))
        await hold_open(reader, w)

    reader = ShmReader(writer.name)
    async with fake_vnc(short_dir / "vnc.sock", [cursor]):
        capture = DisplayCapture(writer, short_dir / "vnc.sock", connect_timeout=WAIT_S)
        await capture.start()
        try:
            await wait_until(lambda: capture.updates == 1, what="the cursor")
        finally:
            await capture.close()
    shapes = [r for r in records_of(reader.read_records()) if isinstance(r, CursorShapeRecord)]
    assert [(s.hot_x, s.hot_y, s.width, s.height) for s in shapes] == [(2, 1, 3, 2)]
    image = reader.cursor()
    opaque_red, clear_red = b"\x00\x00\xff\xff", b"\x00\x00\xff\x00"
    opaque_blue, clear_blue = b"\xff\x00\x00\xff", b"\xff\x00\x00\x00"
    assert image.pixels == opaque_red + clear_red + opaque_red + clear_blue + opaque_blue + clear_blue
    assert cursor_to_bgra(3, 2, pixels, mask) == image.pixels
    reader.close()


async def test_a_hostile_server_only_costs_a_reconnect(short_dir: Path, writer: ShmWriter,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    async def hostile(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 64, 32)
        w.write(update(raw_rect(60, 30, 8, 8, RED)))  # outside the framebuffer
        await hold_open(reader, w)

    async def good(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 64, 32)
        w.write(update(raw_rect(0, 0, 64, 32, BLUE)))
        await hold_open(reader, w)

    async with fake_vnc(short_dir / "vnc.sock", [hostile, good]):
        capture = DisplayCapture(writer, short_dir / "vnc.sock", connect_timeout=WAIT_S, max_backoff=0.2)
        await capture.start()
        try:
            await wait_until(lambda: capture.updates == 1, what="the good session's update")
        finally:
            await capture.close()
    assert capture.connections == 2
    assert "outside the 64x32 framebuffer" in caplog.text


async def test_input_hint_is_a_throttled_release_of_shift(short_dir: Path, writer: ShmWriter) -> None:
    received = bytearray()

    async def recorder(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await handshake(reader, w, 64, 32)
        while data := await reader.read(4096):
            received.extend(data)

    async with fake_vnc(short_dir / "vnc.sock", [recorder]):
        capture = DisplayCapture(writer, short_dir / "vnc.sock", connect_timeout=WAIT_S)
        await capture.start()
        try:
            guest = GuestInput(RecordingQmp().execute, lambda: capture.screen_size, on_input=capture.input_hint)
            await guest.key("a", True)  # -> one hint
            await guest.key("a", False)  # within 10 ms of the first: throttled (almost surely)
            await asyncio.sleep(0.05)
            capture.set_run_state("running")  # a resumed guest: another hint
            release_shift = struct.pack(">BBxxI", 4, 0, 0xFFE1)
            await wait_until(lambda: bytes(received).count(release_shift) >= 2, what="two hints")
        finally:
            await capture.close()
    assert set(bytes(received).replace(release_shift, b"")) == set()  # nothing else was sent
    assert bytes(received).count(release_shift) <= 3


async def test_refresh_publishes_a_full_frame_damage(short_dir: Path, writer: ShmWriter) -> None:
    woken: list[int] = []
    capture = DisplayCapture(writer, short_dir / "vnc.sock", notify=lambda: woken.append(1))
    capture.request_refresh()  # no mode yet: nothing to refresh
    writer.set_mode(64, 32)
    reader = ShmReader(writer.name)
    capture.request_refresh()
    damage = [(r.x, r.y, r.width, r.height) for r in records_of(reader.read_records()) if isinstance(r, DamageRecord)]
    assert damage == [(0, 0, 64, 32)] and woken == [1]
    reader.close()


async def test_start_fails_clearly_when_no_vnc_socket_appears(short_dir: Path, writer: ShmWriter) -> None:
    capture = DisplayCapture(writer, short_dir / "missing.sock", connect_timeout=0.5)
    with pytest.raises(DisplayError, match="no display from QEMU's VNC socket"):
        await capture.start()


async def test_run_state_records_and_repeats_dropped(short_dir: Path, writer: ShmWriter) -> None:
    woken: list[int] = []
    capture = DisplayCapture(writer, short_dir / "vnc.sock", notify=lambda: woken.append(1))
    reader = ShmReader(writer.name)
    for status in ("running", "running", "paused", "io-error", "something-new"):
        capture.set_run_state(status)
    records = records_of(reader.read_records())
    assert [(r.state, r.code) for r in records if isinstance(r, RunStateRecord)] == [
        (RunState.RUNNING, "running"), (RunState.PAUSED, "paused"), (RunState.ERROR, "io-error"),
        (RunState.UNKNOWN, "something-new")]
    assert len(woken) == 4
    assert reader.state().run_code == "something-new"
    reader.close()


# --- the display socket ---------------------------------------------------------------------------------------


async def raw_reader(path: Path) -> tuple[socket.socket, int]:
    """A reader that speaks the socket by hand (blocking calls, in a thread: the core runs on this loop)."""

    def attach() -> tuple[socket.socket, int]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(WAIT_S)
        sock.connect(str(path))
        return sock, receive_hello(sock)[1]

    return await asyncio.to_thread(attach)


@pytest.fixture
async def display_socket(short_dir: Path, writer: ShmWriter) -> AsyncIterator[DisplaySocket]:
    sock = DisplaySocket(short_dir / "display.sock", writer.name)
    sock.start()
    yield sock
    sock.close()


async def test_hello_and_eventfd(display_socket: DisplaySocket, writer: ShmWriter) -> None:
    assert stat.S_IMODE(os.stat(display_socket.path).st_mode) == 0o660
    async with await DisplaySubscription.connect(display_socket.path) as sub:
        assert sub.hello == Hello(HELLO_VERSION, writer.name, 1, "eventfd")
        assert display_socket.readers == 1
        assert not await sub.wait(timeout_s=0.2)  # nothing yet
        writer.set_mode(64, 32)
        display_socket.notify()
        assert await sub.wait(timeout_s=WAIT_S)
        assert [type(r) for r in records_of(sub.reader.read_records())] == [ModeRecord]
    await wait_until(lambda: display_socket.readers == 0, what="the core to notice the reader left")
    assert (await asyncio.to_thread(read_hello, display_socket.path)).shm == writer.name


async def test_batches_coalesce_into_one_wakeup(display_socket: DisplaySocket, writer: ShmWriter) -> None:
    writer.set_mode(64, 32)
    async with await DisplaySubscription.connect(display_socket.path) as sub:
        for _ in range(50):  # 50 batches while the reader is busy elsewhere
            writer.damage(0, 0, 1, 1)
            display_socket.notify()
        assert await sub.wait(timeout_s=WAIT_S)
        assert len(records_of(sub.reader.read_records())) == 50
        assert not await sub.wait(timeout_s=0.3)
        assert sub.wakeups == 1


async def test_a_hostile_reader_cannot_block_or_break_the_core(display_socket: DisplaySocket,
                                                              writer: ShmWriter) -> None:
    # One reader saturates its own eventfd counter; another sends bytes it must not send.
    greedy, greedy_fd = await raw_reader(display_socket.path)
    os.eventfd_write(greedy_fd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum: further writes would block
    talker, talker_fd = await raw_reader(display_socket.path)
    try:
        async with await DisplaySubscription.connect(display_socket.path) as honest:
            await wait_until(lambda: display_socket.readers == 3, what="three readers")
            talker.send(b"hello core")
            await wait_until(lambda: display_socket.readers == 2, what="the talker to be dropped")
            display_socket.notify()  # must not block or raise although greedy's counter is full
            assert await honest.wait(timeout_s=WAIT_S)
    finally:
        for fd in (greedy_fd, talker_fd):
            os.close(fd)
        greedy.close()
        talker.close()


async def test_reader_limit(short_dir: Path, writer: ShmWriter) -> None:
    sock = DisplaySocket(short_dir / "display.sock", writer.name, max_readers=1)
    sock.start()
    try:
        async with await DisplaySubscription.connect(sock.path):
            with pytest.raises(DisplayClosed):
                await DisplaySubscription.connect(sock.path)
    finally:
        sock.close()


async def test_readers_learn_that_the_core_went_away(display_socket: DisplaySocket) -> None:
    async with await DisplaySubscription.connect(display_socket.path) as sub:
        display_socket.close()
        with pytest.raises(DisplayClosed):
            await sub.wait(timeout_s=WAIT_S)
        assert sub.closed


def test_hello_format_is_checked() -> None:
    assert decode_hello(b'{"type":"vmfront-display","version":1,"shm":"/x","layout":1,"notify":"eventfd","new":2}')
    for bad in (b"not json", b"[]", b'{"type":"other"}', b'{"type":"vmfront-display","version":2}',
                b'{"type":"vmfront-display","version":1,"shm":3,"layout":1,"notify":"eventfd"}'):
        with pytest.raises(HelloError):
            decode_hello(bad)


# --- input ------------------------------------------------------------------------------------------------


class RecordingQmp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def execute(self, command: str, arguments: dict[str, Any]) -> object:
        self.calls.append((command, arguments))
        return {}

    def events(self) -> list[dict[str, Any]]:
        return [event for _, args in self.calls for event in args["events"]]


async def test_input_events_as_qmp_sees_them() -> None:
    qmp = RecordingQmp()
    guest = GuestInput(qmp.execute, lambda: (640, 400))
    await guest.key("a", True)
    await guest.scancode(0xE048, True)  # extended: cursor up
    await guest.pointer(639, 0, {"left"})
    await guest.pointer(320, 200, 0b100)  # RFB mask: right only
    await guest.wheel(-2)
    await guest.release()
    assert all(command == "input-send-event" for command, _ in qmp.calls)
    events = qmp.events()
    assert events[0] == {"type": "key", "data": {"down": True, "key": {"type": "qcode", "data": "a"}}}
    assert events[1] == {"type": "key", "data": {"down": True, "key": {"type": "number", "data": 0xC8}}}
    assert events[2:5] == [{"type": "abs", "data": {"axis": "x", "value": 639 * ABS_MAX // 640}},
                           {"type": "abs", "data": {"axis": "y", "value": 0}},
                           {"type": "btn", "data": {"down": True, "button": "left"}}]
    assert events[5:9] == [{"type": "abs", "data": {"axis": "x", "value": ABS_MAX // 2}},
                           {"type": "abs", "data": {"axis": "y", "value": ABS_MAX // 2}},
                           {"type": "btn", "data": {"down": True, "button": "right"}},
                           {"type": "btn", "data": {"down": False, "button": "left"}}]
    assert [e["data"]["button"] for e in events[9:13]] == ["wheel-down"] * 4
    released = events[13:]
    assert {"type": "btn", "data": {"down": False, "button": "right"}} in released
    assert {"type": "key", "data": {"down": False, "key": {"type": "qcode", "data": "a"}}} in released
    assert len(released) == 3
    assert scale_axis(10_000, 640) == 639 * ABS_MAX // 640 and scale_axis(-5, 640) == 0


async def test_key_events_are_paced_pointer_events_are_not() -> None:
    """QEMU's keyboard buffer holds 16 bytes: a burst of keys in one command would overflow it. So each key event
    ends a command, and the next one waits the key delay; pointer events ride along with no delay."""
    qmp = RecordingQmp()
    stamps: list[float] = []
    execute = qmp.execute

    async def timed(command: str, arguments: dict[str, Any]) -> object:
        stamps.append(time.monotonic())
        return await execute(command, arguments)

    guest = GuestInput(timed, lambda: (640, 400), key_delay=0.05)
    batch = (guest.pointer_events(1, 1) + guest.key_events("h", True) + guest.key_events("h", False)
             + guest.pointer_events(2, 2))
    await guest.send(batch)
    assert [len(args["events"]) for _, args in qmp.calls] == [3, 1, 2]
    assert qmp.events() == batch
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(stamps)), stamps
    # Two batches sent at once keep their order: the second waits for the first to be paced out.
    qmp.calls.clear()
    first = guest.key_events("a", True) + guest.key_events("a", False)
    second = guest.key_events("b", True) + guest.key_events("b", False)
    await asyncio.gather(guest.send(first), guest.send(second))
    assert qmp.events() == first + second
    # No delay: one command for the whole batch.
    qmp.calls.clear()
    await GuestInput(qmp.execute, lambda: (640, 400), key_delay=0).send(batch)
    assert len(qmp.calls) == 1


async def test_release_lets_go_only_of_what_the_gone_holder_pressed() -> None:
    qmp = RecordingQmp()
    guest = GuestInput(qmp.execute, lambda: (640, 400))
    first, second = object(), object()
    await guest.send(guest.key_events("shift", True) + guest.key_events("a", True), first)
    await guest.send(guest.key_events("b", True) + guest.key_events("shift", True), second)
    await guest.send(guest.pointer_events(10, 10, {"left"}, second), second)
    qmp.calls.clear()
    await guest.release(lambda h: h is first)  # "shift" is still held by the second: only "a" goes up
    assert qmp.events() == [{"type": "key", "data": {"down": False, "key": {"type": "qcode", "data": "a"}}}]
    qmp.calls.clear()
    await guest.release(lambda h: h is second)
    released = qmp.events()
    assert len(released) == 3
    assert {"type": "btn", "data": {"down": False, "button": "left"}} in released
    assert {e["data"]["key"]["data"] for e in released if e["type"] == "key"} == {"b", "shift"}
    qmp.calls.clear()
    await guest.release(lambda h: h is first)
    assert qmp.calls == []


async def test_keys_count_as_held_only_once_qemu_took_them() -> None:
    """A batch QEMU refuses leaves nothing to release (tracking follows delivery, not intent)."""
    qmp = RecordingQmp()
    calls = 0

    async def refusing_second(command: str, arguments: dict[str, Any]) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            reply = Message({"error": {"class": "GenericError", "desc": "no"}})
            raise ExecuteError(ErrorResponse(reply), Message({"execute": command}), reply)
        return await qmp.execute(command, arguments)

    guest = GuestInput(refusing_second, lambda: (640, 400), key_delay=0.001)
    holder = object()
    with pytest.raises(InputError):
        await guest.send(guest.key_events("a", True) + guest.key_events("b", True), holder)
    qmp.calls.clear()
    await guest.release(lambda h: h is holder)
    assert qmp.events() == [{"type": "key", "data": {"down": False, "key": {"type": "qcode", "data": "a"}}}]


async def test_input_refuses_what_qmp_would_not_understand() -> None:
    guest = GuestInput(RecordingQmp().execute, lambda: None)
    with pytest.raises(InputError):
        await guest.key("A; quit", True)
    with pytest.raises(InputError):
        await guest.scancode(0x1FF, True)
    with pytest.raises(InputError, match="no display mode"):
        await guest.pointer(1, 1)


# --- screendump -------------------------------------------------------------------------------------------


def test_write_screendump(short_dir: Path, writer: ShmWriter) -> None:
    with pytest.raises(ScreendumpError, match="no display mode"):
        write_screendump(writer.name, short_dir / "x.png")
    writer.set_mode(40, 20)
    writer.put_rect(0, 0, 40, 20, bytes(range(256)) * 12 + bytes(range(128)))
    path = short_dir / "dump.png"
    assert write_screendump(writer.name, path) == (40, 20)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (40, 20)
        assert image.tobytes() == Image.frombytes("RGB", (40, 20), ShmReader(writer.name).copy_frame(),
                                                  "raw", "BGRX").tobytes()
    assert sorted(p.name for p in short_dir.iterdir()) == ["dump.png"]  # no temporary file left


# --- real QEMU --------------------------------------------------------------------------------------------

COUNTER = TEXT_BOXES["counter"]


def intersects(record: DamageRecord, box: tuple[int, int, int, int]) -> bool:
    left, top, right, bottom = box
    return record.x < right and left < record.x + record.width and record.y < bottom and top < record.y + record.height


@needs_qemu
async def test_the_counter_produces_damage_records() -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        assert (rig.writer.mode.width, rig.writer.mode.height) == TEXT_SIZE
        seen: list[DamageRecord] = []
        deadline = time.monotonic() + WAIT_S
        while not any(intersects(r, COUNTER) for r in seen):
            assert time.monotonic() < deadline, "no damage over the counter"
            result = await asyncio.wait_for(sub.read(), WAIT_S)
            seen += [r for r in records_of(result) if isinstance(r, DamageRecord)]
        assert all(r.generation == rig.writer.mode.generation for r in seen)


@needs_qemu
async def test_typed_keys_reach_the_screen_in_shm() -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        blank = crop(frame_image(sub.reader), TEXT_BOXES["keys"])
        await rig.input.press("h")
        await rig.input.press("i", modifiers=["shift"])
        deadline = time.monotonic() + WAIT_S
        while (await rig.vm.read_text_screen())[4] != "KEYS: hI":
            assert time.monotonic() < deadline, "the guest did not echo the keys"
            await asyncio.sleep(0.1)
        # The guest has written the text; QEMU's own dump and the shm frame must agree on the KEYS row.
        expected = crop(await rig.vm.wait_for_screen(lambda im: crop(im, TEXT_BOXES["keys"]) != blank,
                                                     stable=TEXT_BOXES["keys"], what="hI"), TEXT_BOXES["keys"])
        await wait_frame(sub, lambda im: crop(im, TEXT_BOXES["keys"]) == expected, what="hI in shm")


@needs_qemu
async def test_f2_mode_switch_produces_a_mode_record() -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        await rig.input.press("f2")
        modes: list[ModeRecord] = []
        deadline = time.monotonic() + WAIT_S
        while not modes:
            assert time.monotonic() < deadline, "no mode record after F2"
            result = await asyncio.wait_for(sub.read(), WAIT_S)
            modes += [r for r in records_of(result) if isinstance(r, ModeRecord)]
        assert (modes[0].width, modes[0].height) == VGA_SIZE
        assert rig.capture.screen_size == VGA_SIZE
        assert sub.reader.mode().generation == modes[-1].generation


@needs_qemu
async def test_screendump_equals_qemus_own(short_dir: Path) -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        await rig.vm.execute("stop")
        qemu_dump = await rig.vm.screendump()
        # Updates QEMU sent before the stop may still be on their way: wait until shm has caught up.
        await wait_frame(sub, lambda im: im.tobytes() == qemu_dump.tobytes(), what="shm to match QEMU's dump")
        path = short_dir / "dump.png"
        assert await asyncio.to_thread(screendump, rig.display_socket, path) == qemu_dump.size
        with Image.open(path) as ours:
            assert ours.convert("RGB").tobytes() == qemu_dump.tobytes()
        await rig.vm.execute("cont")


@needs_qemu
async def test_a_paused_guest_causes_no_wakeups() -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        await rig.vm.execute("stop")
        deadline = time.monotonic() + WAIT_S
        while await sub.wait(timeout_s=1.0):  # in-flight updates drain; then a whole second of silence
            sub.reader.read_records()
            assert time.monotonic() < deadline, "wake-ups kept coming while the guest was paused"
        quiet_since = sub.wakeups
        assert not await sub.wait(timeout_s=1.0)
        assert sub.wakeups == quiet_since
        await rig.vm.execute("cont")
        assert await sub.wait(timeout_s=WAIT_S)  # and the counter wakes it again


SLOW_READER_CHILD = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[2])
from shm.notify import DisplaySubscription
async def main():
    sub = await DisplaySubscription.connect(sys.argv[1])
    print("attached", flush=True)
    sys.stdin.readline()  # busy elsewhere (the loop does not run) until the parent says go
    woken = await sub.wait(timeout_s=5)
    records = sub.reader.read_records()
    print(json.dumps({"woken": woken, "wakeups": sub.wakeups, "records": len(records)}), flush=True)
asyncio.run(main())
"""


@needs_qemu
async def test_wakeups_are_coalesced() -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        # A reader in another process that does not look while five batches go by: one wake-up for all.
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SLOW_READER_CHILD, str(rig.display_socket), str(ROOT),
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdin is not None
            assert await asyncio.wait_for(child.stdout.readline(), WAIT_S) == b"attached\n"
            await wait_until(lambda: rig.socket.readers == 2, what="the child reader")
            updates_before = rig.capture.updates
            await wait_until(lambda: rig.capture.updates >= updates_before + 5, what="five updates")
            child.stdin.write(b"go\n")
            result = json.loads(await asyncio.wait_for(child.stdout.readline(), WAIT_S))
        finally:
            if child.returncode is None:
                child.kill()
            await asyncio.wait_for(child.wait(), WAIT_S)
        assert result["woken"] and result["wakeups"] == 1 and result["records"] >= 5
        # A reader that follows along: never more wake-ups than batches.
        start_updates, start_wakeups, records = rig.capture.updates, sub.wakeups, 0
        while rig.capture.updates < start_updates + 10:
            await sub.wait(timeout_s=WAIT_S)
            records += len(records_of(sub.reader.read_records()))
        assert sub.wakeups - start_wakeups <= rig.capture.updates - start_updates + 1
        assert records >= sub.wakeups - start_wakeups - 1


@needs_qemu
async def test_stop_and_resume_become_run_state_records() -> None:
    async with running_display() as rig, await rig.subscribe() as sub:
        async def status() -> str:
            return str((await rig.vm.execute("query-status"))["status"])  # type: ignore[index]

        rig.capture.set_run_state(await status())
        await rig.vm.execute("stop")
        rig.capture.set_run_state(await status())
        await rig.vm.execute("cont")
        rig.capture.set_run_state(await status())
        states: list[RunStateRecord] = []
        while len(states) < 3:
            states += [r for r in records_of(await asyncio.wait_for(sub.read(), WAIT_S))
                       if isinstance(r, RunStateRecord)]
        assert [(r.state, r.code) for r in states] == [
            (RunState.RUNNING, "running"), (RunState.PAUSED, "paused"), (RunState.RUNNING, "running")]


READER_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from shm.notify import DisplaySubscription
async def main():
    sub = await DisplaySubscription.connect(sys.argv[1])
    print("attached", flush=True)
    while True:
        await sub.wait()
        sub.reader.read_records()
asyncio.run(main())
"""


@needs_qemu
async def test_a_reader_killed_with_sigkill_never_affects_the_writer() -> None:
    async with running_display() as rig:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", READER_CHILD, str(rig.display_socket), str(ROOT),
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        try:
            assert await asyncio.wait_for(child.stdout.readline(), WAIT_S) == b"attached\n"  # type: ignore[union-attr]
            await wait_until(lambda: rig.socket.readers == 1, what="the child reader")
            os.kill(child.pid, signal.SIGKILL)
            await asyncio.wait_for(child.wait(), WAIT_S)
            await wait_until(lambda: rig.socket.readers == 0, what="the core to drop the killed reader")
        finally:
            if child.returncode is None:
                child.kill()
                await asyncio.wait_for(child.wait(), WAIT_S)
        seq = rig.writer.write_seq
        await wait_until(lambda: rig.writer.write_seq > seq, what="the writer to go on")
        async with await rig.subscribe() as sub:  # and new readers still attach and get wake-ups
            assert await sub.wait(timeout_s=WAIT_S)


@needs_qemu
async def test_input_hints_never_reach_the_guest() -> None:
    async with running_display() as rig:
        guest = GuestInput(rig.vm.qmp.execute, lambda: rig.capture.screen_size, on_input=rig.capture.input_hint)
        for _ in range(10):
            rig.capture.input_hint()
            await asyncio.sleep(0.02)
        await guest.press("a")
        deadline = time.monotonic() + WAIT_S
        while (await rig.vm.read_text_screen())[4] != "KEYS: a":
            assert time.monotonic() < deadline, "the guest did not echo the key"
            await asyncio.sleep(0.1)
        assert "scancode" not in rig.vm.stderr_text()


@needs_qemu
async def test_pointer_reaches_a_usb_tablet() -> None:
    async with running_display() as rig:
        mice = await rig.vm.execute("query-mice")
        assert any(m["absolute"] for m in mice)  # type: ignore[attr-defined]
        await rig.input.pointer(100, 50, {"left"})
        await rig.input.pointer(100, 50, 0)
        await rig.input.wheel(1)
        with pytest.raises(InputError, match="QEMU refused"):
            await rig.input.key("no_such_key", True)

