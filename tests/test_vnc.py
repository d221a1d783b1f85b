"""The client's VNC server against a real core, QEMU and the demo guest, with real viewers: vncdotool,
TigerVNC under Xvfb, and minimal asyncio viewers (several at once, one stalled)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, RawQmpPeer, running_core, screendump, wait_demo_booted
from guestlib import TEXT_BOXES, crop
from PIL import Image, ImageChops
from vnclib import (
    MiniViewer,
    VncClientProcess,
    free_port,
    rss_kib,
    screenshot,
    vncdo,
    wait_for,
    wait_port,
    xvfb,
)

from clients.vnc.region import DirtyRegion
from clients.vnc.service import VncError, parse_listen

VM = "vn"


@pytest.fixture(scope="module")
def core() -> Iterator[CoreProcess]:
    with running_core(VM) as running:
        yield running


@pytest.fixture(scope="module")
def booted(core: CoreProcess) -> CoreProcess:
    wait_demo_booted(core)
    return core


@pytest.fixture(scope="module")
def client(booted: CoreProcess) -> Iterator[VncClientProcess]:
    proc = VncClientProcess(booted.run_dir, VM, free_port())
    try:
        yield proc
    finally:
        proc.stop()


class Paused:
    """QMP stop/cont on the management socket, so the screen holds still for an exact comparison."""

    def __init__(self, core: CoreProcess) -> None:
        self.peer = RawQmpPeer(core.qmp_socket).negotiate()

    def __enter__(self) -> Paused:
        assert "return" in self.peer.execute("stop")
        time.sleep(0.5)  # the last frame reaches shm (QEMU polls every 30 ms while the screen changes)
        return self

    def __exit__(self, *exc: object) -> None:
        self.peer.execute("cont")
        self.peer.close()


# --- units -----------------------------------------------------------------------------------------------------


def test_region_merges_and_stays_bounded() -> None:
    region = DirtyRegion(max_rects=4)
    region.add(0, 0, 10, 10)
    region.add(5, 5, 10, 10)
    assert region.rects == [(0, 0, 15, 15)]
    region.add(2, 2, 3, 3)
    assert region.rects == [(0, 0, 15, 15)]
    for i in range(10):
        region.add(100 * i + 200, 0, 1, 1)
    assert len(region.rects) <= 4
    region.clear()
    region.add(0, 0, 100, 100)
    assert region.take((0, 0, 50, 100)) == [(0, 0, 50, 100)]
    assert region.rects == [(50, 0, 50, 100)]


def test_listen_addresses() -> None:
    assert str(parse_listen("127.0.0.1:5901")) == "127.0.0.1:5901"
    assert parse_listen("unix:/tmp/v.sock").path == Path("/tmp/v.sock")
    assert parse_listen("[::1]:5900").host == "::1"
    with pytest.raises(VncError):
        parse_listen("localhost")


# --- vncdotool -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["raw", "hextile", "zrle"])
def test_vncdotool_capture_equals_screendump(core: CoreProcess, client: VncClientProcess, tmp_path: Path,
                                             encoding: str) -> None:
    with Paused(core):
        vncdo(client.port, capture=tmp_path / "vnc.png", encoding=encoding)
        dump = screendump(core, tmp_path / "dump.png")
    capture = Image.open(tmp_path / "vnc.png").convert("RGB")
    assert capture.size == dump.size
    assert ImageChops.difference(capture, dump).getbbox() is None


def test_vncdotool_types_keys_the_guest_echoes(core: CoreProcess, client: VncClientProcess,
                                               tmp_path: Path) -> None:
    before = crop(screendump(core, tmp_path / "before.png"), TEXT_BOXES["keys"])
    vncdo(client.port, type_text="hi")
    wait_for(lambda: crop(screendump(core, tmp_path / "after.png"), TEXT_BOXES["keys"]) != before, 10,
             "the typed keys on the guest's screen")
    with Paused(core):
        vncdo(client.port, capture=tmp_path / "vnc.png")
        dump = screendump(core, tmp_path / "dump.png")
    capture = Image.open(tmp_path / "vnc.png").convert("RGB")
    assert crop(capture, TEXT_BOXES["keys"]) == crop(dump, TEXT_BOXES["keys"]) != before


# --- several viewers, one stalled ------------------------------------------------------------------------------


async def test_five_viewers_one_stalled(client: VncClientProcess) -> None:
    rss_before = rss_kib(client.pid)
    stalled = await MiniViewer.connect(client.port, rcvbuf=4096)
    stalled.request(incremental=False)
    for _ in range(50):
        stalled.request(incremental=True)  # asks a lot, reads nothing
    viewers = [await MiniViewer.connect(client.port) for _ in range(4)]
    try:
        for v in viewers:
            v.request(incremental=False)

        async def follow(v: MiniViewer) -> None:
            while True:
                await v.read_update()
                v.request(incremental=True)

        tasks = [asyncio.create_task(follow(v)) for v in viewers]
        await asyncio.sleep(3.0)
        for task in tasks:
            task.cancel()
        counts = [len(v.updates) for v in viewers]
        # The demo guest's counter changes continuously: every live viewer keeps getting updates.
        assert all(c >= 5 for c in counts), counts
        assert all(v.updates[-1] > time.monotonic() - 1.5 for v in viewers)
        assert client.proc.poll() is None
        assert rss_kib(client.pid) - rss_before < 64 * 1024, "the stalled viewer made the client grow"
    finally:
        stalled.close()
        for v in viewers:
            v.close()


async def test_killed_client_releases_only_its_own_keys(core: CoreProcess, client: VncClientProcess) -> None:
    """Two clients' viewers hold keys; one client is SIGKILLed: the core lets go of its keys, not the other's."""
    other = VncClientProcess(core.run_dir, VM, free_port())
    kept = await MiniViewer.connect(client.port)
    doomed = await MiniViewer.connect(other.port)
    released = re.compile(r"releasing (\d+) keys/buttons still held by (.*)")
    try:
        kept.key(0xFFE1, True)  # shift, held through the module's client
        doomed.key(0x61, True)  # "a" and "b", held through the client about to die
        doomed.key(0x62, True)
        await asyncio.sleep(1.0)  # both clients forwarded their keys to the core
        before = len(released.findall(core.stderr()))
        other.proc.kill()
        other.proc.wait(timeout=10)
        wait_for(lambda: len(released.findall(core.stderr())) > before, 15, "the dead client's keys released")
        count, holder = released.findall(core.stderr())[before]
        assert int(count) == 2 and f"pid {other.pid}" in holder, (count, holder)
    finally:
        kept.key(0xFFE1, False)
        kept.close()
        doomed.close()
        other.stop()


async def test_bad_bytes_close_only_that_viewer(client: VncClientProcess) -> None:
    good = await MiniViewer.connect(client.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        await asyncio.wait_for(reader.readexactly(12), 5)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) is not None  # closed by the server
        good.request(incremental=False)
        await asyncio.wait_for(good.read_update(), 10)
        wait_for(lambda: "closing it" in client.text(), 5, "the log line for the bad viewer")
    finally:
        writer.close()
        good.close()


# --- TigerVNC under Xvfb (with VNC authentication: test_vnc_management.py) ---------------------------------------


@pytest.mark.skipif(shutil.which("vncviewer") is None or shutil.which("Xvfb") is None,
                    reason="needs tigervnc-viewer and xvfb")
def test_tigervnc_shows_the_exact_screen(booted: CoreProcess, tmp_path: Path) -> None:
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port)
    viewer: subprocess.Popen[bytes] | None = None
    try:
        with xvfb() as display, Paused(booted):
            dump = screendump(booted, tmp_path / "dump.png")
            viewer = subprocess.Popen(
                ["vncviewer", "-AutoSelect=0", "-PreferredEncoding=ZRLE", "-FullColour", f"127.0.0.1::{port}"],
                env={"DISPLAY": display, "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def shows_guest() -> bool:
                screenshot(display, tmp_path / "screen.png")
                return find(Image.open(tmp_path / "screen.png").convert("RGB"), dump) is not None

            wait_for(shows_guest, 20, "TigerVNC's window to show the guest screen")
        assert "security type 1" in proc.text()
    finally:
        if viewer is not None:
            viewer.terminate()
            try:
                viewer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                viewer.kill()
                viewer.wait(timeout=10)
        proc.stop()


def find(screen: Image.Image, image: Image.Image) -> tuple[int, int] | None:
    """Where ``image`` appears exactly inside ``screen`` (found by its top-left pixel), or None."""
    first = image.getpixel((0, 0))
    width, height = image.size
    pixels = screen.load()
    assert pixels is not None
    for y in range(screen.height - height + 1):
        for x in range(screen.width - width + 1):
            if pixels[x, y] == first and ImageChops.difference(
                    screen.crop((x, y, x + width, y + height)), image).getbbox() is None:
                return x, y
    return None


# --- WebSocket (what noVNC speaks) ---------------------------------------------------------------------------


async def test_websocket_viewer_gets_the_screen(core: CoreProcess, tmp_path: Path) -> None:
    from websockets.asyncio.client import connect

    ws_port = free_port()
    proc = VncClientProcess(core.run_dir, VM, free_port(), "--websocket", f"127.0.0.1:{ws_port}")
    try:
        async with connect(f"ws://127.0.0.1:{ws_port}/", subprotocols=["binary"],  # type: ignore[list-item]
                           open_timeout=10, max_size=None) as ws:
            assert ws.subprotocol == "binary"
            buf = bytearray()

            async def take(n: int) -> bytes:
                while len(buf) < n:
                    message = await asyncio.wait_for(ws.recv(), 10)
                    assert isinstance(message, bytes)
                    buf.extend(message)
                data = bytes(buf[:n])
                del buf[:n]
                return data

            assert await take(12) == b"RFB 003.008\n"
            await ws.send(b"RFB 003.008\n")
            assert await take(2) == b"\x01\x01"
            await ws.send(b"\x01")
            assert await take(4) == b"\0\0\0\0"
            await ws.send(b"\x01")
            width, height = int.from_bytes(await take(2), "big"), int.from_bytes(await take(2), "big")
            await take(16)
            await take(int.from_bytes(await take(4), "big"))
            await ws.send(bytes([3, 0, 0, 0, 0, 0]) + width.to_bytes(2, "big") + height.to_bytes(2, "big"))
            header = await take(4 + 12)
            assert header[0] == 0 and header[2:4] == b"\x00\x01"
            assert header[8:12] == width.to_bytes(2, "big") + height.to_bytes(2, "big")
            assert len(await take(width * height * 4)) == width * height * 4
    finally:
        proc.stop()


# --- mode change ---------------------------------------------------------------------------------------------


async def test_mode_change_sends_desktop_size_then_full_update(client: VncClientProcess) -> None:
    """F2 (sent as an RFB key: keymap → qcode) switches the guest to mode 13h and back: DesktopSize, then
    a full update of the new size."""
    f2 = 0xFFBF
    viewer = await MiniViewer.connect(client.port)
    try:
        viewer.request(incremental=False)
        await asyncio.wait_for(viewer.read_update(), 10)
        start_size = (viewer.width, viewer.height)
        for expected in ((640, 400), start_size):
            viewer.key(f2, True)
            viewer.key(f2, False)

            async def resized(expected: tuple[int, int] = expected) -> None:
                while (viewer.width, viewer.height) != expected:
                    viewer.request(incremental=True)
                    await viewer.read_update()

            await asyncio.wait_for(resized(), 10)
            viewer.request(incremental=True)  # the full refresh follows without a non-incremental request
            rects = await asyncio.wait_for(viewer.read_update(), 10)
            assert (0, 0, *expected) in rects
    finally:
        viewer.close()


# --- noVNC in headless Chromium ------------------------------------------------------------------------------

NOVNC = Path("/usr/share/novnc")


@pytest.mark.skipif(shutil.which("chromium") is None or not (NOVNC / "vnc_lite.html").exists(),
                    reason="needs chromium and novnc (apt)")
def test_novnc_in_headless_chromium(booted: CoreProcess, tmp_path: Path) -> None:
    from test_novnc import devtools, headless_chromium, title_bar_pixels

    ws_port, http_port = free_port(), free_port()
    proc = VncClientProcess(booted.run_dir, VM, free_port(), "--websocket", f"127.0.0.1:{ws_port}")
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                             "--directory", str(NOVNC)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def page_shows_guest(url: str) -> None:
        """noVNC's page (not just its canvas) shows the guest's blue title bar: noVNC decoded our updates."""
        async with devtools(url) as cdp:
            targets = (await cdp.send("Target.getTargets"))["targetInfos"]
            page = next(t["targetId"] for t in targets if t["type"] == "page")
            session = (await cdp.send("Target.attachToTarget", {"targetId": page, "flatten": True}))["sessionId"]
            await cdp.send("Page.enable", session=session)
            await cdp.send("Page.navigate", {"url": f"http://127.0.0.1:{http_port}/vnc_lite.html?host=127.0.0.1"
                                                    f"&port={ws_port}&path=websockify"}, session)
            await cdp.poll(session, "(document.getElementById('status')?.textContent ?? '').startsWith('Connected')",
                           30, "noVNC to connect")
            deadline = time.monotonic() + 30
            while True:
                shot = await cdp.send("Page.captureScreenshot", {"format": "png"}, session)
                with Image.open(io.BytesIO(base64.b64decode(shot["data"]))) as image:
                    blue = title_bar_pixels(image)
                if blue > 600 * 12:
                    return
                assert time.monotonic() < deadline, f"only {blue} title-bar pixels in noVNC's page"
                await asyncio.sleep(0.2)

    try:
        wait_port(http_port)
        with headless_chromium(tmp_path / "profile") as url:
            asyncio.run(asyncio.wait_for(page_shows_guest(url), 60))
        assert "viewer ws:127.0.0.1" in proc.text()
    finally:
        http.terminate()
        http.wait(timeout=10)
        proc.stop()
