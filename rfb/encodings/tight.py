"""Tight (7): fill for solid rectangles, a palette for few colours, JPEG (Pillow) for many when the viewer
gave a quality level, zlib-compressed TPIXELs otherwise.

Rectangles are split to at most 2048 pixels wide (a protocol rule) and at most 65536 pixels (so compact
lengths always fit and one chunk stays cheap). Streams: 0 full colour, 1 two-colour (1 bit per pixel), 2
indexed (8 bits per pixel). A new compression level resets the streams, which Tight can tell the viewer
in the next rectangle's control byte. The gradient filter is not produced.
"""

from __future__ import annotations

import io

from PIL import Image

from rfb.encodings.base import (
    Encoder,
    check_size,
    compact_length,
    distinct_colours,
    is_solid,
    pack_indices,
    palette_indices,
    pixel_bytes,
    pixel_values,
    tile_bytes,
)
from rfb.encodings.zlibraw import DEFAULT_LEVEL, ZlibStream
from rfb.pixels import rgb_bytes, tpixel_is_rgb
from rfb.wire import ENCODING_TIGHT, Buffer, PixelFormat, rect_header

MAX_WIDTH = 2048
MAX_PIXELS = 65536
MIN_TO_COMPRESS = 12  # data shorter than this is sent as is, without zlib or a length
MAX_PALETTE = 256

FILL = 0x80
JPEG = 0x90
READ_FILTER = 0x40
FILTER_COPY = 0
FILTER_PALETTE = 1
STREAM_FULL, STREAM_MONO, STREAM_INDEXED = 0, 1, 2

#: JPEG quality and chroma subsampling (Pillow: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0) per Tight quality level 0..9.
JPEG_QUALITY = (15, 25, 35, 45, 55, 65, 75, 80, 88, 95)
JPEG_SUBSAMPLING = (2, 2, 2, 2, 2, 2, 1, 1, 1, 0)
MIN_JPEG_PIXELS = 64  # below this JPEG's headers outweigh its gain


class TightEncoder(Encoder):
    encoding = ENCODING_TIGHT

    def __init__(self, level: int = DEFAULT_LEVEL, quality: int | None = None) -> None:
        self.streams = [ZlibStream(level) for _ in range(4)]
        self.quality = quality
        self._reset_mask = 0

    @property
    def level(self) -> int:
        return self.streams[0].level

    def set_level(self, level: int) -> None:
        """Change the zlib level; started streams are reset (and the viewer told so) on the next rectangle."""
        if level == self.level:
            return
        for i, stream in enumerate(self.streams):
            stream.set_level(level)
            if stream.started:
                stream.reset()
                self._reset_mask |= 1 << i

    def set_quality(self, quality: int | None) -> None:
        """The viewer's JPEG quality level 0..9, or None for lossless only."""
        if quality is not None and not 0 <= quality <= 9:
            raise ValueError(f"quality level {quality} out of range 0-9")
        self.quality = quality

    def rects(self, x: int, y: int, width: int, height: int, pixels: Buffer, fmt: PixelFormat) -> list[bytes]:
        data = check_size(pixels, width, height, fmt)
        bpp = fmt.bytes_per_pixel
        row = width * bpp
        out = []
        chunk_width = min(width, MAX_WIDTH) or 1
        chunk_height = max(1, MAX_PIXELS // chunk_width)
        for cy in range(0, height, chunk_height):
            ch = min(chunk_height, height - cy)
            for cx in range(0, width, chunk_width):
                cw = min(chunk_width, width - cx)
                chunk = tile_bytes(data, row, cx, cy, cw, ch, bpp)
                out.append(rect_header(x + cx, y + cy, cw, ch, self.encoding) + self.encode(chunk, cw, ch, fmt))
        return out

    def encode(self, pixels: Buffer, width: int, height: int, fmt: PixelFormat) -> bytes:
        data = check_size(pixels, width, height, fmt)
        if width > MAX_WIDTH:
            raise ValueError(f"Tight rectangles are at most {MAX_WIDTH} pixels wide; use rects() to split")
        bpp = fmt.bytes_per_pixel
        reset, self._reset_mask = self._reset_mask, 0
        if not data:
            return bytes((reset,))  # a 0-pixel rectangle: empty copy-filter data
        rgb = tpixel_is_rgb(fmt)

        def tpixels(raw: bytes) -> bytes:
            return rgb_bytes(raw, fmt) if rgb else raw

        if is_solid(data, bpp):
            return bytes((FILL | reset,)) + tpixels(data[:bpp])
        values = pixel_values(data, bpp)
        colours = distinct_colours(values, width, height, MAX_PALETTE)
        if colours is not None:
            palette = list(colours)
            indices = palette_indices(data, values, bpp, palette)
            if len(palette) == 2:
                stream, body = STREAM_MONO, pack_indices(indices, width, height, 1)
            else:
                stream, body = STREAM_INDEXED, indices
            header = bytes(((stream << 4) | READ_FILTER | reset, FILTER_PALETTE, len(palette) - 1))
            return header + tpixels(b"".join([pixel_bytes(v, bpp) for v in palette])) + self._compress(stream, body)
        if self.quality is not None and rgb and width * height >= MIN_JPEG_PIXELS:
            jpeg = self._jpeg(rgb_bytes(data, fmt), width, height, self.quality)
            return bytes((JPEG | reset,)) + compact_length(len(jpeg)) + jpeg
        body = tpixels(data)
        if len(body) > 0x3FFFFF:
            raise ValueError("Tight rectangle too large for a compact length; use rects() to split")
        return bytes(((STREAM_FULL << 4) | reset,)) + self._compress(STREAM_FULL, body)

    def _compress(self, stream: int, data: bytes) -> bytes:
        if len(data) < MIN_TO_COMPRESS:
            return data
        compressed = self.streams[stream].compress(data)
        return compact_length(len(compressed)) + compressed

    @staticmethod
    def _jpeg(rgb: bytes, width: int, height: int, quality: int) -> bytes:
        image = Image.frombytes("RGB", (width, height), rgb)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=JPEG_QUALITY[quality], subsampling=JPEG_SUBSAMPLING[quality])
        return out.getvalue()
