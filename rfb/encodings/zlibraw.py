"""Zlib (6): Raw pixels through one zlib stream that lives as long as the connection.

Compression is zlib-ng's (the ``zlib-ng`` package: SIMD deflate, the same stream format as zlib): on this
project's 1920x1080 measurements it Huffman-codes 40 % faster and LZ77-compresses text 2-3x faster than zlib,
at the same or smaller size; only raw 32-bit pixels (the Zlib encoding of a high-colour frame) come out larger
at its fast levels.
"""

from __future__ import annotations

import zlib

from zlib_ng import zlib_ng

from rfb.encodings.base import Encoder, Pixels, check_size
from rfb.wire import ENCODING_ZLIB, U32, Buffer, PixelFormat, rect_header

DEFAULT_LEVEL = 2  # zlib's fast (deflate_fast) levels are 1-3; a VNC viewer's compress-level hint overrides


#: Above this size, a sample decides whether LZ77 matching is worth its CPU (see ZlibStream.compress).
SAMPLE_SIZE = 16 * 1024
#: LZ77 must make the sample this much smaller than Huffman coding alone does to be worth its CPU.
LZ77_GAIN = 0.95

#: The two bytes that open a zlib stream (deflate, 32 KiB window, no dictionary; (0x78 << 8 | 0x01) % 31 == 0).
ZLIB_HEADER = b"\x78\x01"


class ZlibStream:
    """A zlib stream shared by every rectangle of one encoding on one connection.

    The viewer inflates one stream for the whole connection, but this side keeps no compressor between calls:
    each :meth:`compress` is a fresh raw deflate that ends in a sync flush, so it starts on a byte boundary,
    never refers back to earlier data (the viewer's window holds it, nothing points into it) and the viewer's
    inflate continues through it as through any other deflate block. Only the 2-byte zlib header before the
    first piece is state: :attr:`started`. So any encoder process can produce the next piece of any viewer's
    stream, a level change takes effect at once, and a lost piece costs nothing to resynchronise. The price is
    that a rectangle cannot refer to the previous update's bytes (which, for frames far larger than the 32 KiB
    window, it rarely could anyway).
    """

    def __init__(self, level: int = DEFAULT_LEVEL, *, started: bool = False) -> None:
        self.set_level(level)
        self.started = started

    def set_level(self, level: int) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level {level} out of range 0-9")
        self.level = level

    def reset(self) -> None:
        """The viewer resets its stream (Tight can tell it to): the next piece starts with the header again."""
        self.started = False

    def compress(self, data: Buffer) -> bytes:
        """``data`` compressed and sync-flushed, so the viewer can inflate all of it now.

        High-colour pixels (video, photos) defeat LZ77: deflate's match search then costs most of an encoder's
        time and finds nothing that Huffman coding alone would not save. So a large input is sampled first
        (16 KiB from its middle): if LZ77 at level 1 makes it no more than 5 % smaller than Huffman coding
        alone, the whole is Huffman-coded only, which on such data is as small and about twice as fast.
        """
        strategy = zlib.Z_DEFAULT_STRATEGY
        if self.level and len(data) >= 8 * SAMPLE_SIZE:
            middle = len(data) // 2
            sample = data[middle : middle + SAMPLE_SIZE]
            huffman = zlib_ng.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_HUFFMAN_ONLY)
            if len(zlib_ng.compress(sample, 1)) > LZ77_GAIN * len(huffman.compress(sample) + huffman.flush()):
                strategy = zlib.Z_HUFFMAN_ONLY
        compressor = zlib_ng.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, strategy)
        out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        if not self.started:
            self.started = True
            return ZLIB_HEADER + out
        return out


class ZlibEncoder(Encoder):
    encoding = ENCODING_ZLIB

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.stream = ZlibStream(level)

    def encode(self, pixels: Pixels, width: int, height: int, fmt: PixelFormat) -> bytes:
        compressed = self.stream.compress(check_size(pixels, width, height, fmt))
        return U32.pack(len(compressed)) + compressed

    def pieces(self, x: int, y: int, width: int, height: int, pixels: Pixels,
               fmt: PixelFormat) -> tuple[list[Buffer], int]:
        compressed = self.stream.compress(check_size(pixels, width, height, fmt))
        return [rect_header(x, y, width, height, self.encoding) + U32.pack(len(compressed)), compressed], 1
