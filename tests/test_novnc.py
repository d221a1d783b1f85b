"""noVNC (Debian's /usr/share/novnc) in headless Chromium, driven through the Chrome DevTools Protocol: it
connects to the client's WebSocket VNC server, its canvas shows the guest's screen, and keys typed in the page
reach the guest (read back from guest memory through the core's management socket).

Every process started here (Chromium, http.server, the client, the core and its QEMU) is ended by its pid;
every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from corelib import CoreProcess, RawQmpPeer, kill_pid, pid_alive, running_core, screendump, wait_demo_booted, wait_for
from guestlib import TEXT_BOXES, crop
from PIL import Image
from vnclib import VncClientProcess, end_process, free_port, wait_port

VM = "nv"
NOVNC = Path("/usr/share/novnc")
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(CHROMIUM is None or not (NOVNC / "vnc_lite.html").exists(),
                                reason="needs chromium and novnc (apt install chromium novnc)")


@pytest.fixture(scope="module")
def core() -> Iterator[CoreProcess]:
    with running_core(VM) as running:
        wait_demo_booted(running)
        yield running


def guest_keys_row(peer: RawQmpPeer, core: CoreProcess) -> str:
    """Row 4 of the demo guest's text screen ("KEYS: ..."), read from guest memory (QMP pmemsave)."""
    path = core.run_dir.parent / "vram.bin"
    reply = peer.execute("pmemsave", arguments={"val": 0xB8000, "size": 80 * 25 * 2, "filename": str(path)})
    assert reply == {"return": {}}, reply
    row = path.read_bytes()[::2][4 * 80:5 * 80].decode("cp437").rstrip()
    return row.removeprefix("KEYS:").strip() if row.startswith("KEYS:") else "?" + row


# --- a minimal DevTools-protocol client ------------------------------------------------------------------------


class Cdp:
    """One browser-level DevTools WebSocket; commands to a page go with its flattened session id."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                future = self.pending.pop(message.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(message)
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(EOFError("DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
                   within: float = 15.0) -> dict[str, Any]:
        ident = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send(json.dumps(message))
        reply = await asyncio.wait_for(future, within)
        assert "error" not in reply, f"{method}: {reply['error']}"
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, session: str, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def poll(self, session: str, expression: str, within: float, what: str) -> Any:
        deadline = time.monotonic() + within
        while True:
            value = await self.evaluate(session, expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within} s waiting for {what} (last: {value!r})")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader
        await self.ws.close()


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (Chromium's zygotes, renderer, GPU and utility processes)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


@contextlib.contextmanager
def headless_chromium(profile: Path, *extra: str) -> Iterator[str]:
    """Chromium with a DevTools endpoint on a free port; yields its browser WebSocket URL."""
    assert CHROMIUM is not None
    log = profile.parent / f"{profile.name}.stderr"
    with log.open("wb") as err:
        # Without the background-networking flags Chromium keeps dialling out, which this machine refuses.
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                 "--disable-sync", "--window-size=800,500", "--remote-debugging-port=0",
                                 f"--user-data-dir={profile}", *extra, "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    descendants: set[int] = set()
    try:
        def listening() -> str:
            found = re.search(r"DevTools listening on (ws://\S+)", log.read_text(errors="replace"))
            assert proc.poll() is None or found, f"chromium exited: {log.read_text(errors='replace')}"
            return found.group(1) if found else ""

        wait_for(listening, 30, "chromium's DevTools endpoint")
        descendants.update(_children(proc.pid))
        yield listening()
    finally:
        descendants.update(_children(proc.pid))
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait(timeout=10)
        for pid in descendants:  # normally gone with the browser; a straggler is ended by its pid
            if pid_alive(pid):
                kill_pid(pid)


@contextlib.asynccontextmanager
async def devtools(url: str) -> AsyncIterator[Cdp]:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, open_timeout=15) as ws:
        cdp = Cdp(ws)
        try:
            yield cdp
        finally:
            await cdp.close()


async def open_page(cdp: Cdp, url: str) -> str:
    """Navigate the browser's page to ``url``; returns its DevTools session."""
    targets = (await cdp.send("Target.getTargets"))["targetInfos"]
    page = next(t["targetId"] for t in targets if t["type"] == "page")
    session: str = (await cdp.send("Target.attachToTarget", {"targetId": page, "flatten": True}))["sessionId"]
    await cdp.send("Page.enable", session=session)
    await cdp.send("Page.navigate", {"url": url}, session)
    return session


async def type_key(cdp: Cdp, session: str, char: str) -> None:
    """One printable key as a real keyboard would: keyDown (with text, so keypress/input too), then keyUp."""
    key = {"key": char, "code": f"Key{char.upper()}" if char.isalpha() else "",
           "windowsVirtualKeyCode": ord(char.upper()), "nativeVirtualKeyCode": ord(char.upper())}
    await cdp.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": char, "unmodifiedText": char, **key},
                   session)
    await cdp.send("Input.dispatchKeyEvent", {"type": "keyUp", **key}, session)


def title_bar_pixels(image: Image.Image) -> int:
    data = image.convert("RGB").tobytes()
    return sum(1 for i in range(0, len(data), 3)
               if data[i] < 24 and data[i + 1] < 24 and abs(data[i + 2] - 168) < 24)


CANVAS_PNG = "document.querySelector('#screen canvas').toDataURL('image/png')"


async def canvas_image(cdp: Cdp, session: str) -> Image.Image:
    url = await cdp.evaluate(session, CANVAS_PNG)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return image.convert("RGB")


def test_novnc_canvas_shows_guest_and_typed_keys_reach_it(core: CoreProcess, tmp_path: Path) -> None:
    ws_port, http_port = free_port(), free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--websocket", f"127.0.0.1:{ws_port}")
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                             "--directory", str(NOVNC)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    peer = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        wait_port(http_port)
        with headless_chromium(tmp_path / "profile") as url:
            page = f"http://127.0.0.1:{http_port}/vnc_lite.html?host=127.0.0.1&port={ws_port}&path=websockify"
            asyncio.run(asyncio.wait_for(drive_novnc(url, page, core, client, peer, tmp_path), 90))
    finally:
        peer.close()
        end_process(http)
        client.stop()


async def drive_novnc(url: str, page_url: str, core: CoreProcess, client: VncClientProcess, peer: RawQmpPeer,
                      tmp_path: Path) -> None:
    async with devtools(url) as cdp:
        session = await open_page(cdp, page_url)
        status = await cdp.poll(session, "(t => t.startsWith('Connected') && t)"
                                         "(document.getElementById('status')?.textContent ?? '')",
                                30, "noVNC to connect")
        assert status.startswith("Connected to "), status
        assert "viewer ws:127.0.0.1" in client.text()

        # The canvas: the guest's blue title bar is painted, on the canvas and in a page screenshot.
        def blue_enough(image: Image.Image) -> bool:
            return title_bar_pixels(image) > 600 * 12

        deadline = time.monotonic() + 30
        while not blue_enough(canvas := await canvas_image(cdp, session)):
            assert time.monotonic() < deadline, f"only {title_bar_pixels(canvas)} title-bar pixels on the canvas"
            await asyncio.sleep(0.2)
        assert canvas.size == (720, 400)
        shot = await cdp.send("Page.captureScreenshot", {"format": "png"}, session)
        with Image.open(io.BytesIO(base64.b64decode(shot["data"]))) as page_shot:
            assert blue_enough(page_shot), f"only {title_bar_pixels(page_shot)} title-bar pixels in the page"
        assert crop(canvas, TEXT_BOXES["title"]) == crop(screendump(core, tmp_path / "dump.png"),
                                                          TEXT_BOXES["title"])

        # The keys: focus noVNC's canvas, type, and read the guest's KEYS row from its memory.
        focused = await cdp.evaluate(session, "(c => (c.focus(), document.activeElement === c))"
                                              "(document.querySelector('#screen canvas'))")
        assert focused, "noVNC's canvas did not take the focus"
        before = guest_keys_row(peer, core)
        blank = crop(screendump(core, tmp_path / "before.png"), TEXT_BOXES["keys"])
        assert not before.startswith("?"), before
        for char in "vnc":
            await type_key(cdp, session, char)
        deadline = time.monotonic() + 10
        while (row := guest_keys_row(peer, core)) != before + "vnc":
            assert time.monotonic() < deadline, f"guest KEYS row {row!r}, expected {before + 'vnc'!r}"
            await asyncio.sleep(0.1)

        # ... and the guest's echo comes back to the canvas, as the guest drew it.
        deadline = time.monotonic() + 10
        while True:
            dump = crop(screendump(core, tmp_path / "after.png"), TEXT_BOXES["keys"])
            shown = crop(await canvas_image(cdp, session), TEXT_BOXES["keys"])
            if shown == dump != blank:
                break
            assert time.monotonic() < deadline, "the typed keys' echo did not reach noVNC's canvas"
            await asyncio.sleep(0.2)


# --- wss:// (the client's WebSocket listener with --vnc-tls-creds) ----------------------------------------------

#: The noVNC page over HTTPS, so that vnc_lite.html connects with wss:// (it follows the page's scheme).
_HTTPS_SERVER = """
import functools, http.server, ssl, sys
port, directory, cert, key = sys.argv[1:5]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


def test_novnc_over_wss_shows_the_guest(core: CoreProcess, tmp_path: Path) -> None:
    from tlslib import make_ca, server_creds, spki_hash

    creds = server_creds(make_ca(tmp_path / "ca"), tmp_path / "creds")
    ws_port, http_port = free_port(), free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--websocket", f"127.0.0.1:{ws_port}",
                              "--vnc-tls-creds", str(creds))
    http = subprocess.Popen([sys.executable, "-c", _HTTPS_SERVER, str(http_port), str(NOVNC),
                             str(creds / "server-cert.pem"), str(creds / "server-key.pem")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(http_port)
        # Chromium trusts the test's server key by its hash (no CA is installed in the machine's store).
        trust = f"--ignore-certificate-errors-spki-list={spki_hash(creds / 'server-cert.pem')}"
        with headless_chromium(tmp_path / "profile", trust) as url:
            page = f"https://127.0.0.1:{http_port}/vnc_lite.html?host=127.0.0.1&port={ws_port}&path=websockify"
            asyncio.run(asyncio.wait_for(watch_over_wss(url, page, core, tmp_path), 90))
        assert "(TLS: wss://)" in client.text()
        assert re.search(r"viewer ws:127.0.0.1:\d+: connection \(TLS", client.text())
    finally:
        end_process(http)
        client.stop()


async def watch_over_wss(url: str, page_url: str, core: CoreProcess, tmp_path: Path) -> None:
    async with devtools(url) as cdp:
        session = await open_page(cdp, page_url)
        await cdp.poll(session, "(t => t.startsWith('Connected') && t)"
                                "(document.getElementById('status')?.textContent ?? '')", 30, "noVNC to connect")
        assert await cdp.evaluate(session, "location.protocol") == "https:"  # so noVNC used wss://
        deadline = time.monotonic() + 30
        while crop(canvas := await canvas_image(cdp, session), TEXT_BOXES["title"]) != \
                crop(screendump(core, tmp_path / "dump.png"), TEXT_BOXES["title"]):
            assert time.monotonic() < deadline, f"only {title_bar_pixels(canvas)} title-bar pixels on the canvas"
            await asyncio.sleep(0.2)
