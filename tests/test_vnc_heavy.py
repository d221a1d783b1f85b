"""The VNC service at 1920x1080 and with CopyRect, checked with real viewers against the shared framebuffer.

The demo guest's F3 mode (a 1920x1080x32 linear framebuffer, full-screen high-colour animation) is decoded by
vncdotool (Raw, Hextile, ZRLE), TigerVNC (Tight without JPEG, Hextile) and, for Zlib, which no real viewer
here speaks, by the spec decoder of test_rfb_encodings over a real connection; each must equal the segment's
frame (``vmfront screendump`` reads the segment) with the guest paused. The F4 mode (scrolling text) is
watched by TigerVNC and noVNC, which must end up showing the segment's frame exactly after the client sent
them scrolls as CopyRect. The encoder workers: none outlives the client, and a killed one is replaced while
viewers stay connected. Every process started here is ended by its pid.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, RawQmpPeer, pid_alive, running_core, screendump, wait_demo_booted, wait_for
from PIL import Image, ImageChops
from test_rfb_encodings import SpecViewer
from test_rfb_hextile import assert_same_as_reference, guest_screen
from test_vnc import Paused, find
from vnclib import ZLIB, MiniViewer, VncClientProcess, end_process, free_port, screenshot, vncdo, xvfb

from core_daemon.demo_guest import demo_image_path, demo_qemu_args
from rfb.wire import BGRX8888

VM = "vh"
HD = (1920, 1080)
TEXT = (720, 400)
TIGERVNC = shutil.which("vncviewer") is not None and shutil.which("Xvfb") is not None


def send_key(core: CoreProcess, key: str) -> None:
    peer = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        assert "return" in peer.execute("send-key", arguments={"keys": [{"type": "qcode", "data": key}]})
    finally:
        peer.close()


@pytest.fixture(scope="module")
def core() -> Iterator[CoreProcess]:
    # TCG: the 1920x1080 mode draws in protected mode, which nested KVM without unrestricted guest cannot run.
    with running_core(VM, qemu_args=[*demo_qemu_args(demo_image_path()), "-accel", "tcg"]) as running:
        wait_demo_booted(running)
        yield running


@pytest.fixture(scope="module")
def client(core: CoreProcess) -> Iterator[VncClientProcess]:
    proc = VncClientProcess(core.run_dir, VM, free_port())
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def hd(core: CoreProcess, tmp_path: Path) -> Iterator[CoreProcess]:
    """The guest in its 1920x1080 animation for the test, back in text mode afterwards."""
    send_key(core, "f3")
    wait_for(lambda: screendump(core, tmp_path / "hd.png", timeout=30).size == HD, 20, "the 1920x1080 mode")
    try:
        yield core
    finally:
        send_key(core, "f3")
        wait_for(lambda: screendump(core, tmp_path / "text.png", timeout=30).size == TEXT, 20, "text mode again")


@pytest.mark.parametrize("encoding", ["raw", "hextile", "zrle"])
def test_1080p_vncdotool_decodes_to_the_segment(hd: CoreProcess, client: VncClientProcess, tmp_path: Path,
                                                encoding: str) -> None:
    with Paused(hd):
        vncdo(client.port, capture=tmp_path / "vnc.png", encoding=encoding, timeout=120)
        dump = screendump(hd, tmp_path / "dump.png", timeout=30)
    capture = Image.open(tmp_path / "vnc.png").convert("RGB")
    assert capture.size == dump.size == HD
    assert ImageChops.difference(capture, dump).getbbox() is None


async def spec_decode(port: int, encoding: int) -> bytes:
    """One full update through a real connection, decoded by the spec decoder: its BGRX framebuffer."""
    viewer = await MiniViewer.connect(port, encoding)
    try:
        viewer.recording = bytearray()
        viewer.request(incremental=False)
        await asyncio.wait_for(viewer.read_update(), 60)
        decoder = SpecViewer(viewer.width, viewer.height, BGRX8888)
        decoder.update(bytes(viewer.recording))
        return bytes(decoder.fb)
    finally:
        viewer.close()


def test_1080p_zlib_decodes_to_the_segment(hd: CoreProcess, client: VncClientProcess, tmp_path: Path) -> None:
    with Paused(hd):
        fb = asyncio.run(spec_decode(client.port, ZLIB))
        dump = screendump(hd, tmp_path / "dump.png", timeout=30)
    decoded = Image.frombytes("RGB", HD, fb, "raw", "BGRX")
    assert ImageChops.difference(decoded, dump).getbbox() is None


def test_hextile_in_c_matches_the_reference_on_the_1080p_animation(hd: CoreProcess, tmp_path: Path) -> None:
    for k in range(2):  # two moments of the animation
        frame = guest_screen(VM, hd.run_dir, tmp_path / f"hd{k}.png")
        assert frame.shape == (1080, 1920)
        assert "raw" in assert_same_as_reference(frame, rects=20, seed=k)


def tigervnc(display: str, port: int, home: Path, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["vncviewer", "-AutoSelect=0", "-FullColour", *options, f"127.0.0.1::{port}"],
                            env={"DISPLAY": display, "HOME": str(home), "PATH": "/usr/bin:/bin"},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scroll(core: CoreProcess, seconds: float = 4.0) -> None:
    """The demo guest scrolls text (F4) for ``seconds``, then stops."""
    send_key(core, "f4")
    time.sleep(seconds)
    send_key(core, "f4")


def shows(display: str, image: Image.Image, path: Path) -> bool:
    screenshot(display, path)
    return find(Image.open(path).convert("RGB"), image) is not None


@pytest.mark.skipif(not TIGERVNC, reason="needs tigervnc-viewer and xvfb")
@pytest.mark.parametrize("options", [("-PreferredEncoding=Tight", "-NoJPEG"), ("-PreferredEncoding=Hextile",)],
                         ids=["tight", "hextile"])
def test_1080p_tigervnc_shows_the_segment(hd: CoreProcess, client: VncClientProcess, tmp_path: Path,
                                          options: tuple[str, ...]) -> None:
    with xvfb(1920, 1200) as display:
        viewer = tigervnc(display, client.port, tmp_path, *options)
        try:
            with Paused(hd):
                dump = screendump(hd, tmp_path / "dump.png", timeout=30)
                wait_for(lambda: shows(display, dump, tmp_path / "screen.png"), 60,
                         "TigerVNC's window to show the 1920x1080 frame")
        finally:
            end_process(viewer)


def copyrects(client: VncClientProcess, peer_prefix: str) -> int:
    """CopyRect scrolls the client logged for the viewers whose peer name starts with ``peer_prefix``."""
    pattern = re.compile(rf"viewer {re.escape(peer_prefix)}\S* gone \(.*?; \d+ updates sent, (\d+) scrolls")
    return sum(int(n) for n in pattern.findall(client.text()))


@pytest.mark.skipif(not TIGERVNC, reason="needs tigervnc-viewer and xvfb")
def test_tigervnc_follows_scrolling_text_by_copyrect(core: CoreProcess, tmp_path: Path) -> None:
    client = VncClientProcess(core.run_dir, VM, free_port())
    try:
        with xvfb() as display:
            viewer = tigervnc(display, client.port, tmp_path, "-PreferredEncoding=ZRLE")
            try:
                wait_for(lambda: "viewer 127.0.0.1" in client.text(), 20, "TigerVNC to connect")
                scroll(core)
                with Paused(core):
                    dump = screendump(core, tmp_path / "dump.png", timeout=30)
                    wait_for(lambda: shows(display, dump, tmp_path / "screen.png"), 30,
                             "TigerVNC to show the scrolled text exactly")
            finally:
                end_process(viewer)
            wait_for(lambda: "scrolls by CopyRect" in client.text(), 10, "the viewer's summary")
        assert copyrects(client, "127.0.0.1") > 0, "no scroll was sent as CopyRect"
    finally:
        client.stop()


def test_hextile_in_c_matches_the_reference_on_text_screens(core: CoreProcess, tmp_path: Path) -> None:
    """The demo guest's text screen, still and while it scrolls (F4)."""
    kinds = assert_same_as_reference(guest_screen(VM, core.run_dir, tmp_path / "text.png"), rects=80)
    assert {"solid", "foreground", "several subrects"} <= kinds
    send_key(core, "f4")
    try:
        for k in range(3):
            time.sleep(0.5)
            assert_same_as_reference(guest_screen(VM, core.run_dir, tmp_path / f"scroll{k}.png"), seed=k + 1)
    finally:
        send_key(core, "f4")


NOVNC = Path("/usr/share/novnc")


@pytest.mark.skipif(shutil.which("chromium") is None or not (NOVNC / "vnc_lite.html").exists(),
                    reason="needs chromium and novnc (apt)")
def test_novnc_follows_scrolling_text_by_copyrect(core: CoreProcess, tmp_path: Path) -> None:
    from test_novnc import canvas_image, devtools, headless_chromium

    ws_port, http_port = free_port(), free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--websocket", f"127.0.0.1:{ws_port}")
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                             "--directory", str(NOVNC)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    async def drive(url: str) -> None:
        async with devtools(url) as cdp:
            targets = (await cdp.send("Target.getTargets"))["targetInfos"]
            page = next(t["targetId"] for t in targets if t["type"] == "page")
            session = (await cdp.send("Target.attachToTarget", {"targetId": page, "flatten": True}))["sessionId"]
            await cdp.send("Page.enable", session=session)
            await cdp.send("Page.navigate", {"url": f"http://127.0.0.1:{http_port}/vnc_lite.html?host=127.0.0.1"
                                                    f"&port={ws_port}&path=websockify"}, session)
            await cdp.poll(session, "(document.getElementById('status')?.textContent ?? '').startsWith('Connected')",
                           30, "noVNC to connect")
            await asyncio.get_running_loop().run_in_executor(None, scroll, core)
            with Paused(core):
                dump = screendump(core, tmp_path / "dump.png", timeout=30)
                deadline = time.monotonic() + 30
                while ImageChops.difference(await canvas_image(cdp, session), dump).getbbox() is not None:
                    assert time.monotonic() < deadline, "noVNC's canvas does not show the scrolled text exactly"
                    await asyncio.sleep(0.3)

    try:
        wait_for(lambda: http.poll() is None and free_port() > 0, 5, "http.server")
        with headless_chromium(tmp_path / "profile") as url:
            asyncio.run(asyncio.wait_for(drive(url), 120))
        wait_for(lambda: "scrolls by CopyRect" in client.text(), 10, "the viewer's summary")
        assert copyrects(client, "ws:") > 0, "no scroll was sent as CopyRect"
    finally:
        end_process(http)
        client.stop()


def worker_pids(client: VncClientProcess) -> list[int]:
    children = Path(f"/proc/{client.pid}/task/{client.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"clients.vnc.encoder_worker" in cmdline(int(pid))]


def cmdline(pid: int) -> bytes:
    """The process's command line; empty if it is gone (a child can be reaped between the listing and this)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


async def follow(port: int, encoding: int, updates: int) -> int:
    viewer = await MiniViewer.connect(port, encoding)
    try:
        for _ in range(updates):
            viewer.request(incremental=False)
            await asyncio.wait_for(viewer.read_update(), 30)
        return len(viewer.updates)
    finally:
        viewer.close()


def test_a_killed_worker_is_replaced_and_none_outlives_the_client(core: CoreProcess) -> None:
    client = VncClientProcess(core.run_dir, VM, free_port())
    try:
        wait_for(lambda: len(worker_pids(client)) >= 1, 20, "the encoder workers")
        first = worker_pids(client)
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: first[0] not in worker_pids(client) and len(worker_pids(client)) == len(first), 20,
                 "a new worker in place of the killed one")
        assert asyncio.run(follow(client.port, 16, 3)) == 3  # ZRLE updates from the pool as it is now
        workers = worker_pids(client)
        client.proc.send_signal(signal.SIGKILL)  # no chance to clean up: PR_SET_PDEATHSIG must end them
        client.proc.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(pid) for pid in workers), 10, "the workers to die with the client")
    finally:
        client.stop()
