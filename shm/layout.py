"""The shared-memory wire format: the one place that says what every byte of a segment means.

docs/shm.md mirrors this module byte by byte; change both together and follow the version rule written there.
Pure data and pack/unpack helpers, no I/O, so the writer, the reader, the tests and the docs agree on one source.
All integers are little-endian. A segment is:

    header (one page) | event ring | cursor area | framebuffer

each part starting on a page boundary, with its offset and size recorded in the header.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"VMFRSHM\x00"
# Bump on any change to an existing field's offset, size or meaning (see docs/shm.md, "Version rule").
LAYOUT_VERSION = 1

PAGE_SIZE = 4096
HEADER_SIZE = PAGE_SIZE
RECORD_SIZE = 64
DEFAULT_RING_SLOTS = 4096
DEFAULT_CURSOR_MAX = 256
MAX_FB_DIMENSION = 16384
MAX_CURSOR_DIMENSION = 1024
MAX_RING_SLOTS = 1 << 24
RUN_CODE_SIZE = 32

Buffer = bytes | bytearray | memoryview

# A slot whose sequence word holds this is being written: its payload must not be trusted.
INVALID_SEQ = 0xFFFF_FFFF_FFFF_FFFF


class LayoutError(Exception):
    """The segment does not hold a well-formed layout this code understands."""


class VersionError(LayoutError):
    """The segment was written with a layout version this reader does not speak."""

    def __init__(self, found: int) -> None:
        super().__init__(f"shm layout version {found} is not supported (this reader speaks {LAYOUT_VERSION})")
        self.found = found


class SegmentNotReady(LayoutError):
    """The segment exists but its writer has not finished the header yet (magic still zero)."""


class PixelFormat(IntEnum):
    """Framebuffer pixel formats; 0 is never valid so a zeroed header cannot pass for a mode."""

    BGRX8888 = 1  # 32 bits per pixel, bytes B, G, R, X in memory (Pillow raw mode "BGRX")


BYTES_PER_PIXEL: dict[int, int] = {PixelFormat.BGRX8888: 4}
CURSOR_BYTES_PER_PIXEL = 4  # cursor images are always B, G, R, A in memory (straight alpha)


class RecordKind(IntEnum):
    """Event ring record kinds; readers skip kinds they do not know."""

    DAMAGE = 1
    MODE = 2
    CURSOR_SHAPE = 3
    CURSOR_POSITION = 4
    RUN_STATE = 5
    KEYBOARD_LEDS = 6


class RunState(IntEnum):
    """The guest's run state, coarse enough for a display; the QMP status name travels beside it."""

    UNKNOWN = 0
    RUNNING = 1
    PAUSED = 2
    SHUTDOWN = 3
    SUSPENDED = 4
    MIGRATING = 5
    ERROR = 6

    @classmethod
    def decode(cls, value: int) -> RunState:
        """A newer writer may send states this reader does not know: they read as UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


QMP_RUN_STATES = {
    "running": RunState.RUNNING,
    "paused": RunState.PAUSED,
    "debug": RunState.PAUSED,
    "prelaunch": RunState.PAUSED,
    "restore-vm": RunState.PAUSED,
    "save-vm": RunState.PAUSED,
    "watchdog": RunState.PAUSED,
    "shutdown": RunState.SHUTDOWN,
    "suspended": RunState.SUSPENDED,
    "inmigrate": RunState.MIGRATING,
    "postmigrate": RunState.MIGRATING,
    "finish-migrate": RunState.MIGRATING,
    "colo": RunState.MIGRATING,
    "internal-error": RunState.ERROR,
    "io-error": RunState.ERROR,
    "guest-panicked": RunState.ERROR,
}

# --- header (page 0) -----------------------------------------------------------------------------------------
# Static part: written once by the writer, magic last, never changed afterwards.
STATIC_HEADER = struct.Struct("<8sIIQQIIQHHIQQII")
STATIC_HEADER_OFFSET = 0
# Dynamic part: each group on its own 64-byte line.
WRITE_SEQ_OFFSET = 128  # u64: sequence number of the last published record (0: none yet)
STATE_LOCK_OFFSET = 192  # u64 seqlock guarding the state block: odd while the writer updates it
STATE_OFFSET = 200
# generation, w, h, stride, fmt, run, cursor flags, x, y, code, keyboard LEDs
STATE = struct.Struct(f"<IIIIIHHii{RUN_CODE_SIZE}sH")
CURSOR_VISIBLE = 0x1  # bit in the cursor flags (state block and cursor position record)
#: Keyboard LED word (state block and KEYBOARD_LEDS record): QEMU's LED bits, and a bit saying they are known,
#: so that the zero an older writer leaves reads as "not known" rather than "all off".
LED_SCROLL_LOCK = 0x1
LED_NUM_LOCK = 0x2
LED_CAPS_LOCK = 0x4
LEDS_KNOWN = 0x8000

U64 = struct.Struct("<Q")

# --- cursor area -------------------------------------------------------------------------------------------
CURSOR_LOCK_OFFSET = 0  # u64 seqlock guarding the whole cursor area
CURSOR_HEADER_OFFSET = 8
CURSOR_HEADER = struct.Struct("<IHHHH")  # serial, hot_x, hot_y, width, height
CURSOR_PIXELS_OFFSET = 64

# --- event ring records --------------------------------------------------------------------------------------
# A slot: u64 seq | u16 kind | u16 reserved | u32 generation | 48-byte payload.
PAYLOAD_OFFSET = 16
KIND = struct.Struct("<H")
KIND_OFFSET = 8
_BODY_PREFIX = "<HHI"  # the slot after its sequence word: kind, reserved, generation
PAYLOADS = {
    RecordKind.DAMAGE: "IIII",  # x, y, width, height
    RecordKind.MODE: "IIII",  # width, height, stride, pixel format (the record's generation is the new one)
    RecordKind.CURSOR_SHAPE: "IHHHH",  # serial, hot_x, hot_y, width, height
    RecordKind.CURSOR_POSITION: "iiI",  # x, y, flags
    RecordKind.RUN_STATE: f"H2x{RUN_CODE_SIZE}s",  # state, QMP status name (ASCII, NUL padded)
    RecordKind.KEYBOARD_LEDS: "H",  # LED word (LEDS_KNOWN set)
}
# Packs everything in a slot but the sequence word, starting at slot offset 8.
RECORD_BODIES = {kind: struct.Struct(_BODY_PREFIX + fmt) for kind, fmt in PAYLOADS.items()}
# Unpacks a whole slot into (seq, generation, *payload), skipping kind and reserved.
SLOT_STRUCTS = {kind: struct.Struct("<Q4xI" + fmt) for kind, fmt in PAYLOADS.items()}
assert all(s.size <= RECORD_SIZE for s in SLOT_STRUCTS.values())


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def encode_run_code(code: str) -> bytes:
    """The QMP status name as stored: ASCII, at most RUN_CODE_SIZE bytes (struct pads with NULs)."""
    raw = code.encode("ascii")
    if len(raw) > RUN_CODE_SIZE:
        raise ValueError(f"run state code longer than {RUN_CODE_SIZE} bytes: {code!r}")
    return raw


def decode_run_code(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("ascii", errors="replace")


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where everything lives in a segment; fixed for the segment's lifetime."""

    fb_max_width: int
    fb_max_height: int
    ring_slots: int
    cursor_max_width: int
    cursor_max_height: int
    ring_offset: int
    cursor_offset: int
    fb_offset: int
    fb_size: int
    segment_size: int

    @classmethod
    def plan(
        cls,
        fb_max_width: int,
        fb_max_height: int,
        ring_slots: int = DEFAULT_RING_SLOTS,
        cursor_max_width: int = DEFAULT_CURSOR_MAX,
        cursor_max_height: int = DEFAULT_CURSOR_MAX,
    ) -> Geometry:
        """Lay out a segment for a maximum mode; untouched framebuffer pages cost no memory."""
        if not (0 < fb_max_width <= MAX_FB_DIMENSION and 0 < fb_max_height <= MAX_FB_DIMENSION):
            raise ValueError(f"framebuffer maximum {fb_max_width}x{fb_max_height} out of range")
        if not (0 < cursor_max_width <= MAX_CURSOR_DIMENSION and 0 < cursor_max_height <= MAX_CURSOR_DIMENSION):
            raise ValueError(f"cursor maximum {cursor_max_width}x{cursor_max_height} out of range")
        if not (2 <= ring_slots <= MAX_RING_SLOTS) or ring_slots & (ring_slots - 1):
            raise ValueError(f"ring slots must be a power of two in [2, {MAX_RING_SLOTS}], not {ring_slots}")
        ring_offset = HEADER_SIZE
        cursor_offset = ring_offset + _round_up(ring_slots * RECORD_SIZE, PAGE_SIZE)
        cursor_size = CURSOR_PIXELS_OFFSET + cursor_max_width * cursor_max_height * CURSOR_BYTES_PER_PIXEL
        fb_offset = cursor_offset + _round_up(cursor_size, PAGE_SIZE)
        fb_size = _round_up(fb_max_width * fb_max_height * max(BYTES_PER_PIXEL.values()), PAGE_SIZE)
        return cls(
            fb_max_width, fb_max_height, ring_slots, cursor_max_width, cursor_max_height,
            ring_offset, cursor_offset, fb_offset, fb_size, fb_offset + fb_size,
        )


@dataclass(frozen=True, slots=True)
class Header:
    """The static header as read back from a segment."""

    geometry: Geometry
    writer_pid: int


def pack_header(buf: memoryview, geometry: Geometry, writer_pid: int) -> None:
    """Write the static header, magic last, so a reader that sees the magic sees every other field."""
    g = geometry
    STATIC_HEADER.pack_into(
        buf, STATIC_HEADER_OFFSET, b"\x00" * len(MAGIC), LAYOUT_VERSION, HEADER_SIZE, g.segment_size,
        g.ring_offset, g.ring_slots, RECORD_SIZE, g.cursor_offset, g.cursor_max_width, g.cursor_max_height,
        writer_pid, g.fb_offset, g.fb_size, g.fb_max_width, g.fb_max_height,
    )
    buf[STATIC_HEADER_OFFSET : STATIC_HEADER_OFFSET + len(MAGIC)] = MAGIC


def unpack_header(buf: Buffer, mapped_size: int) -> Header:
    """Read and check the static header; every offset is checked against what is really mapped."""
    if mapped_size < HEADER_SIZE or len(buf) < HEADER_SIZE:
        raise SegmentNotReady(f"segment is {mapped_size} bytes, smaller than its {HEADER_SIZE}-byte header")
    (
        magic, version, header_size, segment_size, ring_offset, ring_slots, record_size, cursor_offset,
        cursor_max_width, cursor_max_height, writer_pid, fb_offset, fb_size, fb_max_width, fb_max_height,
    ) = STATIC_HEADER.unpack_from(buf, STATIC_HEADER_OFFSET)
    if magic == b"\x00" * len(MAGIC):
        raise SegmentNotReady("segment header not written yet")
    if magic != MAGIC:
        raise LayoutError(f"not a vmfront shm segment (magic {magic!r})")
    if version != LAYOUT_VERSION:
        raise VersionError(version)
    if header_size != HEADER_SIZE or record_size != RECORD_SIZE:
        raise LayoutError(f"header size {header_size} / record size {record_size} do not match version 1")
    try:
        expected = Geometry.plan(fb_max_width, fb_max_height, ring_slots, cursor_max_width, cursor_max_height)
    except ValueError as exc:
        raise LayoutError(f"bad geometry in header: {exc}") from exc
    found = Geometry(
        fb_max_width, fb_max_height, ring_slots, cursor_max_width, cursor_max_height,
        ring_offset, cursor_offset, fb_offset, fb_size, segment_size,
    )
    if found != expected:
        raise LayoutError(f"header offsets {found} differ from the version 1 layout {expected}")
    if segment_size > mapped_size:
        raise LayoutError(f"header says {segment_size} bytes but only {mapped_size} are mapped")
    return Header(found, writer_pid)


# --- decoded values ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mode:
    """A display mode; generation goes up by one on every mode change so stale damage can be told apart."""

    generation: int
    width: int
    height: int
    stride: int
    pixel_format: int

    @property
    def bytes_per_pixel(self) -> int:
        """0 for a pixel format this code does not know."""
        return BYTES_PER_PIXEL.get(self.pixel_format, 0)


@dataclass(frozen=True, slots=True)
class State:
    """Everything a reader needs after an overrun or at attach, read consistently from the header."""

    mode: Mode
    run_state: RunState
    run_code: str
    cursor_x: int
    cursor_y: int
    cursor_visible: bool
    #: The guest keyboard's lock LEDs (LED_* bits), None until the core learned them.
    keyboard_leds: int | None = None


@dataclass(frozen=True, slots=True)
class CursorImage:
    """A cursor shape: width*height pixels, B,G,R,A bytes each, rows packed."""

    serial: int
    hot_x: int
    hot_y: int
    width: int
    height: int
    pixels: bytes


# Records are built once per record on the reader's hot path: plain slots dataclasses, because frozen ones
# take ~4x longer to construct. Treat them as immutable values all the same.


@dataclass(slots=True)
class DamageRecord:
    """Pixels in this rectangle changed (coordinates belong to mode `generation`)."""

    seq: int
    generation: int
    x: int
    y: int
    width: int
    height: int


@dataclass(slots=True)
class ModeRecord:
    """The mode changed to this; framebuffer content is undefined until damage for the new generation."""

    seq: int
    generation: int
    width: int
    height: int
    stride: int
    pixel_format: int


@dataclass(slots=True)
class CursorShapeRecord:
    """The cursor area now holds shape `serial` (or a newer one)."""

    seq: int
    generation: int
    serial: int
    hot_x: int
    hot_y: int
    width: int
    height: int


@dataclass(slots=True)
class CursorPositionRecord:
    seq: int
    generation: int
    x: int
    y: int
    visible: bool


@dataclass(slots=True)
class RunStateRecord:
    seq: int
    generation: int
    state: RunState
    code: str


@dataclass(slots=True)
class KeyboardLedsRecord:
    """The guest switched its keyboard's lock LEDs (LED_* bits); the state block holds them too."""

    seq: int
    generation: int
    leds: int


@dataclass(frozen=True, slots=True)
class Overrun:
    """The reader fell behind and records were lost: refresh everything (State, frame, cursor)."""

    missed: int


Record = DamageRecord | ModeRecord | CursorShapeRecord | CursorPositionRecord | RunStateRecord | KeyboardLedsRecord


def decode_leds(word: int) -> int | None:
    """The LED word as stored: None when the known bit is clear (an older writer, or nothing learned yet)."""
    return word & (LED_SCROLL_LOCK | LED_NUM_LOCK | LED_CAPS_LOCK) if word & LEDS_KNOWN else None


def _cursor_position(seq: int, generation: int, x: int, y: int, flags: int) -> CursorPositionRecord:
    return CursorPositionRecord(seq, generation, x, y, bool(flags & CURSOR_VISIBLE))


def _run_state(seq: int, generation: int, state: int, code: bytes) -> RunStateRecord:
    return RunStateRecord(seq, generation, RunState.decode(state), decode_run_code(code))


_DECODERS: dict[int, tuple[struct.Struct, Callable[..., Record]]] = {
    RecordKind.DAMAGE: (SLOT_STRUCTS[RecordKind.DAMAGE], DamageRecord),
    RecordKind.MODE: (SLOT_STRUCTS[RecordKind.MODE], ModeRecord),
    RecordKind.CURSOR_SHAPE: (SLOT_STRUCTS[RecordKind.CURSOR_SHAPE], CursorShapeRecord),
    RecordKind.CURSOR_POSITION: (SLOT_STRUCTS[RecordKind.CURSOR_POSITION], _cursor_position),
    RecordKind.RUN_STATE: (SLOT_STRUCTS[RecordKind.RUN_STATE], _run_state),
    RecordKind.KEYBOARD_LEDS: (SLOT_STRUCTS[RecordKind.KEYBOARD_LEDS],
                               lambda seq, generation, word: KeyboardLedsRecord(seq, generation, word & 0x7)),
}


def decode_slot(buf: Buffer, offset: int = 0) -> tuple[int, Record | None]:
    """The slot's sequence word and its record (None for kinds this code skips), in one pass.

    Safe on a slot being overwritten: any bytes decode to *some* value without raising, and the
    sequence protocol then rejects it; `buf` may be the live ring, so nothing is copied twice.
    """
    decoder = _DECODERS.get(KIND.unpack_from(buf, offset + KIND_OFFSET)[0])
    if decoder is None:
        seq: int = U64.unpack_from(buf, offset)[0]
        return seq, None
    slot, make = decoder
    fields = slot.unpack_from(buf, offset)
    return fields[0], make(*fields)
