"""The core's side of the segment: the only process that ever writes to it.

Memory ordering. Every protocol word (a slot's sequence number, the header's write sequence, the two seqlocks)
is an 8-byte-aligned u64 written with one `struct.pack_into("<Q")`. On a little-endian host CPython packs a
native-size "<Q" with an 8-byte memcpy, i.e. one aligned store, which x86-64 performs atomically; each
`pack_into` is a separate C call, so the compiler cannot move stores across them; and x86-64 (TSO) makes
stores visible to other cores in program order and does not reorder loads with loads. That is all the
protocol needs: "slot seq := INVALID, payload, slot seq := n, header write_seq := n" is seen in that order.
On a weakly ordered CPU (ARM64, POWER) or in a C port, the writer needs a release fence (or store-release)
after the INVALID store and before each publishing store, and the reader acquire loads / a fence between
copying a slot and re-reading its sequence word (the classic seqlock fences).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from types import TracebackType

import posix_ipc

from .layout import (
    BYTES_PER_PIXEL,
    CURSOR_BYTES_PER_PIXEL,
    CURSOR_HEADER,
    CURSOR_HEADER_OFFSET,
    CURSOR_LOCK_OFFSET,
    CURSOR_PIXELS_OFFSET,
    CURSOR_VISIBLE,
    DEFAULT_CURSOR_MAX,
    DEFAULT_RING_SLOTS,
    INVALID_SEQ,
    LED_CAPS_LOCK,
    LED_NUM_LOCK,
    LED_SCROLL_LOCK,
    LEDS_KNOWN,
    RECORD_BODIES,
    RECORD_SIZE,
    STATE,
    STATE_LOCK_OFFSET,
    STATE_OFFSET,
    U64,
    WRITE_SEQ_OFFSET,
    Buffer,
    Geometry,
    Mode,
    PixelFormat,
    RecordKind,
    RunState,
    encode_run_code,
    pack_header,
    unpack_header,
)


class ShmWriter:
    """Creates a segment (it must not exist yet), owns every write to it, and unlinks it at the end."""

    def __init__(
        self,
        name: str,
        fb_max_width: int,
        fb_max_height: int,
        *,
        ring_slots: int = DEFAULT_RING_SLOTS,
        cursor_max_width: int = DEFAULT_CURSOR_MAX,
        cursor_max_height: int = DEFAULT_CURSOR_MAX,
        mode: int = 0o640,
        group: int | None = None,
    ) -> None:
        self.geometry = Geometry.plan(fb_max_width, fb_max_height, ring_slots, cursor_max_width, cursor_max_height)
        self.name = name
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=self.geometry.segment_size)
        try:
            os.fchmod(shm.fd, mode)  # shm_open applied our umask; the requested mode is the contract
            if group is not None:
                os.fchown(shm.fd, -1, group)
            self._map = mmap.mmap(shm.fd, self.geometry.segment_size)
        except BaseException:
            shm.unlink()
            raise
        finally:
            shm.close_fd()  # the mapping is all we need
        self._mv = memoryview(self._map)
        g = self.geometry
        self._ring = self._mv[g.ring_offset : g.ring_offset + g.ring_slots * RECORD_SIZE]
        self._mask = g.ring_slots - 1
        self._cursor = self._mv[g.cursor_offset : g.fb_offset]
        # Writable view of the whole framebuffer area; rows of the current mode are `mode.stride` bytes apart.
        self.framebuffer = self._mv[g.fb_offset : g.fb_offset + g.fb_size]
        self._next_seq = 1
        self._state_lock = 0
        self._cursor_lock = 0
        self._cursor_serial = 0
        self._mode = Mode(0, 0, 0, 0, PixelFormat.BGRX8888)  # generation 0: no display yet
        self._run = (RunState.UNKNOWN, b"")
        self._pointer = (0, 0, 0)
        self._leds = 0  # not known yet
        self._write_state()
        pack_header(self._mv, g, os.getpid())
        unpack_header(self._mv, g.segment_size)  # the layout module checks what we just wrote

    # --- state (header) ----------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(
        self, width: int, height: int, stride: int | None = None, pixel_format: int = PixelFormat.BGRX8888
    ) -> Mode:
        """Switch mode: the header changes first, then a MODE record tells readers to look again."""
        bpp = BYTES_PER_PIXEL.get(pixel_format)
        if bpp is None:
            raise ValueError(f"unknown pixel format {pixel_format}")
        stride = width * bpp if stride is None else stride
        if width <= 0 or height <= 0 or stride < width * bpp or stride * height > self.geometry.fb_size:
            raise ValueError(f"mode {width}x{height} stride {stride} does not fit the framebuffer")
        self._mode = Mode(self._mode.generation + 1, width, height, stride, pixel_format)
        self._write_state()
        m = self._mode
        self._append(RecordKind.MODE, m.width, m.height, m.stride, m.pixel_format)
        return m

    def set_cursor_position(self, x: int, y: int, visible: bool = True) -> None:
        flags = CURSOR_VISIBLE if visible else 0
        self._pointer = (x, y, flags)
        self._write_state()
        self._append(RecordKind.CURSOR_POSITION, x, y, flags)

    def set_run_state(self, state: RunState, code: str = "") -> None:
        """`code` is the QMP status name ("io-error"), kept because RunState is coarser."""
        self._run = (state, encode_run_code(code))
        self._write_state()
        self._append(RecordKind.RUN_STATE, state, self._run[1])

    def set_keyboard_leds(self, leds: int) -> None:
        """The guest keyboard's lock LEDs (QEMU's bits: 0 Scroll, 1 Num, 2 Caps Lock)."""
        self._leds = LEDS_KNOWN | (leds & (LED_SCROLL_LOCK | LED_NUM_LOCK | LED_CAPS_LOCK))
        self._write_state()
        self._append(RecordKind.KEYBOARD_LEDS, self._leds)

    def _write_state(self) -> None:
        m = self._mode
        self._state_lock += 1
        U64.pack_into(self._mv, STATE_LOCK_OFFSET, self._state_lock)
        x, y, flags = self._pointer
        STATE.pack_into(
            self._mv, STATE_OFFSET, m.generation, m.width, m.height, m.stride, m.pixel_format,
            self._run[0], flags, x, y, self._run[1], self._leds,
        )
        self._state_lock += 1
        U64.pack_into(self._mv, STATE_LOCK_OFFSET, self._state_lock)

    # --- framebuffer -------------------------------------------------------------------------------------

    def put_rect(self, x: int, y: int, width: int, height: int, pixels: Buffer) -> None:
        """Copy packed rows (width*bpp bytes each) into the framebuffer; records no damage by itself."""
        m = self._mode
        self._check_rect(x, y, width, height)
        bpp = BYTES_PER_PIXEL[m.pixel_format]
        row = width * bpp
        if len(pixels) != row * height:
            raise ValueError(f"expected {row * height} bytes of pixels, got {len(pixels)}")
        src = memoryview(pixels).cast("B")
        fb = self.framebuffer
        start = y * m.stride + x * bpp
        if row == m.stride:
            fb[start : start + row * height] = src
            return
        for i in range(height):
            dst = start + i * m.stride
            fb[dst : dst + row] = src[i * row : (i + 1) * row]

    def _check_rect(self, x: int, y: int, width: int, height: int) -> None:
        m = self._mode
        if x < 0 or y < 0 or width <= 0 or height <= 0 or x + width > m.width or y + height > m.height:
            raise ValueError(f"rectangle {width}x{height}+{x}+{y} outside mode {m.width}x{m.height}")

    # --- records -----------------------------------------------------------------------------------------

    def damage(self, x: int, y: int, width: int, height: int) -> int:
        """Tell readers these pixels changed; returns the record's sequence number."""
        self._check_rect(x, y, width, height)
        return self._append(RecordKind.DAMAGE, x, y, width, height)

    def set_cursor_shape(self, hot_x: int, hot_y: int, width: int, height: int, pixels: Buffer) -> int:
        """Store a B,G,R,A cursor image in the cursor area under its seqlock; returns the shape's serial."""
        g = self.geometry
        if not (0 <= width <= g.cursor_max_width and 0 <= height <= g.cursor_max_height):
            raise ValueError(f"cursor {width}x{height} larger than {g.cursor_max_width}x{g.cursor_max_height}")
        if len(pixels) != width * height * CURSOR_BYTES_PER_PIXEL:
            raise ValueError(f"expected {width * height * CURSOR_BYTES_PER_PIXEL} cursor bytes, got {len(pixels)}")
        if not (0 <= hot_x <= max(width - 1, 0) and 0 <= hot_y <= max(height - 1, 0)):
            raise ValueError(f"hotspot {hot_x},{hot_y} outside the {width}x{height} cursor")
        self._cursor_serial += 1
        self._cursor_lock += 1
        U64.pack_into(self._cursor, CURSOR_LOCK_OFFSET, self._cursor_lock)
        self._cursor[CURSOR_PIXELS_OFFSET : CURSOR_PIXELS_OFFSET + len(pixels)] = memoryview(pixels).cast("B")
        CURSOR_HEADER.pack_into(self._cursor, CURSOR_HEADER_OFFSET, self._cursor_serial, hot_x, hot_y, width, height)
        self._cursor_lock += 1
        U64.pack_into(self._cursor, CURSOR_LOCK_OFFSET, self._cursor_lock)
        self._append(RecordKind.CURSOR_SHAPE, self._cursor_serial, hot_x, hot_y, width, height)
        return self._cursor_serial

    def _append(self, kind: RecordKind, *payload: object) -> int:
        seq = self._begin_record(kind, *payload)
        self._publish_record(seq)
        return seq

    def _begin_record(self, kind: RecordKind, *payload: object) -> int:
        """First half of an append: mark the slot invalid, then fill it. Tests stop here to play a crash."""
        seq = self._next_seq
        offset = (seq & self._mask) * RECORD_SIZE
        U64.pack_into(self._ring, offset, INVALID_SEQ)
        RECORD_BODIES[kind].pack_into(self._ring, offset + U64.size, kind, 0, self._mode.generation, *payload)
        self._next_seq = seq + 1
        return seq

    def _publish_record(self, seq: int) -> None:
        """Second half: the slot's sequence word, then the header's write sequence."""
        U64.pack_into(self._ring, (seq & self._mask) * RECORD_SIZE, seq)
        U64.pack_into(self._mv, WRITE_SEQ_OFFSET, seq)

    @property
    def write_seq(self) -> int:
        """Sequence number of the last record appended (0 before the first)."""
        return self._next_seq - 1

    # --- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap. Views handed out (`framebuffer` slices) must be released first."""
        if self._map.closed:
            return
        for view in (self.framebuffer, self._cursor, self._ring, self._mv):
            view.release()
        self._map.close()

    def unlink(self) -> None:
        """Remove the name; readers that mapped the segment keep their mapping until they close it."""
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.name)

    def __enter__(self) -> ShmWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        self.unlink()
