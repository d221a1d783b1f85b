"""A hostile guest agent (tests/hostile_agent.py, a test double) behind a real core and client: every kind of
misbehaviour only makes calls fail cleanly; the client stays responsive, its memory bounded, and the core relays
the bytes without parsing them (its QMP and the client's attachment are unaffected)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, RawQmpPeer, kill_pid, running_core, short_tmpdir, wait_for
from test_client import ClientProcess, client_pids

HERE = Path(__file__).parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Proxy:
    """A raw qemu-ga-protocol connection to the client's agent proxy."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""

    def call(self, request: dict[str, object]) -> dict[str, object]:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "proxy closed"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        reply: dict[str, object] = json.loads(line.lstrip(b"\xff"))
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hostile() -> Iterator[tuple[CoreProcess, ClientProcess, Path]]:
    root = short_tmpdir()
    sock, mode_file = root / "qga.sock", root / "mode"
    mode_file.write_text("honest")
    double = subprocess.Popen([sys.executable, str(HERE / "hostile_agent.py"), str(sock), "honest", str(mode_file)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, "the hostile agent double's socket")
        with running_core("hos", "--agent-socket", str(sock), qemu_args=["-machine", "pc", "-m", "16"]) as core:
            client = ClientProcess(core, "hos")
            try:
                wait_for(lambda: (core.run_dir / "agent.sock").exists(), 15, "the agent proxy")
                yield core, client, mode_file
            finally:
                client.stop()
    finally:
        kill_pid(double.pid)
        double.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("mode", ["garbage", "huge", "long-string", "tokens", "silent", "drip", "wrong-id",
                                  "ff-flood"])
def test_hostile_agent_cannot_hurt_the_client(hostile: tuple[CoreProcess, ClientProcess, Path], mode: str) -> None:
    core, client, mode_file = hostile
    proxy_path = core.run_dir / "agent.sock"
    try:
        good = Proxy(proxy_path)
    except OSError as exc:
        raise AssertionError(f"cannot connect to the agent proxy: {exc}; client alive: {client.proc.poll() is None}"
                             f"\nclient log:\n{client.text()[-4000:]}\ncore log:\n{core.stderr()[-3000:]}") from exc
    assert good.call({"execute": "guest-ping"}) == {"return": {}}, client.text()[-2000:]
    rss_before = rss_kib(client.pid)
    mode_file.write_text(mode)
    start = time.monotonic()
    bad = subprocess.Popen([sys.executable, "-m", "vmfront", "agent", "hos", "--run-dir", str(core.run_dir),
                            "--timeout", "3", "ping"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # While the hostile exchange is going on, the client answers at once what it can answer itself.
        time.sleep(0.5)
        other = Proxy(proxy_path)
        t0 = time.monotonic()
        assert other.call({"execute": "guest-sync-delimited", "arguments": {"id": 7}}) == {"return": 7}
        state = other.call({"execute": "vmfront-session", "arguments": {}})
        assert time.monotonic() - t0 < 1.0
        assert state["return"] in ({"state": "busy"}, {"state": "connecting"}, {"state": "ready"}), state
        other.close()
        out, err = bad.communicate(timeout=30)
    finally:
        if bad.poll() is None:
            bad.kill()
    elapsed = time.monotonic() - start
    assert bad.returncode == 1, (out, err)
    assert any(c in err for c in ("AgentTimeout", "AgentProtocolError")), err
    assert elapsed < 12, f"took {elapsed:.1f} s"
    assert rss_kib(client.pid) - rss_before < 96 * 1024, "client memory grew unbounded"
    # Back to an honest agent: the next call resynchronises and works.
    mode_file.write_text("honest")
    deadline = time.monotonic() + 15
    while (reply := good.call({"execute": "guest-ping"})) != {"return": {}}:
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)
    good.close()
    # The core relayed it all without caring: still serving QMP, the client still attached.
    peer = RawQmpPeer(core.qmp_socket).negotiate()
    assert peer.execute("query-status")["return"]["status"] == "running"
    peer.close()
    assert client.pid in client_pids(core)
    assert client.proc.poll() is None
