"""The web console (``vmfront client --all --web``) in headless Chromium, driven over the DevTools protocol, with
two real demo VMs: the overview lists them with their states; a thumbnail is the VM's screendump, scaled; a click
opens the VM's noVNC console, whose canvas is the screendump and whose keys reach that guest only; a VM stopped
while the page is open shows as stopped; without a token nothing but the login form and 401s.

With VMFRONT_WEB_SCREENSHOTS=DIR the overview and a console are saved there as PNG (docs/web.md's pictures).
Every process started here is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, screendump, wait_for
from fleetlib import FleetClientProcess, endpoints, start_cores, write_tokens
from guestlib import text_row
from PIL import Image
from test_novnc import CHROMIUM, NOVNC, Cdp, canvas_image, devtools, headless_chromium, type_key
from vnclib import ROOT, free_port

pytestmark = [pytest.mark.skipif(CHROMIUM is None or not (NOVNC / "vnc_lite.html").exists(),
                                 reason="needs chromium and novnc (apt install chromium novnc)"),
              pytest.mark.timeout(300)]

OPERATOR = "O" * 32  # opens every VM
ONLY_W2 = "T" * 32


@dataclass
class Site:
    fleet: Fleet
    cores: dict[str, CoreProcess]
    client: FleetClientProcess
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with Fleet() as fleet:
        cores = dict(zip(("w1", "w2"), start_cores(fleet, ["w1", "w2"]), strict=True))
        tokens = write_tokens(fleet.root / "tokens", {OPERATOR: "*", ONLY_W2: "w2"})
        port = free_port()
        client = fleet.add(FleetClientProcess(fleet.root, "--web", f"127.0.0.1:{port}", "--websocket-tokens",
                                              str(tokens)))
        client.wait_serving(list(cores.values()))
        for core in cores.values():
            peer = RawQmpPeer(core.qmp_socket).negotiate()
            try:
                wait_for(lambda p=peer: text_row(p, 4, fleet.root).startswith("KEYS:"), 120, "the guest to boot")
            finally:
                peer.close()
        yield Site(fleet, cores, client, port)


def status(url: str, *, method: str = "GET", cookie: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_without_a_token_nothing_but_the_login_form(site: Site) -> None:
    code, headers, body = status(site.url("/"))
    assert code == 401 and b"<form" in body and headers["Cache-Control"] == "no-store", (code, headers)
    for path in ("/api/vms", "/vm/w1/screen.png", "/vm/w1/console", "/novnc/vnc_lite.html", "/vm/nosuch/console"):
        code, headers, body = status(site.url(path))
        assert code == 401 and b"w1" not in body and headers["Cache-Control"] == "no-store", (path, code)
    assert status(site.url("/"), cookie=f"vmfront_token={'x' * 32}")[0] == 401
    # A token for w2 shows w2 only; other VMs do not exist for it.
    vms = json.loads(status(site.url("/api/vms"), cookie=f"vmfront_token={ONLY_W2}")[2])
    assert [vm["name"] for vm in vms] == ["w2"]
    assert status(site.url("/vm/w1/screen.png"), cookie=f"vmfront_token={ONLY_W2}")[0] == 404
    # HEAD, content types, 404 for what is not there.
    code, headers, body = status(site.url("/vm/w2/screen.png?width=100"), method="HEAD",
                                 cookie=f"vmfront_token={ONLY_W2}")
    assert (code, headers["Content-Type"], body) == (200, "image/png", b"")
    assert status(site.url("/vm/w2/screen.png?width=nope"), cookie=f"vmfront_token={ONLY_W2}")[0] == 400
    assert OPERATOR not in site.client.text() and ONLY_W2 not in site.client.text()

    async def websocket(path: str, cookie: str | None) -> int:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        try:
            async with connect(site.url(path).replace("http", "ws", 1), open_timeout=10,
                               additional_headers={"Cookie": cookie} if cookie else {}):
                return 101
        except InvalidStatus as exc:
            return int(exc.response.status_code)

    assert asyncio.run(websocket("/vnc/w1", None)) == 401
    assert asyncio.run(websocket("/vnc/w1", f"vmfront_token={ONLY_W2}")) == 404
    assert asyncio.run(websocket("/vnc/w2", f"vmfront_token={ONLY_W2}")) == 101


def test_a_web_console_off_loopback_needs_tokens(site: Site) -> None:
    result = subprocess.run([sys.executable, "-m", "vmfront", "client", "--all", "--run-root", str(site.fleet.root),
                             "--as-root", "--web", f"0.0.0.0:{free_port()}"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 1 and "--websocket-tokens" in result.stderr, result.stderr


async def page_session(cdp: Cdp, url: str) -> str:
    target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
    session: str = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
    await cdp.send("Page.enable", session=session)
    await cdp.send("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 700, "deviceScaleFactor": 1,
                                                          "mobile": False}, session)
    await cdp.send("Page.navigate", {"url": url}, session)
    return session


async def save_screenshot(cdp: Cdp, session: str, name: str) -> None:
    where = os.environ.get("VMFRONT_WEB_SCREENSHOTS")
    if where:
        shot = await cdp.send("Page.captureScreenshot", {"format": "png"}, session)
        (Path(where) / name).write_bytes(base64.b64decode(shot["data"]))


THUMBNAIL_JS = """(name => {
  const img = document.querySelector(`section[data-vm="${name}"] img.shot`);
  if (!img || !img.complete || !img.naturalWidth) return null;
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  c.getContext('2d').drawImage(img, 0, 0);
  return [img.src, c.toDataURL('image/png')];
})"""


def test_overview_thumbnails_console_and_stop(site: Site, tmp_path: Path) -> None:
    peers = {name: RawQmpPeer(core.qmp_socket).negotiate() for name, core in site.cores.items()}

    async def drive(browser: str) -> None:
        async with devtools(browser) as cdp:
            # A link with the operator's token: the token goes to a cookie and out of the address bar.
            overview = await page_session(cdp, site.url(f"/?token={OPERATOR}"))
            states = ("Array.from(document.querySelectorAll('section.vm')).map(s => "
                      "[s.dataset.vm, s.querySelector('.state').textContent])")
            await cdp.poll(overview, f"JSON.stringify({states}) === JSON.stringify([['w1','running'],"
                                     "['w2','running']])", 30, "the overview to list both VMs as running")
            assert await cdp.evaluate(overview, "location.search") == ""

            # A thumbnail is the VM's screen, scaled: compared while the guest is paused.
            assert peers["w1"].execute("stop") == {"return": {}}
            try:
                await asyncio.sleep(1.5)  # the capture refreshes at least once a second when nobody watches
                first = await cdp.poll(overview, f"{THUMBNAIL_JS}('w1')", 20, "a thumbnail")
                await cdp.poll(overview, f"(t => t && t[0] !== {json.dumps(first[0])})({THUMBNAIL_JS}('w1'))", 20,
                               "a refreshed thumbnail")
                shown = await cdp.evaluate(overview, f"{THUMBNAIL_JS}('w1')")
                dump = screendump(site.cores["w1"], tmp_path / "w1.png")
                scaled = dump.resize((320, round(dump.height * 320 / dump.width)), Image.Resampling.BILINEAR)
                with Image.open(io.BytesIO(base64.b64decode(shown[1].split(",", 1)[1]))) as thumbnail:
                    assert thumbnail.convert("RGB").tobytes() == scaled.tobytes()
            finally:
                assert peers["w1"].execute("cont") == {"return": {}}
            await save_screenshot(cdp, overview, "web-overview.png")

            # A click on w2's thumbnail opens its console (noVNC), connected through /vnc/w2 on this port.
            await cdp.evaluate(overview, "document.querySelector('section[data-vm=\"w2\"] a.open').click()")
            await cdp.poll(overview, "(t => t.startsWith('Connected') && t)"
                                     "(document.getElementById('status')?.textContent ?? '')", 30, "noVNC")
            assert "/novnc/vnc_lite.html" in await cdp.evaluate(overview, "location.pathname")
            def typed(name: str) -> str:
                return text_row(peers[name], 4, tmp_path).removeprefix("KEYS:").strip()

            before = {name: typed(name) for name in peers}
            assert await cdp.evaluate(overview, "(c => (c.focus(), document.activeElement === c))"
                                                "(document.querySelector('#screen canvas'))")
            for char in "web":
                await type_key(cdp, overview, char)
            wait_for(lambda: typed("w2") == before["w2"] + "web", 10, "the keys to reach w2")
            assert typed("w1") == before["w1"]
            # Management sees the console as QEMU shows a WebSocket viewer: this port is w2's VNC server, the
            # browser its client (and not w1's).
            web_server = {"host": "127.0.0.1", "service": str(site.port), "family": "ipv4", "websocket": True,
                          "auth": "none"}
            servers = peers["w2"].execute("query-vnc-servers")["return"]
            assert [(s["id"], s["server"], [c["websocket"] for c in s["clients"]]) for s in servers] == \
                [("default", [web_server], [True])], servers
            assert peers["w1"].execute("query-vnc-servers")["return"][0]["clients"] == []
            assert peers["w2"].execute("query-vnc")["return"]["service"] == str(site.port)
            assert peers["w2"].execute("stop") == {"return": {}}
            try:
                dump = screendump(site.cores["w2"], tmp_path / "w2.png")
                deadline = time.monotonic() + 20
                while (await canvas_image(cdp, overview)).tobytes() != dump.tobytes():
                    assert time.monotonic() < deadline, "the console's canvas is not the VM's screendump"
                    await asyncio.sleep(0.2)
            finally:
                assert peers["w2"].execute("cont") == {"return": {}}
            await save_screenshot(cdp, overview, "web-console.png")

            # Back on the overview, w1 is stopped: it shows so within 2 s.
            overview = await page_session(cdp, site.url("/"))
            await cdp.poll(overview, "document.querySelectorAll('section.vm').length === 2", 20, "the overview")
            peers["w1"].close()
            site.cores["w1"].stop()
            started = time.monotonic()
            await cdp.poll(overview, "document.querySelector('section[data-vm=\"w1\"] .state').textContent !== "
                                     "'running'", 10, "w1 to show as stopped")
            assert time.monotonic() - started < 2.0
            shown = await cdp.evaluate(overview, "document.querySelector('section[data-vm=\"w1\"] .state')"
                                                 ".textContent")
            assert shown in ("shutdown", "stopped"), shown

    try:
        with headless_chromium(tmp_path / "profile") as browser:
            asyncio.run(asyncio.wait_for(drive(browser), 180))
    finally:
        for peer in peers.values():
            peer.close()
    assert endpoints(site.cores["w2"])["web"] == site.url("/vm/w2/console")
