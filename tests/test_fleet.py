"""The fleet client (``vmfront client --all``) against real QEMU: 20 demo VMs under one run root, one client
process for all of them.

Each VM is reached through the port its core's state.json lists; a vncdotool capture equals that VM's
screendump and a typed key reaches that guest only; cores that appear are served, cores that stop are let go;
a fleet client killed with SIGKILL is replaced by one that serves every VM again, on the same ports; noVNC in
headless Chromium reaches two VMs through the one WebSocket port with their tokens, and wrong, expired or
missing tokens are refused; a hostile core double (malformed control frames, a garbage display segment)
disturbs only its own VM.

Every process started here is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from corelib import CoreProcess, Fleet, LoggedProcess, RawQmpPeer, screendump, wait_for
from fleetlib import FleetClientProcess, endpoints, start_cores, vnc_port, write_tokens
from guestlib import TEXT_BOXES, crop, text_row
from PIL import Image
from test_novnc import CHROMIUM, NOVNC, canvas_image, devtools, headless_chromium
from vnclib import ROOT, free_port, vncdo, wait_port

VMS = [f"vm{i:02d}" for i in range(20)]
#: Twenty guests booting at once take a while on a busy 2-CPU machine.
pytestmark = pytest.mark.timeout(600)
TOKENS = {"A" * 24: "vm03", "B" * 24: "vm11", "E" * 24: ("vm03", "2001-01-01T00:00:00Z")}


def free_range(count: int) -> int:
    """The first port of ``count`` consecutive free ports."""
    for base in range(23000, 60000, 97):
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no free port range")


@dataclass
class Twenty:
    fleet: Fleet
    cores: dict[str, CoreProcess]
    args: list[str]
    ws_port: int
    client: FleetClientProcess
    peers: dict[str, RawQmpPeer] = field(default_factory=dict)

    def peer(self, name: str) -> RawQmpPeer:
        if name not in self.peers:
            self.peers[name] = self.fleet.add(RawQmpPeer(self.cores[name].qmp_socket).negotiate())
        return self.peers[name]

    def restart_client(self) -> FleetClientProcess:
        self.client = self.fleet.add(FleetClientProcess(self.fleet.root, *self.args))
        return self.client


@pytest.fixture(scope="module")
def twenty() -> Iterator[Twenty]:
    with Fleet() as fleet:
        cores = dict(zip(VMS, start_cores(fleet, VMS), strict=True))
        tokens = write_tokens(fleet.root / "tokens", TOKENS)
        base, ws_port = free_range(40), free_port()
        args = ["--vnc-ports", f"{base}-{base + 39}", "--websocket", f"127.0.0.1:{ws_port}",
                "--websocket-tokens", str(tokens), "--monitor"]
        client = fleet.add(FleetClientProcess(fleet.root, *args))
        client.wait_serving(list(cores.values()), within=60)
        twenty = Twenty(fleet, cores, args, ws_port, client)
        for name in VMS:  # every guest booted (20 of them at once take a while on a busy machine)
            typed(twenty, name, fleet.root, within=180)
        yield twenty


@contextlib.contextmanager
def paused(peer: RawQmpPeer) -> Iterator[None]:
    """The guest stopped (its screen still), then running again."""
    assert peer.execute("stop") == {"return": {}}
    try:
        yield
    finally:
        assert peer.execute("cont") == {"return": {}}


def test_each_vm_is_served_on_its_own_port(twenty: Twenty, tmp_path: Path) -> None:
    ports = {name: vnc_port(core) for name, core in twenty.cores.items()}
    assert len(set(ports.values())) == len(VMS), ports
    for name in ("vm00", "vm07", "vm19"):
        core = twenty.cores[name]
        assert endpoints(core)["websocket"] == f"ws://127.0.0.1:{twenty.ws_port}/vnc/{name}"
        assert endpoints(core)["monitor"] == f"unix:{core.run_dir / 'monitor.sock'}"
        status = subprocess.run([sys.executable, "-m", "vmfront", "status", name, "--run-dir", str(core.run_dir)],
                                check=True, timeout=20, cwd=ROOT, capture_output=True, text=True).stdout
        assert f"vnc 127.0.0.1:{ports[name]}" in status and f"/vnc/{name}" in status, status
        with paused(twenty.peer(name)):
            capture = tmp_path / f"{name}-vnc.png"
            vncdo(ports[name], capture=capture)
            with Image.open(capture) as shot:
                assert shot.convert("RGB").tobytes() == screendump(core, tmp_path / f"{name}.png").tobytes(), name


def typed(twenty: Twenty, name: str, scratch: Path, within: float = 30) -> str:
    """What the guest shows on its KEYS line, read from its memory (once it has booted and drawn the line)."""
    rows: list[str] = []
    wait_for(lambda: rows.append(text_row(twenty.peer(name), 4, scratch)) or rows[-1].startswith("KEYS:"), within,
             f"{name} to draw its KEYS line")
    return rows[-1].removeprefix("KEYS:").strip()


def test_keys_reach_only_their_guest(twenty: Twenty, tmp_path: Path) -> None:
    rows = {name: typed(twenty, name, tmp_path) for name in ("vm06", "vm07", "vm08")}
    vncdo(vnc_port(twenty.cores["vm07"]), type_text="fleet")
    wait_for(lambda: typed(twenty, "vm07", tmp_path) == rows["vm07"] + "fleet", 10, "the keys to reach vm07")
    for name in ("vm06", "vm08"):
        assert typed(twenty, name, tmp_path) == rows[name], name


def test_the_monitor_of_each_vm_is_its_own(twenty: Twenty) -> None:
    for name in ("vm01", "vm12"):
        path = endpoints(twenty.cores[name])["monitor"].removeprefix("unix:")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"info name\n")
            seen = b""
            while seen.count(b"(qemu) ") < 2:  # the banner's prompt, then the one after the answer
                chunk = sock.recv(4096)
                assert chunk, seen
                seen += chunk
            assert seen.split(b"(qemu) ")[1].split() == [name.encode()], seen


def test_cores_that_appear_are_served_and_cores_that_stop_let_go(twenty: Twenty) -> None:
    late = start_cores(twenty.fleet, ["late"])[0]
    # Within 2 s on an idle host (benchmarks/fleet.py measures it); the bound here only catches a hang.
    twenty.client.wait_serving([late], within=20)
    port = vnc_port(late)
    wait_port(port)
    late.stop()
    wait_for(lambda: "letting go of VM 'late' (its core stopped)" in twenty.client.text(), 10, "the fleet to let go")

    def port_closed() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    wait_for(port_closed, 5, "the VNC port of the stopped VM to close")


def test_a_hostile_core_disturbs_only_its_own_vm(twenty: Twenty) -> None:
    hostile = LoggedProcess()
    hostile.log = twenty.fleet.root / "hostile.log"
    with hostile.log.open("wb") as out:
        hostile.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile_core.py"),
                                         str(twenty.fleet.root / "evil")], stdout=out, stderr=out, cwd=ROOT)
    twenty.fleet.add(hostile)
    wait_for(lambda: "[evil] control channel client" in twenty.client.text(), 10, "the fleet to attach to it")
    wait_for(lambda: "[evil] cannot subscribe to the display" in twenty.client.text(), 10,
             "the garbage segment to be refused")
    time.sleep(2)  # a couple of seconds of malformed frames
    assert twenty.client.proc.poll() is None
    # Everyone else is served as before: a capture through a neighbour's port, its monitor.
    vncdo(vnc_port(twenty.cores["vm05"]), capture=twenty.fleet.root / "vm05-during.png")
    test_the_monitor_of_each_vm_is_its_own(twenty)
    text = twenty.client.text()
    assert "Traceback" not in text, text[-5000:]
    hostile.stop()


def test_kill_9_and_restart_serves_every_vm_again_on_the_same_ports(twenty: Twenty) -> None:
    before = {name: vnc_port(core) for name, core in twenty.cores.items()}
    twenty.client.kill()
    client = twenty.restart_client()
    # Within 3 s on an idle host (benchmarks/fleet.py measures it); the bound here only catches a hang.
    client.wait_serving(list(twenty.cores.values()), within=30)
    assert {name: vnc_port(core) for name, core in twenty.cores.items()} == before


def test_websocket_tokens(twenty: Twenty) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def status(path: str) -> int:
        try:
            async with connect(f"ws://127.0.0.1:{twenty.ws_port}{path}", open_timeout=10) as ws:
                assert (await asyncio.wait_for(ws.recv(), 10))[:4] == b"RFB "
                return 101
        except InvalidStatus as exc:
            return int(exc.response.status_code)

    async def check() -> None:
        assert await status(f"/vnc/vm03?token={'A' * 24}") == 101
        assert await status(f"/vnc/vm11?token={'B' * 24}") == 101
        assert await status("/vnc/vm03") == 401
        assert await status(f"/vnc/vm03?token={'B' * 24}") == 403  # vm11's token
        assert await status(f"/vnc/vm03?token={'E' * 24}") == 403  # expired
        assert await status(f"/vnc/vm03?token={'A' * 23}x") == 403
        assert await status(f"/vnc/nosuchvm?token={'A' * 24}") == 403  # without a token for it: no hint
        write_tokens(twenty.fleet.root / "tokens", {**TOKENS, "N" * 24: "nosuchvm"})
        await asyncio.sleep(1.0)  # the file is looked at again at most every 0.5 s
        assert await status(f"/vnc/nosuchvm?token={'N' * 24}") == 404
        write_tokens(twenty.fleet.root / "tokens", TOKENS)

    asyncio.run(check())
    assert "A" * 24 not in twenty.client.text() and "B" * 24 not in twenty.client.text()


@pytest.mark.skipif(CHROMIUM is None or not (NOVNC / "vnc_lite.html").exists(),
                    reason="needs chromium and novnc (apt install chromium novnc)")
def test_novnc_reaches_two_vms_through_one_port(twenty: Twenty, tmp_path: Path) -> None:
    http_port = free_port()
    http = twenty.fleet.add(subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind",
                                              "127.0.0.1", "--directory", str(NOVNC)], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port(http_port)
    # Something on each screen that tells the two apart: their own KEYS lines.
    for vm, text in (("vm03", "three"), ("vm11", "eleven")):
        typed(twenty, vm, tmp_path)  # booted: keys typed now are the guest's
        vncdo(vnc_port(twenty.cores[vm]), type_text=text)
        wait_for(lambda vm=vm, text=text: typed(twenty, vm, tmp_path).endswith(text), 10, "the keys")
    keys: dict[str, bytes] = {}

    def page(vm: str, token: str) -> str:
        return (f"http://127.0.0.1:{http_port}/vnc_lite.html?host=127.0.0.1&port={twenty.ws_port}"
                f"&path=vnc/{vm}%3Ftoken%3D{token}")

    async def drive(url: str) -> None:
        async with devtools(url) as cdp:
            for vm, token in (("vm03", "A" * 24), ("vm11", "B" * 24), ("vm03", "B" * 24)):
                target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
                session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))[
                    "sessionId"]
                await cdp.send("Page.enable", session=session)
                await cdp.send("Page.navigate", {"url": page(vm, token)}, session)
                status_js = "document.getElementById('status')?.textContent ?? ''"
                if token != TOKENS_BY_VM[vm]:
                    text = await cdp.poll(session, f"(t => /Disconnected|went wrong/.test(t) && t)({status_js})", 20,
                                          "noVNC to be refused")
                    assert "Connected to" not in text, text
                    continue
                await cdp.poll(session, f"(t => t.startsWith('Connected') && t)({status_js})", 30,
                               f"noVNC to connect to {vm}")
                dump = screendump(twenty.cores[vm], tmp_path / f"{vm}.png")
                deadline = time.monotonic() + 20
                while True:
                    canvas = await canvas_image(cdp, session)
                    if all(crop(canvas, TEXT_BOXES[box]) == crop(dump, TEXT_BOXES[box]) for box in ("title", "keys")):
                        break
                    assert time.monotonic() < deadline, f"noVNC's canvas for {vm} is not its screendump"
                    await asyncio.sleep(0.2)
                keys[vm] = crop(canvas, TEXT_BOXES["keys"])

    with headless_chromium(tmp_path / "profile") as url:
        asyncio.run(asyncio.wait_for(drive(url), 120))
    http.terminate()
    assert keys["vm03"] != keys["vm11"]


TOKENS_BY_VM = {"vm03": "A" * 24, "vm11": "B" * 24}
