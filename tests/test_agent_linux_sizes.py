"""qemu-ga's sizes and its commands without a reply, through the agent proxy to the real qemu-ga inside the real
Linux test guest (the guest of ``test_agent_linux_guest``, with more memory: qemu-ga holds a 40 MiB read three
times over while it answers).

What qemu-ga's own socket answers is the reference: a second, host-run qemu-ga (``-m unix-listen``) gets the same
requests on the same bytes (a host file with the guest file's content), and the replies are compared byte for
byte, the data by checksums (the guest's own sha256sum too). Then guest-suspend-ram and guest-shutdown: they
return once QEMU says the guest suspended or shut down, and a call to a suspended guest says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from corelib import Fleet, RawQmpPeer, short_tmpdir, wait_for
from test_agent_client import Qga
from test_agent_linux_guest import (
    BootedGuest,
    LinuxGuestImage,
    build_image,
    guest_sh,
    vmfront_agent,
    wait_agent_ready,
)
from vnclib import free_port

pytestmark = [pytest.mark.linux_guest, pytest.mark.timeout(900)]

MiB = 1 << 20


class QgaSocket:
    """A qemu-ga wire-protocol connection (the proxy's or qemu-ga's own): one request, its reply line."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(300)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def raw(self, request: dict[str, Any]) -> bytes:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        searched = 0
        while (end := self.buf.find(b"\n", searched)) < 0:
            searched = len(self.buf)
            chunk = self.sock.recv(1 << 20)
            assert chunk, f"{request['execute']}: the connection closed"
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return line

    def call(self, command: str, **arguments: Any) -> Any:
        reply = json.loads(self.raw({"execute": command, "arguments": arguments}))
        assert "return" in reply, f"{command}: {reply}"
        return reply["return"]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Sides:
    guest: BootedGuest
    reference: Qga
    work: Path

    def proxy(self) -> QgaSocket:
        return QgaSocket(self.guest.run_dir / "agent.sock")

    def qemu_ga(self) -> QgaSocket:
        return QgaSocket(self.reference.sock)


@pytest.fixture(scope="module")
def image() -> LinuxGuestImage:
    return build_image()


@pytest.fixture(scope="module")
def sides(image: LinuxGuestImage) -> Iterator[Sides]:
    work = short_tmpdir()
    reference = Qga(work / "qga")
    reference.root.mkdir()
    reference.start()
    try:
        with Fleet() as fleet:
            console = fleet.root / "console.log"
            core = fleet.core("ls", "--agent", qemu_args=image.qemu_args(console, memory_mib=512))
            guest = fleet.add(BootedGuest(core, console, free_port()))
            guest.start_client()
            wait_agent_ready(core.run_dir, console)
            yield Sides(guest, reference, work)
    finally:
        reference.kill()
        shutil.rmtree(work, ignore_errors=True)


def exec_status(side: QgaSocket, request: dict[str, Any]) -> bytes:
    """guest-exec, then guest-exec-status until it exited: that last reply's bytes."""
    pid = json.loads(side.raw(request))["return"]["pid"]
    deadline = time.monotonic() + 120
    while True:
        status = side.raw({"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if json.loads(status)["return"]["exited"]:
            return status
        assert time.monotonic() < deadline, "the command did not exit"
        time.sleep(0.1)


@pytest.mark.slow
def test_big_writes_reads_and_exec_input_answered_as_qemu_ga_answers(sides: Sides) -> None:
    """8 MiB guest-file-writes, a 40 MiB guest-file-read and a 2 MiB guest-exec input: each over the control
    channel's 1 MiB frames and the old 16 MiB reply limit."""
    data = os.urandom(40 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    host_file = sides.work / "data.bin"
    proxy, qemu_ga = sides.proxy(), sides.qemu_ga()
    try:
        # The guest file is written 8 MiB at a time through the proxy; the reference writes a host file alike.
        handles = (proxy.call("guest-file-open", path="/tmp/data.bin", mode="w"),
                   qemu_ga.call("guest-file-open", path=str(host_file), mode="w"))
        for start in range(0, len(data), 8 * MiB):
            piece = base64.b64encode(data[start:start + 8 * MiB]).decode()
            replies = [side.raw({"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": piece}})
                       for side, handle in zip((proxy, qemu_ga), handles, strict=True)]
            assert replies[0] == replies[1] == b'{"return": {"count": 8388608, "eof": false}}'
        for side, handle in zip((proxy, qemu_ga), handles, strict=True):
            side.call("guest-file-close", handle=handle)
        assert hashlib.sha256(host_file.read_bytes()).hexdigest() == digest
        assert guest_sh(sides.guest.run_dir, "sha256sum /tmp/data.bin").split()[0] == digest

        # All of it back in one guest-file-read: a 53 MiB reply line, the same bytes as qemu-ga's own.
        handles = (proxy.call("guest-file-open", path="/tmp/data.bin", mode="r"),
                   qemu_ga.call("guest-file-open", path=str(host_file), mode="r"))
        replies = [side.raw({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 40 * MiB},
                             "id": "big"})
                   for side, handle in zip((proxy, qemu_ga), handles, strict=True)]
        assert len(replies[0]) > 53 * MiB and replies[0] == replies[1]
        read = json.loads(replies[0])
        assert read["id"] == "big" and read["return"]["count"] == 40 * MiB
        assert hashlib.sha256(base64.b64decode(read["return"]["buf-b64"])).hexdigest() == digest
        for side, handle in zip((proxy, qemu_ga), handles, strict=True):
            side.call("guest-file-close", handle=handle)

        # 2 MiB on a command's standard input: both sha256sums print the same line, which is the data's.
        stdin = base64.b64encode(data[:2 * MiB]).decode()
        statuses = [exec_status(side, {"execute": "guest-exec", "arguments": {
            "path": "sha256sum", "input-data": stdin, "capture-output": True}}) for side in (proxy, qemu_ga)]
        assert statuses[0] == statuses[1]
        out = base64.b64decode(json.loads(statuses[0])["return"]["out-data"])
        assert out == f"{hashlib.sha256(data[:2 * MiB]).hexdigest()}  -\n".encode()
    finally:
        proxy.close()
        qemu_ga.close()
        guest_sh(sides.guest.run_dir, "rm -f /tmp/data.bin")


def test_a_read_over_qemu_gas_limit_fails_before_the_file_position_moves(sides: Sides) -> None:
    (sides.work / "small.bin").write_bytes(b"0123456789" * 1000)
    guest_sh(sides.guest.run_dir, "head -c 10000 /dev/zero | tr '\\0' x > /tmp/small.bin")
    answers = []
    for side, path in ((sides.proxy(), "/tmp/small.bin"), (sides.qemu_ga(), str(sides.work / "small.bin"))):
        try:
            handle = side.call("guest-file-open", path=path, mode="r")
            assert side.call("guest-file-read", handle=handle, count=10)["count"] == 10
            over = side.raw({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 48 * MiB + 1}})
            position = side.call("guest-file-seek", handle=handle, offset=0, whence="cur")
            answers.append((over, position))
            side.call("guest-file-close", handle=handle)
        finally:
            side.close()
    assert answers[0] == answers[1], answers
    assert answers[0] == (b'{"error": {"class": "GenericError", "desc": "value \'50331649\' is invalid for argument '
                          b'count"}}', {"eof": False, "position": 10})


def test_suspend_returns_when_the_guest_suspends_and_calls_then_say_it_is(sides: Sides) -> None:
    """guest-suspend-ram never answers when it works: the call is done when QEMU's SUSPEND event comes (not
    after a grace period); until the guest is woken up, calls fail at once saying the guest is suspended."""
    run_dir, client = sides.guest.run_dir, sides.guest.client
    assert client is not None
    suspended = vmfront_agent(run_dir, "guest-suspend-ram")
    assert suspended.returncode == 0, suspended.stderr
    assert "guest-suspend-ram: the guest suspended to RAM (QEMU event SUSPEND)" in client.text()
    qmp = RawQmpPeer(sides.guest.core.qmp_socket).negotiate()
    try:
        assert qmp.execute("query-status")["return"]["status"] == "suspended"
        ping = vmfront_agent(run_dir, "ping")
        assert ping.returncode == 1 and "vmfront agent: AgentUnavailable: guest-ping: the guest is suspended" \
            in ping.stderr, ping.stderr
        assert "return" in qmp.execute("system_wakeup")
        wait_for(lambda: qmp.execute("query-status")["return"]["status"] == "running", 30, "the guest to wake up")
    finally:
        qmp.close()
    wait_agent_ready(run_dir, sides.guest.console, within=60)


def test_shutdown_returns_when_the_guest_shuts_down(sides: Sides) -> None:
    """Last: the guest powers off. The call is done when QEMU's SHUTDOWN event (or the VM's end) comes."""
    guest = sides.guest
    assert guest.client is not None
    down = vmfront_agent(guest.run_dir, "guest-shutdown")
    assert down.returncode == 0, down.stderr
    assert guest.core.wait(timeout=60) == 0, guest.core.stderr()[-3000:]
    log = guest.client.text()
    assert ("guest-shutdown: the guest shut down (QEMU event SHUTDOWN)" in log
            or "guest-shutdown: the guest went away after it" in log), log[-3000:]
