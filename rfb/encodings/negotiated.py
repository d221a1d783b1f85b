"""One viewer's encoders: picks the encoding from its SetEncodings, keeps zlib streams across updates.

Encoders keep no compressor state between rectangles (see ZlibStream), so what one viewer's encoding needs is
small and plain: :class:`EncoderSettings` (encoding, level, quality, which zlib streams have started). Any
process can rebuild the encoder from it (:func:`make_encoder`), encode rectangles of a framebuffer
(:func:`encode_frame_rects`) and hand back the settings to continue with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from rfb.encodings.base import Arena, Encoder, PixelArray
from rfb.encodings.hextile import HextileEncoder
from rfb.encodings.raw import RawEncoder
from rfb.encodings.tight import TightEncoder
from rfb.encodings.zlibraw import DEFAULT_LEVEL, ZlibEncoder, ZlibStream
from rfb.encodings.zrle import ZrleEncoder
from rfb.pixels import convert, is_native
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

    def settings(self, encoding: int | None = None) -> EncoderSettings:
        """What a process needs to continue this viewer's ``encoding`` (default: the preferred one)."""
        encoder = self.encoder(encoding)
        quality = encoder.quality if isinstance(encoder, TightEncoder) else None
        return EncoderSettings(encoder.encoding, self._level, quality, streams_started(encoder))

    def advance(self, settings: EncoderSettings) -> None:
        """Adopt the stream state after an update encoded elsewhere with ``settings`` was sent."""
        set_streams_started(self.encoder(settings.encoding), settings.started)


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """One viewer's encoder, as plain values: encoding number, zlib level, Tight JPEG quality, and for each zlib
    stream of that encoding (1 for Zlib and ZRLE, 4 for Tight) whether its header was sent."""

    encoding: int
    level: int = DEFAULT_LEVEL
    quality: int | None = None
    started: tuple[bool, ...] = ()


def _streams(encoder: Encoder) -> list[ZlibStream]:
    if isinstance(encoder, TightEncoder):
        return encoder.streams
    if isinstance(encoder, ZlibEncoder | ZrleEncoder):
        return [encoder.stream]
    return []


def streams_started(encoder: Encoder) -> tuple[bool, ...]:
    return tuple(stream.started for stream in _streams(encoder))


def set_streams_started(encoder: Encoder, started: Sequence[bool]) -> None:
    for stream, was_started in zip(_streams(encoder), started, strict=False):
        stream.started = was_started


def make_encoder(settings: EncoderSettings) -> Encoder:
    """A fresh encoder that continues where ``settings`` says the viewer's streams are."""
    if settings.encoding not in ENCODER_TYPES:
        raise ValueError(f"encoding {settings.encoding} is not one this package produces")
    encoder: Encoder
    if settings.encoding == ENCODING_TIGHT:
        encoder = TightEncoder(settings.level, settings.quality)
    elif settings.encoding == ENCODING_ZLIB:
        encoder = ZlibEncoder(settings.level)
    elif settings.encoding == ENCODING_ZRLE:
        encoder = ZrleEncoder(settings.level)
    else:
        encoder = ENCODER_TYPES[settings.encoding]()
    set_streams_started(encoder, settings.started)
    return encoder


Rect = tuple[int, int, int, int]


def encode_frame_rects(settings: EncoderSettings, fmt: PixelFormat, frame: PixelArray, rects: Sequence[Rect],
                       arena: Arena | None = None) -> tuple[list[Buffer], int, EncoderSettings]:
    """Complete rectangles for ``rects`` of ``frame`` (a (height, width) uint32 array of BGRX pixels, e.g. a view
    of shared memory), in the viewer's format ``fmt``: the buffers to send in order, how many rectangles they
    make, and the settings to continue with. Large gathered outputs go to ``arena`` when given."""
    encoder = make_encoder(settings)
    encoder.arena = arena
    native = is_native(fmt)
    out: list[Buffer] = []
    count = 0
    for x, y, w, h in rects:
        view = frame[y : y + h, x : x + w]
        if view.shape != (h, w):
            raise ValueError(f"rectangle {w}x{h}+{x}+{y} outside the {frame.shape[1]}x{frame.shape[0]} frame")
        pixels = view if native else convert(np.ascontiguousarray(view).tobytes(), fmt)
        pieces, n = encoder.pieces(x, y, w, h, pixels, fmt)
        out += pieces
        count += n
    return out, count, replace(settings, started=streams_started(encoder))
