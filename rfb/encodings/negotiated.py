"""One viewer's encoders: picks the encoding from its SetEncodings, keeps zlib streams across updates."""

from __future__ import annotations

from collections.abc import Sequence

from rfb.encodings.base import Encoder
from rfb.encodings.hextile import HextileEncoder
from rfb.encodings.raw import RawEncoder
from rfb.encodings.tight import TightEncoder
from rfb.encodings.zlibraw import DEFAULT_LEVEL, ZlibEncoder
from rfb.encodings.zrle import ZrleEncoder
from rfb.wire import (
    ENCODING_COMPRESS_LEVEL_0,
    ENCODING_COMPRESS_LEVEL_9,
    ENCODING_HEXTILE,
    ENCODING_QUALITY_LEVEL_0,
    ENCODING_QUALITY_LEVEL_9,
    ENCODING_RAW,
    ENCODING_TIGHT,
    ENCODING_ZLIB,
    ENCODING_ZRLE,
    Buffer,
    PixelFormat,
)

#: Pixel encodings this module can choose, by number.
ENCODER_TYPES: dict[int, type[Encoder]] = {
    ENCODING_RAW: RawEncoder,
    ENCODING_HEXTILE: HextileEncoder,
    ENCODING_ZLIB: ZlibEncoder,
    ENCODING_TIGHT: TightEncoder,
    ENCODING_ZRLE: ZrleEncoder,
}


class NegotiatedEncoders:
    """Create one per connection; call :meth:`set_encodings` on every EncodingsSet event.

    The first pixel encoding in the viewer's list that we produce wins (Raw if none); the first compression
    level (-256..-247) and quality level (-32..-23) it lists are used. Encoder objects live as long as this
    object, because Zlib, ZRLE and Tight streams must continue across rectangles.
    """

    def __init__(self) -> None:
        self.preferred = ENCODING_RAW
        self.compress_level: int | None = None
        self.quality_level: int | None = None
        self._encoders: dict[int, Encoder] = {}

    def set_encodings(self, encodings: Sequence[int]) -> None:
        self.preferred = next((e for e in encodings if e in ENCODER_TYPES), ENCODING_RAW)
        self.compress_level = next((e - ENCODING_COMPRESS_LEVEL_0 for e in encodings
                                    if ENCODING_COMPRESS_LEVEL_0 <= e <= ENCODING_COMPRESS_LEVEL_9), None)
        self.quality_level = next((e - ENCODING_QUALITY_LEVEL_0 for e in encodings
                                   if ENCODING_QUALITY_LEVEL_0 <= e <= ENCODING_QUALITY_LEVEL_9), None)
        tight = self._encoders.get(ENCODING_TIGHT)
        if isinstance(tight, TightEncoder):
            tight.set_level(self._level)
            tight.set_quality(self.quality_level)

    @property
    def _level(self) -> int:
        return DEFAULT_LEVEL if self.compress_level is None else self.compress_level

    def encoder(self, encoding: int | None = None) -> Encoder:
        """The encoder for ``encoding`` (default: the preferred one), created on first use."""
        number = self.preferred if encoding is None else encoding
        if number not in self._encoders:
            if number == ENCODING_TIGHT:
                self._encoders[number] = TightEncoder(self._level, self.quality_level)
            elif number in (ENCODING_ZLIB, ENCODING_ZRLE):
                # A zlib stream's level is fixed once it has started; the first hint seen wins.
                self._encoders[number] = ZlibEncoder(self._level) if number == ENCODING_ZLIB \
                    else ZrleEncoder(self._level)
            else:
                self._encoders[number] = ENCODER_TYPES[number]()
        return self._encoders[number]

    def rects(self, x: int, y: int, width: int, height: int, pixels: Buffer, fmt: PixelFormat,
              encoding: int | None = None) -> list[bytes]:
        """Complete rectangles for pixels already in ``fmt`` (see rfb.pixels.convert)."""
        return self.encoder(encoding).rects(x, y, width, height, pixels, fmt)
