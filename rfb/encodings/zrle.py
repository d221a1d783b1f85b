"""ZRLE (16): 64x64 tiles, each solid, packed palette, palette RLE or raw, all through one zlib stream.

CPIXELs follow RFC 6143 section 7.7.6: for 32 bpp true colour with depth <= 24 whose colour bits fit in the
three least (or else most) significant bytes, a CPIXEL is those three bytes. Solid detection is one
comparison per tile (after one for the whole rectangle); colours are counted row by row and given up on past
127, so noise goes to raw at the cost of about one row. Plain RLE (subencoding 128) is not produced.
"""

from __future__ import annotations

import re

from rfb.encodings.base import (
    Encoder,
    check_size,
    distinct_colours,
    is_solid,
    pack_indices,
    palette_indices,
    pixel_bytes,
    pixel_values,
    run_count,
    tile_bytes,
)
from rfb.encodings.zlibraw import DEFAULT_LEVEL, ZlibStream
from rfb.wire import ENCODING_ZRLE, U32, Buffer, PixelFormat

TILE = 64
SOLID = 1
PALETTE_RLE = 128
MAX_PACKED = 16
MAX_RLE_PALETTE = 127

_LONG_RUNS = re.compile(rb"(.)\1+", re.DOTALL)  # runs of two or more; what lies between are single pixels


def cpixel_span(fmt: PixelFormat) -> tuple[int, int]:
    """(start, end) of the CPIXEL bytes inside each pixel's bytes, per the rule above."""
    bpp = fmt.bytes_per_pixel
    if not (fmt.true_colour and fmt.bits_per_pixel == 32 and fmt.depth <= 24):
        return 0, bpp
    top = max((fmt.red_max << fmt.red_shift), (fmt.green_max << fmt.green_shift), (fmt.blue_max << fmt.blue_shift))
    low_fits = top <= 0xFFFFFF
    high_fits = min(fmt.red_shift, fmt.green_shift, fmt.blue_shift) >= 8
    if low_fits:  # preferred when both fit
        return (1, 4) if fmt.big_endian else (0, 3)
    if high_fits:
        return (0, 3) if fmt.big_endian else (1, 4)
    return 0, bpp


def strip_pixels(data: bytes, bpp: int, span: tuple[int, int]) -> bytes:
    """Keep bytes ``span`` of every ``bpp``-byte pixel (the CPIXELs of a run of pixels)."""
    start, end = span
    if (start, end) == (0, bpp):
        return data
    size = end - start
    out = bytearray(len(data) // bpp * size)
    for i in range(size):
        out[i::size] = data[start + i :: bpp]
    return bytes(out)


def run_length(length: int) -> bytes:
    """RLE length bytes: (length-1) as 255s and a final byte below 255."""
    rest = length - 1
    return b"\xff" * (rest // 255) + bytes((rest % 255,))


class ZrleEncoder(Encoder):
    encoding = ENCODING_ZRLE

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.stream = ZlibStream(level)

    def encode(self, pixels: Buffer, width: int, height: int, fmt: PixelFormat) -> bytes:
        data = check_size(pixels, width, height, fmt)
        compressed = self.stream.compress(self.tiles(data, width, height, fmt))
        return U32.pack(len(compressed)) + compressed

    def tiles(self, data: bytes, width: int, height: int, fmt: PixelFormat) -> bytes:
        """The uncompressed tile stream (exposed for tests and measurements)."""
        bpp = fmt.bytes_per_pixel
        span = cpixel_span(fmt)
        row = width * bpp
        if width and height and is_solid(data, bpp):
            count = ((width + TILE - 1) // TILE) * ((height + TILE - 1) // TILE)
            return (bytes((SOLID,)) + strip_pixels(data[:bpp], bpp, span)) * count
        out = bytearray()
        for ty in range(0, height, TILE):
            th = min(TILE, height - ty)
            for tx in range(0, width, TILE):
                tw = min(TILE, width - tx)
                tile = tile_bytes(data, row, tx, ty, tw, th, bpp)
                if is_solid(tile, bpp):
                    out.append(SOLID)
                    out += strip_pixels(tile[:bpp], bpp, span)
                else:
                    out += self._tile(tile, tw, th, bpp, span)
        return bytes(out)

    @staticmethod
    def _tile(tile: bytes, tw: int, th: int, bpp: int, span: tuple[int, int]) -> bytes:
        raw = b"\x00" + strip_pixels(tile, bpp, span)
        values = pixel_values(tile, bpp)
        colours = distinct_colours(values, tw, th, MAX_RLE_PALETTE)
        if colours is None:
            return raw
        palette = list(colours)
        indices = palette_indices(tile, values, bpp, palette)
        palette_bytes = strip_pixels(b"".join([pixel_bytes(v, bpp) for v in palette]), bpp, span)
        best = raw
        size = len(palette)
        if size <= MAX_PACKED:
            bits = 1 if size == 2 else 2 if size <= 4 else 4
            packed = bytes((size,)) + palette_bytes + pack_indices(indices, tw, th, bits)
            if len(packed) < len(best):
                best = packed
        # Every run costs at least one byte: skip the RLE pass when it cannot win.
        if 1 + len(palette_bytes) + run_count(indices) >= len(best):
            return best
        rle = bytearray((PALETTE_RLE + size,))
        rle += palette_bytes
        pos = 0
        for m in _LONG_RUNS.finditer(indices):
            start, end = m.span()
            rle += indices[pos:start]  # single pixels: the palette index alone
            rle.append(indices[start] | 0x80)
            rle += run_length(end - start)
            pos = end
        rle += indices[pos:]
        return bytes(rle) if len(rle) < len(best) else best
