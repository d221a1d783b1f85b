"""Hextile (5): 16x16 tiles, each solid, raw, or a background with subrectangles; encoded in C.

The tile choices and bytes are those of the Python reference (rfb.encodings.hextile_reference, which says
what they are); the C part (rfb/encodings/_hextile.c, built by ``pip install -e .``) makes them in one pass:
each tile is copied once to a local buffer, classified, and written into the output, which in an encoder
worker is the reply's memfd (the :class:`~rfb.encodings.base.Arena`), rectangle header included, so nothing
is copied again before the socket. Every pixel format (1, 2 or 4 bytes per pixel) takes the C path. Why C and
what it costs: docs/rfb.md.
"""

from __future__ import annotations

from rfb.encodings.base import Encoder, Pixels, pixel_array
from rfb.wire import ENCODING_HEXTILE, Buffer, PixelFormat, rect_header

try:
    from rfb.encodings import _hextile
except ImportError as exc:  # pragma: no cover - a broken install, not a code path
    raise ImportError(
        "vmfront's Hextile encoder (rfb/encodings/_hextile.c) is not built: run ./install.sh, or "
        "`pip install -e .` with a C compiler and Python's headers (Debian: gcc, python3-dev)") from exc


class HextileEncoder(Encoder):
    encoding = ENCODING_HEXTILE

    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        return bytes(self._encode(None, pixels, width, height, fmt))

    def pieces(self, x: int, y: int, width: int, height: int, pixels: Pixels,
               fmt: PixelFormat) -> tuple[list[Buffer], int]:
        return [self._encode(rect_header(x, y, width, height, self.encoding), pixels, width, height, fmt)], 1

    def _encode(self, header: bytes | None, pixels: Pixels, width: int, height: int,
                fmt: PixelFormat) -> memoryview:
        """``header`` (if any) and the payload, back to back in the arena (or a new buffer if it is full)."""
        px = pixel_array(pixels, width, height, fmt)
        if px.strides[1] != px.itemsize or px.strides[0] < 0:
            px = px.copy()  # not a view of rows of pixels (never from a framebuffer): what the C part reads
        start = len(header) if header is not None else 0
        size = start + _hextile.max_size(width, height, fmt.bytes_per_pixel)
        room = self.arena.room(size) if self.arena is not None else None
        arena = self.arena if room is not None else None
        if room is None:
            room = memoryview(bytearray(size))
        if header is not None:
            room[:start] = header
        used = start + _hextile.encode_into(px, room[start:])
        if arena is not None:
            arena.keep(used)
        return room[:used]
