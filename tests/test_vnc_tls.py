"""VeNCrypt TLS in the client's VNC server against a real core, QEMU and the demo guest, with real viewers:
TigerVNC (X509Vnc, X509None, an untrusted CA, no client certificate), gtk-vnc's gvncviewer with a client
certificate, certificates swapped by QMP ``display-reload`` and SIGHUP while a viewer stays connected, and hostile
peers (garbage instead of a ClientHello, a stalled handshake, renegotiation, bytes in the clear before TLS).

CAs and certificates are made here with ``openssl`` (tests/tlslib.py). noVNC over ``wss://`` is in test_novnc.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, RawQmpPeer, running_core, screendump, wait_demo_booted, wait_for
from fleetlib import FleetClientProcess, endpoints, vnc_port
from PIL import Image
from test_vnc import Paused, find
from tlslib import (
    Ca,
    fingerprint,
    issue,
    make_ca,
    pem_fingerprint,
    server_creds,
    vencrypt_server_certificate,
    vencrypt_to_tls,
)
from vnclib import (
    ROOT,
    VncClientProcess,
    end_process,
    free_port,
    screenshot,
    vnc_password_file,
    vncdo_refused,
    xvfb,
)
from websockets.sync.client import connect

from clients.vnc.tls import HANDSHAKE_TIMEOUT_S, TlsCredentials, TlsError, TlsSettings, check_key_file

VM = "tl"
VIEWERS = shutil.which("vncviewer") is not None and shutil.which("Xvfb") is not None
needs_tigervnc = pytest.mark.skipif(not VIEWERS, reason="needs tigervnc-viewer and xvfb")


@pytest.fixture(scope="module")
def booted() -> Iterator[CoreProcess]:
    with running_core(VM) as core:
        wait_demo_booted(core)
        yield core


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return make_ca(tmp_path_factory.mktemp("ca"))


def viewer_env(display: str, home: Path) -> dict[str, str]:
    return {"DISPLAY": display, "HOME": str(home), "PATH": "/usr/bin:/bin"}


def tigervnc(display: str, home: Path, port: int, *args: str) -> subprocess.Popen[bytes]:
    log = (home / f"vncviewer-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(["vncviewer", "-AutoSelect=0", "-PreferredEncoding=ZRLE", "-FullColour", *args,
                             f"127.0.0.1::{port}"], env=viewer_env(display, home), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log)


def shows_guest(display: str, tmp_path: Path, dump: Image.Image) -> bool:
    screenshot(display, tmp_path / "screen.png")
    return find(Image.open(tmp_path / "screen.png").convert("RGB"), dump) is not None


# --- TigerVNC ---------------------------------------------------------------------------------------------------


@needs_tigervnc
def test_tigervnc_x509vnc_shows_the_guest(ca: Ca, tmp_path: Path) -> None:
    """The core holds the password (VNC authentication inside TLS is checked by the core, like in the clear)."""
    creds = server_creds(ca, tmp_path / "creds")
    (tmp_path / "pw").write_text("s3cret\n")
    with running_core(VM, "--vnc-password-file", str(tmp_path / "pw")) as core:
        _x509vnc_shows_the_guest(core, creds, ca, tmp_path)


def _x509vnc_shows_the_guest(core: CoreProcess, creds: Path, ca: Ca, tmp_path: Path) -> None:
    wait_demo_booted(core)
    port = free_port()
    proc = VncClientProcess(core.run_dir, VM, port, "--vnc-tls-creds", str(creds))
    viewer: subprocess.Popen[bytes] | None = None
    try:
        with xvfb() as display, Paused(core):
            dump = screendump(core, tmp_path / "dump.png")
            viewer = tigervnc(display, tmp_path, port, "-SecurityTypes", "X509Vnc", "-X509CA", str(ca.cert),
                              "-passwd", str(vnc_password_file("s3cret", tmp_path / "passwd")))
            wait_for(lambda: shows_guest(display, tmp_path, dump), 30, "TigerVNC's window to show the guest")
        log = proc.text()
        assert "TLS (x509-vnc, TLSv1.3" in log and "security type 19" in log, log[-3000:]
    finally:
        if viewer is not None:
            end_process(viewer)
        proc.stop()


@needs_tigervnc
def test_tigervnc_x509none_and_a_viewer_that_does_not_trust_the_ca(booted: CoreProcess, ca: Ca,
                                                                    tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds")
    other = make_ca(tmp_path / "other-ca", "someone else's CA")
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds))
    viewers: list[subprocess.Popen[bytes]] = []
    try:
        with xvfb() as display, Paused(booted):
            dump = screendump(booted, tmp_path / "dump.png")
            # Untrusted first. TigerVNC checks the certificate after the TLS handshake and, finding an unknown
            # CA, stops to ask its user: it never goes on to RFB's ClientInit, so it never sees the guest.
            viewers.append(tigervnc(display, tmp_path, port, "-SecurityTypes", "X509None", "-X509CA",
                                    str(other.cert)))
            wait_for(lambda: "TLS (x509-none" in proc.text(), 30, "the untrusting viewer's handshake")
            time.sleep(5)
            assert not shows_guest(display, tmp_path, dump)
            assert "connected (RFB" not in proc.text()
            end_process(viewers[0])

            viewers.append(tigervnc(display, tmp_path, port, "-SecurityTypes", "X509None", "-X509CA",
                                    str(ca.cert)))
            wait_for(lambda: shows_guest(display, tmp_path, dump), 30, "TigerVNC's window to show the guest")
        assert "TLS (x509-none" in proc.text()
    finally:
        for viewer in viewers:
            end_process(viewer)
        proc.stop()


@needs_tigervnc
def test_clear_types_are_not_offered_with_tls(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    """No downgrade: TigerVNC limited to None or VncAuth finds nothing it may use; with --vnc-tls-plain-too
    the clear types are offered after VeNCrypt."""
    creds = server_creds(ca, tmp_path / "creds")
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds))
    try:
        types = asyncio.run(security_types(port))
        assert types == b"\x13"
    finally:
        proc.stop()
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds), "--vnc-tls-plain-too")
    try:
        assert asyncio.run(security_types(port)) == b"\x13\x01"
    finally:
        proc.stop()


async def security_types(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readexactly(12)
        writer.write(b"RFB 003.008\n")
        return await asyncio.wait_for(reader.readexactly((await reader.readexactly(1))[0]), 10)
    finally:
        writer.transport.abort()


# --- verify-peer: client certificates ---------------------------------------------------------------------------


@needs_tigervnc
@pytest.mark.skipif(shutil.which("gvncviewer") is None, reason="needs gvncviewer (gtk-vnc)")
def test_verify_peer(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    """TigerVNC has no client certificate: refused. gtk-vnc (what remote-viewer and virt-manager use) reads its
    CA and client certificate from ~/.pki as libvirt lays them out: it gets in, and its subject is reported."""
    creds = server_creds(ca, tmp_path / "creds")
    home = tmp_path / "home"
    pki = home / ".pki"
    (pki / "CA").mkdir(parents=True)
    shutil.copy(ca.cert, pki / "CA" / "cacert.pem")
    cert, key = issue(ca, tmp_path / "client", "client", "/O=vmfront tests/CN=alice", server=False)
    for name in ("gvncviewer", "libvirt-vnc", "libvirt"):  # gtk-vnc looks in ~/.pki/CLIENTNAME/
        (pki / name / "private").mkdir(parents=True)
        shutil.copy(cert, pki / name / "clientcert.pem")
        shutil.copy(key, pki / name / "private" / "clientkey.pem")
    display_number = next(n for n in range(60, 99) if port_free(5900 + n))
    port = 5900 + display_number
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds), "--vnc-tls-verify-peer",
                            "--monitor", f"unix:{tmp_path / 'monitor.sock'}")
    viewers: list[subprocess.Popen[bytes]] = []
    try:
        with xvfb() as display, Paused(booted):
            dump = screendump(booted, tmp_path / "dump.png")
            viewers.append(tigervnc(display, tmp_path, port, "-SecurityTypes", "X509None", "-X509CA",
                                    str(ca.cert)))
            wait_for(lambda: "TLS handshake failed" in proc.text(), 30, "TigerVNC without a certificate refused")
            end_process(viewers[0])
            assert "TLS (x509-none" not in proc.text()

            log = (tmp_path / "gvncviewer.log").open("wb")
            # gtk-vnc looks in ~/.pki of the passwd entry (glib ignores $HOME for root): run it with that home
            # replaced by the test's, in a mount namespace of its own.
            command = ["gvncviewer", f"127.0.0.1:{display_number}"]
            if os.geteuid() == 0:
                command = ["unshare", "--mount", "--", "sh", "-c", f'mount --bind "$1" "{Path.home()}" && shift && '
                           'exec "$@"', "sh", str(home), *command]
            viewers.append(subprocess.Popen(command, env=viewer_env(display, home), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log))
            wait_for(lambda: shows_guest(display, tmp_path, dump), 30, "gvncviewer's window to show the guest")
            info = monitor_line(tmp_path / "monitor.sock", "info vnc")
        assert "client certificate CN=alice,O=vmfront tests" in proc.text()
        assert "Auth: vencrypt (Sub: x509-none)" in info and "x509_dname: CN=alice,O=vmfront tests" in info, info
    finally:
        for viewer in viewers:
            end_process(viewer)
        proc.stop()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def monitor_line(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        data = b""
        while not data.endswith(b"(qemu) "):
            data += sock.recv(4096)
        sock.sendall(command.encode() + b"\n")
        data = b""
        while not data.endswith(b"(qemu) "):
            data += sock.recv(4096)
        return data.decode(errors="replace")


# --- reload: display-reload and SIGHUP ----------------------------------------------------------------------------


@needs_tigervnc
def test_display_reload_and_sighup_swap_the_certificate(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds", "first")
    first = pem_fingerprint(creds / "server-cert.pem")
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds))
    peer = RawQmpPeer(booted.qmp_socket).negotiate()
    viewer: subprocess.Popen[bytes] | None = None
    try:
        assert fingerprint(asyncio.run(vencrypt_server_certificate(port))) == first
        with xvfb() as display:
            viewer = tigervnc(display, tmp_path, port, "-SecurityTypes", "X509None", "-X509CA", str(ca.cert))
            wait_for(lambda: "TLS (x509-none" in proc.text() and "connected (RFB" in proc.text(), 30,
                     "TigerVNC to connect")

            server_creds(ca, tmp_path / "creds", "second")  # new files in place, as a renewal would write them
            second = pem_fingerprint(creds / "server-cert.pem")
            assert peer.execute("display-reload", arguments={"type": "vnc", "tls-certs": True}) == {"return": {}}
            wait_for(lambda: "TLS credentials reloaded" in proc.text(), 10, "the client to reload")
            assert fingerprint(asyncio.run(vencrypt_server_certificate(port))) == second

            server_creds(ca, tmp_path / "creds", "third")
            third = pem_fingerprint(creds / "server-cert.pem")
            os.kill(proc.pid, signal.SIGHUP)
            wait_for(lambda: proc.text().count("TLS credentials reloaded") == 2, 10, "the client to reload again")
            assert fingerprint(asyncio.run(vencrypt_server_certificate(port))) == third

            # A broken renewal (the key readable by everyone) is refused; the last good certificate stays.
            (creds / "server-key.pem").chmod(0o644)
            assert peer.execute("display-reload", arguments={"type": "vnc", "tls-certs": True}) == {"return": {}}
            wait_for(lambda: "not reloaded" in proc.text(), 10, "the refused reload")
            assert fingerprint(asyncio.run(vencrypt_server_certificate(port))) == third

            # The viewer connected before the first reload is still there, and still gets updates.
            assert viewer.poll() is None
            tiger = re.search(r"viewer (\S+): connected \(RFB", proc.text())
            assert tiger is not None and f"viewer {tiger[1]} gone" not in proc.text()
            before = proc.text().count(f"viewer {tiger[1]}: update")
            peer.execute("send-key", arguments={"keys": [{"type": "qcode", "data": "x"}]})
            wait_for(lambda: proc.text().count(f"viewer {tiger[1]}: update") > before, 10, "an update for it")
        reply = peer.execute("display-reload", arguments={"type": "vnc", "tls-certs": True, "x": 1})
        assert reply["error"]["desc"] == "Parameter 'x' is unexpected"
    finally:
        peer.close()
        if viewer is not None:
            end_process(viewer)
        proc.stop()


def test_display_reload_without_a_vnc_client_is_an_error(booted: CoreProcess) -> None:
    peer = RawQmpPeer(booted.qmp_socket).negotiate()
    try:
        reply = peer.execute("display-reload", arguments={"type": "vnc", "tls-certs": True})
        assert "no client serves VNC" in reply["error"]["desc"], reply
        assert peer.execute("display-reload", arguments={"type": "vnc"}) == {"return": {}}
    finally:
        peer.close()


# --- hostile peers ------------------------------------------------------------------------------------------------


def test_hostile_tls_peers_close_only_their_connection(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds")
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds))
    try:
        asyncio.run(asyncio.wait_for(hostile_peers(port, ca, proc), 60))
        assert proc.proc.poll() is None
    finally:
        proc.stop()


async def hostile_peers(port: int, ca: Ca, proc: VncClientProcess) -> None:
    trusting = ssl.create_default_context(cafile=str(ca.cert))
    trusting.check_hostname = False
    good_reader, good_writer = await asyncio.open_connection("127.0.0.1", port)
    await vencrypt_to_tls(good_reader, good_writer)
    await good_writer.start_tls(trusting)
    try:
        # The good viewer finishes RFB inside TLS first (its handshake has a deadline too).
        assert await good_reader.readexactly(4) == b"\0\0\0\0"
        good_writer.write(b"\x01")
        width, height = struct.unpack(">HH", await good_reader.readexactly(4))
        await good_reader.readexactly(16)  # pixel format
        name_len = struct.unpack(">I", await good_reader.readexactly(4))[0]
        await good_reader.readexactly(name_len)

        # Garbage instead of a ClientHello: closed at once.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await vencrypt_to_tls(reader, writer)
        writer.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        # Plaintext right behind the subtype, before the server's accept byte (an injection attempt): closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readexactly(12)
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(2)
        writer.write(b"\x13\x00\x02")
        await reader.readexactly(8)  # version, ack, one subtype
        writer.write(struct.pack(">I", 260) + b"\x01\x00\x00\x00\x00")
        assert (await asyncio.wait_for(reader.read(), 5)) in (b"", b"\x01")
        writer.close()

        # A handshake that stalls: closed within the deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await vencrypt_to_tls(reader, writer)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), HANDSHAKE_TIMEOUT_S + 5) == b""
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_S + 3
        writer.close()

        # The first connection was never disturbed: it gets a picture.
        good_writer.write(struct.pack(">BxHi", 2, 1, 0) + struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        assert (await asyncio.wait_for(good_reader.readexactly(4), 10))[0] == 0
    finally:
        good_writer.transport.abort()
    assert proc.text().count("TLS handshake failed") >= 2, proc.text()[-3000:]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_renegotiation_is_refused(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    """TLS 1.2 renegotiation asked for by the viewer (``openssl s_client``'s R command, spliced onto a connection
    past the VeNCrypt bytes) is refused with OpenSSL's no_renegotiation alert, and that connection ends. The
    connection never gets to ClientInit: a handshake deadline longer than the test keeps a slow machine from
    closing it first."""
    creds = server_creds(ca, tmp_path / "creds")
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc-tls-creds", str(creds), "--vnc-handshake-timeout", "120")
    try:
        asyncio.run(asyncio.wait_for(renegotiate(port, ca), 60))
        assert proc.proc.poll() is None and "viewer 127.0.0.1" in proc.text()
    finally:
        proc.stop()


async def renegotiate(port: int, ca: Ca) -> None:
    """A local relay does the VeNCrypt bytes, then splices ``openssl s_client -tls1_2`` onto the connection."""
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
    await vencrypt_to_tls(upstream_reader, upstream_writer)
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.get_running_loop().create_future()
    relay = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    relay_port = relay.sockets[0].getsockname()[1]
    s_client = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{relay_port}", "-CAfile", str(ca.cert),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        local_reader, local_writer = await asyncio.wait_for(accepted, 10)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
            dst.close()

        pumps = [asyncio.create_task(pipe(local_reader, upstream_writer)),
                 asyncio.create_task(pipe(upstream_reader, local_writer))]
        assert s_client.stdin is not None and s_client.stdout is not None
        out = b""
        while b"Verify return code: 0" not in out:
            out += await asyncio.wait_for(s_client.stdout.read(4096), 10)
        s_client.stdin.write(b"R\n")
        await s_client.stdin.drain()
        await asyncio.wait_for(pumps[1], 15)  # the connection is over
        rest = await asyncio.wait_for(s_client.stdout.read(), 10)
        assert b"RENEGOTIATING" in rest and b"no renegotiation" in rest, rest  # refused by the server's alert
    finally:
        if s_client.returncode is None:
            s_client.kill()
        await s_client.wait()
        relay.close()
        upstream_writer.transport.abort()


# --- credentials and exposure ------------------------------------------------------------------------------------


def test_credentials_are_checked(ca: Ca, tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds")
    (creds / "server-key.pem").chmod(0o640)
    with pytest.raises(TlsError, match="readable by its group"):
        check_key_file(creds / "server-key.pem")
    tls = TlsCredentials(TlsSettings(creds_dir=creds))
    with pytest.raises(TlsError, match="chmod 0600"):
        tls.load()
    (creds / "server-key.pem").chmod(0o600)
    tls.load()
    first = tls.x509
    (creds / "ca-cert.pem").unlink()
    assert "ca-cert.pem" in (tls.reload() or "") and tls.x509 is first
    assert TlsCredentials(TlsSettings(anonymous=True)).reload() is not None


def test_status_warns_about_an_exposed_vnc_without_tls_or_password(booted: CoreProcess, tmp_path: Path) -> None:
    port = free_port()
    proc = VncClientProcess(booted.run_dir, VM, port, "--vnc", f"0.0.0.0:{port}")
    try:
        wait_for(lambda: any(c.get("warnings") for c in booted.state().get("clients") or []), 10,
                 "the warning in state.json")
        status = subprocess.run([sys.executable, "-m", "vmfront", "status", VM, "--run-dir", str(booted.run_dir)],
                                capture_output=True, text=True, timeout=20, cwd=ROOT).stdout
        assert "WARNING: VNC listens on 0.0.0.0" in status and "without TLS: unless the core asks" in status, status
        assert "without TLS: unless the core asks for a VNC password" in proc.text()
    finally:
        proc.stop()


def test_key_readable_by_others_stops_the_client(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    creds = server_creds(ca, tmp_path / "creds")
    (creds / "server-key.pem").chmod(0o644)
    from corelib import client_command

    done = subprocess.run(client_command(VM, booted.run_dir, "--vnc", f"127.0.0.1:{free_port()}", "--vnc-tls-creds",
                                         str(creds)), capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1 and "readable by its group or by everyone" in done.stderr, done.stderr[-2000:]


# --- the fleet client -----------------------------------------------------------------------------------------------


@needs_tigervnc
def test_a_fleet_client_serves_its_vms_in_tls(booted: CoreProcess, ca: Ca, tmp_path: Path) -> None:
    """``client --all --vnc-tls-creds``: one host certificate for every VM's port (VeNCrypt, the clear types not
    offered) and wss:// for the WebSocket router, loaded once before privileges are dropped; SIGHUP swaps it."""
    creds = server_creds(ca, tmp_path / "creds", "fleet host")
    first, router = free_port(), free_port()
    fleet = FleetClientProcess(booted.run_dir.parent, "--vnc-ports", f"{first}-{first}", "--vnc-tls-creds",
                               str(creds), "--websocket", f"127.0.0.1:{router}")
    viewer: subprocess.Popen[bytes] | None = None
    try:
        fleet.wait_serving([booted], within=60)
        port = vnc_port(booted)
        name = booted.run_dir.name  # a fleet client names each VM by its run directory
        assert endpoints(booted)["websocket"] == f"wss://127.0.0.1:{router}/vnc/{name}"
        assert fingerprint(asyncio.run(vencrypt_server_certificate(port))) == pem_fingerprint(
            creds / "server-cert.pem")
        assert vncdo_refused(port)  # a viewer without VeNCrypt finds no security type it can use

        with xvfb() as display, Paused(booted):
            dump = screendump(booted, tmp_path / "dump.png")
            viewer = tigervnc(display, tmp_path, port, "-SecurityTypes", "X509None", "-X509CA", str(ca.cert))
            wait_for(lambda: shows_guest(display, tmp_path, dump), 30, "TigerVNC's window to show the guest")
        assert "TLS (x509-none" in fleet.text()

        # The router is wss:// with the same certificate; inside it RFB offers its own types (here: None).
        context = ssl.create_default_context(cafile=str(ca.cert))
        with connect(f"wss://127.0.0.1:{router}/vnc/{name}", ssl=context, subprotocols=["binary"],
                     open_timeout=10) as ws:
            assert ws.recv(timeout=10) == b"RFB 003.008\n"
            ws.send(b"RFB 003.008\n")
            assert ws.recv(timeout=10) == b"\x01\x01"  # one security type: None

        server_creds(ca, tmp_path / "creds", "fleet host renewed")
        os.kill(fleet.pid, signal.SIGHUP)
        wait_for(lambda: "TLS credentials reloaded for every VM" in fleet.text(), 10, "the fleet client to reload")
        assert fingerprint(asyncio.run(vencrypt_server_certificate(port))) == pem_fingerprint(
            creds / "server-cert.pem")
        assert fleet.proc.poll() is None
    finally:
        if viewer is not None:
            end_process(viewer)
        fleet.stop()
