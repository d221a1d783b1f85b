"""Hextile (5) in Python: the reference the C encoder (rfb/encodings/_hextile.c) is checked against.

The product encodes Hextile in C (rfb.encodings.hextile). This is the numpy/Python encoder it replaced, kept
because its bytes are the definition the C encoder must reproduce exactly (tests/test_rfb_encodings.py, the
fuzz target ``hextile``). Tile by tile: solid; raw with more than 16 colours; otherwise the most common
colour as background plus subrectangles (one foreground colour, or coloured subrectangles) built from
horizontal runs merged downwards, or raw when that is not smaller.

How it gets there: a whole band of solid tiles is one comparison; each band of 16 rows is classified with
numpy (solid tiles by one comparison, tiles whose first two rows already hold more than 16 colours are raw
without a Python loop) and runs of raw tiles are copied out of the band in one gather; the subrectangle
search is Python, per tile.
"""

from __future__ import annotations

import re

import numpy as np

from rfb.encodings.base import (
    Arena,
    Encoder,
    PixelArray,
    Pixels,
    distinct_colours,
    output_array,
    palette_indices,
    pixel_array,
    pixel_bytes,
    pixel_values,
)
from rfb.wire import ENCODING_HEXTILE, Buffer, PixelFormat, rect_header

TILE = 16
RAW = 1
BACKGROUND_SPECIFIED = 2
FOREGROUND_SPECIFIED = 4
ANY_SUBRECTS = 8
SUBRECTS_COLOURED = 16
MAX_COLOURS = 16  # beyond this, subrectangles rarely beat raw and cost more CPU
MAX_SUBRECTS = 255

_RUN = re.compile(rb"([\x01-\xff])\1*")  # a run of one non-background palette index


def _swap_table(a: int, b: int) -> bytes:
    table = bytearray(range(256))
    table[a], table[b] = b, a
    return bytes(table)


def subrects(indices: bytes, width: int, height: int) -> list[tuple[int, int, int, int, int]]:
    """(index, x, y, w, h) rectangles covering every non-zero index: horizontal runs, stacked downwards while
    the same run repeats in the next row."""
    done: list[tuple[int, int, int, int, int]] = []
    open_runs: dict[tuple[int, int, int], list[int]] = {}  # (x0, x1, index) -> [y0, height]
    for y in range(height):
        row = indices[y * width : (y + 1) * width]
        current: dict[tuple[int, int, int], list[int]] = {}
        for m in _RUN.finditer(row):
            key = (m.start(), m.end(), row[m.start()])
            span = open_runs.pop(key, None)
            if span is None:
                span = [y, 0]
            span[1] += 1
            current[key] = span
        for (x0, x1, index), (y0, h) in open_runs.items():
            done.append((index, x0, y0, x1 - x0, h))
        open_runs = current
    for (x0, x1, index), (y0, h) in open_runs.items():
        done.append((index, x0, y0, x1 - x0, h))
    return done


class ReferenceHextileEncoder(Encoder):
    encoding = ENCODING_HEXTILE

    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        return b"".join(self._encode_pieces(pixels, width, height, fmt))

    def pieces(self, x: int, y: int, width: int, height: int, pixels: Pixels,
               fmt: PixelFormat) -> tuple[list[Buffer], int]:
        return [rect_header(x, y, width, height, self.encoding), *self._encode_pieces(pixels, width, height, fmt)], 1

    def _encode_pieces(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> list[Buffer]:
        px = pixel_array(pixels, width, height, fmt)
        if width == 0 or height == 0:
            return []
        bpp = fmt.bytes_per_pixel
        tiles_per_band = (width + TILE - 1) // TILE
        out: list[Buffer] = []
        bg: bytes | None = None  # carried-over background (None: must be specified)
        fg: bytes | None = None  # carried-over foreground (None: must be specified)
        start = _all_raw_bands(px)
        if start:  # video-like: every full band is raw tiles, gathered in one go
            out.append(_raw_bands(px[:start], self.arena))
        for ty in range(start, height, TILE):
            band = px[ty : ty + TILE]
            first = band[0, 0]
            if (band[0] == first).all() and (band == first).all():  # the first row rules most bands out cheaply
                colour = pixel_bytes(int(first), bpp)
                if colour == bg:
                    out.append(bytes(tiles_per_band))
                else:
                    out.append(bytes((BACKGROUND_SPECIFIED,)) + colour + bytes(tiles_per_band - 1))
                    bg = colour
                continue
            solid, raw = _classify(band)
            tx = 0
            while tx < tiles_per_band:
                if raw[tx]:  # a run of raw tiles, gathered at once
                    end = tx + 1
                    while end < tiles_per_band and raw[end]:
                        end += 1
                    out.append(_raw_tiles(band, tx, end, self.arena))
                    bg = fg = None  # nothing carries over a raw tile
                    tx = end
                    continue
                tile = band[:, tx * TILE : (tx + 1) * TILE]
                if solid[tx]:
                    colour = pixel_bytes(int(tile[0, 0]), bpp)
                    if colour == bg:
                        out.append(b"\x00")
                    else:
                        out.append(bytes((BACKGROUND_SPECIFIED,)) + colour)
                        bg = colour
                else:
                    encoded = self._subrect_tile(tile, bpp, bg, fg)
                    if encoded is None:
                        out.append(bytes((RAW,)) + tile.tobytes())
                        bg = fg = None
                    else:
                        body, bg, fg = encoded
                        out.append(body)
                tx += 1
        return out

    @staticmethod
    def _subrect_tile(tile_array: PixelArray, bpp: int, bg: bytes | None,
                      fg: bytes | None) -> tuple[bytes, bytes, bytes | None] | None:
        """(tile bytes, new background, new foreground) as background + subrects, or None when raw is better.
        Tiles are small (256 pixels): sets and bytes.translate beat numpy's per-call cost here."""
        th, tw = tile_array.shape
        tile = tile_array.tobytes()
        values = pixel_values(tile, bpp)
        colours = distinct_colours(values, tw, th, MAX_COLOURS)
        if colours is None:
            return None
        palette = sorted(colours)
        indices = palette_indices(tile, values, bpp, palette)
        # The most common colour becomes the background (index 0), so it needs no subrectangles.
        top = max(range(len(palette)), key=indices.count)
        if top:
            palette[0], palette[top] = palette[top], palette[0]
            indices = indices.translate(_swap_table(0, top))
        rects = subrects(indices, tw, th)
        if len(rects) > MAX_SUBRECTS:
            return None
        bg_bytes = pixel_bytes(palette[0], bpp)
        mask = ANY_SUBRECTS
        head = bytearray()
        if bg_bytes != bg:
            mask |= BACKGROUND_SPECIFIED
            head += bg_bytes
        body = bytearray()
        if len(palette) == 2:
            new_fg = pixel_bytes(palette[1], bpp)
            if new_fg != fg:
                mask |= FOREGROUND_SPECIFIED
                head += new_fg
            for _, x, y, w, h in rects:
                body += bytes((x << 4 | y, (w - 1) << 4 | (h - 1)))
        else:
            mask |= SUBRECTS_COLOURED
            new_fg = None  # a coloured-subrect tile leaves no foreground to carry over
            colour_bytes = [pixel_bytes(v, bpp) for v in palette]
            for index, x, y, w, h in rects:
                body += colour_bytes[index] + bytes((x << 4 | y, (w - 1) << 4 | (h - 1)))
        encoded = bytes((mask,)) + head + bytes((len(rects),)) + body
        if len(encoded) >= 1 + len(tile):
            return None
        return encoded, bg_bytes, new_fg


def _tile_view(band: PixelArray, count: int) -> PixelArray:
    """The first ``count`` full-width tiles of a band as a (count, rows, 16) view."""
    return band[:, : count * TILE].reshape(band.shape[0], count, TILE).transpose(1, 0, 2)


def _classify(band: PixelArray) -> tuple[list[bool], list[bool]]:
    """(solid, surely raw) per tile of a band: all pixels equal; more than 16 colours in the first two rows.
    Only tiles that are not surely raw are compared for solidity (high-colour bands cost one small sort)."""
    width = band.shape[1]
    full = width // TILE
    solid: list[bool] = []
    raw: list[bool] = []
    if full:
        tiles = _tile_view(band, full)
        head = np.sort(tiles[:, :2, :].reshape(full, -1), axis=1)
        distinct = 1 + np.count_nonzero(head[:, 1:] != head[:, :-1], axis=1)
        surely_raw = distinct > MAX_COLOURS
        raw = surely_raw.tolist()
        solid = [False] * full
        candidates = np.flatnonzero(~surely_raw)
        if len(candidates):
            some = tiles[candidates]
            for index, is_solid in zip(candidates.tolist(), (some == some[:, :1, :1]).all(axis=(1, 2)).tolist(),
                                       strict=True):
                solid[index] = is_solid
    if width % TILE:
        edge = band[:, full * TILE :]
        solid.append(bool((edge == edge[0, 0]).all()))
        raw.append(False)  # the general path decides
    return solid, raw


def _all_raw_bands(px: PixelArray) -> int:
    """Rows from the top that are whole bands of surely-raw tiles, if all full bands are (else 0): one sort of
    every tile's first two rows instead of a classification per band."""
    height, width = px.shape
    bands, columns = height // TILE, width // TILE
    if not bands or width % TILE or width == 0:
        return 0
    heads = px[: bands * TILE].reshape(bands, TILE, columns, TILE)[:, :2].transpose(0, 2, 1, 3)
    ordered = np.sort(heads.reshape(bands * columns, 2 * TILE), axis=1)
    distinct = 1 + np.count_nonzero(ordered[:, 1:] != ordered[:, :-1], axis=1)
    return bands * TILE if bool((distinct > MAX_COLOURS).all()) else 0


def _raw_bands(px: PixelArray, arena: Arena | None) -> memoryview:
    """Whole bands of full-width tiles as raw Hextile tiles, in one gather."""
    bands, columns, itemsize = px.shape[0] // TILE, px.shape[1] // TILE, px.dtype.itemsize
    out = output_array((bands, columns, 1 + TILE * TILE * itemsize), arena)
    out[..., 0] = RAW
    out[..., 1:].reshape(bands, columns, TILE, TILE * itemsize)[...] = (
        np.ascontiguousarray(px).view(np.uint8).reshape(bands, TILE, columns, TILE * itemsize).transpose(0, 2, 1, 3))
    view: memoryview = out.data.cast("B")
    return view


def _raw_tiles(band: PixelArray, start: int, end: int, arena: Arena | None) -> memoryview:
    """Tiles ``start:end`` of a band (all full-width) as raw Hextile tiles: a RAW byte and the pixels, each."""
    tiles = _tile_view(band[:, start * TILE :], end - start)
    count, rows = tiles.shape[0], tiles.shape[1]
    size = rows * TILE * band.dtype.itemsize
    out = output_array((count, 1 + size), arena)
    out[:, 0] = RAW
    out[:, 1:].reshape(count, rows, TILE * band.dtype.itemsize)[...] = (
        np.ascontiguousarray(band[:, start * TILE : end * TILE]).view(np.uint8)
        .reshape(rows, count, TILE * band.dtype.itemsize).transpose(1, 0, 2))
    view: memoryview = out.data.cast("B")
    return view
