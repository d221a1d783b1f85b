"""Pixel conversion from the framebuffer's BGRX to viewer formats, checked pixel by pixel against the
definition in RFC 6143 section 7.4 (value = (intensity scaled to max) << shift, in the format's byte order)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rfb import pixels
from rfb.wire import BGRX8888, PixelFormat


def reference(src: bytes, fmt: PixelFormat) -> bytes:
    """One pixel at a time, straight from the definition."""
    out = bytearray()
    bpp = fmt.bits_per_pixel // 8
    for i in range(0, len(src), 4):
        b, g, r = src[i], src[i + 1], src[i + 2]
        if fmt.true_colour:
            value = ((round(r * fmt.red_max / 255) << fmt.red_shift)
                     | (round(g * fmt.green_max / 255) << fmt.green_shift)
                     | (round(b * fmt.blue_max / 255) << fmt.blue_shift))
        else:  # the fixed BGR233 colour map: index bits bbgggrrr
            value = round(r * 7 / 255) | round(g * 7 / 255) << 3 | round(b * 3 / 255) << 6
        out += value.to_bytes(bpp, "big" if fmt.big_endian else "little")
    return bytes(out)


@st.composite
def formats(draw: st.DrawFn) -> PixelFormat:
    bpp = draw(st.sampled_from([8, 16, 32]))
    big = draw(st.booleans())
    if not draw(st.integers(0, 9)):
        return PixelFormat(bpp, 8, big, False, 0, 0, 0, 0, 0, 0)
    maxes, shifts = [], []
    for _ in range(3):
        bits = draw(st.integers(0, min(bpp, 16)))
        maxes.append((1 << bits) - 1)
        shifts.append(draw(st.integers(0, bpp - bits)))
    return PixelFormat(bpp, bpp, big, True, *maxes, *shifts)


def image(count: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(count * 4)


@settings(max_examples=200, deadline=None)
@given(formats(), st.integers(0, 300), st.integers(0, 1 << 30))
def test_matches_the_definition(fmt: PixelFormat, count: int, seed: int) -> None:
    src = image(count, seed)
    converted = pixels.convert(src, fmt)
    if pixels.is_native(fmt):
        assert converted == src  # passed through, X byte included
    else:
        assert converted == reference(src, fmt)


COMMON = {
    "rgbx-be": PixelFormat(32, 24, True, True, 255, 255, 255, 24, 16, 8),
    "bgrx-be": PixelFormat(32, 24, True, True, 255, 255, 255, 8, 16, 24),  # same bytes as BGRX little-endian
    "rgb565": PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),
    "rgb565-be": PixelFormat(16, 16, True, True, 31, 63, 31, 11, 5, 0),
    "bgr233": PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),
    "rgb30": PixelFormat(32, 30, False, True, 1023, 1023, 1023, 20, 10, 0),
}


@pytest.mark.parametrize("name", list(COMMON))
def test_common_formats(name: str) -> None:
    fmt = COMMON[name]
    src = image(1000, 7)
    if pixels.is_native(fmt):
        assert pixels.convert(src, fmt) is src
    else:
        assert pixels.convert(src, fmt) == reference(src, fmt)


def test_native_format_is_free() -> None:
    src = image(10, 1)
    assert pixels.convert(src, BGRX8888) is src
    assert pixels.convert(bytearray(src), BGRX8888) == src


def test_unusable_formats_and_sizes() -> None:
    with pytest.raises(ValueError):
        pixels.convert(b"", PixelFormat(24, 24, False, True, 255, 255, 255, 16, 8, 0))
    with pytest.raises(ValueError):
        pixels.convert(b"\x00" * 5, BGRX8888)


def test_extract_rect() -> None:
    width, height = 7, 5
    frame = bytes(range(width * height * 4))
    rect = pixels.extract_rect(frame, width * 4, 2, 1, 3, 2)
    assert rect == frame[(1 * 7 + 2) * 4 : (1 * 7 + 5) * 4] + frame[(2 * 7 + 2) * 4 : (2 * 7 + 5) * 4]
    assert pixels.extract_rect(frame, width * 4, 0, 2, 7, 3) == frame[2 * 28 :]
    assert pixels.extract_rect(frame, width * 4, 0, 0, 0, 3) == b""
    with pytest.raises(ValueError):
        pixels.extract_rect(frame, width * 4, 5, 4, 3, 1)


@pytest.mark.parametrize("fmt", [
    BGRX8888,
    PixelFormat(32, 24, True, True, 255, 255, 255, 24, 16, 8),
    PixelFormat(32, 24, False, True, 255, 255, 255, 4, 14, 24),  # channels off byte boundaries
    PixelFormat(32, 24, True, True, 255, 255, 255, 0, 20, 9),
])
def test_rgb_bytes(fmt: PixelFormat) -> None:
    src = image(50, 3)
    rgb = pixels.rgb_bytes(pixels.convert(src, fmt), fmt)
    assert rgb[0::3] == src[2::4] and rgb[1::3] == src[1::4] and rgb[2::3] == src[0::4]
    with pytest.raises(ValueError):
        pixels.rgb_bytes(b"", PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0))


def test_cursor_mask_rows_are_padded_msb_first() -> None:
    alphas = [255, 0, 128, 127, 255, 255, 255, 255, 255,   # 9 wide: 2 bytes per row
              0, 0, 0, 0, 0, 0, 0, 0, 200]
    bgra = b"".join(bytes((1, 2, 3, a)) for a in alphas)
    assert pixels.cursor_mask(bgra, 9, 2) == bytes([0b10101111, 0b10000000, 0b00000000, 0b10000000])
    assert pixels.cursor_mask(bytes((0, 0, 0, 255)) * 8, 8, 1) == b"\xff"
    assert pixels.cursor_mask(b"", 0, 0) == b""


def test_colour_map_palette() -> None:
    assert len(pixels.BGR233_PALETTE) == 256
    assert pixels.BGR233_PALETTE[0] == (0, 0, 0)
    assert pixels.BGR233_PALETTE[0b11000111] == (65535, 0, 65535)
    fmt = PixelFormat(16, 8, True, False, 0, 0, 0, 0, 0, 0)
    assert pixels.convert(bytes((255, 0, 255, 0)), fmt) == b"\x00\xc7"
