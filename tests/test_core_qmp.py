"""The core's re-exported QMP against real QEMU, with clients we did not write (qemu.qmp, qmp-shell)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corelib import CoreProcess, RawQmpPeer, running_core, short_tmpdir
from qemu.qmp import ExecuteError, QMPClient


@pytest.fixture(scope="module")
def core() -> Iterator[CoreProcess]:
    """One core with the demo guest, plus a second QMP monitor straight on QEMU for side-by-side checks."""
    tmp = short_tmpdir()
    direct = tmp / "direct.sock"
    try:
        with running_core("qmpt", "--qmp-tcp", "127.0.0.1:0",
                          qemu_args=["-machine", "pc", "-m", "16",
                                     "-qmp", f"unix:{direct},server=on,wait=off"]) as running:
            running.direct_socket = direct  # type: ignore[attr-defined]
            yield running
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def connect(path: Path | tuple[str, int], name: str) -> QMPClient:
    client = QMPClient(name)
    await asyncio.wait_for(client.connect(str(path) if isinstance(path, Path) else path), 10)
    return client


async def next_event(client: QMPClient, name: str, within: float = 10.0) -> dict[str, Any]:
    async def wait() -> dict[str, Any]:
        while True:
            event = await client.events.get()
            if event["event"] == name:
                return dict(event)
    return await asyncio.wait_for(wait(), within)


async def test_two_peers_get_replies_and_events(core: CoreProcess) -> None:
    a = await connect(core.qmp_socket, "peer-a")
    b = await connect(core.qmp_socket, "peer-b")
    try:
        assert a.greeting is not None
        greeting = a.greeting._asdict()["QMP"]
        assert greeting["version"]["qemu"]["major"] >= 7  # type: ignore[index]
        assert "oob" not in greeting["capabilities"]  # type: ignore[operator]
        version = await a.execute("query-version")
        assert version == await b.execute("query-version")  # type: ignore[comparison-overlap]
        assert (await b.execute("query-status"))["status"] == "running"  # type: ignore[index]
        peers = core.state()["peers"]
        assert len(peers) == 2 and all(p["socket"] == "qmp" for p in peers)

        a.events.clear()
        b.events.clear()
        await a.execute("stop")
        assert (await next_event(a, "STOP"))["event"] == "STOP"
        assert (await next_event(b, "STOP"))["event"] == "STOP"
        assert (await b.execute("query-status"))["status"] == "paused"  # type: ignore[index]
        await b.execute("cont")
        await next_event(a, "RESUME")
        await next_event(b, "RESUME")
        # state.json follows the guest.
        deadline = time.monotonic() + 5
        # state.json is written by another process: polling it is the only way to watch it.
        while core.state()["state"] != "running" and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert core.state()["state"] == "running"

        with pytest.raises(ExecuteError) as info:
            await a.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
    finally:
        await a.disconnect()
        await b.disconnect()


def test_same_id_from_two_peers_goes_to_the_right_peer(core: CoreProcess) -> None:
    a = RawQmpPeer(core.qmp_socket).negotiate()
    b = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        for _ in range(20):
            a.send({"execute": "query-status", "id": "same"})
            b.send({"execute": "query-name", "id": "same"})
        for _ in range(20):
            ra, rb = a.recv_reply(), b.recv_reply()
            assert ra["id"] == "same" and "status" in ra["return"]
            assert rb == {"return": {"name": "qmpt"}, "id": "same"}
    finally:
        a.close()
        b.close()


def test_malformed_input_gets_the_same_answer_as_qemu(core: CoreProcess) -> None:
    """Side by side: the same bytes to QEMU's own monitor and to the core must get the same replies."""
    inputs = [  # (bytes, number of replies)
        (b'{"foo\n', 1), (b"}\n", 1), (b"[1,2]\n", 1), (b"123\n", 1), (b'"x"\n', 1), (b'{"execute":1}\n', 1),
        (b'{"id":3}\n', 1), (b'{"execute":"query-status","arguments":[]}\n', 1),
        (b'{"execute":"query-status","extra":1}\n', 1), (b'{"execute":"query-status","arguments":{"x":1},"id":9}\n', 1),
        (b"nul\n", 1), (b'{"execute":"nope","id":{"deep":[1,2,{"x":null}]}}\n', 1),
        (b'{"execute":"qmp_capabilities","id":4}\n', 1),
        (b'{"execute":"query-name"}{"execute":"query-name","id":"no-newline"}', 2),
    ]
    direct_path: Path = core.direct_socket  # type: ignore[attr-defined]
    direct = RawQmpPeer(direct_path).negotiate()
    ours = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        for data, replies in inputs:
            direct.send(data)
            ours.send(data)
            for _ in range(replies):
                assert ours.recv_reply() == direct.recv_reply(), data
        # Before negotiation too (QEMU's monitor takes one peer at a time: hang up first).
        direct.close()
        fresh = [RawQmpPeer(direct_path), RawQmpPeer(core.qmp_socket)]
        for peer in fresh:
            peer.send(b'{"execute":"query-status","id":1}\n')
        assert fresh[1].recv_reply() == fresh[0].recv_reply()
        for peer in fresh:
            peer.close()
    finally:
        direct.close()
        ours.close()


def test_qmp_shell_drives_the_core(core: CoreProcess) -> None:
    shell = Path(sys.executable).with_name("qmp-shell")
    out = subprocess.run([str(shell), str(core.qmp_socket)], input="query-name\nquery-status\nnot-a-command\n",
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "Connected to QEMU 7." in out
    assert '{"return": {"name": "qmpt"}}' in out
    assert '"status": "running"' in out
    assert "The command not-a-command has not been found" in out


async def test_qmp_tcp_endpoint(core: CoreProcess) -> None:
    host, port = core.state()["endpoints"]["qmp_tcp"].rsplit(":", 1)
    client = await connect((host, int(port)), "tcp-peer")
    try:
        assert (await client.execute("query-name")) == {"name": "qmpt"}
        peers = core.state()["peers"]
        assert any(p["socket"] == "qmp-tcp" and p["remote"].startswith("127.0.0.1:") for p in peers)
    finally:
        await client.disconnect()


def test_bad_peers_are_answered_or_closed_and_others_go_on(core: CoreProcess) -> None:
    good = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        # Malformed JSON: an answer, and the connection stays usable.
        bad = RawQmpPeer(core.qmp_socket).negotiate()
        bad.send(b'{"execute": nope}\n')
        assert bad.recv_reply()["error"]["class"] == "GenericError"
        assert "return" in bad.execute("query-name")
        bad.close()

        # A 10 MiB message: an error reply, then the core hangs up on that peer only.
        huge = RawQmpPeer(core.qmp_socket, timeout=30).negotiate()
        payload = b'{"execute":"query-name","arguments":{"x":"' + b"a" * (10 << 20) + b'"}}\n'
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed mid-send: also fine
            huge.sock.sendall(payload)
        reply = huge.recv_reply()
        assert "exceeds the limit" in reply["error"]["desc"]
        with pytest.raises((EOFError, ConnectionResetError)):
            huge.recv()
        huge.close()

        assert good.execute("query-status")["return"]["status"] == "running"
    finally:
        good.close()


def test_peer_that_never_reads_is_closed(core: CoreProcess) -> None:
    good = RawQmpPeer(core.qmp_socket).negotiate()
    stalled = RawQmpPeer(core.qmp_socket).negotiate()
    peers_before = len(core.state()["peers"])
    try:
        # query-qmp-schema replies are ~100 KiB each: unread, their backlog soon passes the 8 MiB limit.
        stalled.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 60
        while len(core.state()["peers"]) == peers_before and time.monotonic() < deadline:
            try:
                stalled.sock.send(b'{"execute":"query-qmp-schema"}\n')
                sent += 1
            except BlockingIOError:
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
            if sent % 25 == 0:  # the well-behaved peer is served all along
                assert good.execute("query-name") == {"return": {"name": "qmpt"}}
        assert len(core.state()["peers"]) == peers_before - 1, f"stalled peer still there after {sent} requests"
        assert good.execute("query-status")["return"]["status"] == "running"
        assert "is not reading" in core.stderr()
    finally:
        stalled.close()
        good.close()


def test_denied_command_names_command_and_socket(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[sockets.qmp]\ndeny = ["system_reset", "human-*"]\n')
    with running_core("pol", "--policy", str(policy), qemu_args=["-machine", "pc", "-m", "16"]) as core:
        peer = RawQmpPeer(core.qmp_socket).negotiate()
        try:
            reply = peer.execute("system_reset", id=5)
            assert reply == {"id": 5, "error": {"class": "GenericError", "desc":
                             "command 'system_reset' is denied by vmfront policy on socket 'qmp'"}}
            reply = peer.execute("human-monitor-command", arguments={"command-line": "info status"})
            assert "denied" in reply["error"]["desc"]
            assert peer.execute("query-status")["return"]["status"] == "running"
        finally:
            peer.close()


def test_status_command(core: CoreProcess) -> None:
    base = [sys.executable, "-m", "vmfront", "status", core.name, "--run-dir", str(core.run_dir)]
    human = subprocess.run(base, capture_output=True, text=True, timeout=30, check=True).stdout
    assert f"VM {core.name}: running (core pid {core.pid})" in human
    assert str(core.qmp_socket) in human
    data = json.loads(subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=30,
                                     check=True).stdout)
    assert data["core_running"] is True and data["state"] == "running" and data["core_pid"] == core.pid
