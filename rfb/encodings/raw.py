"""Raw (0) and CopyRect (1): pixels as they are, or a position the viewer copies from."""

from __future__ import annotations

import struct

from rfb.encodings.base import Encoder, Pixels, check_size
from rfb.wire import ENCODING_COPYRECT, ENCODING_RAW, Buffer, PixelFormat, rect_header

_COPYRECT = struct.Struct(">HH")


class RawEncoder(Encoder):
    """Every viewer must accept Raw; it costs no CPU and the most bandwidth."""

    encoding = ENCODING_RAW

    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        return check_size(pixels, width, height, fmt)

    def pieces(self, x: int, y: int, width: int, height: int, pixels: Pixels,
               fmt: PixelFormat) -> tuple[list[Buffer], int]:
        return [rect_header(x, y, width, height, self.encoding), self.encode(pixels, width, height, fmt)], 1


def copyrect_rect(x: int, y: int, width: int, height: int, src_x: int, src_y: int) -> bytes:
    """A CopyRect rectangle: the viewer copies width x height pixels from (src_x, src_y) of its framebuffer.

    Never use it to answer a non-incremental request (the viewer may have lost the source)."""
    return rect_header(x, y, width, height, ENCODING_COPYRECT) + _COPYRECT.pack(src_x, src_y)
