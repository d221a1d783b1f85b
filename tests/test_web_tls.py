"""The web console over HTTPS (``--web-tls-creds``), against a real core, QEMU and demo guest, with OpenSSL
(Python's ssl, as a browser's TLS would) checking the certificate against a test CA made by the ``openssl``
command: pages and the noVNC WebSocket (wss://) are served in TLS only, the token cookie is ``Secure``, SIGHUP
swaps the certificate for new handshakes, a key readable by others is refused at start, and a console off
loopback without TLS is reported as unsafe. Floods of silent connections against the web console and the two
WebSocket ports the ``websockets`` package serves (a client's ``--websocket``, the fleet's router) leave the
client a bounded number of descriptors and an open viewer its session.

Every process started here is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, RawQmpPeer, client_command, fd_count, running_core, wait_demo_booted, wait_for
from fleetlib import FleetClientProcess, endpoints, write_tokens
from tlslib import Ca, fingerprint, make_ca, pem_fingerprint, server_creds
from vnclib import ROOT, VncClientProcess, closed_by_server, free_port
from websockets.sync.client import ClientConnection, connect

from clients.tokens import TokenFile
from clients.vnc.service import MAX_WEBSOCKET_CONNECTIONS, parse_listen
from clients.vnc.websocket_router import MAX_CONNECTIONS as ROUTER_CONNECTIONS
from clients.vnc.websocket_router import MAX_HANDSHAKES as ROUTER_HANDSHAKES
from clients.web.server import MAX_CONNECTIONS, TLS_HANDSHAKE_TIMEOUT_S, VmView, WebServer

VM = "wt"
TOKEN = "W" * 32


@pytest.fixture(scope="module")
def core() -> Iterator[CoreProcess]:
    with running_core(VM) as running:
        wait_demo_booted(running)  # so its mode no longer changes: a viewer below does not take DesktopSize
        yield running


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return make_ca(tmp_path_factory.mktemp("ca"))


def trusting(ca: Ca) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


def served_certificate(port: int, ca: Ca) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            trusting(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return fingerprint(der)


def get(port: int, ca: Ca, path: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=trusting(ca))
    connection.request("GET", path)
    return connection.getresponse()


def test_pages_and_console_in_tls_only(core: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds", "first")
    tokens = write_tokens(tmp_path / "tokens", {TOKEN: VM})
    web = free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--web", f"127.0.0.1:{web}", "--web-tls-creds",
                              str(creds), "--websocket-tokens", str(tokens))
    peer = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        assert core.state()["clients"][0]["endpoints"]["web"] == f"https://127.0.0.1:{web}/"
        assert served_certificate(web, ca) == pem_fingerprint(creds / "server-cert.pem")

        # A link with the token: the cookie it becomes is Secure (never sent over plain HTTP) and HttpOnly.
        response = get(web, ca, f"/?token={TOKEN}")
        assert response.status == 303
        cookie = response.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie, cookie
        page = get(web, ca, f"/vm/{VM}/screen.png?token={TOKEN}&width=320")
        assert page.status == 303  # the same: into the cookie first
        response = get(web, ca, "/")
        assert response.status == 401  # no token, no page, in TLS too

        # Plain HTTP to the port gets no page: the TLS server drops what is not a TLS handshake.
        plain = http.client.HTTPConnection("127.0.0.1", web, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("GET", f"/?token={TOKEN}")
            plain.getresponse()
        plain.close()

        # noVNC's path: VNC over wss://, from this site's origin. The core lists the port as the VM's
        # WebSocket VNC server, with the viewer.
        with connect(f"wss://127.0.0.1:{web}/vnc/{VM}?token={TOKEN}", ssl=trusting(ca), subprotocols=["binary"],
                     origin=f"https://127.0.0.1:{web}", open_timeout=10) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
            servers = peer.execute("query-vnc-servers")["return"]
            assert {"host": "127.0.0.1", "service": str(web), "family": "ipv4", "websocket": True,
                    "auth": "none"} in servers[0]["server"], servers
            wait_for(lambda: any(c["websocket"] for c in peer.execute("query-vnc")["return"]["clients"]), 10,
                     "the wss viewer in query-vnc")
    finally:
        peer.close()
        client.stop()


def test_sighup_swaps_the_certificate_and_a_broken_renewal_keeps_the_last(core: CoreProcess, ca: Ca,
                                                                          tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds", "first")
    web = free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--web", f"127.0.0.1:{web}", "--web-tls-creds",
                              str(creds))
    try:
        assert served_certificate(web, ca) == pem_fingerprint(creds / "server-cert.pem")
        server_creds(ca, tmp_path / "creds", "second")  # new files in place, as a renewal writes them
        second = pem_fingerprint(creds / "server-cert.pem")
        os.kill(client.pid, signal.SIGHUP)
        wait_for(lambda: client.text().count("web console: TLS with the X.509 credentials") == 2, 10,
                 "the web console to reload")
        assert served_certificate(web, ca) == second
        assert get(web, ca, "/").status == 200  # loopback without tokens: the overview

        (creds / "server-key.pem").chmod(0o644)
        os.kill(client.pid, signal.SIGHUP)
        wait_for(lambda: "web console: TLS credentials not reloaded" in client.text(), 10, "the refused reload")
        assert served_certificate(web, ca) == second
    finally:
        client.stop()


def test_the_fleet_clients_console_in_tls_and_sighup(core: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    """``client --all --web --web-tls-creds``: the same HTTPS; SIGHUP re-reads the certificate (before, it ended
    the fleet client: no handler)."""
    creds = server_creds(ca, tmp_path / "creds", "fleet")
    web = free_port()
    fleet = FleetClientProcess(core.run_dir.parent, "--web", f"127.0.0.1:{web}", "--web-tls-creds", str(creds))
    try:
        fleet.wait_serving([core], within=60)
        name = core.run_dir.name  # a fleet client names each VM by its run directory
        assert endpoints(core)["web"] == f"https://127.0.0.1:{web}/vm/{name}/console"
        overview = get(web, ca, "/api/vms")
        assert overview.status == 200 and f'"{name}"' in overview.read().decode()
        server_creds(ca, tmp_path / "creds", "fleet renewed")
        os.kill(fleet.pid, signal.SIGHUP)
        wait_for(lambda: fleet.text().count("web console: TLS with the X.509 credentials") == 2, 10,
                 "the fleet client to reload")
        assert served_certificate(web, ca) == pem_fingerprint(creds / "server-cert.pem")
        assert fleet.proc.poll() is None
    finally:
        fleet.stop()


def test_the_vnc_certificate_serves_the_console_unless_told_otherwise(core: CoreProcess, ca: Ca,
                                                                     tmp_path: Path) -> None:
    """With VNC in TLS, a web console in the clear would offer its viewers VeNCrypt alone, which no browser can
    do: without ``--web-tls-creds`` it takes the VNC credentials."""
    creds = server_creds(ca, tmp_path / "creds", "vnc and web")
    web = free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--vnc-tls-creds", str(creds), "--web",
                              f"127.0.0.1:{web}")
    try:
        assert served_certificate(web, ca) == pem_fingerprint(creds / "server-cert.pem")
        with connect(f"wss://127.0.0.1:{web}/vnc/{VM}", ssl=trusting(ca), subprotocols=["binary"],
                     origin=f"https://127.0.0.1:{web}", open_timeout=10) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
            ws.send(b"RFB 003.008\n")
            assert ws.recv(timeout=10) == b"\x01\x01"  # inside TLS: RFB's None, not VeNCrypt
    finally:
        client.stop()


class RfbOverWebSocket:
    """Just enough of a viewer over a WebSocket to be one: the handshake (security None), then a full update.
    noVNC in Chromium plays it in test_web.py; here the point is what the server does around it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending = b""

    def read(self, n: int) -> bytes:
        while len(self.pending) < n:
            data = self.ws.recv(timeout=10)
            assert isinstance(data, bytes)
            self.pending += data
        chunk, self.pending = self.pending[:n], self.pending[n:]
        return chunk

    def log_in(self) -> None:
        assert self.read(12) == b"RFB 003.008\n"
        self.ws.send(b"RFB 003.008\n")
        assert self.read(2) == b"\x01\x01"  # one security type: None (inside TLS, or no TLS asked for)
        self.ws.send(b"\x01")
        assert self.read(4) == b"\0\0\0\0"
        self.ws.send(b"\x01")  # ClientInit: shared
        name_length = struct.unpack(">I", self.read(24)[20:24])[0]
        self.read(name_length)

    def full_update(self) -> None:
        self.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 1, 1))
        assert self.read(1) == b"\0"  # FramebufferUpdate


@pytest.mark.slow
def test_a_flood_of_idle_connections_keeps_consoles_and_pages_in(core: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    """A hostile peer opens hundreds of connections that never start their TLS handshake: the client holds at most
    MAX_CONNECTIONS of them (the oldest in their handshake go first), an open console is never the one closed, a
    page still loads, and a lone silent connection is dropped after the TLS deadline."""
    creds = server_creds(ca, tmp_path / "creds")
    web = free_port()
    client = VncClientProcess(core.run_dir, VM, free_port(), "--web", f"127.0.0.1:{web}", "--web-tls-creds",
                              str(creds))
    flood: list[socket.socket] = []
    try:
        baseline, qemu = fd_count(client.pid), core.qemu_pid
        with connect(f"wss://127.0.0.1:{web}/vnc/{VM}", ssl=trusting(ca), subprotocols=["binary"],
                     origin=f"https://127.0.0.1:{web}", open_timeout=10) as ws:
            console = RfbOverWebSocket(ws)
            console.log_in()
            for _ in range(400):
                flood.append(socket.create_connection(("127.0.0.1", web), timeout=10))
            response = get(web, ca, "/api/vms")
            assert response.status == 200 and VM in response.read().decode()
            assert fd_count(client.pid) <= baseline + MAX_CONNECTIONS + 8, fd_count(client.pid)
            console.full_update()  # the console, open before the flood, goes on
        assert sum(closed_by_server(sock, within=0.05) for sock in flood) >= len(flood) - MAX_CONNECTIONS
        for sock in flood:
            sock.close()
        flood.clear()

        silent = socket.create_connection(("127.0.0.1", web), timeout=TLS_HANDSHAKE_TIMEOUT_S + 20)
        flood.append(silent)
        # Dropped by the handshake deadline, not held until the client's limit:
        assert closed_by_server(silent, within=TLS_HANDSHAKE_TIMEOUT_S + 20)
        assert "connection dropped before HTTP" in client.text()
        assert core.qemu_pid == qemu and core.state()["state"] == "running"  # the core supervises the same QEMU
    finally:
        for sock in flood:
            sock.close()
        client.stop()


@pytest.mark.parametrize("kind", ["client --websocket", "fleet router"])
@pytest.mark.slow
def test_a_flood_of_silent_connections_on_a_websocket_port(core: CoreProcess, kind: str, tmp_path: Path) -> None:
    """The same flood against the WebSocket ports the ``websockets`` package serves: the one-VM client's
    ``--websocket`` and the fleet client's router. Their connections stay bounded and an open noVNC-style
    WebSocket viewer goes on."""
    port = free_port()
    if kind == "fleet router":
        proc: VncClientProcess | FleetClientProcess = FleetClientProcess(core.run_dir.parent, "--websocket",
                                                                         f"127.0.0.1:{port}")
        proc.wait_serving([core], within=60)
        url, limit = f"ws://127.0.0.1:{port}/vnc/{core.run_dir.name}", ROUTER_CONNECTIONS + ROUTER_HANDSHAKES
    else:
        proc = VncClientProcess(core.run_dir, VM, free_port(), "--websocket", f"127.0.0.1:{port}")
        url, limit = f"ws://127.0.0.1:{port}/", MAX_WEBSOCKET_CONNECTIONS
    flood: list[socket.socket] = []
    try:
        baseline, qemu = fd_count(proc.pid), core.qemu_pid
        with connect(url, subprotocols=["binary"], open_timeout=10) as ws:
            viewer = RfbOverWebSocket(ws)
            viewer.log_in()
            for _ in range(limit + 150):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            # Well before the WebSocket open timeout (10 s) would close them anyway:
            wait_for(lambda: fd_count(proc.pid) <= baseline + limit + 8, 5, "the client to close the surplus")
            viewer.full_update()  # the viewer, open before the flood, goes on
        assert "to make room" in proc.text()
        assert core.qemu_pid == qemu and core.state()["state"] == "running"  # the core supervises the same QEMU
    finally:
        for sock in flood:
            sock.close()
        proc.stop()


def test_a_key_readable_by_others_is_refused_at_start(core: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds")
    (creds / "server-key.pem").chmod(0o640)
    proc = subprocess.run(client_command(VM, core.run_dir, "--web", f"127.0.0.1:{free_port()}", "--web-tls-creds",
                                         str(creds)), capture_output=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert b"readable by its group or by everyone" in proc.stderr, proc.stderr[-2000:]
    missing = subprocess.run([sys.executable, "-m", "vmfront", "client", "--name", VM, "--web-tls-creds",
                              str(creds)], capture_output=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 2 and b"--web-tls-creds goes with --web" in missing.stderr


class Directory:
    def vms(self) -> list[VmView]:
        return []


def test_off_loopback_without_tls_is_reported_unsafe(tmp_path: Path) -> None:
    tokens = TokenFile(write_tokens(tmp_path / "tokens", {TOKEN: VM}))
    nobody = Directory()
    plain = WebServer(parse_listen("0.0.0.0:0"), nobody, tokens)
    assert plain.warnings() and "in the clear" in plain.warnings()[0]
    assert WebServer(parse_listen("0.0.0.0:0"), nobody, tokens, tls_creds=tmp_path).warnings() == []
    assert WebServer(parse_listen("127.0.0.1:0"), nobody, None).warnings() == []
