"""Tight (7): fill for solid rectangles, a palette for few colours, JPEG (Pillow) for many when the viewer
gave a quality level, zlib-compressed TPIXELs otherwise.

Rectangles are split to at most 2048 pixels wide (a protocol rule) and at most 65536 pixels (so compact
lengths always fit and one chunk stays cheap). Streams: 0 full colour, 1 two-colour (1 bit per pixel), 2
indexed (8 bits per pixel); a new compression level takes effect at once (see ZlibStream: no compressor
state is kept, so nothing needs resetting). Palettes come from numpy (``np.unique``: ascending pixel values),
after the first two rows alone were checked for more than 256 colours. The gradient filter is not produced.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rfb.encodings.base import (
    Encoder,
    PixelArray,
    Pixels,
    compact_length,
    pack_index_array,
    palette_of,
    pixel_array,
    solid_colour,
)
from rfb.encodings.zlibraw import DEFAULT_LEVEL, ZlibStream
from rfb.pixels import rgb_bytes, tpixel_is_rgb
from rfb.wire import ENCODING_TIGHT, PixelFormat, rect_header

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

    @property
    def level(self) -> int:
        return self.streams[0].level

    def set_level(self, level: int) -> None:
        """Change the zlib level (from the next rectangle on)."""
        for stream in self.streams:
            stream.set_level(level)

    def set_quality(self, quality: int | None) -> None:
        """The viewer's JPEG quality level 0..9, or None for lossless only."""
        if quality is not None and not 0 <= quality <= 9:
            raise ValueError(f"quality level {quality} out of range 0-9")
        self.quality = quality

    def rects(self, x: int, y: int, width: int, height: int, pixels: Pixels, fmt: PixelFormat) -> list[bytes]:
        px = pixel_array(pixels, width, height, fmt)
        out = []
        chunk_width = min(width, MAX_WIDTH) or 1
        chunk_height = max(1, MAX_PIXELS // chunk_width)
        for cy in range(0, height, chunk_height):
            for cx in range(0, width, chunk_width):
                chunk = px[cy : cy + chunk_height, cx : cx + chunk_width]
                ch, cw = chunk.shape
                out.append(rect_header(x + cx, y + cy, cw, ch, self.encoding) + self._encode_array(chunk, fmt))
        return out

    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        px = pixel_array(pixels, width, height, fmt)
        if width > MAX_WIDTH:
            raise ValueError(f"Tight rectangles are at most {MAX_WIDTH} pixels wide; use rects() to split")
        if width * height * fmt.bytes_per_pixel > 0x3FFFFF:
            raise ValueError("Tight rectangle too large for a compact length; use rects() to split")
        return self._encode_array(px, fmt)

    def _encode_array(self, px: PixelArray, fmt: PixelFormat) -> bytes:
        height, width = px.shape
        if px.size == 0:
            return b"\x00"  # a 0-pixel rectangle: empty copy-filter data
        rgb = tpixel_is_rgb(fmt)

        def tpixels(values: PixelArray) -> bytes:
            return _rgb(values, fmt) if rgb else values.tobytes()

        colour = solid_colour(px)
        if colour is not None:
            return bytes((FILL,)) + tpixels(np.array([colour], dtype=px.dtype))
        found = palette_of(px, MAX_PALETTE)
        if found is not None:
            values, indices = found
            if len(values) == 2:
                stream, body = STREAM_MONO, pack_index_array(indices, width, height, 1)
            else:
                stream, body = STREAM_INDEXED, indices.tobytes()
            header = bytes(((stream << 4) | READ_FILTER, FILTER_PALETTE, len(values) - 1))
            return header + tpixels(values) + self._compress(stream, body)
        if self.quality is not None and rgb and width * height >= MIN_JPEG_PIXELS:
            jpeg = self._jpeg(_rgb(px, fmt), width, height, self.quality)
            return bytes((JPEG,)) + compact_length(len(jpeg)) + jpeg
        return bytes((STREAM_FULL << 4,)) + self._compress(STREAM_FULL, tpixels(px))

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


def _rgb(px: PixelArray, fmt: PixelFormat) -> bytes:
    """TPIXELs (R, G, B bytes) of pixels in a format where tpixel_is_rgb holds; three strided copies when the
    channels are whole bytes (numpy's fancy indexing over the last axis is several times slower)."""
    shifts = (fmt.red_shift, fmt.green_shift, fmt.blue_shift)
    if any(s % 8 for s in shifts):
        return rgb_bytes(px.tobytes(), fmt)
    as_bytes = np.ascontiguousarray(px).view(np.uint8).reshape(*px.shape, 4)
    out = np.empty((*px.shape, 3), dtype=np.uint8)
    for channel, shift in enumerate(shifts):
        out[..., channel] = as_bytes[..., 3 - shift // 8 if fmt.big_endian else shift // 8]
    return out.tobytes()
