"""ZRLE (16): 64x64 tiles, each solid, packed palette, palette RLE or raw, all through one zlib stream.

CPIXELs follow RFC 6143 section 7.7.6: for 32 bpp true colour with depth <= 24 whose colour bits fit in the
three least (or else most) significant bytes, a CPIXEL is those three bytes. Tiles are analysed with numpy:
solid detection is one comparison, palettes come from ``np.unique`` (so palette entries are in ascending pixel
value order) after the first two rows alone were checked for more than 127 colours (noise goes to raw at the
cost of two rows), and runs come from one ``diff``. Plain RLE (subencoding 128) is not produced.
"""

from __future__ import annotations

import numpy as np

from rfb.encodings.base import (
    Encoder,
    PixelArray,
    Pixels,
    array_bytes,
    pack_index_array,
    palette_of,
    pixel_array,
    runs_of,
    solid_colour,
)
from rfb.encodings.zlibraw import DEFAULT_LEVEL, ZlibStream
from rfb.wire import ENCODING_ZRLE, U32, Buffer, PixelFormat, rect_header

TILE = 64
SOLID = 1
PALETTE_RLE = 128
MAX_PACKED = 16
MAX_RLE_PALETTE = 127

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


def run_length(length: int) -> bytes:
    """RLE length bytes: (length-1) as 255s and a final byte below 255."""
    rest = length - 1
    return b"\xff" * (rest // 255) + bytes((rest % 255,))


def rle_bytes(values: PixelArray, lengths: PixelArray) -> bytes:
    """Palette RLE of runs: an index alone for a run of 1, else index | 128 and :func:`run_length`."""
    long_run = lengths > 1
    sizes = 1 + np.where(long_run, (lengths - 1) // 255 + 1, 0)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    out = np.full(int(ends[-1]) if len(ends) else 0, 255, dtype=np.uint8)
    out[starts] = values.astype(np.uint8) | np.where(long_run, 0x80, 0).astype(np.uint8)
    out[(ends - 1)[long_run]] = ((lengths[long_run] - 1) % 255).astype(np.uint8)
    return out.tobytes()


class ZrleEncoder(Encoder):
    encoding = ENCODING_ZRLE

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.stream = ZlibStream(level)

    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        compressed = self.stream.compress(self.tiles(pixels, width, height, fmt))
        return U32.pack(len(compressed)) + compressed

    def pieces(self, x: int, y: int, width: int, height: int, pixels: Pixels,
               fmt: PixelFormat) -> tuple[list[Buffer], int]:
        compressed = self.stream.compress(self.tiles(pixels, width, height, fmt))
        return [rect_header(x, y, width, height, self.encoding) + U32.pack(len(compressed)), compressed], 1

    def tiles(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        """The uncompressed tile stream (exposed for tests and measurements)."""
        px = pixel_array(pixels, width, height, fmt)
        span = cpixel_span(fmt)
        if width and height:
            colour = solid_colour(px)
            if colour is not None:
                count = ((width + TILE - 1) // TILE) * ((height + TILE - 1) // TILE)
                return (bytes((SOLID,)) + _cpixels(np.array([colour], dtype=px.dtype), span)) * count
        out = []
        tiles_per_band = (width + TILE - 1) // TILE
        for ty in range(0, height, TILE):
            band = px[ty : ty + TILE]
            raw = _surely_raw(band)
            tx = 0
            while tx < tiles_per_band:
                if raw[tx]:  # a run of high-colour tiles, gathered at once
                    end = tx + 1
                    while end < tiles_per_band and raw[end]:
                        end += 1
                    out.append(_raw_tiles(band, tx, end, span))
                    tx = end
                    continue
                out.append(self._tile(band[:, tx * TILE : (tx + 1) * TILE], span))
                tx += 1
        return b"".join(out)

    @staticmethod
    def _tile(tile: PixelArray, span: tuple[int, int]) -> bytes:
        colour = solid_colour(tile)
        if colour is not None:
            return bytes((SOLID,)) + _cpixels(np.array([colour], dtype=tile.dtype), span)
        th, tw = tile.shape
        raw_size = 1 + th * tw * (span[1] - span[0])
        found = palette_of(tile, MAX_RLE_PALETTE)
        if found is None:
            return b"\x00" + _cpixels(tile, span)
        values, indices = found
        palette_bytes = _cpixels(values, span)
        size = len(values)
        best: bytes | None = None
        if size <= MAX_PACKED:
            bits = 1 if size == 2 else 2 if size <= 4 else 4
            packed = bytes((size,)) + palette_bytes + pack_index_array(indices, tw, th, bits)
            if len(packed) < raw_size:
                best = packed
        best_size = raw_size if best is None else len(best)
        run_values, lengths = runs_of(indices)
        # Every run costs at least one byte: skip building RLE when it cannot win.
        if 1 + len(palette_bytes) + len(run_values) < best_size:
            rle = bytes((PALETTE_RLE + size,)) + palette_bytes + rle_bytes(run_values, lengths)
            if len(rle) < best_size:
                return rle
        return best if best is not None else b"\x00" + _cpixels(tile, span)


def _cpixels(pixels: PixelArray, span: tuple[int, int]) -> bytes:
    return array_bytes(pixels, *span)


def _surely_raw(band: PixelArray) -> list[bool]:
    """Per tile of a band: True if its first two rows alone hold more than 127 colours (so it is raw)."""
    full = band.shape[1] // TILE
    raw = [False] * ((band.shape[1] + TILE - 1) // TILE)
    if full and band.shape[0] >= 2:
        head = np.sort(band[:2, : full * TILE].reshape(2, full, TILE).transpose(1, 0, 2).reshape(full, -1), axis=1)
        distinct = 1 + np.count_nonzero(head[:, 1:] != head[:, :-1], axis=1)
        raw[:full] = (distinct > MAX_RLE_PALETTE).tolist()
    return raw


def _raw_tiles(band: PixelArray, start: int, end: int, span: tuple[int, int]) -> bytes:
    """Full-width tiles ``start:end`` of a band as raw ZRLE tiles: subencoding 0, then the tile's CPIXELs."""
    rows, count = band.shape[0], end - start
    cp = span[1] - span[0]
    as_bytes = np.ascontiguousarray(band[:, start * TILE : end * TILE]).view(np.uint8)
    cpixels = as_bytes.reshape(rows, count, TILE, band.dtype.itemsize)[..., span[0] : span[1]]
    out = np.empty((count, 1 + rows * TILE * cp), dtype=np.uint8)
    out[:, 0] = 0
    out[:, 1:].reshape(count, rows, TILE, cp)[...] = cpixels.transpose(1, 0, 2, 3)
    return out.tobytes()
