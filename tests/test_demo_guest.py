"""The built-in demo guest: image building/caching, and end to end under QEMU (TCG).

The end-to-end tests boot the real guest with ``qemu-system-x86_64 -accel tcg`` (so they
pass without /dev/kvm), inject keys with QMP ``input-send-event`` and check the result
with QMP ``screendump`` -- the same input -> guest -> display path vmfront serves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from guestlib import (
    BAR_YELLOW,
    BLUE,
    TEXT_BOXES,
    TEXT_SIZE,
    VGA_BACKGROUND,
    VGA_BOXES,
    VGA_SIZE,
    QemuVM,
    colours,
    crop,
    is_demo_text_screen,
    is_demo_vga_screen,
    running_demo_guest,
)
from PIL import Image

from core_daemon import demo_guest
from core_daemon.demo_guest import DemoGuestError, demo_image_path, demo_qemu_args

needs_nasm = pytest.mark.skipif(shutil.which("nasm") is None, reason="nasm not installed")
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
)


# --- building and caching the image -----------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty VMFRONT_CACHE_DIR."""
    path = tmp_path / "cache"
    monkeypatch.setenv("VMFRONT_CACHE_DIR", str(path))
    return path


@needs_nasm
def test_image_is_built_once_into_the_cache(cache_dir: Path) -> None:
    image = demo_image_path()
    assert image.parent == cache_dir
    assert re.fullmatch(r"demo-[0-9a-f]{16}\.img", image.name)
    data = image.read_bytes()
    assert len(data) % 512 == 0 and len(data) >= 1024  # boot sector + stage 2
    assert data[510:512] == b"\x55\xaa"
    mtime = image.stat().st_mtime_ns
    assert demo_image_path() == image
    assert image.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert [p.name for p in cache_dir.iterdir()] == [image.name]  # no temp files left


@needs_nasm
def test_concurrent_builds_agree(cache_dir: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        images = list(pool.map(lambda _: demo_image_path(), range(4)))
    assert len(set(images)) == 1
    assert images[0].read_bytes()[510:512] == b"\x55\xaa"
    assert [p.name for p in cache_dir.iterdir()] == [images[0].name]


def test_build_false_only_computes_the_path(cache_dir: Path) -> None:
    image = demo_image_path(build=False)
    assert image.parent == cache_dir
    assert not image.exists()
    assert not cache_dir.exists()


def test_cache_dir_falls_back_to_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMFRONT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_image_path(build=False).parent == tmp_path / "xdg" / "vmfront"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_image_path(build=False).parent == tmp_path / "home" / ".cache" / "vmfront"


@needs_nasm
def test_changed_source_gets_a_new_image(cache_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    original = demo_image_path()
    source = tmp_path / "demo.asm"
    source.write_text(demo_guest.DEMO_SOURCE.read_text() + "\n; edited\n")
    monkeypatch.setattr(demo_guest, "DEMO_SOURCE", source)
    edited = demo_image_path()
    assert edited != original
    assert edited.read_bytes() == original.read_bytes()  # a comment changes no code


@needs_nasm
def test_nasm_failure_reports_its_stderr(cache_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "broken.asm"
    source.write_text("bits 16\n  frobnicate ax, bx\n")
    monkeypatch.setattr(demo_guest, "DEMO_SOURCE", source)
    with pytest.raises(DemoGuestError, match=r"nasm failed[\s\S]*broken\.asm:2"):
        demo_image_path()
    assert list(cache_dir.iterdir()) == []  # the temp file was removed


def test_missing_nasm_is_a_clear_error(cache_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DemoGuestError, match=r"nasm not found: install Debian package 'nasm'"):
        demo_image_path()


def test_qemu_args_add_vga_and_protect_the_image() -> None:
    args = demo_qemu_args(Path("/cache/dir,x/demo.img"))
    assert args[args.index("-device") + 1] == "VGA"
    drive = args[args.index("-drive") + 1]
    assert drive.startswith("file=/cache/dir,,x/demo.img,")  # comma escaped for QEMU
    assert "format=raw" in drive and "snapshot=on" in drive


# --- end to end under QEMU --------------------------------------------------------------


@pytest.fixture(scope="module")
def _module_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Build the image once per module into a private cache (not the user's ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMFRONT_CACHE_DIR", str(tmp_path_factory.mktemp("vmfront-cache")))
        yield


@pytest.fixture
async def vm(_module_cache_dir: None) -> AsyncIterator[QemuVM]:
    """A booted demo guest under TCG, showing its text screen; QEMU is ended on teardown."""
    if shutil.which("nasm") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs nasm and qemu-system-x86_64")
    async with running_demo_guest(accel="tcg") as guest:
        yield guest


def save_png(image: Image.Image, path: Path) -> None:
    """Keep a screendump for a person to look at (tests write them into tmp_path)."""
    image.save(path.with_suffix(".png"))


@needs_qemu
async def test_counter_keeps_changing_the_screen(vm: QemuVM) -> None:
    first = await vm.screendump()
    assert first.size == TEXT_SIZE
    await asyncio.sleep(0.5)  # ~9 BIOS ticks
    second = await vm.wait_for_screen(
        lambda im: crop(im, TEXT_BOXES["counter"]) != crop(first, TEXT_BOXES["counter"]),
        timeout_s=5, what="the counter to change")
    # Only the counter digits were redrawn: blank them in both dumps and compare the rest.
    for image in (first, second):
        image.paste((0, 0, 0), TEXT_BOXES["counter"])
    assert first.tobytes() == second.tobytes()

    rows = await vm.read_text_screen()
    assert rows[0] == "VMFRONT DEMO GUEST"
    match = re.fullmatch(r"COUNTER (\d{5})", rows[2])
    assert match is not None, rows[2]
    assert int(match.group(1)) > 0
    assert rows[4] == "KEYS:"


@needs_qemu
async def test_typed_keys_are_echoed(vm: QemuVM, tmp_path: Path) -> None:
    box = TEXT_BOXES["keys"]

    def keys(image: Image.Image) -> bytes:
        return crop(image, box)

    async def wait_keys(predicate: Callable[[bytes], bool], what: str) -> Image.Image:
        # stable=box: ignore a dump that caught a cell half-written (char before attribute)
        return await vm.wait_for_screen(lambda im: predicate(keys(im)), stable=box, what=what)

    blank = keys(await vm.screendump())

    await vm.type_text("h")
    shown_h = keys(await wait_keys(lambda k: k != blank, '"h" to show'))
    await vm.type_text("i")
    image_hi = await wait_keys(lambda k: k not in (blank, shown_h), '"hi" to show')
    save_png(image_hi, tmp_path / "typed-hi")
    shown_hi = keys(image_hi)
    assert (await vm.read_text_screen())[4] == "KEYS: hi"

    await vm.type_text("\b")  # Backspace erases the last character
    await wait_keys(lambda k: k == shown_h, "Backspace to erase the i")
    await vm.type_text("\n")  # Enter clears the line
    await wait_keys(lambda k: k == blank, "Enter to clear the line")

    await vm.type_text("ho")  # different text draws differently ...
    await wait_keys(lambda k: k not in (blank, shown_h, shown_hi), '"ho" to show')
    await vm.send_key("esc")  # ... Esc clears too ...
    await wait_keys(lambda k: k == blank, "Esc to clear the line")
    await vm.type_text("hi")  # ... and the same text draws the same pixels
    await wait_keys(lambda k: k == shown_hi, '"hi" to show again')

    await vm.type_text("Hello, World!")  # shifted keys and punctuation
    await _wait_for_row(vm, 4, "KEYS: hiHello, World!")


@needs_qemu
async def test_full_line_starts_over(vm: QemuVM) -> None:
    text = "abcdefghij" * 7 + "klmn"  # exactly the 74 characters that fit in text mode
    await vm.type_text(text, delay=0.01)
    rows = await _wait_for_row(vm, 4, "KEYS: " + text)
    assert len(rows[4]) == 80
    await vm.type_text("z")  # one more: the line is cleared and starts over
    await _wait_for_row(vm, 4, "KEYS: z")


async def _wait_for_row(vm: QemuVM, row: int, expected: str, timeout_s: float = 10.0) -> list[str]:
    """Poll guest text memory until ``row`` reads ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        rows = await vm.read_text_screen()
        if rows[row] == expected:
            return rows
        if loop.time() >= deadline:
            raise AssertionError(f"row {row} is {rows[row]!r}, expected {expected!r}")
        await asyncio.sleep(0.05)


@needs_qemu
async def test_f2_toggles_vga_mode_13h(vm: QemuVM, tmp_path: Path) -> None:
    await vm.type_text("ab")
    await _wait_for_row(vm, 4, "KEYS: ab")
    text_before = await vm.screendump()

    await vm.send_key("f2")
    vga = await vm.wait_for_screen(is_demo_vga_screen, what="mode 13h (640x400 dump)")
    save_png(vga, tmp_path / "vga")
    assert vga.size == VGA_SIZE
    assert vga.getpixel((VGA_SIZE[0] - 4, 8)) == BLUE  # title bar
    assert vga.getpixel((4, VGA_SIZE[1] - 4)) == VGA_BACKGROUND  # non-black fill
    # The typed text was kept: the KEYS field is not just background.
    assert len(colours(vga, VGA_BOXES["keys"])) > 1

    # The counter and the moving square keep producing damage in this mode too.
    def bar_and_counter(image: Image.Image) -> tuple[bytes, bytes]:
        return crop(image, VGA_BOXES["bar"]), crop(image, VGA_BOXES["counter"])

    before = bar_and_counter(vga)
    later = await vm.wait_for_screen(
        lambda im: is_demo_vga_screen(im)  # includes: the yellow square is on screen
        and all(a != b for a, b in zip(bar_and_counter(im), before, strict=True)),
        timeout_s=5, what="the square and the counter to move")
    assert BAR_YELLOW in colours(later, VGA_BOXES["bar"])

    keys_ab = crop(later, VGA_BOXES["keys"])
    await vm.type_text("c")  # typing works in mode 13h
    typed_c = await vm.wait_for_screen(lambda im: crop(im, VGA_BOXES["keys"]) != keys_ab,
                                       stable=VGA_BOXES["keys"], what='"c" in mode 13h')
    save_png(typed_c, tmp_path / "vga-typed-c")

    await vm.send_key("f2")
    text = await vm.wait_for_screen(is_demo_text_screen, what="text mode again (720x400 dump)")
    save_png(text, tmp_path / "text-again")
    rows = await _wait_for_row(vm, 4, "KEYS: abc")  # kept across both switches
    assert rows[0] == "VMFRONT DEMO GUEST"
    assert crop(text, TEXT_BOXES["title"]) == crop(text_before, TEXT_BOXES["title"])
