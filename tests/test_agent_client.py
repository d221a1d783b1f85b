"""The client's guest-agent side end to end: real core, real host-run qemu-ga (``-m unix-listen``), the real
client process with its agent proxy, and ``vmfront agent`` as scripts would use it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, fd_count, kill_pid, running_core, short_tmpdir, wait_for
from test_client import ClientProcess

QEMU_GA = shutil.which("qemu-ga") or "/usr/bin/qemu-ga"


class Qga:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "qga.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([QEMU_GA, "-m", "unix-listen", "-p", str(self.sock), "-t", str(self.root)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: self.sock.exists(), 10, "qemu-ga's socket")

    def kill(self) -> None:
        if self.proc is not None:
            kill_pid(self.proc.pid)
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def setup() -> Iterator[tuple[CoreProcess, ClientProcess, Qga]]:
    root = short_tmpdir()
    qga = Qga(root)
    qga.start()
    try:
        with running_core("agc", "--agent-socket", str(qga.sock), qemu_args=["-machine", "pc", "-m", "16"]) as core:
            client = ClientProcess(core, "agc")
            try:
                wait_for(lambda: (core.run_dir / "agent.sock").exists(), 15, "the client's agent proxy")
                yield core, client, qga
            finally:
                client.stop()
    finally:
        qga.kill()
        shutil.rmtree(root, ignore_errors=True)


#: What qemu-ga answers a 0xFF byte with (a lexical error; a script discards everything up to the sentinel).
FF_ERROR = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}'


def qga_script(proxy: Path, *commands: str, sync_id: int, timeout: float = 30) -> list[bytes]:
    """What an unchanged qga script does on a qga socket: its own 0xFF and guest-sync-delimited, then plain JSON
    lines; returns the reply lines after qemu-ga's error for the 0xFF (the first one is the sync's, 0xFF-prefixed)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(proxy))
        s.sendall(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' % sync_id
                  + b"".join(b'{"execute": "%s"}\n' % c.encode() for c in commands))
        buf = b""
        while buf.count(b"\n") < len(commands) + 2:
            chunk = s.recv(65536)
            assert chunk, f"the proxy closed after {buf!r}"
            buf += chunk
    lines = buf.split(b"\n")
    assert lines[0] == FF_ERROR, lines[0]
    return lines[1:len(commands) + 2]


def vmfront_agent(core: CoreProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfront", "agent", "agc", "--run-dir", str(core.run_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_commands_exec_copy_and_proxy_against_real_qemu_ga(setup: tuple[CoreProcess, ClientProcess, Qga]) -> None:
    core, client, _ = setup
    ping = vmfront_agent(core, "ping")
    assert ping.returncode == 0, ping.stderr + client.text()
    assert json.loads(ping.stdout) == {}
    info = json.loads(vmfront_agent(core, "info").stdout)
    assert "version" in info and any(c["name"] == "guest-exec" for c in info["supported_commands"])
    osinfo = json.loads(vmfront_agent(core, "osinfo").stdout)
    assert osinfo.get("kernel-release") == os.uname().release
    now = json.loads(vmfront_agent(core, "guest-get-time").stdout)
    assert abs(now / 1e9 - time.time()) < 60
    # An error from the agent: non-zero exit, the class on stderr.
    bad = vmfront_agent(core, "guest-file-open", '{"path": "/nonexistent/x", "mode": "r"}')
    assert bad.returncode == 1 and "vmfront agent: GenericError:" in bad.stderr, bad.stderr
    nocmd = vmfront_agent(core, "guest-no-such-command")
    assert nocmd.returncode == 1 and "CommandNotFound" in nocmd.stderr, nocmd.stderr

    ex = vmfront_agent(core, "exec", "--", "/bin/sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3")
    assert (ex.returncode, ex.stdout, ex.stderr) == (3, "out-42\n", "err\n"), ex

    # 5 MiB round trip with equal checksums.
    work = short_tmpdir()
    try:
        src = work / "src.bin"
        src.write_bytes(os.urandom(5 << 20))
        guest = work / "guest.bin"
        back = work / "back.bin"
        up = vmfront_agent(core, "copy-to", str(src), str(guest), timeout=120)
        assert up.returncode == 0, up.stderr
        down = vmfront_agent(core, "copy-from", str(guest), str(back), timeout=120)
        assert down.returncode == 0, down.stderr
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, guest, back)]
        assert digest[0] == digest[1] == digest[2]
        missing = vmfront_agent(core, "copy-from", str(work / "nope"), str(work / "nope.out"))
        assert missing.returncode == 1 and not (work / "nope.out").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # An unchanged qga script: plain JSON lines on the proxy socket, its own guest-sync-delimited included.
    lines = qga_script(core.run_dir / "agent.sock", "guest-ping", "guest-info", sync_id=1234)
    assert lines[0] == b'\xff{"return": 1234}'
    assert json.loads(lines[1]) == {"return": {}}
    assert "version" in json.loads(lines[2])["return"]


def test_qemu_ga_killed_and_restarted(setup: tuple[CoreProcess, ClientProcess, Qga]) -> None:
    core, client, qga = setup
    assert vmfront_agent(core, "ping").returncode == 0
    # qemu-ga dies in the middle of a command: stopped first so the command is surely in flight, then killed.
    assert qga.proc is not None
    os.kill(qga.proc.pid, signal.SIGSTOP)
    start = time.monotonic()
    pending = subprocess.Popen([sys.executable, "-m", "vmfront", "agent", "agc", "--run-dir", str(core.run_dir),
                                "--timeout", "3", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    qga.proc.kill()  # SIGKILL: a stopped process would keep a SIGTERM pending
    qga.proc.wait(timeout=10)
    qga.proc = None
    _, err = pending.communicate(timeout=30)
    assert pending.returncode == 1
    assert "vmfront agent: AgentTimeout: guest-info: could not get an answer from the guest agent within 3 s" in err \
        or "AgentUnavailable" in err, err
    assert time.monotonic() - start < 3 + 5
    # While it is gone: a clear error, within the deadline.
    failed = vmfront_agent(core, "--timeout", "2", "ping")
    assert failed.returncode == 1
    assert "AgentUnavailable" in failed.stderr or "AgentTimeout" in failed.stderr, failed.stderr
    qga.start()
    deadline = time.monotonic() + 20
    while True:
        again = vmfront_agent(core, "--timeout", "3", "ping")
        if again.returncode == 0:
            break
        assert time.monotonic() < deadline, again.stderr + client.text()[-3000:]
        time.sleep(0.3)
    assert json.loads(again.stdout) == {}


def test_a_flood_of_proxy_connections_leaves_room_for_scripts(setup: tuple[CoreProcess, ClientProcess, Qga]) -> None:
    """200 connections to agent.sock that say nothing: the client keeps at most 16 (the newest), its descriptors
    stay bounded, and `vmfront agent` (a connection that does work) is served all along."""
    core, client, _ = setup
    assert vmfront_agent(core, "ping").returncode == 0
    fds_before = fd_count(client.pid)
    flood: list[socket.socket] = []
    try:
        for n in range(200):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(core.run_dir / "agent.sock"))
            flood.append(sock)
            if n % 50 == 49:
                ping = vmfront_agent(core, "ping")
                assert ping.returncode == 0, ping.stderr + client.text()[-2000:]
        wait_for(lambda: fd_count(client.pid) <= fds_before + 16, 10, "the client to close the evicted connections")
        for sock in flood[:-16]:  # the oldest were closed by the client
            sock.settimeout(5)
            assert sock.recv(100) == b""
        assert "agent proxy: closing a connection: evicted to make room for a new connection" in client.text()
    finally:
        for sock in flood:
            sock.close()


def test_big_arguments_from_files_and_standard_input(setup: tuple[CoreProcess, ClientProcess, Qga]) -> None:
    """What a command line cannot hold (an argument is at most 128 KiB): `exec --input FILE` gives a command 3 MiB
    on its standard input, and `-` reads a 4 MiB guest-file-write's arguments from vmfront's own."""
    core, client, _ = setup
    work = short_tmpdir()
    try:
        data = os.urandom(3 << 20)
        (work / "input.bin").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        ex = vmfront_agent(core, "exec", "--input", str(work / "input.bin"), "--", "sha256sum")
        assert (ex.returncode, ex.stdout) == (0, f"{digest}  -\n"), ex.stderr + client.text()[-2000:]
        handle = json.loads(vmfront_agent(core, "guest-file-open",
                                          json.dumps({"path": str(work / "out.bin"), "mode": "w"})).stdout)
        arguments = json.dumps({"handle": handle, "buf-b64": base64.b64encode(data + data[:1 << 20]).decode()})
        written = subprocess.run([sys.executable, "-m", "vmfront", "agent", "agc", "--run-dir", str(core.run_dir),
                                  "guest-file-write", "-"], input=arguments, capture_output=True, text=True,
                                 timeout=60)
        assert written.returncode == 0 and json.loads(written.stdout)["count"] == 4 << 20, written.stderr
        assert vmfront_agent(core, "guest-file-close", json.dumps({"handle": handle})).returncode == 0
        assert (work / "out.bin").read_bytes() == data + data[:1 << 20]
    finally:
        shutil.rmtree(work, ignore_errors=True)
