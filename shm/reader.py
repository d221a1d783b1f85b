"""The client's side of the segment: a read-only mapping and a private position in the event ring.

Nothing a reader does is visible to the writer or to other readers, so a reader may be slow, die or be
compromised without disturbing them. The memory-ordering argument is in `shm.writer`'s docstring.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

import posix_ipc

from .layout import (
    CURSOR_BYTES_PER_PIXEL,
    CURSOR_HEADER,
    CURSOR_HEADER_OFFSET,
    CURSOR_LOCK_OFFSET,
    CURSOR_PIXELS_OFFSET,
    CURSOR_VISIBLE,
    RECORD_SIZE,
    STATE,
    STATE_LOCK_OFFSET,
    STATE_OFFSET,
    U64,
    WRITE_SEQ_OFFSET,
    CursorImage,
    LayoutError,
    Mode,
    Overrun,
    Record,
    RunState,
    State,
    decode_run_code,
    decode_slot,
    unpack_header,
)

T = TypeVar("T")


class SeqlockTimeout(TimeoutError):
    """The writer held a seqlock longer than the deadline: it is very busy, stopped, or died mid-update."""


class ShmReader:
    """Maps a segment read-only and follows its event ring from the write position at open time."""

    def __init__(self, name: str, *, lock_timeout: float = 0.1) -> None:
        self.name = name
        self.lock_timeout = lock_timeout
        shm = posix_ipc.SharedMemory(name, read_only=True)  # O_RDONLY: the mapping can never become writable
        try:
            size = shm.size
            if size == 0:
                raise LayoutError(f"shm segment {name} is empty (writer not ready?)")
            self._map = mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        self._mv = memoryview(self._map)
        try:
            header = unpack_header(self._mv, size)
        except BaseException:
            self._mv.release()
            self._map.close()
            raise
        self.geometry = header.geometry
        self.writer_pid = header.writer_pid
        g = self.geometry
        self._ring = self._mv[g.ring_offset : g.ring_offset + g.ring_slots * RECORD_SIZE]
        self._slots = g.ring_slots
        self._mask = g.ring_slots - 1
        self._cursor = self._mv[g.cursor_offset : g.fb_offset]
        self._fb = self._mv[g.fb_offset : g.fb_offset + g.fb_size]
        # Sequence number of the next record this reader will return: new readers start at the end.
        self.position = self.write_seq() + 1

    # --- event ring --------------------------------------------------------------------------------------

    def write_seq(self) -> int:
        """Sequence number of the last record the writer published."""
        seq: int = U64.unpack_from(self._mv, WRITE_SEQ_OFFSET)[0]
        return seq

    def pending(self) -> int:
        """How many records were published that this reader has not read (may exceed the ring)."""
        return max(0, self.write_seq() - self.position + 1)

    def read_records(self, limit: int | None = None) -> list[Record] | Overrun:
        """The new records in order, or Overrun if some were lost (then the position is at the writer's).

        After an Overrun take `state()`, the frame and `cursor()`; records read later are all idempotent
        (damage, or set-to-value), so seeing one again that the refresh already covered does no harm.
        Records of kinds this code does not know are skipped.
        """
        first = self.position
        head = self.write_seq()
        if head - first >= self._slots:
            return self._overrun(first)
        last = head if limit is None else min(head, first + limit - 1)
        records: list[Record] = []
        for seq in range(first, last + 1):
            copied_seq, record = self._load_slot(seq)
            if not self._slot_still_holds(seq, copied_seq):
                return self._overrun(first)
            if record is not None:
                records.append(record)
        self.position = max(first, last + 1)
        return records

    def _load_slot(self, seq: int) -> tuple[int, Record | None]:
        """Copy record `seq`'s slot out of the ring (decoded straight into Python values)."""
        return decode_slot(self._ring, (seq & self._mask) * RECORD_SIZE)

    def _slot_still_holds(self, seq: int, copied_seq: int) -> bool:
        """The seqlock check: the copy is record `seq` only if the slot said `seq` in the copy and still does.

        A slot being rewritten says INVALID (or a later lap's number) once any new payload byte can be seen,
        so a torn copy always fails here; a slot still holding an older lap fails the first comparison.
        """
        live: int = U64.unpack_from(self._ring, (seq & self._mask) * RECORD_SIZE)[0]
        return copied_seq == seq and live == seq

    def _overrun(self, first: int) -> Overrun:
        head = self.write_seq()
        self.position = head + 1
        return Overrun(missed=head - first + 1)

    def skip_to_end(self) -> None:
        """Forget unread records (e.g. before a full refresh done for another reason)."""
        self.position = self.write_seq() + 1

    # --- consistent header and cursor reads --------------------------------------------------------------

    def _read_locked(self, area: memoryview, lock_offset: int, read: Callable[[], T]) -> T:
        """Retry `read` until it ran with the seqlock even and unchanged; give up after `lock_timeout`."""
        deadline: float | None = None
        attempts = 0
        while True:
            before = U64.unpack_from(area, lock_offset)[0]
            if not before & 1:
                value = read()
                if U64.unpack_from(area, lock_offset)[0] == before:
                    return value
            attempts += 1
            if attempts >= 32:  # the writer is descheduled mid-update: let it run
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.lock_timeout
                elif now > deadline:
                    raise SeqlockTimeout(f"shm {self.name}: writer kept a seqlock for {self.lock_timeout}s")
                os.sched_yield()

    def state(self) -> State:
        """Mode, run state and pointer as one consistent snapshot."""
        generation, width, height, stride, fmt, run, flags, x, y, code = self._read_locked(
            self._mv, STATE_LOCK_OFFSET, lambda: STATE.unpack_from(self._mv, STATE_OFFSET)
        )
        mode = Mode(generation, width, height, stride, fmt)
        return State(mode, RunState.decode(run), decode_run_code(code), x, y, bool(flags & CURSOR_VISIBLE))

    def mode(self) -> Mode:
        return self.state().mode

    def cursor(self) -> CursorImage:
        """The current cursor shape, never half-written (serial 0 and no pixels before the first one)."""
        g = self.geometry
        limit = g.cursor_max_width * g.cursor_max_height * CURSOR_BYTES_PER_PIXEL

        def read() -> tuple[tuple[int, int, int, int, int], bytes]:
            fields = CURSOR_HEADER.unpack_from(self._cursor, CURSOR_HEADER_OFFSET)
            size = min(fields[3] * fields[4] * CURSOR_BYTES_PER_PIXEL, limit)
            return fields, self._cursor[CURSOR_PIXELS_OFFSET : CURSOR_PIXELS_OFFSET + size].tobytes()

        (serial, hot_x, hot_y, width, height), pixels = self._read_locked(self._cursor, CURSOR_LOCK_OFFSET, read)
        if width > g.cursor_max_width or height > g.cursor_max_height:
            raise LayoutError(f"cursor {width}x{height} larger than the segment's cursor area")
        return CursorImage(serial, hot_x, hot_y, width, height, pixels)

    # --- framebuffer -------------------------------------------------------------------------------------

    def copy_rect(self, x: int, y: int, width: int, height: int, mode: Mode | None = None) -> bytes:
        """Pixels of a rectangle as packed rows, in `mode` (the current one by default).

        Pass the mode the caller is working in: a rectangle from a damage record of that generation then
        copies without error even if the writer has switched mode since (a MODE record is on its way).
        The copy may tear against concurrent writes; a later damage record covers that region again.
        """
        mode = self.mode() if mode is None else mode
        bpp = mode.bytes_per_pixel
        if not bpp or mode.stride < mode.width * bpp or mode.stride * mode.height > len(self._fb):
            raise LayoutError(f"mode {mode} does not fit this segment")
        if x < 0 or y < 0 or width < 0 or height < 0 or x + width > mode.width or y + height > mode.height:
            raise ValueError(f"rectangle {width}x{height}+{x}+{y} outside mode {mode.width}x{mode.height}")
        row = width * bpp
        start = y * mode.stride + x * bpp
        fb = self._fb
        if row == mode.stride:
            return fb[start : start + row * height].tobytes()
        stride = mode.stride
        return b"".join([fb[offset : offset + row] for offset in range(start, start + height * stride, stride)])

    @property
    def framebuffer(self) -> memoryview:
        """The framebuffer area of the read-only mapping, without copying (pixels at ``y * stride + x * bpp``).

        For readers that cannot afford a copy (the VNC encoders). Release every view made from it before
        :meth:`close`; what it shows may tear against concurrent writes, as :meth:`copy_rect` says.
        """
        return self._fb

    def copy_frame(self, mode: Mode | None = None) -> bytes:
        """The whole frame as packed rows (width*bpp bytes each)."""
        mode = self.mode() if mode is None else mode
        return self.copy_rect(0, 0, mode.width, mode.height, mode)

    # --- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap, or leave the unmapping to the last view still in use: slices of :attr:`framebuffer` handed to
        a socket may outlive the reader by the time it takes to send them."""
        if self._map.closed:
            return
        for view in (self._fb, self._cursor, self._ring, self._mv):
            with contextlib.suppress(BufferError):
                view.release()
        with contextlib.suppress(BufferError):
            self._map.close()

    def __enter__(self) -> ShmReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
