"""Pixels for the encoders: numpy views of the shared framebuffer, and the service's own copy of it for viewers
that take CopyRect, with vertical scrolls detected by comparing damaged rows against that copy.

Why a copy: CopyRect tells a viewer to copy pixels *it already has*. That is only right if we know exactly what
it has, and a viewer served straight from the shared segment may have been sent pixels newer than any record
we have read (the core writes pixels before it publishes their damage record). So viewers that take CopyRect
are served from a copy that changes only here, in the event loop, when damage records are processed; each
change marks the pixels dirty for every such viewer at the same moment. Then for every pixel outside a
viewer's dirty region (and outside an update still being encoded for it) the viewer holds exactly the copy's
value, and a scroll found between the copy and the new frame can be sent as CopyRect plus the new strip.

The copy lives in a memfd (sparse: only the current mode's pages are ever touched), so encoder workers map it
read-only like the shared segment. Viewers that do not take CopyRect are served from the segment directly,
so they cost nothing extra.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shm import Mode

Frame = npt.NDArray[np.uint32]
Rect = tuple[int, int, int, int]

#: The copy's size: sparse, so this only bounds the largest mode it can hold (4096x4096 at 32 bits).
COPY_SIZE = 64 << 20
#: Smallest damaged area (rows, columns) worth looking for a scroll in.
MIN_MOVE_ROWS = 32
MIN_MOVE_COLUMNS = 64
#: Rows sampled to vote for a scroll distance.
VOTE_ROWS = 16


def frame_array(buffer: Any, mode: Mode) -> Frame:
    """A (height, width) uint32 view of a BGRX framebuffer laid out as ``mode`` says (no copy)."""
    if mode.bytes_per_pixel != 4 or mode.stride < mode.width * 4 or mode.stride % 4:
        raise ValueError(f"mode {mode} is not 32-bit pixels on whole-pixel strides")
    if mode.stride * mode.height > len(buffer):
        raise ValueError(f"mode {mode} does not fit a {len(buffer)}-byte buffer")
    rows: Frame = np.ndarray((mode.height, mode.width), dtype=np.uint32, buffer=buffer, strides=(mode.stride, 4))
    return rows


@dataclass(frozen=True, slots=True)
class Move:
    """Rows ``y..y+height`` of columns ``x..x+width`` now hold what rows ``y+dy..`` of the same columns held."""

    x: int
    y: int
    width: int
    height: int
    dy: int

    @property
    def dest(self) -> Rect:
        return self.x, self.y, self.width, self.height

    @property
    def source(self) -> Rect:
        return self.x, self.y + self.dy, self.width, self.height


def find_move(old: Frame, new: Frame) -> tuple[int, int, int] | None:
    """(first row, rows, dy) of the longest band where ``new[i] == old[i + dy]`` for one dy != 0, if it is at least
    MIN_MOVE_ROWS long. Row signatures (sums of every 7th pixel) vote for dy; the winner is checked exactly."""
    rows, columns = new.shape
    if rows < MIN_MOVE_ROWS or columns < MIN_MOVE_COLUMNS:
        return None
    old_sig = old[:, ::7].sum(axis=1, dtype=np.uint64)
    new_sig = new[:, ::7].sum(axis=1, dtype=np.uint64)
    votes: dict[int, int] = {}
    for i in np.linspace(0, rows - 1, VOTE_ROWS).astype(int).tolist():
        if new_sig[i] == old_sig[i]:
            continue  # unchanged (or blank) rows say nothing about a move
        for j in np.flatnonzero(old_sig == new_sig[i])[:4].tolist():
            votes[j - i] = votes.get(j - i, 0) + 1
    if not votes:
        return None
    dy = max(votes, key=lambda d: votes[d])
    if votes[dy] < 2 or abs(dy) > rows - MIN_MOVE_ROWS:
        return None
    if dy > 0:
        same = (new[: rows - dy] == old[dy:]).all(axis=1)
        offset = 0
    else:
        same = (new[-dy:] == old[: rows + dy]).all(axis=1)
        offset = -dy
    # The longest run of True.
    edges = np.flatnonzero(np.diff(np.concatenate(([0], same.view(np.int8), [0]))))
    if len(edges) == 0:
        return None
    starts, ends = edges[0::2], edges[1::2]
    best = int(np.argmax(ends - starts))
    length = int(ends[best] - starts[best])
    if length < MIN_MOVE_ROWS:
        return None
    return int(starts[best]) + offset, length, dy


_copy_keys = itertools.count(1)


class FrameCopy:
    """The service's copy of the guest framebuffer in a memfd, written only in the event loop. ``key`` names it
    to the encoder workers (one pool may serve the copies of many VMs)."""

    def __init__(self, size: int = COPY_SIZE) -> None:
        self.key = next(_copy_keys)
        self.size = size
        self.fd = os.memfd_create("vmfront-vnc-frame", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.mode: Mode | None = None  # the mode the copy holds a whole frame of; None: not maintained

    @property
    def buffer(self) -> memoryview:
        """The copy's memory (Raw pieces are copied out of it at once: it changes under a queued slice)."""
        return memoryview(self._map)

    def fits(self, mode: Mode) -> bool:
        return mode.bytes_per_pixel == 4 and mode.stride % 4 == 0 and mode.stride * mode.height <= self.size

    def array(self, mode: Mode) -> Frame:
        return frame_array(self._map, mode)

    def load(self, source: Frame, mode: Mode) -> None:
        """Copy the whole frame (a new mode, an overrun, or the first viewer that needs the copy)."""
        np.copyto(self.array(mode), source)
        self.mode = mode

    def apply(self, source: Frame, damage: list[Rect]) -> tuple[list[Move], list[Rect]]:
        """Copy the damaged rectangles from ``source`` (the new frame). Returns the vertical moves found in them
        and what really changed otherwise: the rows of each rectangle that differ from what the copy held and
        that no move explains (a damage record often covers rows that did not change)."""
        assert self.mode is not None
        copy = self.array(self.mode)
        moves: list[Move] = []
        changed: list[Rect] = []
        for x, y, w, h in damage:
            old, new = copy[y : y + h, x : x + w], source[y : y + h, x : x + w]
            rows = (old != new).any(axis=1)
            found = find_move(old, new)
            if found is not None:
                first, count, dy = found
                moves.append(Move(x, y + first, w, count, dy))
                rows[first : first + count] = False
            edges = np.flatnonzero(np.diff(np.concatenate(([0], rows.view(np.int8), [0]))))
            changed += [(x, y + int(a), w, int(b - a)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]
            np.copyto(old, new)
        return moves, changed

    def forget(self) -> None:
        """No viewer needs the copy any more: give its pages back (the mapping stays valid, reading zeros)."""
        self.mode = None
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        """Unmap, or leave that to the last slice still being sent."""
        self.mode = None
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self.fd)
