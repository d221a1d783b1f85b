"""The core's guest-agent relay against the real qemu-ga (host-run, unix-listen): bytes through, unparsed."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import RawQmpPeer, kill_pid, running_core, short_tmpdir

from ipc.channel import ClientChannel, RemoteError, ipc_endpoint
from ipc.messages import AgentData, AgentWriteOp

QEMU_GA = shutil.which("qemu-ga") or "/usr/bin/qemu-ga"


@pytest.fixture
def qga() -> Iterator[Path]:
    """A real qemu-ga listening on a unix socket, as the issue prescribes for host-side tests."""
    root = short_tmpdir()
    sock = root / "qga.sock"
    proc = subprocess.Popen([QEMU_GA, "-m", "unix-listen", "-p", str(sock), "-t", str(root)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, "qemu-ga exited at start"
            assert time.monotonic() < deadline, "qemu-ga never created its socket"
            time.sleep(0.05)
        yield sock
        assert proc.poll() is None, "qemu-ga must still run: the relay never dropped its connection"
    finally:
        kill_pid(proc.pid)
        proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


async def agent_call(channel: ClientChannel, replies: asyncio.Queue[bytes], message: dict[str, object]) -> object:
    await channel.request(AgentWriteOp(json.dumps(message).encode() + b"\n"))
    buffer = b""
    while b"\n" not in buffer:
        buffer += await asyncio.wait_for(replies.get(), 10)
    return json.loads(buffer.split(b"\n", 1)[0])


async def test_relay_to_real_qemu_ga_survives_client_churn(qga: Path) -> None:
    with running_core("ag", "--agent-socket", str(qga), qemu_args=["-machine", "pc", "-m", "16"]) as core:
        assert core.state()["endpoints"]["agent"] == str(qga)
        endpoint = ipc_endpoint(core.run_dir / "control.sock")
        for round_ in range(3):  # clients come and go; the agent's connection stays
            replies: asyncio.Queue[bytes] = asyncio.Queue()
            channel = ClientChannel(endpoint, name=f"agent-test-{round_}",
                                    on_event=lambda body, q=replies: q.put_nowait(body.data)  # type: ignore[misc]
                                    if isinstance(body, AgentData) else None)
            await channel.connect(timeout_s=10)
            try:
                assert await agent_call(channel, replies, {"execute": "guest-ping"}) == {"return": {}}
                info = await agent_call(channel, replies, {"execute": "guest-info"})
                assert isinstance(info, dict) and "version" in info["return"]
            finally:
                await channel.close()
        # The core's QMP is unaffected by all of it.
        assert RawQmpPeer(core.qmp_socket).negotiate().execute("query-name") == {"return": {"name": "ag"}}


async def test_agent_write_without_an_agent_is_a_clear_error() -> None:
    with running_core("noag", qemu_args=["-machine", "pc", "-m", "16"]) as core:
        channel = ClientChannel(ipc_endpoint(core.run_dir / "control.sock"), name="noagent")
        await channel.connect(timeout_s=10)
        try:
            with pytest.raises(RemoteError) as info:
                await channel.request(AgentWriteOp(b'{"execute":"guest-ping"}\n'))
            # A core without an agent does not offer the capability at all.
            assert info.value.error_class == "CapabilityNotGranted"
            assert "agent" not in (channel.welcome.capabilities if channel.welcome else ())
        finally:
            await channel.close()


def test_agent_option_gives_the_guest_a_virtio_serial_port() -> None:
    with running_core("vs", "--agent") as core:
        peer = RawQmpPeer(core.qmp_socket).negotiate()
        chardevs = {c["label"]: c for c in peer.execute("query-chardev")["return"]}
        assert "vmfront-qga" in chardevs
        # ("disconnected:unix:..." until the core's relay has connected: it does so after the core is ready.)
        assert chardevs["vmfront-qga"]["filename"].removeprefix("disconnected:").startswith("unix:")
        ports = peer.execute("qom-list", arguments={"path": "/machine/peripheral/vmfront-vserial"})
        assert "error" not in ports
        assert core.state()["endpoints"]["agent"] == str(core.run_dir / "private" / "qga.sock")
        peer.close()
