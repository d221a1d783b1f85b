"""RFB rectangle encoders: everything encoded is decoded again and must give back the same pixels.

Two decoders check the encoders: one written here from the spec (RFC 6143 / rfbproto: Raw, CopyRect, Hextile,
Zlib, ZRLE, Tight, cursor), and vncdotool's RFB client (Raw, CopyRect, Hextile, ZRLE, Cursor, DesktopSize,
LastRect) fed whole FramebufferUpdate messages by a real RfbServerConnection.
"""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rfb import pixels
from rfb.encodings import (
    FramebufferUpdate,
    HextileEncoder,
    NegotiatedEncoders,
    RawEncoder,
    TightEncoder,
    ZlibEncoder,
    ZlibStream,
    ZrleEncoder,
    compact_length,
    copyrect_rect,
    cursor_rect,
    desktop_size_rect,
    extended_desktop_size_rect,
    framebuffer_update_message,
    last_rect,
    qemu_extended_key_event_rect,
    qemu_pointer_motion_change_rect,
)
from rfb.encodings.base import Encoder, pack_indices
from rfb.encodings.hextile_reference import ReferenceHextileEncoder
from rfb.server import RfbServerConnection
from rfb.wire import (
    BGRX8888,
    ENCODING_COPYRECT,
    ENCODING_CURSOR,
    ENCODING_DESKTOP_SIZE,
    ENCODING_EXTENDED_DESKTOP_SIZE,
    ENCODING_HEXTILE,
    ENCODING_LAST_RECT,
    ENCODING_QEMU_EXTENDED_KEY_EVENT,
    ENCODING_QEMU_POINTER_MOTION_CHANGE,
    ENCODING_RAW,
    ENCODING_TIGHT,
    ENCODING_ZLIB,
    ENCODING_ZRLE,
    PixelFormat,
    Screen,
)

FORMATS = {
    "bgrx": BGRX8888,
    "rgbx-be": PixelFormat(32, 24, True, True, 255, 255, 255, 24, 16, 8),  # bytes R, G, B, X
    "xrgb-be": PixelFormat(32, 24, True, True, 255, 255, 255, 16, 8, 0),  # bytes X, R, G, B
    "rgb565": PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),
    "rgb555-be": PixelFormat(16, 15, True, True, 31, 31, 31, 10, 5, 0),
    "bgr233": PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),
    "colour-map": PixelFormat(8, 8, False, False, 0, 0, 0, 0, 0, 0),
    "rgb30": PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0),
}


# --- images (B, G, R, X with X = 0, as the framebuffer holds them) ----------------------------------------


def bgrx(colours: list[tuple[int, int, int]]) -> bytes:
    return b"".join(bytes((b, g, r, 0)) for r, g, b in colours)


def noise(width: int, height: int, seed: int = 1) -> bytes:
    data = bytearray(random.Random(seed).randbytes(width * height * 4))
    data[3::4] = bytes(width * height)
    return bytes(data)


def solid(width: int, height: int, rgb: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    return bgrx([rgb]) * (width * height)


def desktop(width: int, height: int, seed: int = 2) -> bytes:
    """A flat background, a few flat windows, a title bar gradient and some 'text' (dots of two colours)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (58, 110, 165))
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = min(width, x0 + rng.randrange(1, width + 1)), min(height, y0 + rng.randrange(1, height + 1))
        img.paste((236, 233, 216), (x0, y0, x1, y1))
        for x in range(x0, x1):
            img.paste((0, 0, min(255, 80 + x % 176)), (x, y0, x + 1, min(y1, y0 + 6)))
        for _ in range((x1 - x0) * (y1 - y0) // 40):
            img.putpixel((rng.randrange(x0, x1), rng.randrange(y0, y1)), rng.choice([(0, 0, 0), (255, 0, 0)]))
    return img.tobytes("raw", "BGRX")


def palette_image(width: int, height: int, count: int, seed: int = 3, run: int = 1) -> bytes:
    rng = random.Random(seed)
    colours = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(count)]
    out: list[tuple[int, int, int]] = []
    while len(out) < width * height:
        out.extend([rng.choice(colours)] * rng.randrange(1, run + 1))
    return bgrx(out[: width * height])


# --- a viewer written from the spec -------------------------------------------------------------------------


class DecodeError(Exception):
    pass


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DecodeError(f"need {n} bytes at {self.pos}, have {len(self.data) - self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def compact(self) -> int:
        b = self.u8()
        value = b & 0x7F
        if b & 0x80:
            b = self.u8()
            value |= (b & 0x7F) << 7
            if b & 0x80:
                value |= self.u8() << 14
        return value

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def spec_cpixel(fmt: PixelFormat) -> tuple[int, int]:
    """(offset, size) of a CPIXEL inside a pixel, written out from RFC 6143 7.7.6."""
    bpp = fmt.bits_per_pixel // 8
    if fmt.true_colour and fmt.bits_per_pixel == 32 and fmt.depth <= 24:
        bits = 0
        for top, shift in ((fmt.red_max, fmt.red_shift), (fmt.green_max, fmt.green_shift),
                           (fmt.blue_max, fmt.blue_shift)):
            bits |= top << shift
        if bits < 1 << 24:  # least significant three bytes
            return (1 if fmt.big_endian else 0), 3
        if bits & 0xFF == 0:  # most significant three bytes
            return (0 if fmt.big_endian else 1), 3
    return 0, bpp


class SpecViewer:
    """Keeps a framebuffer in the negotiated format and decodes updates into it."""

    def __init__(self, width: int, height: int, fmt: PixelFormat) -> None:
        self.width, self.height, self.fmt = width, height, fmt
        self.bpp = fmt.bits_per_pixel // 8
        self.fb = bytearray(width * height * self.bpp)
        self.zlib = zlib.decompressobj()
        self.zrle = zlib.decompressobj()
        self.tight = [zlib.decompressobj() for _ in range(4)]
        self.cursor: tuple[int, int, int, int, bytes, bytes] | None = None
        self.pseudo: list[tuple[int, int, int, int, int, bytes]] = []

    def put(self, x: int, y: int, w: int, h: int, data: bytes) -> None:
        assert len(data) == w * h * self.bpp, (len(data), w, h)
        assert x + w <= self.width and y + h <= self.height
        row = w * self.bpp
        for r in range(h):
            o = ((y + r) * self.width + x) * self.bpp
            self.fb[o : o + row] = data[r * row : (r + 1) * row]

    def get(self, x: int, y: int, w: int, h: int) -> bytes:
        row = w * self.bpp
        return b"".join(bytes(self.fb[((y + r) * self.width + x) * self.bpp :][:row]) for r in range(h))

    def fill(self, x: int, y: int, w: int, h: int, pixel: bytes) -> None:
        self.put(x, y, w, h, pixel * (w * h))

    def update(self, message: bytes) -> None:
        r = Reader(message)
        kind, count = r.unpack(">BxH")
        assert kind == 0
        n = 0
        while count == 0xFFFF or n < count:
            x, y, w, h, encoding = r.unpack(">HHHHi")
            n += 1
            if encoding == ENCODING_LAST_RECT:
                break
            self.rect(r, x, y, w, h, encoding)
        if not r.done:
            raise DecodeError(f"{len(r.data) - r.pos} bytes left after the update")

    def rect(self, r: Reader, x: int, y: int, w: int, h: int, encoding: int) -> None:
        if encoding == ENCODING_RAW:
            self.put(x, y, w, h, r.take(w * h * self.bpp))
        elif encoding == ENCODING_COPYRECT:
            sx, sy = r.unpack(">HH")
            self.put(x, y, w, h, self.get(sx, sy, w, h))
        elif encoding == ENCODING_HEXTILE:
            self.hextile(r, x, y, w, h)
        elif encoding == ENCODING_ZLIB:
            (length,) = r.unpack(">I")
            self.put(x, y, w, h, self.zlib.decompress(r.take(length)))
        elif encoding == ENCODING_ZRLE:
            (length,) = r.unpack(">I")
            self.zrle_data(Reader(self.zrle.decompress(r.take(length))), x, y, w, h)
        elif encoding == ENCODING_TIGHT:
            self.tight_rect(r, x, y, w, h)
        elif encoding == ENCODING_CURSOR:
            pix = r.take(w * h * self.bpp)
            mask = r.take((w + 7) // 8 * h)
            self.cursor = (x, y, w, h, pix, mask)
        elif encoding == ENCODING_EXTENDED_DESKTOP_SIZE:
            (n,) = r.unpack(">B3x")
            self.pseudo.append((x, y, w, h, encoding, r.take(16 * n)))
        elif encoding in (ENCODING_DESKTOP_SIZE, ENCODING_QEMU_EXTENDED_KEY_EVENT,
                          ENCODING_QEMU_POINTER_MOTION_CHANGE):
            self.pseudo.append((x, y, w, h, encoding, b""))
        else:
            raise DecodeError(f"unknown encoding {encoding}")

    def hextile(self, r: Reader, x: int, y: int, w: int, h: int) -> None:
        bg = fg = None
        for ty in range(y, y + h, 16):
            for tx in range(x, x + w, 16):
                tw, th = min(16, x + w - tx), min(16, y + h - ty)
                mask = r.u8()
                if mask & 1:
                    self.put(tx, ty, tw, th, r.take(tw * th * self.bpp))
                    bg = fg = None
                    continue
                if mask & 2:
                    bg = r.take(self.bpp)
                if bg is None:
                    raise DecodeError("hextile tile without a background")
                self.fill(tx, ty, tw, th, bg)
                if mask & 4:
                    if mask & 16:
                        raise DecodeError("ForegroundSpecified with SubrectsColoured")
                    fg = r.take(self.bpp)
                if mask & 8:
                    for _ in range(r.u8()):
                        colour = r.take(self.bpp) if mask & 16 else fg
                        if colour is None:
                            raise DecodeError("hextile subrect without a foreground")
                        xy, wh = r.u8(), r.u8()
                        sx, sy, sw, sh = xy >> 4, xy & 15, (wh >> 4) + 1, (wh & 15) + 1
                        if sx + sw > tw or sy + sh > th:
                            raise DecodeError("hextile subrect outside its tile")
                        self.fill(tx + sx, ty + sy, sw, sh, colour)
                    if mask & 16:
                        fg = None

    def cpixel_to_pixel(self, c: bytes) -> bytes:
        off, size = spec_cpixel(self.fmt)
        if size == self.bpp:
            return c
        return bytes(off) + c + bytes(self.bpp - off - size)

    def zrle_data(self, r: Reader, x: int, y: int, w: int, h: int) -> None:
        cp = spec_cpixel(self.fmt)[1]
        for ty in range(y, y + h, 64):
            for tx in range(x, x + w, 64):
                tw, th = min(64, x + w - tx), min(64, y + h - ty)
                sub = r.u8()
                rle, size = sub & 0x80, sub & 0x7F
                palette = [self.cpixel_to_pixel(r.take(cp)) for _ in range(size)]
                out: list[bytes] = []
                if not rle and size == 0:
                    out = [self.cpixel_to_pixel(r.take(cp)) for _ in range(tw * th)]
                elif not rle and size == 1:
                    out = palette * (tw * th)
                elif not rle:
                    if size > 16:
                        raise DecodeError("packed palette over 16")
                    bits = 1 if size == 2 else 2 if size <= 4 else 4
                    per_row = (tw * bits + 7) // 8
                    for _ in range(th):
                        row = r.take(per_row)
                        value = int.from_bytes(row, "big")
                        total = per_row * 8
                        for i in range(tw):
                            out.append(palette[(value >> (total - bits * (i + 1))) & ((1 << bits) - 1)])
                else:
                    if size == 1:
                        raise DecodeError("subencoding 129 is unused")
                    while len(out) < tw * th:
                        if size == 0:
                            pixel, length = self.cpixel_to_pixel(r.take(cp)), self.run(r)
                        else:
                            index = r.u8()
                            pixel = palette[index & 0x7F]
                            length = self.run(r) if index & 0x80 else 1
                        out.extend([pixel] * length)
                    if len(out) != tw * th:
                        raise DecodeError("ZRLE run past the end of its tile")
                self.put(tx, ty, tw, th, b"".join(out))
        if not r.done:
            raise DecodeError("ZRLE data left over")

    @staticmethod
    def run(r: Reader) -> int:
        length = 1
        while True:
            b = r.u8()
            length += b
            if b != 255:
                return length

    def tpixel_size(self) -> int:
        f = self.fmt
        rgb = (f.true_colour and f.bits_per_pixel == 32 and f.depth == 24
               and (f.red_max, f.green_max, f.blue_max) == (255, 255, 255))
        return 3 if rgb else self.bpp

    def tpixel_to_pixel(self, t: bytes) -> bytes:
        if self.tpixel_size() == self.bpp:
            return t
        f = self.fmt
        value = (t[0] << f.red_shift) | (t[1] << f.green_shift) | (t[2] << f.blue_shift)
        return value.to_bytes(4, "big" if f.big_endian else "little")

    def tight_data(self, r: Reader, stream: int, size: int) -> bytes:
        if size < 12:
            return r.take(size)
        data = self.tight[stream].decompress(r.take(r.compact()))
        if len(data) != size:
            raise DecodeError(f"tight stream {stream} gave {len(data)} bytes, expected {size}")
        return data

    def tight_rect(self, r: Reader, x: int, y: int, w: int, h: int) -> None:
        if w > 2048:
            raise DecodeError("Tight rectangle wider than 2048")
        control = r.u8()
        for i in range(4):
            if control & (1 << i):
                self.tight[i] = zlib.decompressobj()
        kind = control >> 4
        tp = self.tpixel_size()
        if kind == 8:
            self.fill(x, y, w, h, self.tpixel_to_pixel(r.take(tp)))
            return
        if kind == 9:
            jpeg = r.take(r.compact())
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
            assert image.size == (w, h)
            self.jpeg_rgb = image.tobytes()
            rgb = self.jpeg_rgb
            self.put(x, y, w, h, b"".join(self.tpixel_to_pixel(rgb[i : i + 3]) for i in range(0, len(rgb), 3)))
            return
        if kind & 8:
            raise DecodeError(f"invalid Tight compression type {kind}")
        stream = kind & 3
        filt = r.u8() if kind & 4 else 0
        if filt == 0:
            data = self.tight_data(r, stream, w * h * tp)
            self.put(x, y, w, h, b"".join(self.tpixel_to_pixel(data[i : i + tp]) for i in range(0, len(data), tp)))
        elif filt == 1:
            count = r.u8() + 1
            palette = [self.tpixel_to_pixel(r.take(tp)) for _ in range(count)]
            if count == 2:
                per_row = (w + 7) // 8
                data = self.tight_data(r, stream, per_row * h)
                out = []
                for row in range(h):
                    for i in range(w):
                        out.append(palette[(data[row * per_row + i // 8] >> (7 - i % 8)) & 1])
            else:
                data = self.tight_data(r, stream, w * h)
                out = [palette[i] for i in data]
            self.put(x, y, w, h, b"".join(out))
        else:
            raise DecodeError(f"unexpected Tight filter {filt}")


def pixels_of(image: bytes, fmt: PixelFormat) -> bytes:
    return pixels.convert(image, fmt)


def roundtrip(encoder: Encoder, image: bytes, width: int, height: int, fmt: PixelFormat,
              viewer: SpecViewer | None = None, x: int = 0, y: int = 0) -> SpecViewer:
    viewer = viewer or SpecViewer(width + x, height + y, fmt)
    converted = pixels_of(image, fmt)
    viewer.update(framebuffer_update_message(encoder.rects(x, y, width, height, converted, fmt)))
    assert viewer.get(x, y, width, height) == converted
    return viewer


# The Hextile reference (what the C encoder must reproduce) is decoded here like the encoders the product uses.
LOSSLESS = [RawEncoder, HextileEncoder, ReferenceHextileEncoder, ZlibEncoder, ZrleEncoder, TightEncoder]
IMAGES: dict[str, Callable[[int, int], bytes]] = {
    "solid": lambda w, h: solid(w, h),
    "desktop": desktop,
    "noise": noise,
    "two": lambda w, h: palette_image(w, h, 2, run=6),
    "four": lambda w, h: palette_image(w, h, 4, run=3),
    "sixteen": lambda w, h: palette_image(w, h, 16, run=2),
    "hundred": lambda w, h: palette_image(w, h, 100, run=8),
    "three-hundred": lambda w, h: palette_image(w, h, 300, run=4),
}


@pytest.mark.parametrize("encoder_type", LOSSLESS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("fmt_name", list(FORMATS))
@pytest.mark.parametrize("image_name", list(IMAGES))
def test_lossless_roundtrip(encoder_type: type[Encoder], fmt_name: str, image_name: str) -> None:
    fmt = FORMATS[fmt_name]
    for width, height in ((67, 45), (16, 16), (1, 1), (130, 3)):
        roundtrip(encoder_type(), IMAGES[image_name](width, height), width, height, fmt)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encoder_type=st.sampled_from(LOSSLESS),
    fmt=st.sampled_from(list(FORMATS.values())),
    width=st.integers(1, 140),
    height=st.integers(1, 70),
    colours=st.integers(1, 40),
    run=st.integers(1, 30),
    seed=st.integers(0, 1 << 30),
)
def test_lossless_roundtrip_random(encoder_type: type[Encoder], fmt: PixelFormat, width: int, height: int,
                                   colours: int, run: int, seed: int) -> None:
    roundtrip(encoder_type(), palette_image(width, height, colours, seed, run), width, height, fmt)


@pytest.mark.parametrize("encoder_type", [ZlibEncoder, ZrleEncoder, TightEncoder], ids=lambda t: t.__name__)
def test_streams_continue_across_rectangles_and_updates(encoder_type: type[Encoder]) -> None:
    fmt = BGRX8888
    encoder = encoder_type()
    viewer = SpecViewer(100, 80, fmt)
    makers: list[Callable[[int, int], bytes]] = [desktop, noise, lambda w, h: palette_image(w, h, 3, run=5)]
    for i, make in enumerate(makers):
        x, y = (i * 13) % 40, (i * 7) % 30
        roundtrip(encoder, make(60, 50), 60, 50, fmt, viewer, x, y)


def test_empty_rectangles() -> None:
    for encoder_type in LOSSLESS:
        viewer = SpecViewer(4, 4, BGRX8888)
        viewer.update(framebuffer_update_message(encoder_type().rects(0, 0, 0, 0, b"", BGRX8888)))


def test_encoders_check_the_pixel_count() -> None:
    for encoder_type in LOSSLESS:
        with pytest.raises(ValueError):
            encoder_type().encode(b"\x00" * 7, 2, 1, BGRX8888)


def test_hextile_uses_subrects_and_carries_background() -> None:
    image = bytearray(solid(32, 16, (0, 0, 0)))
    for i in range(16):  # a diagonal line in the first tile, a box in the second
        image[(i * 32 + i) * 4 : (i * 32 + i) * 4 + 3] = b"\xff\xff\xff"
    for yy in range(4, 8):
        for xx in range(20, 28):
            image[(yy * 32 + xx) * 4 : (yy * 32 + xx) * 4 + 3] = b"\x00\x00\xff"
    payload = HextileEncoder().encode(bytes(image), 32, 16, BGRX8888)
    assert len(payload) < 2 * (1 + 16 * 16 * 4) // 4
    assert payload[0] == 2 | 4 | 8  # background, foreground, subrects
    roundtrip(HextileEncoder(), bytes(image), 32, 16, BGRX8888)


def test_zrle_tile_choices() -> None:
    enc = ZrleEncoder()
    assert enc.tiles(solid(64, 64), 64, 64, BGRX8888) == b"\x01" + bytes((200, 90, 40))
    assert enc.tiles(noise(64, 64), 64, 64, BGRX8888)[0] == 0  # raw
    assert 2 <= enc.tiles(palette_image(64, 64, 5), 64, 64, BGRX8888)[0] <= 16  # packed palette
    assert enc.tiles(palette_image(64, 64, 60, run=20), 64, 64, BGRX8888)[0] == 128 + 60  # palette RLE
    # A CPIXEL is three bytes for depth-24 true colour, a whole pixel otherwise.
    assert len(enc.tiles(solid(64, 64), 64, 64, FORMATS["rgb30"])) == 1 + 4


def test_tight_choices_and_split() -> None:
    enc = TightEncoder()
    [fill] = enc.rects(0, 0, 30, 20, pixels_of(solid(30, 20), BGRX8888), BGRX8888)
    assert fill[12:] == b"\x80" + bytes((40, 90, 200))  # fill, TPIXEL is R, G, B
    [mono] = enc.rects(0, 0, 30, 20, pixels_of(palette_image(30, 20, 2), BGRX8888), BGRX8888)
    assert mono[12] == 0x50 and mono[13] == 1 and mono[14] == 1  # stream 1, palette filter, 2 colours
    wide = enc.rects(0, 0, 3000, 30, pixels_of(desktop(3000, 30), BGRX8888), BGRX8888)
    assert all(struct.unpack(">HHHHi", r[:12])[2] <= 2048 for r in wide)
    viewer = SpecViewer(3000, 30, BGRX8888)
    viewer.update(framebuffer_update_message(wide))
    assert viewer.get(0, 0, 3000, 30) == pixels_of(desktop(3000, 30), BGRX8888)
    tall = enc.rects(0, 0, 1024, 200, pixels_of(noise(1024, 200), BGRX8888), BGRX8888)
    assert len(tall) == 4  # 64 rows of 1024 pixels per rectangle


def test_tight_level_change_needs_no_reset() -> None:
    """No compressor state is kept between rectangles, so a new level applies at once without a stream reset."""
    fmt = BGRX8888
    enc = TightEncoder(level=1)
    viewer = SpecViewer(80, 60, fmt)
    roundtrip(enc, noise(80, 60), 80, 60, fmt, viewer)
    enc.set_level(9)
    rect = enc.rects(0, 0, 80, 60, pixels_of(noise(80, 60, 5), fmt), fmt)[0]
    assert rect[12] & 0x0F == 0  # no stream reset
    viewer.update(framebuffer_update_message([rect]))
    assert viewer.get(0, 0, 80, 60) == noise(80, 60, 5)


@pytest.mark.parametrize("encoder_type", [ZlibEncoder, ZrleEncoder, TightEncoder], ids=lambda t: t.__name__)
def test_any_encoder_continues_a_viewers_stream(encoder_type: type[Encoder]) -> None:
    """Updates made by different encoder objects (as different worker processes make them), told only whether
    the stream has started, continue the viewer's one zlib stream."""
    fmt = BGRX8888
    viewer = SpecViewer(100, 80, fmt)
    started = [False] * 4
    for i, make in enumerate([desktop, noise, lambda w, h: palette_image(w, h, 3, run=5), desktop]):
        encoder = encoder_type()
        streams: list[ZlibStream] = encoder.streams if isinstance(encoder, TightEncoder) else [encoder.stream]
        for stream, was_started in zip(streams, started, strict=False):
            stream.started = was_started
        roundtrip(encoder, make(60, 50), 60, 50, fmt, viewer, i * 10, i * 7)
        started = [stream.started for stream in streams]


def smooth(width: int, height: int) -> bytes:
    return Image.radial_gradient("L").resize((width, height)).convert("RGB").tobytes("raw", "BGRX")


@pytest.mark.parametrize("fmt_name", ["bgrx", "rgbx-be", "xrgb-be"])
def test_tight_jpeg_is_close(fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]
    base = bytearray(smooth(120, 90))
    base[0::4] = bytes(range(256)) * (120 * 90 // 256) + bytes(120 * 90 % 256)  # many colours
    image = bytes(base)
    enc = TightEncoder(quality=8)
    rect = enc.rects(0, 0, 120, 90, pixels_of(image, fmt), fmt)
    assert rect[0][12] == 0x90
    viewer = SpecViewer(120, 90, fmt)
    viewer.update(framebuffer_update_message(rect))
    decoded = pixels.rgb_bytes(viewer.get(0, 0, 120, 90), fmt)
    expected = pixels.rgb_bytes(pixels_of(image, fmt), fmt)
    error = sum(abs(a - b) for a, b in zip(decoded, expected, strict=True)) / len(expected)
    assert error < 8, error
    # Formats without 8-bit channels never get JPEG.
    rgb565 = FORMATS["rgb565"]
    assert TightEncoder(quality=8).rects(0, 0, 120, 90, pixels_of(image, rgb565), rgb565)[0][12] & 0xF0 != 0x90


def test_compact_length_and_packing() -> None:
    assert compact_length(10000) == bytes.fromhex("904e")
    assert compact_length(127) == b"\x7f" and compact_length(128) == b"\x80\x01"
    assert compact_length(0x3FFFFF) == b"\xff\xff\xff"
    with pytest.raises(ValueError):
        compact_length(0x400000)
    assert pack_indices(bytes([1, 0, 1, 1, 0, 0, 0, 0, 1]), 9, 1, 1) == bytes([0b10110000, 0b10000000])
    assert pack_indices(bytes([3, 2, 1]), 3, 1, 2) == bytes([0b11100100])
    assert pack_indices(bytes([15, 1, 7, 0, 9]), 5, 1, 4) == bytes([0xF1, 0x70, 0x90])


def test_pseudo_rectangles() -> None:
    screens = [Screen(1, 0, 0, 800, 600), Screen(2, 800, 0, 224, 600, 7)]
    viewer = SpecViewer(8, 8, BGRX8888)
    message = framebuffer_update_message([
        desktop_size_rect(1024, 600),
        extended_desktop_size_rect(1024, 600, screens, reason=1, status=3),
        qemu_extended_key_event_rect(),
        qemu_pointer_motion_change_rect(True, 8, 8),
    ], last_rect_terminated=True)
    assert message[:4] == b"\x00\x00\xff\xff" and message[-12:] == last_rect()
    viewer.update(message)
    assert viewer.pseudo[0] == (0, 0, 1024, 600, ENCODING_DESKTOP_SIZE, b"")
    assert viewer.pseudo[1][:5] == (1, 3, 1024, 600, ENCODING_EXTENDED_DESKTOP_SIZE)
    assert viewer.pseudo[1][5] == b"".join(s.pack() for s in screens)
    assert viewer.pseudo[3] == (1, 0, 8, 8, ENCODING_QEMU_POINTER_MOTION_CHANGE, b"")
    update = FramebufferUpdate()
    update.add(copyrect_rect(0, 0, 2, 2, 4, 4))
    assert len(update) == 1 and update.to_bytes()[:4] == b"\x00\x00\x00\x01"
    with pytest.raises(ValueError):
        framebuffer_update_message([b""] * 0xFFFF)


def test_copyrect() -> None:
    viewer = roundtrip(RawEncoder(), desktop(32, 32), 32, 32, BGRX8888)
    viewer.update(framebuffer_update_message([copyrect_rect(16, 16, 16, 16, 0, 0)]))
    assert viewer.get(16, 16, 16, 16) == viewer.get(0, 0, 16, 16)


def test_cursor_pixels_and_mask() -> None:
    # 10x3: alpha 255 on the left half, 0 on the right, 127/128 at the threshold.
    bgra = bytearray()
    for yy in range(3):
        for xx in range(10):
            alpha = 255 if xx < 5 else 0
            if (xx, yy) == (7, 1):
                alpha = 128
            if (xx, yy) == (2, 2):
                alpha = 127
            bgra += bytes((xx * 20, yy * 50, 200, alpha))
    fmt = FORMATS["rgb565"]
    rect = cursor_rect(4, 1, 10, 3, bytes(bgra), fmt)
    viewer = SpecViewer(16, 16, fmt)
    viewer.update(framebuffer_update_message([rect]))
    assert viewer.cursor is not None
    hx, hy, w, h, pix, mask = viewer.cursor
    assert (hx, hy, w, h) == (4, 1, 10, 3)
    assert pix == pixels.convert(bytes(bgra), fmt)
    assert mask == bytes([0b11111000, 0b00000000, 0b11111001, 0b00000000, 0b11011000, 0b00000000])
    hidden = cursor_rect(0, 0, 0, 0, b"", fmt)
    assert hidden == struct.pack(">HHHHi", 0, 0, 0, 0, ENCODING_CURSOR)


def test_negotiated_encoders_pick_and_keep_streams() -> None:
    enc = NegotiatedEncoders()
    enc.set_encodings([-239, 16, 7, 5, 0, -250, -26, -248])
    assert enc.preferred == ENCODING_ZRLE and enc.compress_level == 6 and enc.quality_level == 6
    zrle = enc.encoder()
    enc.set_encodings([7, -256, -23])
    assert enc.preferred == ENCODING_TIGHT
    tight = enc.encoder()
    assert isinstance(tight, TightEncoder) and tight.level == 0 and tight.quality == 9
    enc.set_encodings([16])
    assert enc.encoder() is zrle and tight.quality is None
    enc.set_encodings([12345, -1])
    assert enc.preferred == ENCODING_RAW


# --- vncdotool as the reference viewer ----------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def loseConnection(self) -> None:
        pass


def vncdotool_viewer(width: int, height: int, encodings: list[int]) -> tuple[Any, RfbServerConnection]:
    """A vncdotool RFBClient connected in memory to an RfbServerConnection; returns (client, server)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vncdotool.rfb import RFBClient  # type: ignore[import-untyped]

        class Client(RFBClient):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.fb = bytearray(width * height * 4)
                self.cursor: tuple[int, int, int, int, bytes, bytes] | None = None
                self.sizes: list[tuple[int, int]] = []
                self.updates = 0

            def updateRectangle(self, x: int, y: int, w: int, h: int, data: bytes) -> None:
                for r in range(h):
                    o = ((y + r) * width + x) * 4
                    self.fb[o : o + w * 4] = data[r * w * 4 : (r + 1) * w * 4]

            def copyRectangle(self, sx: int, sy: int, x: int, y: int, w: int, h: int) -> None:
                rows = [bytes(self.fb[((sy + r) * width + sx) * 4 :][: w * 4]) for r in range(h)]
                self.updateRectangle(x, y, w, h, b"".join(rows))

            def updateCursor(self, x: int, y: int, w: int, h: int, image: bytes, mask: bytes) -> None:
                self.cursor = (x, y, w, h, image, mask)

            def updateDesktopSize(self, w: int, h: int) -> None:
                self.sizes.append((w, h))

            def commitUpdate(self, rectangles: object = None) -> None:
                self.updates += 1

        client = Client()
    client.factory = SimpleNamespace(password=None, shared=True)
    client.transport = _Transport()
    server = RfbServerConnection(width=width, height=height)
    for _ in range(6):
        client.dataReceived(server.data_to_send())
        server.receive_data(bytes(client.transport.data))
        client.transport.data.clear()
    client.setEncodings(encodings)
    server.receive_data(bytes(client.transport.data))
    client.transport.data.clear()
    assert server.encodings == tuple(encodings)
    return client, server


@pytest.mark.parametrize("encoder_type", [RawEncoder, HextileEncoder, ZrleEncoder], ids=lambda t: t.__name__)
def test_vncdotool_decodes_our_updates(encoder_type: type[Encoder]) -> None:
    width, height = 150, 100
    client, server = vncdotool_viewer(width, height, [encoder_type.encoding, ENCODING_COPYRECT, ENCODING_CURSOR,
                                                       ENCODING_DESKTOP_SIZE, ENCODING_LAST_RECT])
    encoder = encoder_type()
    opaque = bytearray(width * height * 4)  # vncdotool's ZRLE decoder writes X as 0xff
    opaque[3::4] = b"\xff" * (width * height)
    for image in (desktop(width, height), noise(width, height), solid(width, height),
                  palette_image(width, height, 7, run=9), palette_image(width, height, 90, run=40)):
        client.dataReceived(server.framebuffer_update(encoder.rects(0, 0, width, height, image, BGRX8888)))
        if encoder_type is ZrleEncoder:
            image = bytes(a | b for a, b in zip(image, opaque, strict=True))
        assert bytes(client.fb) == image
    # A partial update, a CopyRect, a cursor and a size change, LastRect-terminated.
    sub = noise(40, 30, 9)
    rects = encoder.rects(5, 7, 40, 30, sub, BGRX8888)
    rects.append(copyrect_rect(100, 60, 40, 30, 5, 7))
    cursor = bytes((1, 2, 3, 255, 4, 5, 6, 0)) * 6  # 4x3
    rects.append(cursor_rect(1, 2, 4, 3, cursor, BGRX8888))
    client.dataReceived(server.framebuffer_update(rects, last_rect=True))
    client.dataReceived(server.framebuffer_update([desktop_size_rect(640, 480)]))
    assert client.cursor == (1, 2, 4, 3, pixels.convert(cursor, BGRX8888), b"\xa0" * 3)
    assert client.sizes == [(640, 480)]
    assert client.updates == 5 + 2


def test_vncdotool_and_spec_viewer_agree_on_big_frames() -> None:
    """1024x768 through ZRLE: our decoder and vncdotool's see the same frame."""
    width, height = 1024, 768
    client, server = vncdotool_viewer(width, height, [ENCODING_ZRLE])
    image = desktop(width, height)
    rects = ZrleEncoder().rects(0, 0, width, height, image, BGRX8888)
    client.dataReceived(server.framebuffer_update(rects))
    viewer = SpecViewer(width, height, BGRX8888)
    viewer.update(framebuffer_update_message(ZrleEncoder().rects(0, 0, width, height, image, BGRX8888)))
    decoded = bytes(client.fb)
    assert decoded[0::4] == image[0::4] == viewer.fb[0::4]
    assert decoded[2::4] == image[2::4] == viewer.fb[2::4]


def test_pillow_reads_what_jpeg_tight_sends() -> None:
    fmt = BGRX8888
    enc = TightEncoder(quality=0)
    image = noise(100, 100)
    rect = enc.rects(0, 0, 100, 100, image, fmt)[0]
    r = Reader(rect[13:])
    jpeg = r.take(r.compact())
    assert r.done and Image.open(io.BytesIO(jpeg)).format == "JPEG"


def test_random_bytes_are_not_valid_rects() -> None:
    """Sanity check of the spec decoder itself: it notices garbage."""
    viewer = SpecViewer(16, 16, BGRX8888)
    with pytest.raises((DecodeError, zlib.error, IndexError)):
        viewer.update(b"\x00\x00\x00\x01" + struct.pack(">HHHHi", 0, 0, 16, 16, ENCODING_ZRLE) + os.urandom(40))
