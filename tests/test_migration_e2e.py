"""Live migration end to end, as a user sees it: two real QEMUs (the demo guest) under two cores on this machine,
one ``vmfront client`` serving VNC and the guest-agent proxy, a vncdotool viewer that stays connected across the
switch, and a real qemu-ga per core (host-run, ``-m unix-listen``: the agent is not migrated with the guest, so
one instance per core models "the agent on the destination").

Every process is ended by its pid, every wait has a timeout, run dirs are short mkdtemp dirs under /tmp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, kill_pid, pid_alive, wait_for
from guestlib import TEXT_BOXES, crop, is_demo_text_screen, text_row
from PIL import Image, ImageChops
from test_client import client_pids
from vnclib import ROOT, VncClientProcess, free_port

from clients.agent.cli import AgentCliError, ProxyClient

QEMU_GA = shutil.which("qemu-ga") or "/usr/bin/qemu-ga"
pytestmark = pytest.mark.skipif(not Path(QEMU_GA).exists(), reason="needs qemu-ga")


# --- helpers ---------------------------------------------------------------------------------------------------


def vmfront(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfront", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def screendump(name: str, run_dir: Path, path: Path) -> Image.Image:
    result = vmfront("screendump", name, str(path), "--run-dir", str(run_dir), timeout=20)
    assert result.returncode == 0, result.stderr
    return Image.open(path).convert("RGB")


class Qga:
    """A host-run qemu-ga on a unix socket (what the guest's agent would be)."""

    def __init__(self, root: Path, name: str) -> None:
        self.sock = root / f"{name}.qga"
        self.state_dir = root / f"{name}.qga.d"
        self.state_dir.mkdir()
        self.proc = subprocess.Popen([QEMU_GA, "-m", "unix-listen", "-p", str(self.sock), "-t", str(self.state_dir)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None, 10, "qemu-ga's socket")
        assert self.proc.poll() is None, "qemu-ga exited at start"

    def stop(self) -> None:
        kill_pid(self.proc.pid)
        self.proc.wait(timeout=10)


_VIEWER_SCRIPT = r"""
import sys
from vncdotool import api, rfb
from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

class Client(VNCDoToolClient):
    encoding = rfb.Encoding.RAW

class Factory(VNCDoToolFactory):
    protocol = Client

c = api.connect(sys.argv[1], factory_class=Factory, timeout=20)
try:
    c.pause(0)  # connected: the protocol (and its TCP transport) exists
    print("port", c.protocol.transport.getHost().port, flush=True)
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        if verb == "capture":
            c.captureScreen(arg)
        elif verb == "keys":
            for ch in arg:
                c.keyPress(ch)
        elif verb == "quit":
            break
        print("ok", c.protocol.transport.getHost().port, flush=True)
finally:
    c.disconnect()
    api.shutdown()
"""


class Viewer:
    """vncdotool in a subprocess that keeps one connection open and obeys line commands on its stdin."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _VIEWER_SCRIPT, f"127.0.0.1::{port}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.local_port = int(self._answer("port", 25))

    def _answer(self, expected: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not result or not result[0].startswith(expected + " "):
            self.stop()
            raise AssertionError(f"vncdotool viewer: no {expected!r} within {timeout} s; got {result!r}; "
                                 f"stderr: {self.proc.stderr.read() if self.proc.stderr else ''}"[-3000:])
        return result[0].split()[1]

    def command(self, line: str, timeout: float = 20) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        port = int(self._answer("ok", timeout))
        assert port == self.local_port, "the viewer's TCP connection changed"

    def capture(self, path: Path) -> Image.Image:
        self.command(f"capture {path}")
        return Image.open(path).convert("RGB")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with_stdin = self.proc.stdin
            try:
                if with_stdin is not None:
                    with_stdin.write("quit\n")
                    with_stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait(timeout=10)


class RawViewer:
    """A minimal RFB viewer on a blocking socket (RFB 3.8, no authentication, Raw only, no DesktopSize), whose
    messages a thread reads (``_run``, in subclasses)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.ended: str | None = None
        assert self._take(12).startswith(b"RFB ")
        self.sock.sendall(b"RFB 003.008\n")
        assert 1 in self._take(self._take(1)[0])
        self.sock.sendall(b"\x01")
        assert self._take(4) == b"\0\0\0\0"
        self.sock.sendall(b"\x01")
        self.width, self.height = struct.unpack(">HH", self._take(4))
        self._take(16)
        self._take(struct.unpack(">I", self._take(4))[0])
        self.sock.sendall(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: Raw only
        self._started()
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._reading, daemon=True)
        self.thread.start()

    def _started(self) -> None:
        """After the handshake, before the reading thread starts."""

    def _take(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the server closed the connection")
            data += chunk
        return data

    def _reading(self) -> None:
        try:
            self._run()
        except (OSError, EOFError, AssertionError) as exc:
            self.ended = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


class PlainViewer(RawViewer):
    """A viewer that cannot resize: it keeps an incremental request outstanding and notes when each update
    arrived and what ended it."""

    def __init__(self, port: int) -> None:
        self.updates: list[float] = []
        super().__init__(port)

    def _started(self) -> None:
        self.sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, self.width, self.height))

    def _run(self) -> None:
        while True:
            kind = self._take(1)[0]
            if kind == 2:
                continue
            assert kind == 0, f"server message {kind}"
            (count,) = struct.unpack(">xH", self._take(3))
            for _ in range(count):
                _, _, w, h, enc = struct.unpack(">HHHHi", self._take(12))
                assert enc == 0, f"encoding {enc}"
                self._take(w * h * 4)
            self.updates.append(time.monotonic())
            self.sock.sendall(struct.pack(">BBHHHH", 3, 1, 0, 0, self.width, self.height))


@dataclass
class Pair:
    root: Path
    src: CoreProcess
    dst: CoreProcess
    qga: dict[str, Qga] = field(default_factory=dict)
    qemu_pids: list[int] = field(default_factory=list)

    @property
    def src_run(self) -> Path:
        return self.src.run_dir

    @property
    def dst_run(self) -> Path:
        return self.dst.run_dir


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A source core running the demo guest (booted) and a destination core waiting with --incoming auto,
    each with its own qemu-ga."""
    with Fleet() as fleet:
        root = fleet.root
        qgas = {name: fleet.add(Qga(root, name)) for name in ("src", "dst")}
        src = fleet.core("src", "--agent-socket", str(qgas["src"].sock))
        dst = fleet.core("dst", "--incoming", "auto", "--agent-socket", str(qgas["dst"].sock))
        wait_for(lambda: is_demo_text_screen(screendump("src", root / "src", root / "boot.png")), 30,
                 "the demo guest to boot")
        yield Pair(root, src, dst, qgas, [src.qemu_pid, dst.qemu_pid])


def start_migrate(pair: Pair) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmfront", "migrate", "src", "--run-dir", str(pair.src_run),
                             "--to", "dst", "--dest-run-dir", str(pair.dst_run), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_migration_status(watcher: RawQmpPeer, wanted: set[str], within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        watcher.sock.settimeout(max(0.1, deadline - time.monotonic()))
        message = watcher.recv()
        if message.get("event") == "MIGRATION" and message["data"]["status"] in wanted:
            return str(message["data"]["status"])
        assert time.monotonic() < deadline, f"no MIGRATION event in {wanted} within {within} s"


def set_bandwidth(peer: RawQmpPeer, bytes_per_s: int) -> None:
    reply = peer.execute("migrate-set-parameters", arguments={"max-bandwidth": bytes_per_s})
    assert reply == {"return": {}}, reply


def agent_call(run_dir: Path, command: str, *, wait: bool, timeout: float = 20) -> tuple[str, Any]:
    """('ok', value) or (error class, desc), through the client's agent proxy."""
    try:
        with ProxyClient(run_dir / "agent.sock", wait=wait, timeout=timeout) as proxy:
            return "ok", proxy.call(command)
    except AgentCliError as exc:
        return exc.error_class, exc.desc


def agent_pid(run_dir: Path) -> int:
    """The pid of the qemu-ga answering: the parent of a shell it execs."""
    result = vmfront("agent", "src", "--run-dir", str(run_dir), "--timeout", "10", "exec", "--", "/bin/sh", "-c",
                     "echo $PPID")
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def viewer_shows_the_running_guest(viewer: Viewer, qmp: RawQmpPeer, vm: str, run_dir: Path, scratch: Path,
                                   keys: str, keys_row: str) -> None:
    """The viewer's captures keep changing (the guest's counter runs), the keys it types reach the guest (its
    KEYS row, read from guest memory, becomes ``keys_row``), and with the guest paused a capture equals the
    core's screendump."""
    first = viewer.capture(scratch / "after-1.png")
    wait_for(lambda: crop(viewer.capture(scratch / "after-2.png"), TEXT_BOXES["counter"])
             != crop(first, TEXT_BOXES["counter"]), 10, f"the viewer's counter to change ({vm})")
    viewer.command(f"keys {keys}")
    wait_for(lambda: text_row(qmp, 4, scratch) == keys_row, 10, f"the keys on {vm}")
    assert "return" in qmp.execute("stop")
    time.sleep(0.5)
    capture = viewer.capture(scratch / "paused.png")
    dump = screendump(vm, run_dir, scratch / f"{vm}.png")
    assert capture.size == dump.size
    assert ImageChops.difference(capture, dump).getbbox() is None
    assert "return" in qmp.execute("cont")


# --- the tests -------------------------------------------------------------------------------------------------


def test_viewer_keys_and_agent_follow_the_guest(pair: Pair) -> None:
    scratch = pair.root
    port = free_port()
    client = VncClientProcess(pair.src_run, "src", port)
    viewer: Viewer | None = None
    plain: PlainViewer | None = None
    watcher = RawQmpPeer(pair.src.qmp_socket).negotiate()
    migrate: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: (pair.src_run / "agent.sock").exists(), 15, "the client's agent proxy")
        assert agent_pid(pair.src_run) == pair.qga["src"].proc.pid
        viewer = Viewer(port)
        plain = PlainViewer(port)
        viewer.command("keys a")
        before = viewer.capture(scratch / "before.png")
        assert before.size == (720, 400)

        # A slow migration (the bandwidth capped on the source), so agent calls surely meet it in flight.
        set_bandwidth(watcher, 256 << 10)
        migrate = start_migrate(pair)
        wait_migration_status(watcher, {"active"}, 20)
        busy = time.monotonic() + 10
        outcome = agent_call(pair.src_run, "guest-ping", wait=False)
        while outcome[0] == "ok":  # until the client heard "Migrating" from the core
            assert time.monotonic() < busy, "a --no-wait agent call never failed busy during the migration"
            time.sleep(0.05)
            outcome = agent_call(pair.src_run, "guest-ping", wait=False)
        assert outcome[0] == "AgentBusy" and "migrating" in outcome[1], outcome
        # A waiting call, made while the guest migrates, is answered once it is over (by the destination's agent).
        waited: list[tuple[str, Any]] = []
        waiter = threading.Thread(target=lambda: waited.append(agent_call(pair.src_run, "guest-info", wait=True)),
                                  daemon=True)
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not waited, \
            f"a waiting agent call did not wait: {str(waited)[:200]}; {client.text()[-3000:]}"
        set_bandwidth(watcher, 1 << 34)  # lift the cap: let it finish
        assert wait_migration_status(watcher, {"completed", "failed", "cancelled"}, 30) == "completed"
        _, err = migrate.communicate(timeout=30)
        assert migrate.returncode == 0, err
        waiter.join(25)
        assert waited and waited[0][0] == "ok" and "version" in waited[0][1], waited

        wait_for(lambda: client.pid in client_pids(pair.dst), 15, "the client to follow the guest")
        shm = pair.dst.state()["display"]["shm"]
        wait_for(lambda: f"display: mapped {shm} read-only" in client.text(), 10, "the client to map the new display")
        assert pair.dst.state()["state"] == "running"

        # The viewer never reconnected: same TCP connection (checked on every command), one connection logged.
        peer = f"viewer 127.0.0.1:{viewer.local_port}"
        assert client.text().count(f"{peer}: connection") == 1 and f"{peer} gone" not in client.text()
        # The guest's mode did not change: no viewer was resized, and one that cannot resize was not closed.
        assert "resized to" not in client.text() and "cannot resize" not in client.text(), client.text()[-4000:]
        switched = time.monotonic()
        wait_for(lambda: plain.ended or (plain.updates and plain.updates[-1] > switched + 0.5), 10,
                 "updates to the viewer that cannot resize")
        assert plain.ended is None, plain.ended
        # The viewer shows the guest running on the destination, and its keys reach it there.
        dst_qmp = RawQmpPeer(pair.dst.qmp_socket).negotiate()
        try:
            viewer_shows_the_running_guest(viewer, dst_qmp, "dst", pair.dst_run, scratch, "bc", "KEYS: abc")
        finally:
            dst_qmp.close()

        # Agent calls now work, and it is the destination's qemu-ga that answers.
        assert agent_call(pair.src_run, "guest-ping", wait=False) == ("ok", {})
        assert agent_pid(pair.src_run) == pair.qga["dst"].proc.pid
        assert client.proc.poll() is None
    finally:
        if migrate is not None and migrate.poll() is None:
            migrate.kill()
            migrate.wait(timeout=10)
        watcher.close()
        if viewer is not None:
            viewer.stop()
        if plain is not None:
            plain.close()
        client.stop()


def test_destination_dies_mid_way(pair: Pair) -> None:
    scratch = pair.root
    port = free_port()
    client = VncClientProcess(pair.src_run, "src", port)
    viewer: Viewer | None = None
    watcher = RawQmpPeer(pair.src.qmp_socket).negotiate()
    migrate: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: client.pid in client_pids(pair.src), 15, "the client to attach")
        wait_for(lambda: (pair.src_run / "agent.sock").exists(), 15, "the client's agent proxy")
        viewer = Viewer(port)
        viewer.capture(scratch / "before.png")
        set_bandwidth(watcher, 128 << 10)  # 128 KiB/s: seconds for the guest's non-zero RAM
        migrate = start_migrate(pair)
        wait_migration_status(watcher, {"active"}, 20)

        def transferred() -> bool:
            info = watcher.execute("query-migrate")["return"]
            return bool(info.get("ram", {}).get("transferred", 0) > (64 << 10))

        wait_for(transferred, 10, "the migration to be under way")
        dst_qemu = pair.dst.qemu_pid
        os.kill(dst_qemu, signal.SIGKILL)
        wait_for(lambda: not pid_alive(dst_qemu), 10, "the destination QEMU to die")

        _, err = migrate.communicate(timeout=30)
        assert migrate.returncode == 1, err
        assert "vmfront migrate: error: migration failed" in err, err
        # The source QEMU runs the guest, its core says so, the client stays attached to it.
        assert pair.src.proc.poll() is None and pid_alive(pair.qemu_pids[0])
        assert watcher.execute("query-status")["return"]["status"] == "running"
        wait_for(lambda: pair.src.state()["state"] == "running", 10, "the source core to report running")
        assert client.proc.poll() is None and client.pid in client_pids(pair.src)
        assert "guest migrated" not in client.text()
        # The viewer on the same connection keeps getting a running screen equal to the source's.
        viewer_shows_the_running_guest(viewer, watcher, "src", pair.src_run, scratch, "z", "KEYS: z")
        peer = f"viewer 127.0.0.1:{viewer.local_port}"
        assert client.text().count(f"{peer}: connection") == 1 and f"{peer} gone" not in client.text()
        # Agent calls work again (no lingering "migrating"), answered by the source's agent.
        assert agent_call(pair.src_run, "guest-ping", wait=False, timeout=10) == ("ok", {})
        assert agent_pid(pair.src_run) == pair.qga["src"].proc.pid
    finally:
        if migrate is not None and migrate.poll() is None:
            migrate.kill()
            migrate.wait(timeout=10)
        watcher.close()
        if viewer is not None:
            viewer.stop()
        client.stop()



class CutTextViewer(RawViewer):
    """A viewer for the clipboard (legacy cut text, Latin-1): it pastes with ClientCutText and collects every
    ServerCutText; it asks for no updates."""

    def __init__(self, port: int) -> None:
        self.received: list[str] = []
        super().__init__(port)

    def paste(self, text: str) -> None:
        data = text.encode("latin-1")
        self.sock.sendall(struct.pack(">BxxxI", 6, len(data)) + data)

    def _run(self) -> None:
        while True:
            kind = self._take(1)[0]
            if kind == 3:
                (length,) = struct.unpack(">xxxI", self._take(7))
                self.received.append(self._take(length).decode("latin-1"))
            elif kind != 2:  # a bell is all else a viewer that asks for nothing may get
                raise AssertionError(f"server message {kind}")


def test_a_paste_during_migration_waits_for_the_destination(pair: Pair) -> None:
    """A viewer pastes while the guest migrates: the source core never takes it (QEMU's vdagent state does not
    travel); the client holds it, follows the guest and pastes into the destination's QEMU, whose core tells the
    other viewers. (No vdagent here: QEMU 7.2 cannot migrate one, and the paste's way through QEMU's clipboard is
    the same without it.)"""
    port = free_port()
    client = VncClientProcess(pair.src_run, "src", port)
    pasting: CutTextViewer | None = None
    other: CutTextViewer | None = None
    watcher = RawQmpPeer(pair.src.qmp_socket).negotiate()
    migrate: subprocess.Popen[str] | None = None
    text = "pasted while migrating"
    try:
        pasting, other = CutTextViewer(port), CutTextViewer(port)
        set_bandwidth(watcher, 256 << 10)
        migrate = start_migrate(pair)
        wait_migration_status(watcher, {"active"}, 20)
        wait_for(lambda: "guest migrating: pastes wait" in client.text(), 10, "the client to hear of the migration")
        pasting.paste(text)
        time.sleep(1.0)
        assert "set the guest clipboard" not in pair.src.stderr(), pair.src.stderr()[-3000:]
        assert not other.received, other.received

        set_bandwidth(watcher, 1 << 34)
        assert wait_migration_status(watcher, {"completed", "failed", "cancelled"}, 30) == "completed"
        _, err = migrate.communicate(timeout=30)
        assert migrate.returncode == 0, err
        wait_for(lambda: f"pasted {len(text)} characters into the guest clipboard" in client.text(), 30,
                 "the paste to reach the destination")
        assert f"set the guest clipboard ({len(text)} characters)" in pair.dst.stderr(), pair.dst.stderr()[-3000:]
        assert "set the guest clipboard" not in pair.src.stderr()
        wait_for(lambda: text in other.received, 10, "the other viewer to get the paste")
        assert text not in pasting.received  # its clipboard holds it already
        assert pasting.ended is None and other.ended is None, (pasting.ended, other.ended)
        assert "did not reach the guest" not in client.text()
    finally:
        if migrate is not None and migrate.poll() is None:
            migrate.kill()
            migrate.wait(timeout=10)
        watcher.close()
        for viewer in (pasting, other):
            if viewer is not None:
                viewer.close()
        client.stop()
