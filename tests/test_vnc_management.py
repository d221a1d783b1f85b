"""VNC's whole contract with the VNC server in the client: QMP's query-vnc*, set_password, expire_password and
change-vnc-password answered by the core, the VNC_* events, the monitor's VNC commands, the credentials held by
the core across client restarts, and QEMU's connection policy (share flag, connection limit) plus a handshake
deadline and a backoff on failed passwords. Real core, QEMU and demo guest; real viewers (vncdotool, TigerVNC
and remote-viewer under Xvfb); a scripted RFB handshake where a viewer must misbehave on cue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, core_command, kill_pid, wait_for
from test_monitor import Monitor
from vnclib import (
    VncClientProcess,
    closed_by_server,
    end_process,
    free_port,
    screenshot,
    vnc_login,
    vnc_password_file,
    vncdo,
    vncdo_refused,
    xvfb,
)

VM = "vm-mgmt"


class EventLog:
    """A QMP peer on the management socket that keeps every event it is sent (read on demand)."""

    def __init__(self, path: Path) -> None:
        self.peer = RawQmpPeer(path).negotiate()
        self.events: list[dict[str, Any]] = []

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.peer.send({"execute": command, **({"arguments": arguments} if arguments else {})})
        while True:
            message = self.peer.recv()
            if "event" not in message:
                return message
            self.events.append(message)

    def drain(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Every event until none came for ``quiet`` seconds."""
        self.peer.sock.settimeout(quiet)
        try:
            while True:
                self.events.append(self.peer.recv())
        except TimeoutError:
            pass
        finally:
            self.peer.sock.settimeout(10)
        return self.events

    def vnc(self, port: int | None = None) -> list[tuple[str, str]]:
        """(event, viewer port) of the VNC events so far (of viewers of listener ``port``, if given)."""
        self.drain()
        return [(e["event"], e["data"]["client"]["service"]) for e in self.events
                if e["event"].startswith("VNC_") and (port is None or e["data"]["server"]["service"] == str(port))]

    def wait_vnc(self, wanted: list[tuple[str, str]], port: int, within: float = 10.0) -> None:
        wait_for(lambda: all(w in self.vnc(port) for w in wanted), within, f"events {wanted}")

    def close(self) -> None:
        self.peer.close()


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert "return" in reply, reply
    return reply


#: What a refused viewer is told: QEMU's words, or the backoff's (failures in a row from one address).
REFUSALS = ("Authentication failed", "Too many authentication failures, try again later")


def refused(port: int, password: str | None = None) -> bool:
    return vnc_login(port, password)[0] in REFUSALS


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with Fleet() as running:
        yield running


def start_client(fleet: Fleet, core: CoreProcess, port: int, *extra: str) -> VncClientProcess:
    return fleet.add(VncClientProcess(core.run_dir, VM, port, *extra))


def test_the_core_answers_vnc_management_and_holds_the_password(fleet: Fleet) -> None:
    core = fleet.core(VM)
    port = free_port()
    mon_path = core.run_dir / "mon.sock"
    client = start_client(fleet, core, port, "--monitor", f"unix:{mon_path}")
    qmp = fleet.add(EventLog(core.qmp_socket))

    # query-vnc and query-vnc-servers: the client's TCP listener, and the viewers connected to it.
    sock = fleet.add(vnc_login(port)[1] or pytest.fail("no login"))
    viewer_port = str(sock.getsockname()[1])
    wait_for(lambda: qmp.execute("query-vnc")["return"]["clients"], 10, "the viewer to show in query-vnc")
    info = ok(qmp.execute("query-vnc"))["return"]
    assert info == {"enabled": True, "host": "127.0.0.1", "service": str(port), "family": "ipv4", "auth": "none",
                    "clients": [{"host": "127.0.0.1", "service": viewer_port, "family": "ipv4",
                                 "websocket": False}]}
    servers = ok(qmp.execute("query-vnc-servers"))["return"]
    assert servers == [{"id": "default", "auth": "none",
                        "server": [{"host": "127.0.0.1", "service": str(port), "family": "ipv4",
                                    "websocket": False, "auth": "none"}],
                        "clients": info["clients"]}]
    sock.close()
    qmp.wait_vnc([("VNC_DISCONNECTED", viewer_port)], port)

    # A real viewer's session is three events with QEMU's data, about the client's listener.
    qmp.events.clear()
    vncdo(port)
    wait_for(lambda: [e for e, _ in qmp.vnc()] == ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"], 10,
             "a vncdotool session's three events")
    connected, initialized, disconnected = (e for e in qmp.events if e["event"].startswith("VNC_"))
    server = {"host": "127.0.0.1", "service": str(port), "family": "ipv4", "websocket": False, "auth": "none"}
    assert connected["data"]["server"] == server and initialized["data"]["server"] == server
    assert connected["data"]["client"] == disconnected["data"]["client"]
    assert set(connected["data"]["client"]) == {"host", "service", "family", "websocket"}
    assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in (connected, initialized, disconnected))

    # set_password turns VNC authentication on: vncdotool without it is refused, with it gets in.
    ok(qmp.execute("set_password", protocol="vnc", password="s3cret"))
    assert ok(qmp.execute("query-vnc"))["return"]["auth"] == "vnc"
    qmp.events.clear()
    assert vncdo_refused(port)
    assert refused(port)
    events = [e for e, _ in qmp.vnc()]
    assert "VNC_CONNECTED" in events and "VNC_INITIALIZED" not in events, events
    vncdo(port, password="s3cret")

    # kill -9 the client: the core says its viewer left, and the password holds for the next client.
    held = fleet.add(vnc_login(port, "s3cret")[1] or pytest.fail("no login"))
    held_port = str(held.getsockname()[1])
    qmp.wait_vnc([("VNC_INITIALIZED", held_port)], port)
    client.proc.send_signal(signal.SIGKILL)
    client.proc.wait(timeout=10)
    qmp.wait_vnc([("VNC_DISCONNECTED", held_port)], port)
    client = start_client(fleet, core, port, "--monitor", f"unix:{mon_path}")
    assert refused(port)
    assert vncdo_refused(port)
    vncdo(port, password="s3cret")

    # expire_password now locks it out (QEMU checks the expiry when a viewer authenticates).
    ok(qmp.execute("expire_password", protocol="vnc", time="now"))
    assert refused(port, "s3cret")
    assert "doesn't take value" in qmp.execute("expire_password", protocol="vnc", time="soon")["error"]["desc"]

    # The monitor: QEMU's HMP commands act on this VNC (the expiry stays until changed, as in QEMU).
    mon = fleet.add(Monitor(mon_path))
    assert mon.cmd("change vnc password N3w") == ""
    assert refused(port, "N3w"), "expired passwords stay expired"
    assert mon.cmd("expire_password vnc never") == ""
    time.sleep(3.1)  # in case the failures above made this address wait (see the backoff test)
    assert vnc_login(port, "N3w")[0] == "ok"
    assert refused(port, "s3cret")
    assert mon.cmd("set_password vnc An0ther keep") == ""
    assert "Invalid parameter 'connected'" in mon.cmd("set_password vnc x disconnect")
    assert "denied by vmfront policy" in mon.cmd("set_password spice x")
    text = mon.cmd("info vnc").replace("\r\n", "\n")
    assert f"default:\n  Server: 127.0.0.1:{port} (ipv4)\n    Auth: vnc (Sub: none)\n" in text, text
    assert "vnc.sock" not in text
    vncdo(port, password="An0ther")
    assert [e for e in qmp.vnc() if "vnc.sock" in json.dumps(e)] == []


def test_qemus_own_vnc_events_never_reach_peers(tmp_path: Path) -> None:
    """The capture connection's VNC_CONNECTED/VNC_INITIALIZED come while the core starts: a peer already connected
    then (the service manager's socket, negotiated before the core listens) must not see them."""
    path = Path(os.path.realpath(tmp_path)) / "q.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp path too long for a unix socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    early.connect(str(path))
    early.sendall(b'{"execute": "qmp_capabilities", "id": 1}\n')
    run = tmp_path / "run"
    read_fd, write_fd = os.pipe()
    fd = listener.fileno()
    script = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=qmp exec "$@"'
    proc = subprocess.Popen(["/bin/bash", "-c", script, "bash", *core_command(VM, run, "--ready-fd", str(write_fd))],
                            pass_fds=(write_fd, fd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "core.log").open("wb"))
    os.close(write_fd)
    listener.close()
    qemu_pid = None
    try:
        assert os.read(read_fd, 4096).startswith(b"READY"), (tmp_path / "core.log").read_text()
        qemu_pid = json.loads((run / "state.json").read_text())["qemu_pid"]
        early.settimeout(3)
        received = b""
        try:
            while chunk := early.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        lines = [json.loads(line) for line in received.splitlines()]
        assert {"return": {}, "id": 1} in lines, lines  # negotiated before the capture started
        assert [m for m in lines if str(m.get("event", "")).startswith("VNC_")] == []
        assert "display: shm" in (tmp_path / "core.log").read_text()
    finally:
        os.close(read_fd)
        early.close()
        end_process(proc)
        kill_pid(qemu_pid)


def test_three_hundred_idle_connections_do_not_lock_a_viewer_out(fleet: Fleet) -> None:
    """QEMU's policy (the oldest connection still in its handshake makes room), and a deadline QEMU lacks."""
    core = fleet.core(VM)
    port = free_port()
    client = start_client(fleet, core, port, "--vnc-handshake-timeout", "4")
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        vncdo(port, capture=core.run_dir.parent / "seen.png")  # a real viewer gets in meanwhile
        assert (core.run_dir.parent / "seen.png").stat().st_size > 0
        # Evicted or timed out: every idle connection is closed by the server, none lingers.
        started = time.monotonic()
        still_open = [s for s in idle if not closed_by_server(s, within=max(0.1, 30 - (time.monotonic() - started)))]
        assert still_open == [], f"{len(still_open)} idle connections still open"
        text = client.text()
        assert "closed to make room" in text and "no handshake within 4 s" in text
    finally:
        for sock in idle:
            sock.close()
    assert client.proc.poll() is None


def test_share_policies(fleet: Fleet) -> None:
    core = fleet.core(VM)
    port = free_port()
    start_client(fleet, core, port)  # allow-exclusive, QEMU's default
    shared = fleet.add(vnc_login(port)[1] or pytest.fail("no login"))
    status, exclusive = vnc_login(port, shared=False)
    assert status == "ok" and exclusive is not None
    fleet.add(exclusive)
    assert closed_by_server(shared), "an exclusive viewer disconnects the others"
    assert vnc_login(port)[0].startswith("closed"), "a shared viewer is refused while it is there (at ClientInit)"
    exclusive.close()
    # Connections still in their handshake are not "others": an exclusive viewer leaves them be (as QEMU).
    waiting = fleet.add(socket.create_connection(("127.0.0.1", port), timeout=10))
    again = fleet.add(vnc_login(port, shared=False)[1] or pytest.fail("no login"))
    assert not closed_by_server(waiting, within=0.5) and not closed_by_server(again, within=0.2)
    again.close()

    forced = free_port()
    start_client(fleet, core, forced, "--vnc-share", "force-shared")
    assert vnc_login(forced, shared=False)[0].startswith("closed")
    first = fleet.add(vnc_login(forced)[1] or pytest.fail("no login"))
    assert not closed_by_server(first, within=1)

    ignoring = free_port()
    start_client(fleet, core, ignoring, "--vnc-share", "ignore")
    one = fleet.add(vnc_login(ignoring)[1] or pytest.fail("no login"))
    two = fleet.add(vnc_login(ignoring, shared=False)[1] or pytest.fail("no login"))
    assert not closed_by_server(one, within=1) and not closed_by_server(two, within=0.2)
    # Three clients: query-vnc-servers shows each one's listener.
    qmp = fleet.add(EventLog(core.qmp_socket))
    ids = [(s["id"], s["server"][0]["service"]) for s in ok(qmp.execute("query-vnc-servers"))["return"]]
    assert [service for _, service in ids] == [str(port), str(forced), str(ignoring)] and ids[0][0] == "default"


def test_failed_passwords_back_off_per_address(tmp_path: Path, fleet: Fleet) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    core = fleet.core(VM, "--vnc-password-file", str(tmp_path / "pw"))
    port = free_port()
    start_client(fleet, core, port)
    assert [vnc_login(port, "guess")[0] for _ in range(3)] == ["Authentication failed"] * 3
    refused = vnc_login(port, "s3cret")[0]
    assert refused == "Too many authentication failures, try again later", "even the right one waits"
    time.sleep(2.1)  # the third failure and the refused try: 1 s, then 2 s
    assert vnc_login(port, "s3cret")[0] == "ok"
    assert vnc_login(port, "s3cret")[0] == "ok", "a success forgets the failures"


# --- real viewers under Xvfb -------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("remote-viewer") is None or shutil.which("Xvfb") is None,
                    reason="needs virt-viewer and xvfb")
def test_remote_viewer_and_tigervnc_under_xvfb(tmp_path: Path, fleet: Fleet) -> None:
    """remote-viewer (gtk-vnc, as virt-manager users have) asks for exclusive use: with QEMU's default policy the
    viewers before it are disconnected, and it shows the guest. TigerVNC authenticates with the core's password."""
    (tmp_path / "pw").write_text("s3cret\n")
    core = fleet.core(VM, "--vnc-password-file", str(tmp_path / "pw"))
    port = free_port()
    client = start_client(fleet, core, port)
    with xvfb() as display:
        env = {"DISPLAY": display, "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path)}
        tiger = fleet.add(subprocess.Popen(
            ["vncviewer", "-passwd", str(vnc_password_file("s3cret", tmp_path / "passwd")), "-Shared=1",
             f"127.0.0.1::{port}"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        wait_for(lambda: "security type 2" in client.text() and "(RFB 3.8, shared," in client.text(), 20,
                 "TigerVNC to authenticate")
        (tmp_path / "vv").write_text(f"[virt-viewer]\ntype=vnc\nhost=127.0.0.1\nport={port}\npassword=s3cret\n")
        remote = fleet.add(subprocess.Popen(["remote-viewer", str(tmp_path / "vv")], env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=(tmp_path / "rv.log").open("wb")))
        wait_for(lambda: "(RFB 3.8, exclusive," in client.text(), 30, "remote-viewer to connect (exclusive)")
        wait_for(lambda: "another viewer asked for exclusive use" in client.text(), 10,
                 "TigerVNC to be disconnected, as QEMU does")

        def shows_the_guest() -> bool:
            screenshot(display, tmp_path / "screen.png")
            from PIL import Image

            with Image.open(tmp_path / "screen.png") as image:
                return len(image.convert("RGB").getcolors(1 << 20) or []) > 3

        wait_for(shows_the_guest, 20, "remote-viewer's window to show the guest")
        assert remote.poll() is None, (tmp_path / "rv.log").read_text()
        end_process(remote)
        end_process(tiger)
