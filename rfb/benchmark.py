"""Throughput of pixel conversion and of each encoder on full 1024x768 frames: ``python -m rfb.benchmark``.

Two frames: a desktop-like one (flat background, windows with title-bar gradients, lines of text drawn with
Pillow's default font) and random noise. Each encoder starts with fresh zlib streams and encodes the frame
a few times in a row (as consecutive full updates would); the best run is reported.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable

from PIL import Image, ImageDraw

from rfb import pixels
from rfb.encodings import (
    Encoder,
    HextileEncoder,
    RawEncoder,
    TightEncoder,
    ZlibEncoder,
    ZrleEncoder,
)
from rfb.wire import BGRX8888, PixelFormat

WIDTH, HEIGHT = 1024, 768
FORMATS = {
    "bgrx (native)": BGRX8888,
    "rgbx big-endian": PixelFormat(32, 24, True, True, 255, 255, 255, 24, 16, 8),
    "rgb565": PixelFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),
    "bgr233": PixelFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),
}


def desktop_frame(seed: int = 1) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (WIDTH, HEIGHT), (58, 110, 165))
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = rng.randrange(WIDTH - 200), rng.randrange(HEIGHT - 150)
        x1, y1 = min(WIDTH, x0 + rng.randrange(200, 700)), min(HEIGHT, y0 + rng.randrange(150, 500))
        draw.rectangle((x0, y0, x1, y1), fill=(236, 233, 216), outline=(0, 0, 0))
        for x in range(x0, x1):
            draw.line((x, y0, x, y0 + 20), fill=(0, 0, 80 + (x - x0) * 175 // max(1, x1 - x0)))
        for line_y in range(y0 + 28, y1 - 12, 14):
            words = " ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randrange(2, 9)))
                             for _ in range(20))
            draw.text((x0 + 6, line_y), words, fill=(0, 0, 0))
    return img.tobytes("raw", "BGRX")


def noise_frame(seed: int = 2) -> bytes:
    data = bytearray(random.Random(seed).randbytes(WIDTH * HEIGHT * 4))
    data[3::4] = bytes(WIDTH * HEIGHT)
    return bytes(data)


def best_of(fn: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    frames = {"desktop": desktop_frame(), "noise": noise_frame()}
    print(f"{WIDTH}x{HEIGHT} frames, best of {args.runs}")
    print("\npixel conversion from BGRX")
    for name, fmt in FORMATS.items():
        converter = pixels.converter(fmt)
        seconds = best_of(functools.partial(converter.convert, frames["noise"]), args.runs)
        print(f"  {name:18s} {seconds * 1000:7.1f} ms  {1 / seconds:7.0f} frames/s")
    encoders: list[tuple[str, Callable[[], Encoder]]] = [
        ("raw", RawEncoder),
        ("hextile", HextileEncoder),
        ("zlib (level 2)", ZlibEncoder),
        ("zrle (level 2)", ZrleEncoder),
        ("tight (level 2)", TightEncoder),
        ("tight jpeg q6", lambda: TightEncoder(quality=6)),
    ]
    for frame_name, frame in frames.items():
        print(f"\nencoders, {frame_name} frame (native format)")
        for name, make in encoders:
            encoder = make()
            size = sum(len(r) for r in encoder.rects(0, 0, WIDTH, HEIGHT, frame, BGRX8888))
            seconds = best_of(functools.partial(encoder.rects, 0, 0, WIDTH, HEIGHT, frame, BGRX8888), args.runs)
            print(f"  {name:16s} {seconds * 1000:7.1f} ms  {1 / seconds:6.1f} frames/s  {size / 1024:8.0f} KiB")


if __name__ == "__main__":
    main()
