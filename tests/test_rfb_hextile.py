"""The Hextile encoder's C part (rfb/encodings/_hextile.c) against the Python reference it replaced.

The C encoder must write exactly the reference's bytes (rfb/encodings/hextile_reference.py): checked here on
random tiles built to reach every tile kind (solid, raw, one foreground, coloured subrectangles, runs merged
downwards, subrectangles not smaller than raw), every rectangle size modulo 16,
strided views of a larger frame, and every pixel size and format the package converts to; on real screens of
the demo guest and the Linux guest in tests/test_vnc_heavy.py and tests/test_agent_linux_guest.py (through
:func:`assert_same_as_reference`); and by the fuzz target ``hextile`` (fuzz/targets.py). The reference's
bytes are in turn decoded by the spec viewer of test_rfb_encodings and by vncdotool and TigerVNC.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_rfb_encodings import FORMATS, SpecViewer

from rfb import pixels
from rfb.encodings import EncoderSettings, HextileEncoder, _hextile, encode_frame_rects, framebuffer_update_message
from rfb.encodings.base import Arena
from rfb.encodings.hextile_reference import ReferenceHextileEncoder
from rfb.wire import BGRX8888, ENCODING_HEXTILE, PixelFormat

Frame = npt.NDArray[np.uint32]
DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}
FORMAT_OF_SIZE = {1: FORMATS["bgr233"], 2: FORMATS["rgb565"], 4: BGRX8888}


def both(pixels_in: npt.NDArray[np.generic] | bytes, width: int, height: int, fmt: PixelFormat) -> tuple[bytes, bytes]:
    return (HextileEncoder().encode(pixels_in, width, height, fmt),
            ReferenceHextileEncoder().encode(pixels_in, width, height, fmt))


def converted(view: Frame, fmt: PixelFormat) -> npt.NDArray[np.generic] | bytes:
    """A rectangle of a BGRX frame as encode_frame_rects hands it to an encoder: the view itself in the
    framebuffer's format, else packed bytes in ``fmt``."""
    if pixels.is_native(fmt):
        return view
    return pixels.convert(np.ascontiguousarray(view).tobytes(), fmt)


def guest_screen(vm: str, run_dir: Path, path: Path) -> Frame:
    """A running VM's screen as the shared segment holds it (``vmfront screendump``), as a BGRX array."""
    subprocess.run([sys.executable, "-m", "vmfront", "screendump", vm, "--run-dir", str(run_dir), str(path)],
                   check=True, timeout=30, capture_output=True)
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return np.frombuffer(rgb.tobytes("raw", "BGRX"), np.uint32).reshape(rgb.height, rgb.width)


def assert_same_as_reference(frame: Frame, rects: int = 40, seed: int = 0) -> set[str]:
    """C and reference agree on ``frame`` (a (height, width) BGRX array, e.g. a guest's screen): the whole
    frame and ``rects`` random rectangles of it, in every pixel format of test_rfb_encodings. Returns the
    kinds of tile the whole frame took (see :func:`tile_kinds`), for the caller to check what was covered."""
    height, width = frame.shape
    rng = random.Random(seed)
    boxes = [(0, 0, width, height)]
    for _ in range(rects):
        w, h = rng.randint(1, min(width, 300)), rng.randint(1, min(height, 200))
        boxes.append((rng.randrange(width - w + 1), rng.randrange(height - h + 1), w, h))
    for name, fmt in FORMATS.items():
        for x, y, w, h in boxes if name == "bgrx" else boxes[: 1 + rects // 4]:
            ours, reference = both(converted(frame[y : y + h, x : x + w], fmt), w, h, fmt)
            assert ours == reference, f"{name} {w}x{h}+{x}+{y}: C and reference differ"
    return tile_kinds(HextileEncoder().encode(frame, width, height, BGRX8888), width, height, 4)


# --- random tiles -------------------------------------------------------------------------------------------


def make_image(bpp: int, width: int, height: int, count: int, seed: int, run: int, repeat: float, noisy: float,
               pad_left: int, pad_right: int) -> tuple[npt.NDArray[np.generic], int]:
    """(a view of pixels inside a larger array, bytes per pixel): rows made of runs of ``count`` colours, each
    row a copy of the one above with probability ``repeat`` (runs merge downwards), ``noisy`` of the pixels
    random (raw tiles)."""
    rng = random.Random(seed)
    top = (1 << (8 * bpp)) - 1
    colours = [rng.randint(0, top) for _ in range(count)]
    rows: list[list[int]] = []
    for y in range(height):
        if y and rng.random() < repeat:
            rows.append(list(rows[-1]))
            continue
        row: list[int] = []
        while len(row) < width:
            if rng.random() < noisy:
                row.append(rng.randint(0, top))
            else:
                row.extend([rng.choice(colours)] * rng.randint(1, run))
        rows.append(row[:width])
    whole = np.zeros((height, pad_left + width + pad_right), dtype=DTYPES[bpp])
    whole[:, pad_left : pad_left + width] = np.array(rows, dtype=DTYPES[bpp])
    return whole[:, pad_left : pad_left + width], bpp


PIXEL_SIZES = (1, 2, 4)
WHOLE_PARAMETERS = {"width": (1, 70), "height": (1, 50), "count": (1, 24), "seed": (0, 1 << 30), "run": (1, 20),
                    "pad_left": (0, 17), "pad_right": (0, 5)}
FRACTION_PARAMETERS = {"repeat": (0.0, 1.0), "noisy": (0.0, 0.2)}


def images() -> st.SearchStrategy[tuple[npt.NDArray[np.generic], int]]:
    return st.builds(make_image, bpp=st.sampled_from(PIXEL_SIZES),
                     **{name: st.integers(*bounds) for name, bounds in WHOLE_PARAMETERS.items()},
                     **{name: st.floats(*bounds) for name, bounds in FRACTION_PARAMETERS.items()})


def make_mosaic(bpp: int, seed: int, columns: int, rows: int, edge: int) -> tuple[npt.NDArray[np.generic], int]:
    """Tiles side by side, each solid, two-coloured, many-coloured (3 to 17) or noise, all drawn from a pool of
    three colours (plus noise), so that what carries over from one tile to the next (background, foreground)
    is reused, changed and dropped in every order; the last column and row ``edge`` pixels short of a tile."""
    rng = random.Random(seed)
    top = (1 << (8 * bpp)) - 1
    pool = rng.sample(range(top + 1), 3) if top > 3 else [0, 1, 2]
    height, width = rows * 16 - edge, columns * 16 - edge
    whole = np.zeros((rows * 16, columns * 16), dtype=DTYPES[bpp])
    for ty in range(rows):
        for tx in range(columns):
            kind = rng.randrange(4)
            tile = whole[ty * 16 : ty * 16 + 16, tx * 16 : tx * 16 + 16]
            if kind == 0:
                tile[...] = rng.choice(pool)
            elif kind == 1:
                bg, fg = rng.sample(pool, 2)
                tile[...] = bg
                tile[rng.randrange(16) :, rng.randrange(16) : rng.randrange(17)] = fg
            elif kind == 2:
                colours = [*pool, *(rng.randint(0, top) for _ in range(rng.randint(0, 14)))]
                tile[...] = np.array([rng.choice(colours) for _ in range(256)]).reshape(16, 16)
                tile[: rng.randrange(16)] = pool[0]
            else:
                tile[...] = np.array([rng.randint(0, top) for _ in range(256)]).reshape(16, 16)
    return whole[:height, :width], bpp


def mosaics() -> st.SearchStrategy[tuple[npt.NDArray[np.generic], int]]:
    return st.builds(make_mosaic, st.sampled_from([1, 2, 4]), st.integers(0, 1 << 30), st.integers(1, 6),
                     st.integers(1, 3), st.integers(0, 15))


def random_image(rng: random.Random) -> tuple[npt.NDArray[np.generic], int]:
    """A draw of :func:`images` from a seeded generator, for tests that must not depend on hypothesis."""
    whole = {name: rng.randint(*bounds) for name, bounds in WHOLE_PARAMETERS.items()}
    return make_image(rng.choice(PIXEL_SIZES), repeat=rng.uniform(*FRACTION_PARAMETERS["repeat"]),
                      noisy=rng.uniform(*FRACTION_PARAMETERS["noisy"]), **whole)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(images(), mosaics()))
def test_c_writes_the_reference_bytes_on_random_tiles(image: tuple[npt.NDArray[np.generic], int]) -> None:
    view, bpp = image
    height, width = view.shape
    fmt = FORMAT_OF_SIZE[bpp]
    ours, reference = both(view, width, height, fmt)
    assert ours == reference
    packed = np.ascontiguousarray(view).tobytes()
    assert both(packed, width, height, fmt) == (ours, ours)  # packed bytes as well as a strided view


def tile_kinds(payload: bytes, width: int, height: int, bpp: int) -> set[str]:
    """The kinds of tile a payload holds (walking it as a viewer would)."""
    kinds: set[str] = set()
    pos = 0
    for ty in range(0, height, 16):
        for tx in range(0, width, 16):
            tw, th = min(16, width - tx), min(16, height - ty)
            mask = payload[pos]
            pos += 1
            if mask & 1:
                kinds.add("raw")
                pos += tw * th * bpp
                continue
            pos += bpp * (bool(mask & 2) + bool(mask & 4))
            if not mask & 8:
                kinds.add("solid")
                continue
            count = payload[pos]
            pos += 1 + count * (2 + (bpp if mask & 16 else 0))
            kinds.add("coloured" if mask & 16 else "foreground")
            if count > 1:
                kinds.add("several subrects")
    assert pos == len(payload)
    return kinds


def test_the_random_tiles_reach_every_kind_of_tile() -> None:
    """What the hypothesis test above can reach, shown on fixed draws of the same generator."""
    seen: set[str] = set()
    rng = random.Random(7)
    for _ in range(300):
        view, bpp = random_image(rng)
        seen |= tile_kinds(HextileEncoder().encode(view, view.shape[1], view.shape[0], FORMAT_OF_SIZE[bpp]),
                           view.shape[1], view.shape[0], bpp)
    assert seen == {"raw", "solid", "coloured", "foreground", "several subrects"}


def test_background_and_foreground_carry_over_as_the_reference_says() -> None:
    """Background: carried over solid and subrectangle tiles. Foreground: over solid and one-foreground tiles,
    not over coloured subrectangles. Neither over a raw tile."""
    x, y, z = 0x111111, 0x222222, 0x333333
    two = np.full((16, 16), x, np.uint32)
    two[4:8, 4:8] = y  # background x, foreground y
    three = two.copy()
    three[10:12, 0:3] = z
    noise = np.random.default_rng(0).integers(0, 1 << 24, size=(16, 16), dtype=np.uint32)
    solid_x = np.full((16, 16), x, np.uint32)
    masks = {
        "solid": [2 | 4 | 8, 0, 8],  # the first tile specifies both; a solid x; then both carried over
        "three": [2 | 4 | 8, 8 | 16, 4 | 8],
        "noise": [2 | 4 | 8, 1, 2 | 4 | 8],
    }
    for middle, expected in masks.items():
        tiles = {"solid": solid_x, "three": three, "noise": noise}[middle]
        row = np.hstack([two, tiles, two])
        ours, reference = both(row, 48, 16, BGRX8888)
        assert ours == reference
        found, pos = [], 0
        for _ in range(3):
            mask = ours[pos]
            found.append(mask)
            if mask & 1:
                pos += 1 + 1024
                continue
            pos += 1 + 4 * (bool(mask & 2) + bool(mask & 4))
            if mask & 8:
                pos += 1 + ours[pos] * (2 + (4 if mask & 16 else 0))
        assert found == expected, middle


def test_subrectangles_not_smaller_than_raw_are_raw() -> None:
    checker = (np.indices((16, 16)).sum(axis=0) % 2) * 7 + 3  # two colours: 128 one-pixel subrectangles
    ours, reference = both(checker.astype(np.uint8), 16, 16, FORMAT_OF_SIZE[1])
    assert ours == reference and ours[0] == 1  # 260 bytes as subrectangles, 257 raw
    ours, reference = both(checker.astype(np.uint32), 16, 16, FORMAT_OF_SIZE[4])
    assert ours == reference and ours[0] == 2 | 4 | 8  # 266 bytes, raw would be 1025
    diagonals = np.indices((16, 16)).sum(axis=0) % 3  # three colours, ~170 coloured one-pixel subrectangles
    ours, reference = both(diagonals.astype(np.uint8), 16, 16, FORMAT_OF_SIZE[1])
    assert ours == reference and ours[0] == 1
    # Exactly as large as raw: after a solid tile of the same background, 85 coloured one-pixel subrectangles
    # (1 + 1 + 85 * 3 = 257 bytes) are sent raw.
    dotted = np.ones(256, np.uint8)
    dotted[0 : 3 * 85 : 3] = [2, 3] * 42 + [2]
    row = np.hstack([np.ones((16, 16), np.uint8), dotted.reshape(16, 16)])
    ours, reference = both(row, 32, 16, FORMAT_OF_SIZE[1])
    assert ours == reference and ours[2] == 1 and len(ours) == 2 + 257


@pytest.mark.parametrize("fmt_name", list(FORMATS))
def test_every_pixel_format_takes_the_c_path(fmt_name: str) -> None:
    rng = np.random.default_rng(5)
    frame = rng.choice(np.array([0x102030, 0xFFFFFF, 0x000000, 0x3366CC], dtype=np.uint32), size=(45, 67))
    frame[10:30, 20:50] = rng.integers(0, 1 << 24, size=(20, 30), dtype=np.uint32)
    fmt = FORMATS[fmt_name]
    ours, reference = both(converted(frame, fmt), 67, 45, fmt)
    assert ours == reference
    viewer = SpecViewer(67, 45, fmt)
    viewer.update(framebuffer_update_message(HextileEncoder().rects(0, 0, 67, 45, converted(frame, fmt), fmt)))
    assert bytes(viewer.fb) == pixels.convert(frame.tobytes(), fmt)


def test_empty_and_largest_sizes() -> None:
    for width, height in ((0, 0), (0, 5), (5, 0)):
        ours, reference = both(np.zeros((height, width), np.uint32), width, height, BGRX8888)
        assert ours == reference == b""
    row = np.full((1, 0xFFFF), 0x123456, dtype=np.uint32)
    assert both(row, 0xFFFF, 1, BGRX8888)[0] == bytes((2,)) + (0x123456).to_bytes(4, "little") + bytes(4095)
    with pytest.raises(ValueError):
        HextileEncoder().encode(np.zeros((1, 0x10000), np.uint32), 0x10000, 1, BGRX8888)


def test_the_c_part_refuses_what_it_cannot_encode() -> None:
    out = bytearray(_hextile.max_size(16, 16, 4))
    assert _hextile.max_size(17, 16, 4) == 2 + 17 * 16 * 4
    with pytest.raises(ValueError):
        _hextile.encode_into(np.zeros((16, 16), np.uint32), out[:-1])  # room for less than the worst case
    with pytest.raises(ValueError):
        _hextile.encode_into(np.zeros((2, 16, 16), np.uint32), out)  # not 2-D
    with pytest.raises(ValueError):
        _hextile.encode_into(np.zeros((16, 16), np.uint64), out)  # 8-byte pixels
    with pytest.raises(ValueError):
        _hextile.encode_into(np.zeros((16, 32), np.uint32)[:, ::2], out)  # pixels not contiguous in a row
    with pytest.raises(ValueError):
        _hextile.encode_into(np.zeros((16, 16), np.uint32)[::-1], out)  # rows backwards
    with pytest.raises(BufferError):
        _hextile.encode_into(np.zeros((16, 16), np.uint32), b"read-only" * 200)
    with pytest.raises(ValueError):
        _hextile.max_size(1, 1, 3)
    # The Python side copies views the C part does not read (never from a framebuffer) and encodes them.
    frame = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 5
    for view in (frame[:, ::2], frame[::-1]):
        height, width = view.shape
        assert both(view, width, height, BGRX8888)[0] == both(np.ascontiguousarray(view), width, height, BGRX8888)[1]


def test_a_worker_sends_hextile_from_its_arena_without_copying() -> None:
    """encode_frame_rects with an Arena (what an encoder worker does): each rectangle, header and payload, is
    written in the arena right after the previous one, so the worker's reply needs no copy."""
    frame = np.random.default_rng(1).integers(0, 1 << 24, size=(1080, 1920), dtype=np.uint32)
    frame[:500] = 0x336699
    arena = Arena(memoryview(bytearray(12 << 20)), 4096)
    rects = [(0, 0, 1920, 1080), (5, 7, 100, 50), (1000, 900, 33, 17)]
    pieces, count, _ = encode_frame_rects(EncoderSettings(ENCODING_HEXTILE), BGRX8888, frame, rects, arena)
    assert count == len(pieces) == 3
    offset = arena.start
    for piece in pieces:
        view = memoryview(piece)
        assert view.obj is arena.buffer.obj
        assert np.frombuffer(view, np.uint8).__array_interface__["data"][0] == (
            np.frombuffer(arena.buffer, np.uint8).__array_interface__["data"][0] + offset)
        offset += len(view)
    assert offset == arena.offset
    viewer = SpecViewer(1920, 1080, BGRX8888)
    viewer.update(framebuffer_update_message(bytes(p) for p in pieces))
    assert bytes(viewer.fb) == frame.tobytes()
    # An arena without room: the same bytes from the heap.
    small = Arena(memoryview(bytearray(4096 + 100)), 4096)
    again, _, _ = encode_frame_rects(EncoderSettings(ENCODING_HEXTILE), BGRX8888, frame, rects, small)
    assert [bytes(p) for p in again] == [bytes(p) for p in pieces] and small.offset == small.start


def test_pixels_changing_while_encoded_still_make_valid_tiles() -> None:
    """The guest draws while a worker encodes (the GIL is released, another thread writes the frame here):
    every tile is encoded from one copy of its pixels, so what a viewer decodes is always a valid update in
    which every byte held that value at some moment (a pixel may be torn between its bytes by a byte-wise
    copy, as the Python encoders may do too; the damage that follows repaints it)."""
    rng = np.random.default_rng(3)
    first = rng.choice(np.array([0x101010, 0xF0F0F0], dtype=np.uint32), size=(256, 256))
    second = rng.integers(0, 1 << 24, size=(256, 256), dtype=np.uint32)
    second[::3] = first[::3]
    frame = first.copy()
    stop = threading.Event()

    def draw() -> None:
        masks = [rng.random((256, 256)) < 0.5 for _ in range(8)]
        k = 0
        while not stop.is_set():
            np.copyto(frame, second if k % 2 else first, where=masks[k % 8])
            k += 1

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        for _ in range(100):
            update = framebuffer_update_message(HextileEncoder().rects(0, 0, 256, 256, frame, BGRX8888))
            viewer = SpecViewer(256, 256, BGRX8888)
            viewer.update(update)
            shown = np.frombuffer(bytes(viewer.fb), np.uint8)
            assert ((shown == first.view(np.uint8).reshape(-1)) | (shown == second.view(np.uint8).reshape(-1))).all()
    finally:
        stop.set()
        drawer.join(10)
