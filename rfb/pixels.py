"""Pixel conversion from the framebuffer's BGRX8888 to whatever PIXEL_FORMAT a viewer asked for.

No per-pixel Python loops: a frame is split into its B, G and R byte planes (strided slices), each plane is
mapped through a 256-entry table with ``bytes.translate`` (scaling to the channel's max and shifting it into
place, one table per output byte), planes that share an output byte are OR-ed together as big integers
(``int.from_bytes``, linear time), and the output bytes are interleaved back with strided slice assignment.
All of these run in C. The viewer asking for the framebuffer's own layout costs nothing at all.

Colour-map formats (true-colour flag 0) are served with a fixed 256-entry BGR233 palette (index bits
``bbgggrrr``), sent once with SetColourMapEntries; bits-per-pixel 16 or 32 then carry the index in the low byte.

Unused bits of the output (the X byte of a 32-bit format) are zero, except when the format is the
framebuffer's own: then the bytes are passed through untouched.
"""

from __future__ import annotations

import functools
import sys
from array import array
from collections.abc import Sequence

from rfb.wire import BGRX8888, Buffer, PixelFormat

SOURCE_BPP = 4  # the framebuffer's bytes per pixel (BGRX)
_SOURCE_PLANES = {"blue": 0, "green": 1, "red": 2}  # byte offset of each channel in a BGRX pixel
_IDENTITY = bytes(range(256))


def _bgr233_entry(index: int) -> tuple[int, int, int]:
    red, green, blue = index & 7, (index >> 3) & 7, index >> 6
    return red * 65535 // 7, green * 65535 // 7, blue * 65535 // 3


#: The fixed colour map for colour-map formats: 16-bit (red, green, blue) for indices 0..255.
BGR233_PALETTE: tuple[tuple[int, int, int], ...] = tuple(_bgr233_entry(i) for i in range(256))


def effective_format(fmt: PixelFormat) -> PixelFormat:
    """The true-colour layout pixels are computed in: ``fmt`` itself, or BGR233 for a colour-map format."""
    if fmt.true_colour:
        return fmt
    return PixelFormat(fmt.bits_per_pixel, 8, fmt.big_endian, True, 7, 7, 3, 0, 3, 6)


def is_native(fmt: PixelFormat) -> bool:
    """True if ``fmt`` lays pixels out in memory exactly as the framebuffer does (B, G, R, X)."""
    if not fmt.true_colour or fmt.bits_per_pixel != 32 or (fmt.red_max, fmt.green_max, fmt.blue_max) != (255,) * 3:
        return False
    shifts = (fmt.red_shift, fmt.green_shift, fmt.blue_shift)
    return shifts == ((8, 16, 24) if fmt.big_endian else (16, 8, 0))


def scale(value: int, top: int) -> int:
    """An 8-bit intensity scaled to 0..top, rounded to nearest (the rule every path here uses)."""
    return (value * top + 127) // 255


class Converter:
    """Precomputed tables for converting BGRX pixels into one target format; reuse it for every frame."""

    def __init__(self, fmt: PixelFormat) -> None:
        problem = fmt.problem()
        if problem is not None:
            raise ValueError(f"unusable pixel format: {problem}")
        self.fmt = fmt
        self.native = is_native(fmt)
        eff = effective_format(fmt)
        self.bytes_per_pixel = fmt.bytes_per_pixel
        # For each output byte (0 = least significant), the (source plane, table or None for identity) pairs
        # that contribute to it.
        self._sources: list[list[tuple[int, bytes | None]]] = []
        channels = ((_SOURCE_PLANES["red"], eff.red_max, eff.red_shift),
                    (_SOURCE_PLANES["green"], eff.green_max, eff.green_shift),
                    (_SOURCE_PLANES["blue"], eff.blue_max, eff.blue_shift))
        for k in range(self.bytes_per_pixel):
            parts: list[tuple[int, bytes | None]] = []
            for plane, top, shift in channels:
                table = bytes(((scale(v, top) << shift) >> (8 * k)) & 0xFF for v in range(256))
                if any(table):
                    parts.append((plane, None if table == _IDENTITY else table))
            self._sources.append(parts)

    def convert(self, src: Buffer) -> bytes:
        """``src`` is packed BGRX pixels (4 bytes each); returns the same pixels in the target format."""
        data = src if isinstance(src, bytes) else bytes(src)
        if len(data) % SOURCE_BPP:
            raise ValueError(f"source length {len(data)} is not a whole number of 4-byte pixels")
        if self.native:
            return data
        count = len(data) // SOURCE_BPP
        planes: dict[int, bytes] = {}

        def plane(index: int) -> bytes:
            if index not in planes:
                planes[index] = data[index::SOURCE_BPP]
            return planes[index]

        out_planes: list[bytes | None] = []
        for parts in self._sources:
            if not parts:
                out_planes.append(None)
                continue
            mapped = [plane(p) if table is None else plane(p).translate(table) for p, table in parts]
            if len(mapped) == 1:
                out_planes.append(mapped[0])
            else:
                acc = 0
                for m in mapped:
                    acc |= int.from_bytes(m, "little")
                out_planes.append(acc.to_bytes(count, "little"))
        bpp = self.bytes_per_pixel
        if bpp == 1:
            return out_planes[0] if out_planes[0] is not None else bytes(count)
        out = bytearray(count * bpp)
        for k, p in enumerate(out_planes):
            if p is not None:
                pos = bpp - 1 - k if self.fmt.big_endian else k
                out[pos::bpp] = p
        return bytes(out)


@functools.lru_cache(maxsize=32)
def converter(fmt: PixelFormat) -> Converter:
    """A shared Converter for ``fmt`` (formats are few; the tables cost ~1 ms to build)."""
    return Converter(fmt)


def convert(src: Buffer, fmt: PixelFormat) -> bytes:
    """Packed BGRX pixels to ``fmt``; raises ValueError for a format that cannot be served."""
    return converter(fmt).convert(src)


def extract_rect(buf: Buffer, stride: int, x: int, y: int, width: int, height: int,
                 bytes_per_pixel: int = SOURCE_BPP) -> bytes:
    """Rows ``y..y+height`` of columns ``x..x+width`` of a strided buffer, packed (no padding between rows)."""
    view = memoryview(buf)
    row = width * bytes_per_pixel
    start = y * stride + x * bytes_per_pixel
    if height <= 0 or row <= 0:
        return b""
    if start + (height - 1) * stride + row > len(view):
        raise ValueError("rectangle lies outside the buffer")
    if row == stride:
        return bytes(view[start : start + row * height])
    return b"".join([view[o : o + row] for o in range(start, start + height * stride, stride)])


def tpixel_is_rgb(fmt: PixelFormat) -> bool:
    """The Tight TPIXEL rule: 32 bpp true colour, depth 24, channels exactly 8 bits -> 3 bytes R, G, B."""
    return (fmt.true_colour and fmt.bits_per_pixel == 32 and fmt.depth == 24
            and (fmt.red_max, fmt.green_max, fmt.blue_max) == (255, 255, 255))


def rgb_bytes(pixels: Buffer, fmt: PixelFormat) -> bytes:
    """R, G, B bytes per pixel, from pixels in a format where :func:`tpixel_is_rgb` holds."""
    if not tpixel_is_rgb(fmt):
        raise ValueError("pixel format does not have 8-bit red, green and blue channels in 32 bits")
    data = pixels if isinstance(pixels, bytes) else bytes(pixels)
    count = len(data) // 4
    out = bytearray(count * 3)
    shifts = (fmt.red_shift, fmt.green_shift, fmt.blue_shift)
    if all(s % 8 == 0 for s in shifts):
        for i, s in enumerate(shifts):
            pos = 3 - s // 8 if fmt.big_endian else s // 8
            out[i::3] = data[pos::4]
        return bytes(out)
    # Channels not on byte boundaries: no viewer is known to ask for this, so a plain loop is acceptable.
    words = array("I", data)
    if fmt.big_endian != (sys.byteorder == "big"):
        words.byteswap()
    for i, s in enumerate(shifts):
        out[i::3] = bytes((w >> s) & 0xFF for w in words)
    return bytes(out)


def cursor_mask(bgra: Buffer, width: int, height: int, threshold: int = 128) -> bytes:
    """The RFB cursor bitmask of a B, G, R, A image: 1 where alpha >= threshold, rows padded to bytes, MSB first."""
    if width <= 0 or height <= 0:
        return b""
    data = bgra if isinstance(bgra, bytes) else bytes(bgra)
    bits = data[3::4].translate(bytes(0x31 if a >= threshold else 0x30 for a in range(256)))  # ASCII '1'/'0'
    row_bytes = (width + 7) // 8
    pad = b"0" * (row_bytes * 8 - width)
    text = b"".join([bits[r * width : (r + 1) * width] + pad for r in range(height)]) if pad else bits
    return int(text, 2).to_bytes(row_bytes * height, "big")


def pack_colour_map(entries: Sequence[tuple[int, int, int]]) -> bytes:
    """16-bit (red, green, blue) triples as SetColourMapEntries carries them."""
    out = bytearray()
    for red, green, blue in entries:
        out += red.to_bytes(2, "big") + green.to_bytes(2, "big") + blue.to_bytes(2, "big")
    return bytes(out)


__all__ = [
    "BGR233_PALETTE", "BGRX8888", "Converter", "convert", "converter", "cursor_mask", "effective_format",
    "extract_rect", "is_native", "pack_colour_map", "rgb_bytes", "scale", "tpixel_is_rgb",
]
