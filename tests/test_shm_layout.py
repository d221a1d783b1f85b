"""The wire format in shm/layout.py: geometry, header checks, record encoding, and docs/shm.md agreeing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shm import layout
from shm.layout import (
    HEADER_SIZE,
    PAGE_SIZE,
    RECORD_BODIES,
    RECORD_SIZE,
    U64,
    CursorPositionRecord,
    CursorShapeRecord,
    DamageRecord,
    Geometry,
    LayoutError,
    ModeRecord,
    RecordKind,
    RunState,
    RunStateRecord,
    SegmentNotReady,
    VersionError,
    decode_slot,
    pack_header,
    unpack_header,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "shm.md"

u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
seqs = st.integers(1, 2**63)


def test_geometry_is_page_aligned_and_ordered() -> None:
    g = Geometry.plan(1024, 768, ring_slots=4096, cursor_max_width=64, cursor_max_height=32)
    assert g.ring_offset == HEADER_SIZE
    assert g.cursor_offset == g.ring_offset + 4096 * RECORD_SIZE
    assert g.fb_offset >= g.cursor_offset + 64 + 64 * 32 * 4
    assert g.fb_size == 1024 * 768 * 4
    assert g.segment_size == g.fb_offset + g.fb_size
    for offset in (g.ring_offset, g.cursor_offset, g.fb_offset, g.segment_size):
        assert offset % PAGE_SIZE == 0


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 10), {}),
        ((10, layout.MAX_FB_DIMENSION + 1), {}),
        ((10, 10), {"ring_slots": 3}),
        ((10, 10), {"ring_slots": 1}),
        ((10, 10), {"cursor_max_width": 0}),
    ],
)
def test_geometry_rejects_bad_parameters(args: tuple[int, int], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Geometry.plan(*args, **kwargs)


def _header(geometry: Geometry) -> bytearray:
    buf = bytearray(HEADER_SIZE)
    pack_header(memoryview(buf), geometry, writer_pid=4242)
    return buf


def test_header_round_trip() -> None:
    g = Geometry.plan(640, 480, ring_slots=8)
    header = unpack_header(_header(g), g.segment_size)
    assert header.geometry == g
    assert header.writer_pid == 4242


def test_header_rejects_what_it_does_not_understand() -> None:
    g = Geometry.plan(640, 480, ring_slots=8)
    with pytest.raises(SegmentNotReady):
        unpack_header(bytearray(HEADER_SIZE), g.segment_size)
    with pytest.raises(SegmentNotReady):
        unpack_header(_header(g), HEADER_SIZE - 1)
    bad_magic = _header(g)
    bad_magic[0:8] = b"NOTVMFRT"
    with pytest.raises(LayoutError, match="magic"):
        unpack_header(bad_magic, g.segment_size)
    future = _header(g)
    future[8:12] = (2).to_bytes(4, "little")
    with pytest.raises(VersionError) as info:
        unpack_header(future, g.segment_size)
    assert info.value.found == 2
    assert "version 2" in str(info.value)
    moved = _header(g)
    U64.pack_into(moved, 56, g.fb_offset + PAGE_SIZE)  # fb_offset pointing elsewhere
    with pytest.raises(LayoutError, match="offsets"):
        unpack_header(moved, g.segment_size)
    with pytest.raises(LayoutError, match="mapped"):
        unpack_header(_header(g), g.segment_size - PAGE_SIZE)


def decode_record(raw: bytes) -> object:
    seq, record = decode_slot(raw)
    assert seq == U64.unpack_from(raw)[0]
    return record


def _slot(kind: RecordKind, seq: int, generation: int, *payload: object) -> bytes:
    buf = bytearray(RECORD_SIZE)
    U64.pack_into(buf, 0, seq)
    RECORD_BODIES[kind].pack_into(buf, 8, kind, 0, generation, *payload)
    return bytes(buf)


@given(seqs, u32, u32, u32, u32, u32)
def test_damage_and_mode_round_trip(seq: int, gen: int, a: int, b: int, c: int, d: int) -> None:
    assert decode_record(_slot(RecordKind.DAMAGE, seq, gen, a, b, c, d)) == DamageRecord(seq, gen, a, b, c, d)
    assert decode_record(_slot(RecordKind.MODE, seq, gen, a, b, c, d)) == ModeRecord(seq, gen, a, b, c, d)


@given(seqs, u32, u32, u16, u16, u16, u16)
def test_cursor_shape_round_trip(seq: int, gen: int, serial: int, hx: int, hy: int, w: int, h: int) -> None:
    raw = _slot(RecordKind.CURSOR_SHAPE, seq, gen, serial, hx, hy, w, h)
    assert decode_record(raw) == CursorShapeRecord(seq, gen, serial, hx, hy, w, h)


@given(seqs, u32, i32, i32, st.booleans())
def test_cursor_position_round_trip(seq: int, gen: int, x: int, y: int, visible: bool) -> None:
    raw = _slot(RecordKind.CURSOR_POSITION, seq, gen, x, y, int(visible))
    assert decode_record(raw) == CursorPositionRecord(seq, gen, x, y, visible)


@given(seqs, u32, st.sampled_from(RunState), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=32))
def test_run_state_round_trip(seq: int, gen: int, state: RunState, code: str) -> None:
    raw = _slot(RecordKind.RUN_STATE, seq, gen, state, layout.encode_run_code(code))
    assert decode_record(raw) == RunStateRecord(seq, gen, state, code)


def test_unknown_kinds_and_states_are_tolerated() -> None:
    raw = bytearray(_slot(RecordKind.DAMAGE, 5, 1, 1, 2, 3, 4))
    raw[8:10] = (999).to_bytes(2, "little")
    assert decode_record(bytes(raw)) is None
    future_state = _slot(RecordKind.RUN_STATE, 5, 1, 77, b"new-state")
    assert decode_record(future_state) == RunStateRecord(5, 1, RunState.UNKNOWN, "new-state")
    with pytest.raises(ValueError):
        layout.encode_run_code("x" * 33)


@given(st.binary(min_size=RECORD_SIZE, max_size=RECORD_SIZE), st.sampled_from([*RecordKind, 0, 999]))
def test_any_slot_bytes_decode_without_raising(raw: bytes, kind: int) -> None:
    """A slot read while being overwritten holds anything; decoding must not fail before the check rejects it."""
    decode_slot(raw[:8] + kind.to_bytes(2, "little") + raw[10:])


def test_qmp_run_states_cover_qemu_status_names() -> None:
    assert layout.QMP_RUN_STATES["running"] is RunState.RUNNING
    assert layout.QMP_RUN_STATES["io-error"] is RunState.ERROR
    assert layout.QMP_RUN_STATES["inmigrate"] is RunState.MIGRATING


def test_protocol_words_are_aligned_and_fit() -> None:
    """Atomicity of the u64 protocol words relies on 8-byte alignment (see shm/writer.py)."""
    for offset in (layout.WRITE_SEQ_OFFSET, layout.STATE_LOCK_OFFSET, layout.CURSOR_LOCK_OFFSET, 0):
        assert offset % 8 == 0
    assert layout.STATIC_HEADER.size <= layout.WRITE_SEQ_OFFSET
    assert layout.STATE_OFFSET + layout.STATE.size <= HEADER_SIZE
    assert layout.CURSOR_HEADER_OFFSET + layout.CURSOR_HEADER.size <= layout.CURSOR_PIXELS_OFFSET
    assert RECORD_SIZE % 8 == 0


def _doc_rows(section: str) -> set[tuple[int, int, str]]:
    """(offset, size, field) rows of the first table under a docs/shm.md heading."""
    text = DOC.read_text()
    start = text.index(section)
    rows = set()
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        match = re.match(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|[^|]+\|\s*`(\w+)`", line)
        if match:
            rows.add((int(match[1]), int(match[2]), match[3]))
    return rows


def test_docs_header_table_matches_layout() -> None:
    names = [
        "magic", "layout_version", "header_size", "segment_size", "ring_offset", "ring_slots", "record_size",
        "cursor_offset", "cursor_max_width", "cursor_max_height", "writer_pid", "fb_offset", "fb_size",
        "fb_max_width", "fb_max_height",
    ]  # fmt: skip
    expected = set()
    offset = 0
    for name, code in zip(names, re.findall(r"\d*[a-zA-Z]", layout.STATIC_HEADER.format[1:]), strict=True):
        size = 8 if code == "8s" else {"I": 4, "Q": 8, "H": 2}[code]
        expected.add((offset, size, name))
        offset += size
    state_names = ["generation", "width", "height", "stride", "pixel_format", "run_state", "cursor_flags"]
    state_sizes = [4, 4, 4, 4, 4, 2, 2, 4, 4, layout.RUN_CODE_SIZE, 2]
    offset = layout.STATE_OFFSET
    for name, size in zip([*state_names, "cursor_x", "cursor_y", "run_code", "keyboard_leds"], state_sizes,
                          strict=True):
        expected.add((offset, size, name))
        offset += size
    expected |= {(layout.WRITE_SEQ_OFFSET, 8, "write_seq"), (layout.STATE_LOCK_OFFSET, 8, "state_lock")}
    assert _doc_rows("### Header") >= expected
    assert {row[2] for row in _doc_rows("### Header")} == {row[2] for row in expected}


def test_docs_slot_and_cursor_tables_match_layout() -> None:
    assert _doc_rows("### Record slot") == {
        (0, 8, "seq"), (8, 2, "kind"), (10, 2, "reserved"), (12, 4, "generation"), (16, 48, "payload"),
    }  # fmt: skip
    assert _doc_rows("### Cursor area") >= {
        (0, 8, "cursor_lock"), (8, 4, "serial"), (12, 2, "hot_x"), (14, 2, "hot_y"), (16, 2, "width"),
        (18, 2, "height"),
    }  # fmt: skip


def test_keyboard_leds_record_and_state_word() -> None:
    """The LED word: known bit plus QEMU's three bits; zero (an older writer) reads as not known."""
    raw = _slot(RecordKind.KEYBOARD_LEDS, 9, 2, layout.LEDS_KNOWN | layout.LED_CAPS_LOCK)
    assert decode_record(raw) == layout.KeyboardLedsRecord(9, 2, layout.LED_CAPS_LOCK)
    assert layout.decode_leds(0) is None
    assert layout.decode_leds(layout.LEDS_KNOWN) == 0
    assert layout.decode_leds(layout.LEDS_KNOWN | 0x7) == 0x7
