"""What every encoder shares: the Encoder interface, tiling, and small helpers on pixel buffers.

Pixels given to an encoder are a rectangle already converted to the viewer's pixel format (rfb.pixels): either
packed rows with no padding (``width * height * bytes_per_pixel`` bytes), or a ``(height, width)`` numpy array
of 1, 2 or 4-byte unsigned integers holding each pixel's bytes in machine order (a view of a strided
framebuffer works: nothing is copied until an encoder needs contiguous bytes). Tile analysis (solid tiles,
palettes, runs) is vectorised with numpy, so its cost per pixel is C's, not Python's.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from rfb.wire import Buffer, PixelFormat, rect_header

NATIVE_ORDER = sys.byteorder
PixelArray = npt.NDArray[Any]
Pixels = Buffer | PixelArray
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


class Arena:
    """Output arrays carved one after the other out of one writable buffer (the memfd an encoder worker sends
    back), so that the bytes an encoder gathers are already where they will be sent from."""

    def __init__(self, buffer: memoryview, start: int) -> None:
        self.buffer = buffer
        self.start = self.offset = start

    def take(self, size: int) -> PixelArray | None:
        """``size`` bytes right after the previous ones, or None if the buffer is full."""
        if self.offset + size > len(self.buffer):
            return None
        array: PixelArray = np.frombuffer(self.buffer, dtype=np.uint8, count=size, offset=self.offset)
        self.offset += size
        return array

    def room(self, size: int) -> memoryview | None:
        """A writable view of the ``size`` bytes after the previous ones, or None if the buffer is full; they
        are not taken until :meth:`keep` says how many were used (an encoder writing at most ``size``)."""
        if self.offset + size > len(self.buffer):
            return None
        return self.buffer[self.offset : self.offset + size]

    def keep(self, used: int) -> None:
        """Take the first ``used`` bytes of the last :meth:`room`."""
        self.offset += used


def output_array(shape: tuple[int, ...], arena: Arena | None) -> PixelArray:
    """An uninitialised uint8 array for encoded bytes: from ``arena`` when there is room, else the heap."""
    size = 1
    for n in shape:
        size *= n
    taken = arena.take(size) if arena is not None else None
    if taken is None:
        return np.empty(shape, dtype=np.uint8)
    return taken.reshape(shape)


class Encoder(ABC):
    """Encodes rectangles for one connection; keeps whatever state the encoding carries between rectangles
    (zlib streams), so one instance must serve one viewer, in order."""

    encoding: ClassVar[int]
    #: Where large encoded arrays go (see :class:`Arena`); None: the heap.
    arena: Arena | None = None

    @abstractmethod
    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        """The payload of one rectangle (what follows its 12-byte header)."""

    def rects(self, x: int, y: int, width: int, height: int, pixels: Pixels, fmt: PixelFormat) -> list[bytes]:
        """Complete rectangles (header and payload) covering the rectangle; encoders with size limits split."""
        return [rect_header(x, y, width, height, self.encoding) + self.encode(pixels, width, height, fmt)]

    def pieces(self, x: int, y: int, width: int, height: int, pixels: Pixels,
               fmt: PixelFormat) -> tuple[list[Buffer], int]:
        """What :meth:`rects` says, as buffers to send one after the other (a large payload is not copied to
        join it to its header), and how many rectangles they make."""
        rects = self.rects(x, y, width, height, pixels, fmt)
        return list(rects), len(rects)


def _check_dimensions(width: int, height: int) -> None:
    if not (0 <= width <= 0xFFFF and 0 <= height <= 0xFFFF):
        raise ValueError(f"rectangle {width}x{height} does not fit RFB's 16-bit sizes")


def check_size(pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
    """The pixels as packed bytes, after checking they are exactly one width x height rectangle in ``fmt``."""
    if isinstance(pixels, np.ndarray):
        return pixel_array(pixels, width, height, fmt).tobytes()
    _check_dimensions(width, height)
    expected = width * height * fmt.bytes_per_pixel
    if len(pixels) != expected:
        raise ValueError(f"{width}x{height} at {fmt.bits_per_pixel} bpp needs {expected} bytes, got {len(pixels)}")
    return pixels if isinstance(pixels, bytes) else bytes(pixels)


def pixel_array(pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> PixelArray:
    """The pixels as a ``(height, width)`` array of machine integers (values only serve as identities)."""
    dtype = _DTYPES[fmt.bytes_per_pixel]
    if isinstance(pixels, np.ndarray):
        _check_dimensions(width, height)
        if pixels.shape != (height, width) or pixels.dtype != dtype:
            raise ValueError(f"{width}x{height} at {fmt.bits_per_pixel} bpp needs a {dtype} array of that shape, "
                             f"got {pixels.dtype} {pixels.shape}")
        return pixels
    data = check_size(pixels, width, height, fmt)
    array: PixelArray = np.frombuffer(data, dtype=dtype).reshape(height, width)
    return array


def array_bytes(pixels: PixelArray, start: int = 0, end: int | None = None) -> bytes:
    """Bytes ``start:end`` of every pixel of ``pixels``, row by row (all of them by default: the packed pixels)."""
    bpp = pixels.dtype.itemsize
    if start == 0 and (end is None or end == bpp):
        return pixels.tobytes()
    as_bytes = np.ascontiguousarray(pixels).view(np.uint8).reshape(*pixels.shape, bpp)
    return as_bytes[..., start:end].tobytes()


def solid_colour(pixels: PixelArray) -> int | None:
    """The one pixel value of a non-empty array whose pixels are all equal, else None."""
    first = pixels.flat[0]
    if (pixels == first).all():
        return int(first)
    return None


def palette_of(pixels: PixelArray, limit: int) -> tuple[PixelArray, PixelArray] | None:
    """(sorted distinct values, each pixel's index into them as uint8) or None when there are more than
    ``limit`` (<= 256) colours. The first rows are looked at first, so noise is rejected cheaply."""
    flat = pixels.reshape(-1)
    head = flat[: 2 * pixels.shape[-1]] if pixels.ndim == 2 else flat[:128]
    if len(head) > limit and len(np.unique(head)) > limit:
        return None
    values = np.unique(flat)  # hashing, then sorting the few distinct values
    if len(values) > limit:
        return None
    # Each pixel's index by binary search over the few colours: cheaper than return_inverse's full argsort.
    indices: PixelArray = np.searchsorted(values, flat).astype(np.uint8)
    return values, indices


def runs_of(indices: PixelArray) -> tuple[PixelArray, PixelArray]:
    """(value of each run, length of each run) of a 1-D array."""
    if len(indices) == 0:
        return indices[:0], np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], indices[1:] != indices[:-1])))
    lengths = np.diff(np.append(starts, len(indices)))
    return indices[starts], lengths


def tiles(width: int, height: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(x, y, width, height) of each tile, left to right then top to bottom, edge tiles smaller."""
    for ty in range(0, height, size):
        th = min(size, height - ty)
        for tx in range(0, width, size):
            yield tx, ty, min(size, width - tx), th


def tile_bytes(data: bytes, row: int, x: int, y: int, width: int, height: int, bpp: int) -> bytes:
    """The packed pixels of a tile inside a packed rectangle whose rows are ``row`` bytes long."""
    start = y * row + x * bpp
    span = width * bpp
    if span == row:
        return data[start : start + span * height]
    return b"".join([data[o : o + span] for o in range(start, start + height * row, row)])


def is_solid(data: bytes, bpp: int) -> bool:
    """All pixels equal: one C-level comparison against the first pixel repeated."""
    return data == data[:bpp] * (len(data) // bpp)


def pixel_values(data: bytes, bpp: int) -> memoryview:
    """The pixels as machine integers (values only serve as identities; :func:`pixel_bytes` maps back)."""
    view = memoryview(data)
    if bpp == 4:
        return view.cast("I")
    if bpp == 2:
        return view.cast("H")
    return view.cast("B")


def pixel_bytes(value: int, bpp: int) -> bytes:
    return value.to_bytes(bpp, NATIVE_ORDER)


def distinct_colours(values: memoryview, width: int, height: int, limit: int) -> set[int] | None:
    """The set of pixel values, or None once there are more than ``limit``. Rows are added in doubling
    batches, so noise is rejected after about one row and a flat image costs a few C-level passes."""
    colours: set[int] = set()
    done, batch = 0, 1
    while done < height:
        end = min(height, done + batch)
        colours.update(values[done * width : end * width])
        if len(colours) > limit:
            return None
        done, batch = end, batch * 2
    return colours


def run_count(indices: bytes) -> int:
    """How many runs of equal bytes ``indices`` has, without a Python loop: compare it with itself shifted by
    one as big integers and count the equal neighbours."""
    if not indices:
        return 0
    shifted = int.from_bytes(indices[1:], "big") ^ int.from_bytes(indices[:-1], "big")
    return len(indices) - shifted.to_bytes(len(indices) - 1, "big").count(0)


def palette_indices(data: bytes, values: memoryview, bpp: int, palette: list[int]) -> bytes:
    """One byte per pixel: its position in ``palette`` (at most 256 colours, all present in ``palette``).

    If one byte of the pixel already tells the palette colours apart (common: grey text, a single-channel
    gradient), this is one ``bytes.translate`` of that byte plane; otherwise a dict lookup per pixel.
    """
    as_bytes = [pixel_bytes(v, bpp) for v in palette]
    for k in range(bpp):
        keys = [b[k] for b in as_bytes]
        if len(set(keys)) == len(keys):
            table = bytearray(256)
            for i, key in enumerate(keys):
                table[key] = i
            plane = data[k::bpp] if bpp > 1 else data
            return plane.translate(table)
    lookup = {value: i for i, value in enumerate(palette)}
    return bytes(map(lookup.__getitem__, values.tolist()))


def compact_length(value: int) -> bytes:
    """Tight's 1-3 byte length: 7 bits, 7 bits, then 8 bits, least significant first."""
    if not 0 <= value <= 0x3FFFFF:
        raise ValueError(f"length {value} does not fit Tight's compact representation")
    if value < 0x80:
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    return bytes((value & 0x7F | 0x80, (value >> 7) & 0x7F | 0x80, value >> 14))


_HEX_DIGITS = b"0123456789abcdef"


def pack_index_array(indices: PixelArray, width: int, height: int, bits: int) -> bytes:
    """:func:`pack_indices` for a uint8 array of ``height * width`` indices, with numpy."""
    if width == 0 or height == 0:
        return b""
    rows = indices.reshape(height, width).astype(np.uint8)
    if bits == 1:
        return np.packbits(rows, axis=1).tobytes()
    per_byte = 8 // bits
    padded_width = (width + per_byte - 1) // per_byte * per_byte
    if padded_width != width:
        rows = np.pad(rows, ((0, 0), (0, padded_width - width)))
    groups = rows.reshape(height, padded_width // per_byte, per_byte)
    shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
    packed: PixelArray = np.bitwise_or.reduce(groups << shifts, axis=2)
    return packed.astype(np.uint8).tobytes()


def pack_indices(indices: bytes, width: int, height: int, bits: int) -> bytes:
    """Palette indices packed ``bits`` (1, 2 or 4) per pixel, most significant first, each row padded to a
    byte: ZRLE's packed palettes and Tight's mono palette. Done through base-2/4/16 digit strings, in C."""
    per_byte = 8 // bits
    row_pixels = (width + per_byte - 1) // per_byte * per_byte
    digits = indices.translate(_HEX_DIGITS.ljust(256, b"0"))
    if row_pixels != width:
        pad = b"0" * (row_pixels - width)
        digits = b"".join([digits[r * width : (r + 1) * width] + pad for r in range(height)])
    if not digits:
        return b""
    if bits == 4:
        return bytes.fromhex(digits.decode("ascii"))
    return int(digits, 1 << bits).to_bytes(len(digits) // per_byte, "big")
