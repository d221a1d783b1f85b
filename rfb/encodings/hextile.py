"""Hextile (5): 16x16 tiles, each solid, raw, or a background with subrectangles.

Solid tiles cost one byte (the background carries over from the previous tile); a whole band of solid tiles
is detected with a single comparison. Tiles with up to 16 colours become a background plus subrectangles
(one foreground colour, or coloured subrectangles), built from horizontal runs merged downwards, when that
is smaller than raw; anything else is raw.
"""

from __future__ import annotations

import re

from rfb.encodings.base import (
    Encoder,
    check_size,
    distinct_colours,
    is_solid,
    palette_indices,
    pixel_bytes,
    pixel_values,
    tile_bytes,
)
from rfb.wire import ENCODING_HEXTILE, Buffer, PixelFormat

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


class HextileEncoder(Encoder):
    encoding = ENCODING_HEXTILE

    def encode(self, pixels: Buffer, width: int, height: int, fmt: PixelFormat) -> bytes:
        bpp = fmt.bytes_per_pixel
        data = check_size(pixels, width, height, fmt)
        row = width * bpp
        tiles_per_band = (width + TILE - 1) // TILE
        out = bytearray()
        bg: bytes | None = None  # carried-over background (None: must be specified)
        fg: bytes | None = None  # carried-over foreground (None: must be specified)
        for ty in range(0, height, TILE):
            th = min(TILE, height - ty)
            band = data[ty * row : (ty + th) * row]
            if is_solid(band, bpp):
                colour = band[:bpp]
                if colour == bg:
                    out += bytes(tiles_per_band)
                else:
                    out += bytes((BACKGROUND_SPECIFIED,)) + colour + bytes(tiles_per_band - 1)
                    bg = colour
                continue
            for tx in range(0, width, TILE):
                tw = min(TILE, width - tx)
                tile = tile_bytes(band, row, tx, 0, tw, th, bpp)
                if is_solid(tile, bpp):
                    colour = tile[:bpp]
                    if colour == bg:
                        out.append(0)
                    else:
                        out.append(BACKGROUND_SPECIFIED)
                        out += colour
                        bg = colour
                    continue
                encoded = self._subrect_tile(tile, tw, th, bpp, bg, fg)
                if encoded is None:
                    out.append(RAW)
                    out += tile
                    bg = fg = None  # nothing carries over a raw tile
                else:
                    body, bg, fg = encoded
                    out += body
        return bytes(out)

    @staticmethod
    def _subrect_tile(tile: bytes, tw: int, th: int, bpp: int, bg: bytes | None,
                      fg: bytes | None) -> tuple[bytes, bytes, bytes | None] | None:
        """(tile bytes, new background, new foreground) as background + subrects, or None when raw is better."""
        values = pixel_values(tile, bpp)
        colours = distinct_colours(values, tw, th, MAX_COLOURS)
        if colours is None:
            return None
        palette = list(colours)
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
