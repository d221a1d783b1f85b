"""Zlib (6): Raw pixels through one zlib stream that lives as long as the connection."""

from __future__ import annotations

import zlib

from rfb.encodings.base import Encoder, check_size
from rfb.wire import ENCODING_ZLIB, U32, Buffer, PixelFormat

DEFAULT_LEVEL = 2  # zlib's fast (deflate_fast) levels are 1-3; a VNC viewer's compress-level hint overrides


class ZlibStream:
    """A zlib stream shared by every rectangle of one encoding on one connection.

    The viewer inflates with one matching stream, so the level can only be chosen before the first byte;
    :meth:`set_level` afterwards is remembered but only takes effect through :meth:`reset` (for encodings
    that can tell the viewer to reset, i.e. Tight).
    """

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level
        self._compressor: zlib._Compress | None = None

    @property
    def started(self) -> bool:
        return self._compressor is not None

    def set_level(self, level: int) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level {level} out of range 0-9")
        self.level = level

    def reset(self) -> None:
        self._compressor = None

    def compress(self, data: Buffer) -> bytes:
        """``data`` compressed and sync-flushed, so the viewer can inflate all of it now."""
        if self._compressor is None:
            self._compressor = zlib.compressobj(self.level)
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)


class ZlibEncoder(Encoder):
    encoding = ENCODING_ZLIB

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.stream = ZlibStream(level)

    def encode(self, pixels: Buffer, width: int, height: int, fmt: PixelFormat) -> bytes:
        compressed = self.stream.compress(check_size(pixels, width, height, fmt))
        return U32.pack(len(compressed)) + compressed
