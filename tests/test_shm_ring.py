"""ShmWriter / ShmReader: the ring protocol, seqlocks, read-only mapping, other processes, naming and reclaim."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from PIL import Image

from shm import (
    CursorPositionRecord,
    DamageRecord,
    KeyboardLedsRecord,
    LayoutError,
    ModeRecord,
    Overrun,
    Record,
    RecordKind,
    RunState,
    RunStateRecord,
    SegmentNotReady,
    SeqlockTimeout,
    ShmReader,
    ShmWriter,
    VersionError,
    parse_segment_name,
    pid_alive,
    reclaim_stale_segments,
    segment_name,
)
from shm.layout import CURSOR_HEADER, CURSOR_HEADER_OFFSET, CURSOR_LOCK_OFFSET, INVALID_SEQ, STATE_LOCK_OFFSET, U64
from shm.naming import owner_alive

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 10.0
WriterFactory = Callable[..., ShmWriter]
ReaderFactory = Callable[..., ShmReader]


def seqs(result: list[Record] | Overrun) -> list[int]:
    assert isinstance(result, list), result
    return [record.seq for record in result]


def _test_vm() -> str:
    return f"pytest-{uuid.uuid4().hex[:12]}"


def _unlink(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh segment name; whatever was created under it is unlinked afterwards."""
    name = segment_name(_test_vm())
    yield name
    _unlink(name)


@pytest.fixture
def make_writer(shm_name: str) -> Iterator[WriterFactory]:
    writers: list[ShmWriter] = []

    def make(fb_max_width: int = 64, fb_max_height: int = 48, **kwargs: Any) -> ShmWriter:
        writer = ShmWriter(shm_name, fb_max_width, fb_max_height, **kwargs)
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.close()
        writer.unlink()


@pytest.fixture
def readers(shm_name: str) -> Iterator[ReaderFactory]:
    opened: list[ShmReader] = []

    def make(**kwargs: Any) -> ShmReader:
        reader = ShmReader(shm_name, **kwargs)
        opened.append(reader)
        return reader

    yield make
    for reader in opened:
        reader.close()


class Child:
    """A python child process speaking lines on stdin/stdout, always ended by pid with a timeout."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=CHILD_TIMEOUT)

    def wait(self) -> int:
        return self.proc.wait(timeout=CHILD_TIMEOUT)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


ChildFactory = Callable[..., Child]


@pytest.fixture
def children() -> Iterator[ChildFactory]:
    started: list[Child] = []

    def start(code: str, *args: str) -> Child:
        child = Child(code, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


# --- basics ----------------------------------------------------------------------------------------------


def test_every_record_kind_round_trips(make_writer: WriterFactory, readers: ReaderFactory) -> None:
    writer = make_writer()
    reader = readers()
    assert reader.read_records() == []
    assert reader.state().mode.generation == 0
    writer.set_mode(40, 30)
    writer.damage(1, 2, 3, 4)
    serial = writer.set_cursor_shape(1, 0, 2, 1, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    writer.set_cursor_position(-5, 7, visible=True)
    writer.set_run_state(RunState.ERROR, "io-error")
    assert reader.state().keyboard_leds is None  # not learned yet
    writer.set_keyboard_leds(0x4)
    records = reader.read_records()
    assert isinstance(records, list)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[5] == KeyboardLedsRecord(6, 1, 0x4)
    assert reader.state().keyboard_leds == 0x4
    assert records[0] == ModeRecord(1, 1, 40, 30, 160, 1)
    assert records[1] == DamageRecord(2, 1, 1, 2, 3, 4)
    assert records[3] == CursorPositionRecord(4, 1, -5, 7, True)
    assert records[4] == RunStateRecord(5, 1, RunState.ERROR, "io-error")
    state = reader.state()
    assert (state.mode.width, state.mode.height, state.mode.stride, state.mode.generation) == (40, 30, 160, 1)
    assert (state.run_state, state.run_code, state.cursor_x, state.cursor_y, state.cursor_visible) == (
        RunState.ERROR, "io-error", -5, 7, True,
    )
    cursor = reader.cursor()
    assert (cursor.serial, cursor.hot_x, cursor.hot_y, cursor.width, cursor.height) == (serial, 1, 0, 2, 1)
    assert cursor.pixels == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert reader.read_records() == []


def test_readers_keep_their_own_position(make_writer: WriterFactory, readers: ReaderFactory) -> None:
    writer = make_writer()
    writer.set_mode(10, 10)
    early = readers()
    writer.damage(0, 0, 1, 1)
    late = readers()  # starts at the end of the ring
    writer.damage(0, 0, 2, 2)
    assert seqs(early.read_records()) == [2, 3]
    assert seqs(late.read_records()) == [3]
    assert late.pending() == 0


def test_wrap_around_without_overrun(make_writer: WriterFactory, readers: ReaderFactory) -> None:
    writer = make_writer(ring_slots=8)
    writer.set_mode(64, 48)
    reader = readers()
    expected_seq = 2
    for lap in range(40):
        for i in range(1 + lap % 8):  # up to exactly a full ring unread
            writer.damage(i, lap % 48, 1, 1)
        records = reader.read_records()
        assert isinstance(records, list)
        assert [r.seq for r in records] == list(range(expected_seq, expected_seq + 1 + lap % 8))
        assert all(isinstance(r, DamageRecord) and r.y == lap % 48 for r in records)
        expected_seq += len(records)


def test_overrun_then_resync(make_writer: WriterFactory, readers: ReaderFactory) -> None:
    writer = make_writer(ring_slots=4)
    writer.set_mode(64, 48)
    reader = readers()
    for i in range(5):  # one more than the ring holds
        writer.damage(i, 0, 1, 1)
    assert reader.read_records() == Overrun(missed=5)
    assert reader.position == writer.write_seq + 1
    writer.damage(9, 9, 1, 1)
    assert reader.read_records() == [DamageRecord(writer.write_seq, 1, 9, 9, 1, 1)]


def test_limit_reads_in_chunks(make_writer: WriterFactory, readers: ReaderFactory) -> None:
    writer = make_writer(ring_slots=16)
    writer.set_mode(64, 48)
    reader = readers()
    for i in range(10):
        writer.damage(i, 0, 1, 1)
    assert seqs(reader.read_records(limit=4)) == [2, 3, 4, 5]
    assert reader.pending() == 6
    assert seqs(reader.read_records(limit=100)) == list(range(6, 12))


# --- torn records ----------------------------------------------------------------------------------------


def test_writer_interrupted_mid_record(make_writer: WriterFactory, readers: ReaderFactory) -> None:
    writer = make_writer(ring_slots=4)
    writer.set_mode(64, 48)
    lagging = readers()  # wants record 2 next
    current = readers()
    for i in range(3):
        writer.damage(i, 0, 1, 1)  # records 2, 3, 4
    assert seqs(current.read_records()) == [2, 3, 4]
    seq = writer._begin_record(RecordKind.DAMAGE, 7, 7, 7, 7)  # record 5, in record 1's slot: not published
    writer._ring[(seq % 4) * 64 + 16 : (seq % 4) * 64 + 24] = b"\xee" * 8  # and only half written
    assert current.read_records() == []  # unpublished: not visible
    assert seqs(lagging.read_records(limit=1)) == [2]
    writer._begin_record(RecordKind.DAMAGE, 8, 8, 8, 8)  # record 6 starts overwriting record 2's slot
    lagging.position = 2  # wants the record being overwritten: the slot says INVALID
    assert lagging.read_records() == Overrun(missed=3)
    lagging.position = 3  # records 3 and 4 are intact
    assert seqs(lagging.read_records()) == [3, 4]
    writer._publish_record(5)
    writer._publish_record(6)
    assert seqs(current.read_records()) == [5, 6]


def test_slot_being_rewritten_during_a_read_is_rejected(
    make_writer: WriterFactory, readers: ReaderFactory
) -> None:
    writer = make_writer(ring_slots=4)
    writer.set_mode(64, 48)
    reader = readers()
    seq = writer.damage(1, 1, 1, 1)
    copied_seq, record = reader._load_slot(seq)
    assert reader._slot_still_holds(seq, copied_seq)
    assert record == DamageRecord(seq, 1, 1, 1, 1, 1)
    for _ in range(3):
        writer.damage(2, 2, 2, 2)
    writer._begin_record(RecordKind.DAMAGE, 3, 3, 3, 3)  # the next lap starts rewriting that slot
    assert not reader._slot_still_holds(seq, copied_seq)
    assert not reader._slot_still_holds(seq + 4, reader._load_slot(seq + 4)[0])  # copied while INVALID
    writer._publish_record(seq + 4)
    assert not reader._slot_still_holds(seq, copied_seq)
    assert not reader._slot_still_holds(seq + 4, copied_seq)  # nor is the old copy taken for the new record


def test_slot_from_an_older_lap_is_not_taken_for_a_new_one(
    make_writer: WriterFactory, readers: ReaderFactory
) -> None:
    writer = make_writer(ring_slots=4)
    writer.set_mode(64, 48)
    reader = readers()
    seq = writer.damage(1, 1, 1, 1)
    assert not reader._slot_still_holds(seq + 4, reader._load_slot(seq + 4)[0])
    empty = seq + 1  # a slot never written holds 0
    assert not reader._slot_still_holds(empty, reader._load_slot(empty)[0])


# --- seqlocks --------------------------------------------------------------------------------------------


def test_state_read_retries_across_a_concurrent_update(
    make_writer: WriterFactory, readers: ReaderFactory
) -> None:
    writer = make_writer()
    writer.set_cursor_shape(0, 0, 1, 1, b"\x00\x00\x00\xff")
    reader = readers()
    attempts: list[int] = []

    def read() -> tuple[int, ...]:
        fields: tuple[int, ...] = CURSOR_HEADER.unpack_from(reader._cursor, CURSOR_HEADER_OFFSET)
        if not attempts:
            writer.set_cursor_shape(1, 1, 2, 2, b"\x11" * 16)  # lands between our two lock reads
        attempts.append(fields[0])
        return fields

    assert reader._read_locked(reader._cursor, CURSOR_LOCK_OFFSET, read)[0] == 2
    assert attempts == [1, 2]


def test_writer_dead_inside_a_seqlock_gives_a_timeout_not_a_hang(
    make_writer: WriterFactory, readers: ReaderFactory
) -> None:
    writer = make_writer()
    reader = readers(lock_timeout=0.05)
    lock = U64.unpack_from(writer._mv, STATE_LOCK_OFFSET)[0]
    U64.pack_into(writer._mv, STATE_LOCK_OFFSET, lock + 1)  # as if the writer died mid-update
    start = time.monotonic()
    with pytest.raises(SeqlockTimeout):
        reader.state()
    assert time.monotonic() - start < 1.0
    U64.pack_into(writer._cursor, CURSOR_LOCK_OFFSET, 1)
    with pytest.raises(SeqlockTimeout):
        reader.cursor()
    U64.pack_into(writer._mv, STATE_LOCK_OFFSET, lock + 2)
    assert reader.state().mode.generation == 0


# --- framebuffer -----------------------------------------------------------------------------------------


def test_rect_and_frame_copies_with_padded_stride(
    make_writer: WriterFactory, readers: ReaderFactory
) -> None:
    writer = make_writer(64, 48)
    mode = writer.set_mode(5, 4, stride=5 * 4 + 12)
    reader = readers()
    frame = bytes(range(5 * 4 * 4))
    writer.put_rect(0, 0, 5, 4, frame)
    assert reader.copy_frame() == frame
    assert reader.copy_rect(1, 1, 2, 2) == frame[24:32] + frame[44:52]
    assert reader.copy_rect(1, 1, 0, 0) == b""
    with pytest.raises(ValueError):
        reader.copy_rect(4, 0, 2, 1)
    writer.set_mode(8, 8)
    assert len(reader.copy_rect(3, 3, 2, 1, mode)) == 8  # the caller's older mode still copies


def test_pixel_format_1_is_bgrx_as_pillow_reads_it(
    make_writer: WriterFactory, readers: ReaderFactory
) -> None:
    writer = make_writer()
    writer.set_mode(3, 1)
    writer.put_rect(0, 0, 3, 1, bytes([0, 0, 255, 0, 0, 255, 0, 0, 255, 0, 0, 0]))  # red, green, blue
    reader = readers()
    image = Image.frombytes("RGB", (3, 1), reader.copy_frame(), "raw", "BGRX")
    assert [image.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_writer_validates_its_input(make_writer: WriterFactory) -> None:
    writer = make_writer(64, 48, cursor_max_width=8, cursor_max_height=8)
    with pytest.raises(ValueError):
        writer.damage(0, 0, 1, 1)  # no mode yet
    with pytest.raises(ValueError):
        writer.set_mode(65, 48)
    with pytest.raises(ValueError):
        writer.set_mode(10, 10, stride=39)
    with pytest.raises(ValueError):
        writer.set_mode(10, 10, pixel_format=7)
    writer.set_mode(10, 10)
    with pytest.raises(ValueError):
        writer.damage(5, 5, 6, 1)
    with pytest.raises(ValueError):
        writer.put_rect(0, 0, 2, 2, b"\x00" * 15)
    with pytest.raises(ValueError):
        writer.set_cursor_shape(0, 0, 9, 1, b"\x00" * 36)
    with pytest.raises(ValueError):
        writer.set_cursor_shape(2, 0, 2, 1, b"\x00" * 8)
    with pytest.raises(ValueError):
        writer.set_run_state(RunState.RUNNING, "x" * 33)
    assert writer.write_seq == 1


# --- opening, permissions, lifetime -----------------------------------------------------------------------


def test_segment_mode_and_exclusive_create(shm_name: str, make_writer: WriterFactory) -> None:
    make_writer()
    path = "/dev/shm" + shm_name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(posix_ipc.ExistentialError):
        ShmWriter(shm_name, 8, 8)
    other = segment_name(_test_vm())
    try:
        with ShmWriter(other, 8, 8, mode=0o600):
            assert stat.S_IMODE(os.stat("/dev/shm" + other).st_mode) == 0o600
        assert not os.path.exists("/dev/shm" + other)  # the context manager unlinks
    finally:
        _unlink(other)


def test_reader_refuses_what_is_not_a_segment(shm_name: str) -> None:
    with pytest.raises(posix_ipc.ExistentialError):
        ShmReader(shm_name)
    raw = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, size=8192)
    try:
        with pytest.raises(SegmentNotReady):
            ShmReader(shm_name)
        with open("/dev/shm" + shm_name, "r+b") as file:
            file.write(b"JUNKJUNK")
        with pytest.raises(LayoutError, match="magic"):
            ShmReader(shm_name)
    finally:
        raw.close_fd()


def test_reader_refuses_an_unknown_version(make_writer: WriterFactory, shm_name: str) -> None:
    writer = make_writer()
    writer._mv[8:12] = (99).to_bytes(4, "little")
    with pytest.raises(VersionError, match="99"):
        ShmReader(shm_name)


def test_reader_mapping_is_read_only(
    make_writer: WriterFactory, shm_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened_flags: list[int] = []
    real = posix_ipc.SharedMemory

    def spy(*args: Any, **kwargs: Any) -> Any:
        segment = real(*args, **kwargs)
        opened_flags.append(fcntl.fcntl(segment.fd, fcntl.F_GETFL))
        return segment

    make_writer()
    monkeypatch.setattr(posix_ipc, "SharedMemory", spy)
    reader = ShmReader(shm_name)
    try:
        assert opened_flags and opened_flags[0] & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(TypeError):
            reader._mv[0] = 0
        with pytest.raises(TypeError):
            reader._fb[0:4] = b"\x00" * 4
        maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if shm_name[1:] in line]
        perms = {line.split()[1] for line in maps}
        assert "r--s" in perms  # the reader's mapping (the writer's is rw-s)
    finally:
        reader.close()


READ_ONLY_ATTACKER = """
    import ctypes, errno, sys
    from shm import ShmReader
    reader = ShmReader(sys.argv[1])
    maps = open("/proc/self/maps").read().splitlines()
    line = next(line for line in maps if sys.argv[1][1:] in line)
    start = int(line.split("-")[0], 16)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rc = libc.mprotect(start, 4096, 3)  # PROT_READ | PROT_WRITE
    print("mprotect", rc, errno.errorcode.get(ctypes.get_errno()), flush=True)
    ctypes.memset(start, 0xAB, 8)  # must fault
    print("wrote", flush=True)
"""


def test_compromised_reader_cannot_write(
    make_writer: WriterFactory, shm_name: str, children: ChildFactory
) -> None:
    writer = make_writer()
    before = bytes(writer._mv[:4096])
    child = children(READ_ONLY_ATTACKER, shm_name)
    assert child.line() == "mprotect -1 EACCES"
    assert child.wait() == -signal.SIGSEGV
    assert child.line() == ""
    assert bytes(writer._mv[:4096]) == before


def test_reader_survives_unlink_and_writer_close(shm_name: str) -> None:
    writer = ShmWriter(shm_name, 16, 16)
    reader = ShmReader(shm_name)
    try:
        writer.set_mode(16, 16)
        writer.unlink()
        writer.damage(0, 0, 1, 1)
        writer.close()
        writer.close()  # idempotent
        assert seqs(reader.read_records()) == [1, 2]
        assert reader.state().mode.width == 16
    finally:
        reader.close()
        reader.close()


# --- model-based: one writer, several readers, any interleaving ------------------------------------------


@dataclass
class Copy:
    seq: int
    copied_seq: int
    record: Record | None
    slot_writes: int
    held: bool


class RingMachine(RuleBasedStateMachine):
    """The model knows which record each slot holds; readers must agree with it exactly."""

    SLOTS = 4
    READERS = 3

    def __init__(self) -> None:
        super().__init__()
        self.name = segment_name(_test_vm())
        self.writer = ShmWriter(self.name, 32, 32, ring_slots=self.SLOTS, cursor_max_width=4, cursor_max_height=4)
        self.readers = [ShmReader(self.name) for _ in range(self.READERS)]
        self.positions = [1] * self.READERS
        self.copies: dict[int, Copy] = {}
        self.records: dict[int, Record] = {}
        self.slot_seq = [0] * self.SLOTS  # what each slot's seq word says (INVALID while being written)
        self.slot_writes = [0] * self.SLOTS
        self.head = 0
        self.pending: int | None = None
        self.generation = 0
        self.size = (0, 0)
        self.run = (RunState.UNKNOWN, "")
        self.pointer = (0, 0, False)

    def teardown(self) -> None:
        for reader in self.readers:
            reader.close()
        self.writer.close()
        self.writer.unlink()

    def _started(self, seq: int) -> None:
        slot = seq % self.SLOTS
        self.slot_seq[slot] = INVALID_SEQ
        self.slot_writes[slot] += 1

    def _published(self, seq: int, record: Record) -> None:
        self.slot_seq[seq % self.SLOTS] = seq
        self.records[seq] = record
        self.head = seq

    # writer steps
    @precondition(lambda self: self.pending is None)
    @rule(width=st.integers(1, 32), height=st.integers(1, 32))
    def set_mode(self, width: int, height: int) -> None:
        self.writer.set_mode(width, height)
        seq = self.writer.write_seq
        self.generation += 1
        self.size = (width, height)
        self._started(seq)
        self._published(seq, ModeRecord(seq, self.generation, width, height, width * 4, 1))

    @precondition(lambda self: self.pending is None and self.generation > 0)
    @rule(data=st.data())
    def damage(self, data: st.DataObject) -> None:
        x = data.draw(st.integers(0, self.size[0] - 1))
        y = data.draw(st.integers(0, self.size[1] - 1))
        w = data.draw(st.integers(1, self.size[0] - x))
        h = data.draw(st.integers(1, self.size[1] - y))
        seq = self.writer.damage(x, y, w, h)
        self._started(seq)
        self._published(seq, DamageRecord(seq, self.generation, x, y, w, h))

    @precondition(lambda self: self.pending is None)
    @rule(x=st.integers(-(2**31), 2**31 - 1), y=st.integers(-100, 100), visible=st.booleans())
    def move_pointer(self, x: int, y: int, visible: bool) -> None:
        self.writer.set_cursor_position(x, y, visible)
        seq = self.writer.write_seq
        self.pointer = (x, y, visible)
        self._started(seq)
        self._published(seq, CursorPositionRecord(seq, self.generation, x, y, visible))

    @precondition(lambda self: self.pending is None)
    @rule(state=st.sampled_from(RunState), code=st.sampled_from(["", "running", "io-error", "x" * 32]))
    def run_state(self, state: RunState, code: str) -> None:
        self.writer.set_run_state(state, code)
        seq = self.writer.write_seq
        self.run = (state, code)
        self._started(seq)
        self._published(seq, RunStateRecord(seq, self.generation, state, code))

    @precondition(lambda self: self.pending is None)
    @rule(junk=st.binary(min_size=1, max_size=48))
    def writer_interrupted(self, junk: bytes) -> None:
        """The writer stops after marking the slot INVALID and writing part of the payload."""
        seq = self.writer._begin_record(RecordKind.CURSOR_POSITION, 1, 2, 1)
        offset = (seq % self.SLOTS) * 64 + 16
        self.writer._ring[offset : offset + len(junk)] = junk
        self.pending = seq
        self._started(seq)

    @precondition(lambda self: self.pending is not None)
    @rule()
    def writer_resumes(self) -> None:
        """Finish the interrupted record with a well-formed payload, then publish it."""
        seq = self.pending
        assert seq is not None
        offset = (seq % self.SLOTS) * 64 + 16
        self.writer._ring[offset : offset + 48] = bytes(48)
        self.writer._ring[offset : offset + 12] = (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + b"\x01\0\0\0"
        self.writer._publish_record(seq)
        self.slot_writes[seq % self.SLOTS] += 1
        self._published(seq, CursorPositionRecord(seq, self.generation, 1, 2, True))
        self.pending = None

    # reader steps
    @rule(index=st.integers(0, READERS - 1), limit=st.none() | st.integers(1, 6))
    def read(self, index: int, limit: int | None) -> None:
        first = self.positions[index]
        result = self.readers[index].read_records(limit)
        intact_from = self.head - self.SLOTS + 1 + (self.pending is not None)
        if first > self.head:
            assert result == []
        elif first < intact_from:
            assert result == Overrun(missed=self.head - first + 1)
            self.positions[index] = self.head + 1
        else:
            last = self.head if limit is None else min(self.head, first + limit - 1)
            assert result == [self.records[seq] for seq in range(first, last + 1)]
            self.positions[index] = last + 1

    @precondition(lambda self: self.head > 0)
    @rule(index=st.integers(0, READERS - 1), data=st.data())
    def start_copy(self, index: int, data: st.DataObject) -> None:
        """A reader copies a slot and is then descheduled (any seq, also future and long-gone ones)."""
        seq = data.draw(st.integers(max(1, self.head - 2 * self.SLOTS), self.head + self.SLOTS))
        slot = seq % self.SLOTS
        copied_seq, record = self.readers[index]._load_slot(seq)
        self.copies[index] = Copy(seq, copied_seq, record, self.slot_writes[slot], self.slot_seq[slot] == seq)

    @precondition(lambda self: bool(self.copies))
    @rule(data=st.data())
    def finish_copy(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(sorted(self.copies)))
        copy = self.copies.pop(index)
        accepted = self.readers[index]._slot_still_holds(copy.seq, copy.copied_seq)
        untouched = copy.held and self.slot_writes[copy.seq % self.SLOTS] == copy.slot_writes
        assert accepted == untouched
        if accepted:
            assert copy.record == self.records[copy.seq]

    @invariant()
    def positions_and_state_agree(self) -> None:
        for reader, position in zip(self.readers, self.positions, strict=True):
            assert reader.position == position
        state = self.readers[0].state()
        assert state.mode.generation == self.generation
        assert (state.mode.width, state.mode.height) == self.size
        assert (state.run_state, state.run_code) == self.run
        assert (state.cursor_x, state.cursor_y, state.cursor_visible) == self.pointer


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- another process hammering the ring ------------------------------------------------------------------

HAMMER = """
    from shm import RunState

    def expected(seq):
        '''What the hammer writes as record `seq` (seq >= 2): every byte derived from seq.'''
        kind = seq % 3
        if kind == 0:
            return ("damage", seq % 200, (seq // 200) % 200, 1 + seq % 56, 1 + (seq * 7) % 56)
        if kind == 1:
            return ("pointer", seq & 0x7FFFFFFF, -(seq & 0xFFFF), bool(seq & 1))
        return ("run", RunState(seq % 7), f"s{seq:031d}")

    def cursor_of(serial):
        width = 1 + serial % 16
        return width, 17 - width, bytes([serial & 0xFF]) * (width * (17 - width) * 4)
"""

HAMMER_WRITER = (
    HAMMER
    + """
    import sys, time
    from shm import ShmWriter
    name, seconds, slots, pause = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    with ShmWriter(name, 256, 256, ring_slots=slots, cursor_max_width=16, cursor_max_height=16) as writer:
        writer.set_mode(256, 256)
        print("ready", flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + seconds
        serial = 0
        while time.monotonic() < deadline:
            # bursts shorter and longer than a small ring, then a pause: readers both keep up and fall behind
            for _ in range((4, 12, 24, 48, 100)[serial % 5]):
                what = expected(writer.write_seq + 1)
                if what[0] == "damage":
                    writer.damage(*what[1:])
                elif what[0] == "pointer":
                    writer.set_cursor_position(*what[1:])
                else:
                    writer.set_run_state(*what[1:])
            serial += 1  # the writer numbers shapes 1, 2, 3... too
            width, height, pixels = cursor_of(serial)
            writer.set_cursor_shape(0, 0, width, height, pixels)
            if pause:
                time.sleep(pause)
        print("done", writer.write_seq, flush=True)
        sys.stdin.readline()
"""
)


def _as_expected(record: Record) -> tuple[object, ...]:
    if isinstance(record, DamageRecord):
        return ("damage", record.x, record.y, record.width, record.height)
    if isinstance(record, CursorPositionRecord):
        return ("pointer", record.x, record.y, record.visible)
    assert isinstance(record, RunStateRecord)
    return ("run", record.state, record.code)


@pytest.mark.parametrize(
    ("slots", "seconds", "pause"),
    [
        (16, 0.7, 0.0002),
        (1024, 0.7, 0.0002),
        # Tears are rare (CPython copies a slot in ~100 ns): racing long enough to catch a reader that
        # skipped its re-check takes seconds, so this one runs with -m slow.
        pytest.param(16, 15.0, 0.0, marks=pytest.mark.slow),
    ],
)
def test_writer_in_another_process_never_yields_a_bad_record(
    shm_name: str, children: ChildFactory, slots: int, seconds: float, pause: float
) -> None:
    spec: dict[str, Any] = {}
    exec(textwrap.dedent(HAMMER), spec)
    expected, cursor_of = spec["expected"], spec["cursor_of"]
    child = children(HAMMER_WRITER, shm_name, str(seconds), str(slots), str(pause))
    assert child.line() == "ready"
    readers = [ShmReader(shm_name) for _ in range(3)]
    racer = ShmReader(shm_name)  # always reads the oldest slots, the ones the writer is about to overwrite
    try:
        child.send("go")
        accepted = overruns = cursors = 0
        done: int | None = None
        deadline = time.monotonic() + seconds + 20
        while time.monotonic() < deadline:
            racer.position = max(1, racer.write_seq() - slots + 2)
            for reader in [*readers, racer]:
                first = reader.position
                result = reader.read_records()
                if isinstance(result, Overrun):
                    overruns += 1
                    continue
                assert [r.seq for r in result] == list(range(first, first + len(result)))
                for record in result:
                    if record.seq >= 2 and not hasattr(record, "serial"):
                        assert _as_expected(record) == expected(record.seq), record
                    accepted += 1
            state = readers[0].state()  # fields written together must be read together
            assert (state.cursor_y, state.cursor_visible) == (-(state.cursor_x & 0xFFFF), bool(state.cursor_x & 1))
            assert state.run_code == "" or int(state.run_code[1:]) % 7 == state.run_state
            cursor = readers[1].cursor()
            if cursor.serial:
                assert (cursor.width, cursor.height, cursor.pixels) == cursor_of(cursor.serial)
                cursors += 1
            if done is None and _readable(child):
                line = child.line()
                assert line.startswith("done"), line
                done = int(line.split()[1])
            if done is not None and all(reader.position == done + 1 for reader in readers):
                break
        assert done is not None, "writer did not finish"
        assert all(reader.position == done + 1 for reader in readers)
        child.send("bye")
        assert child.wait() == 0
    finally:
        for reader in [*readers, racer]:
            reader.close()
    assert accepted > 500 and cursors > 0
    print(f"ring {slots}: accepted {accepted} records, {overruns} overruns, {cursors} cursor reads")


def _readable(child: Child) -> bool:
    assert child.proc.stdout is not None
    return bool(select.select([child.proc.stdout], [], [], 0)[0])


READER_CHILD = """
    import sys
    from shm import ShmReader
    reader = ShmReader(sys.argv[1])
    print("reading", flush=True)
    while True:
        reader.read_records()
        reader.state()
        reader.cursor()
"""


def test_reader_killed_with_sigkill_does_not_affect_the_writer(
    make_writer: WriterFactory, readers: ReaderFactory, shm_name: str,
    children: ChildFactory,
) -> None:
    writer = make_writer(ring_slots=8)
    writer.set_mode(64, 48)
    survivor = readers()
    child = children(READER_CHILD, shm_name)
    assert child.line() == "reading"
    for i in range(50):
        writer.damage(i % 64, 0, 1, 1)
        writer.set_cursor_shape(0, 0, 1, 1, bytes([i, i, i, 255]))
        if i == 25:
            assert child.kill() == -signal.SIGKILL
    assert survivor.read_records() == Overrun(missed=100)
    writer.set_run_state(RunState.RUNNING, "running")
    assert survivor.read_records() == [RunStateRecord(writer.write_seq, 1, RunState.RUNNING, "running")]
    assert survivor.cursor().pixels == bytes([49, 49, 49, 255])


# --- naming and reclaim ----------------------------------------------------------------------------------


@given(st.text(min_size=1, max_size=15), st.integers(1, 2**22), st.text("0123456789abcdef", min_size=1, max_size=16))
def test_segment_names_parse_back(vm: str, pid: int, token: str) -> None:
    name = segment_name(vm, pid, token)
    assert name.startswith("/vmfront.") and name.count(".") == 3 and "/" not in name[1:]
    parsed = parse_segment_name(name)
    assert parsed is not None
    assert (parsed.vm_name, parsed.pid, parsed.token) == (vm, pid, token)


def test_segment_names_are_unique_and_checked() -> None:
    assert segment_name("vm") != segment_name("vm")
    assert segment_name("a.b", 1, "ff") == "/vmfront.a%2Eb.1.ff"
    for bad in [("", 1, "ab"), ("vm", 0, "ab"), ("vm", 1, "a.b"), ("vm", 1, ""), ("x" * 300, 1, "ab")]:
        with pytest.raises(ValueError):
            segment_name(*bad)
    for name in ["/other.vm.1.ab", "/vmfront.vm.x.ab", "/vmfront.vm.1", "/vmfront..1.ab", "/vmfront.a.b.1.ab"]:
        assert parse_segment_name(name) is None


def test_pid_alive_treats_zombies_as_dead() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-1)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while pid_alive(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.wait(timeout=CHILD_TIMEOUT)
    assert not pid_alive(proc.pid)


CRASHING_WRITER = """
    import sys
    from shm import ShmWriter, segment_name
    writer = ShmWriter(segment_name(sys.argv[1]), 64, 64)
    writer.set_mode(64, 64)
    print(writer.name, flush=True)
    sys.stdin.readline()
"""


def test_a_reused_pid_does_not_keep_a_dead_cores_segment(children: ChildFactory) -> None:
    """A segment older than the process that now has its creator's pid belongs to a dead core."""
    child = children(CRASHING_WRITER, _test_vm())
    child.line()
    assert owner_alive(child.proc.pid, time.time())  # the creator itself
    assert not owner_alive(child.proc.pid, time.time() - 3600)  # created an hour before this process started
    child.kill()
    assert not owner_alive(child.proc.pid, time.time())


def test_stale_segment_of_a_sigkilled_writer_is_reclaimed(children: ChildFactory) -> None:
    vm = _test_vm()
    child = children(CRASHING_WRITER, vm)
    stale = child.line()
    live = segment_name(vm)
    other_vm = segment_name(_test_vm(), pid=child.proc.pid)
    created = [stale, live, other_vm]
    try:
        with ShmWriter(live, 8, 8), ShmWriter(other_vm, 8, 8):
            assert reclaim_stale_segments(vm) == []  # the crashing writer is still alive
            assert child.kill() == -signal.SIGKILL
            reader = ShmReader(stale)  # a client still attached to the dead core's segment
            assert os.path.exists("/dev/shm" + stale)
            assert reclaim_stale_segments(vm) == [stale]
            assert not os.path.exists("/dev/shm" + stale)
            assert os.path.exists("/dev/shm" + live) and os.path.exists("/dev/shm" + other_vm)
            assert reader.state().mode.width == 64  # its mapping outlives the name
            reader.close()
            assert reclaim_stale_segments(vm, is_alive=lambda pid, created: False) == [live]
            assert other_vm in reclaim_stale_segments()  # any VM's, once its core is dead
    finally:
        for name in created:
            _unlink(name)
