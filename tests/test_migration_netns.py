"""Live migration across two network namespaces, as between two hosts: the source core (and its QEMU) in one
namespace, the destination core waiting with ``--incoming tcp:...`` in another, joined by a veth pair that carries
loopback-range addresses only (127.77.0.1/30 and 127.77.0.2/30, with ``route_localnet`` set inside the namespaces:
nothing on the host's own network is touched).

``vmfront migrate SRC --to tcp:...`` is a plain URI, so clients are not moved (their control channel is ipc://,
per host): as an operator would, the test ends the source side's client and starts one on the destination side,
and a VNC viewer there connects to it and sees the migrated guest.

Needs root and ``ip netns``; skipped otherwise. Every process is ended by its pid (``ip netns exec`` execs its
command, so the pid of the child is the command's own), every wait has a timeout, and the namespaces and the veth
pair are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import Fleet, LoggedProcess, RawQmpPeer, client_command, wait_for
from guestlib import is_demo_text_screen, text_row
from PIL import Image, ImageChops
from test_client import client_pids
from test_migration_e2e import screendump
from vnclib import _VNCDO_SCRIPT, ROOT

IP = shutil.which("ip")
SRC_ADDR, DST_ADDR = "127.77.0.1", "127.77.0.2"
MIGRATION_PORT, VNC_PORT = 4444, 5900  # the namespaces are fresh and private: nothing else listens there

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ip netns add, veth)"),
    pytest.mark.skipif(IP is None, reason="needs iproute2's ip"),
]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert IP is not None
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def in_ns(ns: str, *argv: str) -> list[str]:
    assert IP is not None
    return [IP, "netns", "exec", ns, *argv]


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    """Namespaces A and B, ``lo`` up with 127.0.0.1/32 only (so the rest of 127/8 is not local), and a veth pair
    A 127.77.0.1/30 <-> B 127.77.0.2/30. Skips the test (with the reason) when the machine does not allow it."""
    pid = os.getpid()
    names = {"a": (f"vmfnsA{pid}", f"vmfA{pid}"), "b": (f"vmfnsB{pid}", f"vmfB{pid}")}
    created: list[str] = []
    try:
        try:
            for ns, _ in names.values():
                ip("netns", "add", ns)
                created.append(ns)
        except RuntimeError as exc:
            pytest.skip(f"network namespaces unavailable: {exc}")
        (ns_a, veth_a), (ns_b, veth_b) = names["a"], names["b"]
        try:
            ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        except RuntimeError as exc:
            pytest.skip(f"veth pairs unavailable: {exc}")
        ip("link", "set", veth_a, "netns", ns_a)
        ip("link", "set", veth_b, "netns", ns_b)
        for (ns, veth), addr in ((names["a"], SRC_ADDR), (names["b"], DST_ADDR)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo", check=False)
            ip("-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo")
            sysctl = subprocess.run(in_ns(ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1",
                                          f"net.ipv4.conf.{veth}.route_localnet=1"),
                                    capture_output=True, text=True, timeout=15)
            if sysctl.returncode != 0:
                pytest.skip(f"cannot set route_localnet in a namespace: {sysctl.stderr.strip()}")
            try:
                ip("-n", ns, "addr", "add", f"{addr}/30", "dev", veth)
            except RuntimeError as exc:
                pytest.skip(f"the kernel refuses a loopback-range address on a veth: {exc}")
            ip("-n", ns, "link", "set", veth, "up")
        yield ns_a, ns_b
    finally:
        for ns, veth in names.values():
            ip("link", "del", veth, check=False)  # still in the root namespace if the set-up stopped half-way
            if ns in created:
                ip("netns", "del", ns, check=False)  # deletes the veth end inside it too


class NsClient(LoggedProcess):
    """``vmfront client --vnc 127.0.0.1:PORT`` inside a namespace."""

    def __init__(self, ns: str, run_dir: Path, name: str, port: int) -> None:
        self.log = run_dir.parent / f"client-{name}-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(in_ns(ns, *client_command(name, run_dir, "--vnc", f"127.0.0.1:{port}")),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT)



def vncdo_in(ns: str, port: int, *, capture: Path | None = None, type_text: str = "") -> None:
    """vncdotool (a fresh connection: connect, optionally type, optionally capture, disconnect) inside NS."""
    result = subprocess.run(in_ns(ns, sys.executable, "-c", _VNCDO_SCRIPT, f"127.0.0.1::{port}", "", "raw",
                                  str(capture or ""), type_text, "0"),
                            capture_output=True, text=True, timeout=40, cwd=ROOT)
    assert result.returncode == 0, f"vncdotool in {ns}: {result.stderr[-3000:]}"


def test_migration_between_namespaces_and_viewers_reconnect() -> None:
    with two_namespaces() as (ns_a, ns_b), Fleet() as fleet:
        root = fleet.root
        src_run, dst_run = root / "src", root / "dst"
        # Each core under ``ip netns exec`` (which execs: the core's pid is the child's; the --ready-fd crosses).
        src = fleet.core("src", prefix=in_ns(ns_a))
        dst = fleet.core("dst", "--incoming", f"tcp:{DST_ADDR}:{MIGRATION_PORT}", prefix=in_ns(ns_b))
        assert dst.state()["state"] == "incoming"
        assert dst.state()["incoming"] == f"tcp:{DST_ADDR}:{MIGRATION_PORT}"
        # Each QEMU runs in its own namespace (ip netns exec execs: the core's pid is the child's).
        for ns, core in ((ns_a, src), (ns_b, dst)):
            ns_inode = os.stat(f"/var/run/netns/{ns}").st_ino
            assert os.stat(f"/proc/{core.pid}/ns/net").st_ino == ns_inode
            assert os.stat(f"/proc/{core.qemu_pid}/ns/net").st_ino == ns_inode
        wait_for(lambda: is_demo_text_screen(screendump("src", src_run, root / "boot.png")), 30,
                 "the demo guest to boot")

        # On the source side: a client serving VNC, a viewer that types into the guest.
        src_client = fleet.add(NsClient(ns_a, src_run, "src", VNC_PORT))
        wait_for(lambda: src_client.pid in client_pids(src), 15, "the source-side client to attach")
        wait_for(lambda: "VNC: display mode" in src_client.text(), 15, "the source-side client's display")
        src_qmp = RawQmpPeer(src.qmp_socket).negotiate()
        try:
            vncdo_in(ns_a, VNC_PORT, type_text="n", capture=root / "src-view.png")
            wait_for(lambda: text_row(src_qmp, 4, root) == "KEYS: n", 10, "the keys on the source")
        finally:
            src_qmp.close()
        assert is_demo_text_screen(Image.open(root / "src-view.png").convert("RGB"))

        # Migrate over the veth, from namespace A (where the source QEMU is).
        migrate = subprocess.run(in_ns(ns_a, sys.executable, "-m", "vmfront", "migrate", "src", "--run-dir",
                                       str(src_run), "--to", f"tcp:{DST_ADDR}:{MIGRATION_PORT}", "-q"),
                                 capture_output=True, text=True, timeout=40, cwd=ROOT)
        assert migrate.returncode == 0, migrate.stderr
        assert src.wait(timeout=30) == 0, src.stderr()[-3000:]
        assert src.state()["state"] == "migrated"
        wait_for(lambda: dst.state()["state"] == "running", 15, "the destination to run the guest")
        assert dst.proc.poll() is None

        # A plain URI: the source-side client is left behind, so end it and start one on the destination side.
        assert src_client.proc.poll() is None
        src_client.stop()
        dst_client = fleet.add(NsClient(ns_b, dst_run, "dst", VNC_PORT))
        wait_for(lambda: dst_client.pid in client_pids(dst), 15, "the destination-side client to attach")
        shm = dst.state()["display"]["shm"]
        wait_for(lambda: f"display: mapped {shm} read-only" in dst_client.text(), 10,
                 "the destination-side client to map the display")
        wait_for(lambda: "VNC: display mode" in dst_client.text(), 15, "the destination-side client's display")

        # A viewer in namespace B reconnects and gets the migrated guest: the keys typed on the source are
        # there, keys typed now reach it, and with the guest paused its frame equals the destination's dump.
        dst_qmp = RawQmpPeer(dst.qmp_socket).negotiate()
        try:
            assert dst_qmp.execute("query-status")["return"]["status"] == "running"
            assert text_row(dst_qmp, 4, root) == "KEYS: n"
            vncdo_in(ns_b, VNC_PORT, type_text="s")
            wait_for(lambda: text_row(dst_qmp, 4, root) == "KEYS: ns", 10, "the keys on the destination")
            assert "return" in dst_qmp.execute("stop")
            time.sleep(0.5)
            vncdo_in(ns_b, VNC_PORT, capture=root / "dst-view.png")
            capture = Image.open(root / "dst-view.png").convert("RGB")
            dump = screendump("dst", dst_run, root / "dst-dump.png")
            assert capture.size == dump.size == (720, 400)
            assert ImageChops.difference(capture, dump).getbbox() is None
            assert is_demo_text_screen(capture)
            assert "return" in dst_qmp.execute("cont")
        finally:
            dst_qmp.close()
        assert dst_client.proc.poll() is None and dst.proc.poll() is None
