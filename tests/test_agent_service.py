"""AgentService in-process against a scripted agent: queueing, timeouts, resync, simulated migration."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clients.agent.errors import AgentError, AgentGarbage, AgentUnavailable
from clients.agent.protocol import NO_REPLY_COMMANDS
from clients.agent.qemu_json import RawJson
from clients.agent.service import AgentBusy, AgentService, AgentState, AgentTimeout
from clients.main import ClientConfig, ClientContext
from ipc.messages import MAX_AGENT_CHUNK, AgentData, Migrated, Migrating, QmpEvent, RunStateChanged, Welcome
from ipc.rundir import RunDir


class FakeChannel:
    """Stands in for ClientChannel: what the service writes goes to a tiny scripted qemu-ga (requests may come in
    several frames; ``reply`` makes a command's ``return`` value, ``pace`` delays each 64 KiB of a reply)."""

    def __init__(self) -> None:
        self.service: AgentService | None = None
        self.silent = False
        self.commands: list[str] = []
        self.arguments: list[Any] = []
        self.frames: list[int] = []  # agent_write sizes
        self.acks: list[int] = []
        self.status = "running"  # what query-status says
        self.reply: Callable[[str, Any], Any] = lambda command, arguments: {"echo": command}
        self.pace = 0.0
        self._pending = b""

    async def agent_write(self, data: bytes, *, timeout_s: float | None = None) -> None:
        assert self.service is not None and len(data) <= MAX_AGENT_CHUNK
        self.frames.append(len(data))
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if not line.strip(b"\xff"):
                continue
            request = json.loads(line.lstrip(b"\xff"))
            self.commands.append(request["execute"])
            self.arguments.append(request.get("arguments"))
            if self.silent or request["execute"] in NO_REPLY_COMMANDS:  # (those answer only when they fail)
                continue
            if request["execute"] == "guest-sync-delimited":
                reply = b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
            else:
                value = self.reply(request["execute"], request.get("arguments"))
                reply = json.dumps({"return": value, "id": request["id"]}).encode() + b"\n"
            asyncio.get_running_loop().create_task(self._answer(reply))

    async def _answer(self, reply: bytes) -> None:
        assert self.service is not None
        await asyncio.sleep(0.01)
        for start in range(0, len(reply), 65536):
            self.service.event(AgentData(reply[start:start + 65536]))
            if self.pace:
                await asyncio.sleep(self.pace)

    async def agent_ack(self, frames: int) -> None:
        self.acks.append(frames)

    async def qmp(self, command: str, arguments: Any = None, *, timeout_s: float | None = None) -> Any:
        assert command == "query-status"
        return {"status": self.status, "running": self.status == "running"}


def welcome(run_state: str = "running") -> Welcome:
    return Welcome(vm="t", instance="i", core_pid=1, run_state=run_state, heartbeat_interval=1.0, shm=None,
                   shm_generation=None, display_socket=None, capabilities=("agent",), version=1, id=1)


async def make_service(max_reply: int | None = None) -> tuple[AgentService, FakeChannel]:
    channel = FakeChannel()
    service = AgentService(None) if max_reply is None else AgentService(None, max_reply=max_reply)
    channel.service = service
    ctx = ClientContext(ClientConfig("t", RunDir(Path("/nonexistent"))), channel=channel)  # type: ignore[arg-type]
    await service.bind(ctx)
    await service.start()
    service.attached(welcome())
    return service, channel


async def test_calls_are_serialised_and_synced_once() -> None:
    service, channel = await make_service()
    try:
        results = await asyncio.gather(*(service.call("guest-ping") for _ in range(5)))
        assert results == [{"echo": "guest-ping"}] * 5
        assert channel.commands == ["guest-sync-delimited"] + ["guest-ping"] * 5
        assert service.state is AgentState.READY
    finally:
        await service.close()


async def test_timeout_then_resync() -> None:
    service, channel = await make_service()
    try:
        await service.call("guest-ping")
        channel.silent = True
        start = time.monotonic()
        with pytest.raises(AgentTimeout, match="guest-ping"):
            await service.call("guest-ping", timeout_s=0.3)
        assert time.monotonic() - start < 1.0
        channel.silent = False
        assert await service.call("guest-info") == {"echo": "guest-info"}
        assert channel.commands[-2:] == ["guest-sync-delimited", "guest-info"]
    finally:
        await service.close()


async def test_guest_going_away_after_shutdown_is_success() -> None:
    """guest-shutdown never answers; a guest that powers off at once makes QEMU exit and the core say bye."""
    service, channel = await make_service()
    try:
        await service.call("guest-ping")
        channel.silent = True
        asyncio.get_running_loop().call_later(0.2, service.detached, "QEMU exited")
        start = time.monotonic()
        assert await service.call("guest-shutdown") is None
        assert time.monotonic() - start < 1.0, "waited out the grace period instead of seeing the guest go"
        assert channel.commands[-1] == "guest-shutdown"
    finally:
        await service.close()


async def test_migration_waits_or_fails_busy() -> None:
    service, _ = await make_service()
    try:
        service.event(Migrating())
        assert service.state is AgentState.MIGRATING
        with pytest.raises(AgentBusy, match="migrating"):
            await service.call("guest-ping", wait_if_busy=False)
        with pytest.raises(AgentBusy, match="still migrating"):
            await service.call("guest-ping", timeout_s=0.3)
        waiting = asyncio.ensure_future(service.call("guest-ping", timeout_s=5))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        # "Migrated" alone does not release it: the client has yet to attach to the new core (the old core's
        # last state changes do not either) ...
        service.event(Migrated("ipc:///elsewhere"))
        service.event(RunStateChanged("paused", "postmigrate"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        with pytest.raises(AgentBusy, match="migrating"):
            await service.call("guest-ping", wait_if_busy=False)
        # ... attaching there does.
        service.detached("moved to ipc:///elsewhere")
        service.attached(welcome())
        assert await waiting == {"echo": "guest-ping"}
        # A run-state change that is not "migrating" also ends it (e.g. the migration failed and the guest runs).
        service.event(Migrating())
        service.event(RunStateChanged("running", "running"))
        assert await service.call("guest-ping", wait_if_busy=False) == {"echo": "guest-ping"}
        assert service.migrations == 2
    finally:
        await service.close()


async def test_stateful_proxy_session_fails_after_a_migration(tmp_path: Path) -> None:
    """What copy-to/copy-from rely on: once a migration started, the session's next step fails, says retry."""
    import socket as _socket

    path = Path("/tmp") / f"vmf-agent-test-{time.monotonic_ns()}.sock"
    channel = FakeChannel()
    service = AgentService(path)
    channel.service = service
    ctx = ClientContext(ClientConfig("t", RunDir(tmp_path)), channel=channel)  # type: ignore[arg-type]
    await service.bind(ctx)
    await service.start()
    service.attached(welcome())
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))

        async def call(request: dict[str, Any]) -> Any:
            writer.write(json.dumps(request).encode() + b"\n")
            return json.loads(await asyncio.wait_for(reader.readline(), 5))

        assert (await call({"execute": "vmfront-session", "arguments": {"wait": False, "stateful": True}})
                == {"return": {"state": "ready"}})
        assert await call({"execute": "guest-file-write", "id": "a"}) == {"return": {"echo": "guest-file-write"},
                                                                          "id": "a"}
        service.event(Migrating())
        service.event(Migrated("ipc:///elsewhere"))
        reply = await call({"execute": "guest-file-write"})
        assert reply["error"]["class"] == "AgentBusy" and "retry" in reply["error"]["desc"]
        writer.close()
        assert _socket.AF_UNIX  # the proxy is a plain unix socket
    finally:
        await service.close()
    assert not path.exists()


async def test_big_request_goes_in_frames_and_big_reply_comes_back_raw_or_plain() -> None:
    """A 3 MiB guest-file-write in frames of at most 1 MiB; a 4 MiB reply read as it comes, its data kept raw for
    the proxy (raw=True), decoded for everyone else."""
    service, channel = await make_service()
    data = base64.b64encode(bytes(range(256)) * 12288).decode()  # 3 MiB of data, 4 MiB of base64
    channel.reply = lambda command, arguments: {"count": 3 << 20, "buf-b64": data, "eof": False}
    try:
        await service.call("guest-file-write", {"handle": 1, "buf-b64": data})
        assert channel.arguments[-1]["buf-b64"] == data and max(channel.frames) == MAX_AGENT_CHUNK
        assert sum(channel.frames[1:]) > 4 << 20  # (frames[0]: the sync)
        raw = await service.call("guest-file-read", {"handle": 1, "count": 3 << 20}, raw=True)
        assert isinstance(raw["buf-b64"], RawJson) and raw["buf-b64"].decode() == data
        assert await service.call("guest-file-read", {"handle": 1, "count": 3 << 20}) == {
            "count": 3 << 20, "buf-b64": data, "eof": False}
        assert sum(channel.acks) >= 2 * 64 - 16  # every 16 frames of the two 4 MiB replies acknowledged
    finally:
        await service.close()


async def test_a_read_whose_reply_cannot_be_taken_is_refused_before_it_is_sent() -> None:
    service, channel = await make_service(max_reply=1 << 20)
    try:
        with pytest.raises(AgentError, match=r"nothing was read \(read at most 786240 bytes"):
            await service.call("guest-file-read", {"handle": 1, "count": 1 << 20})
        assert "guest-file-read" not in channel.commands
        await service.call("guest-file-read", {"handle": 1, "count": 700_000})  # fits: sent
        await service.call("guest-file-read", {"handle": 1, "count": 49 << 20})  # qemu-ga's own error, unsent here
        assert channel.commands.count("guest-file-read") == 2
    finally:
        await service.close()


async def test_an_oversize_reply_says_how_far_the_guest_read() -> None:
    service, channel = await make_service(max_reply=1 << 20)
    channel.reply = lambda command, arguments: {"count": 700_000, "buf-b64": "QUFB" * 400_000, "eof": False}
    try:
        with pytest.raises(AgentGarbage, match="the guest read 700000 bytes and its file position moved past them"):
            await service.call("guest-file-read", {"handle": 1, "count": 700_000})
    finally:
        await service.close()


async def test_a_slow_big_reply_is_not_cut_off_while_it_progresses() -> None:
    """8 MiB arriving over about 4 s with a 2 s timeout: every MiB that arrives (every 0.5 s) gives it 2 s more.
    A reply that stops coming fails at its deadline, saying how far a read may have moved the file position."""
    service, channel = await make_service()
    channel.reply = lambda command, arguments: {"count": 6 << 20, "buf-b64": "QUFB" * (2 << 20)}
    channel.pace = 0.03
    try:
        start = time.monotonic()
        reply = await service.call("guest-file-read", {"handle": 1, "count": 6 << 20}, timeout_s=2)
        assert len(reply["buf-b64"]) == 8 << 20 and time.monotonic() - start > 2
        channel.silent = True
        with pytest.raises(AgentTimeout, match="may have read up to 4096 bytes and its file position moved"):
            await service.call("guest-file-read", {"handle": 1}, timeout_s=0.3)
    finally:
        await service.close()


async def test_suspend_and_shutdown_are_done_when_qemu_says_the_guest_went() -> None:
    """No reply ever comes for them: QEMU's SUSPEND or SHUTDOWN event ends the call (its grace period is long
    here: reaching it would fail the wait_for), and while suspended calls fail at once saying why."""
    service, channel = await make_service()
    loop = asyncio.get_running_loop()
    try:
        await service.call("guest-ping")
        loop.call_later(0.1, service.event, QmpEvent({"event": "SUSPEND"}))
        assert await asyncio.wait_for(service.call("guest-suspend-ram", timeout_s=60), 10) is None
        channel.status = "suspended"
        with pytest.raises(AgentUnavailable, match="guest-ping: the guest is suspended"):
            await asyncio.wait_for(service.call("guest-ping", timeout_s=60), 10)
        # Woken up (by another QMP peer: the event may come after the next call) and answering again.
        channel.status, channel.silent = "running", False
        assert await service.call("guest-ping") == {"echo": "guest-ping"}
        service.event(QmpEvent({"event": "WAKEUP"}))
        # A command in flight when the guest shuts down fails at once; guest-shutdown itself succeeds.
        channel.silent = True
        loop.call_later(0.1, service.event, QmpEvent({"event": "SHUTDOWN", "data": {"guest": True}}))
        with pytest.raises(AgentUnavailable, match="guest-info: the guest shut down"):
            await asyncio.wait_for(service.call("guest-info", timeout_s=60), 10)
        channel.silent = False
        loop.call_later(0.1, service.event, QmpEvent({"event": "SHUTDOWN", "data": {"guest": True}}))
        assert await asyncio.wait_for(service.call("guest-shutdown", timeout_s=60), 10) is None
    finally:
        await service.close()


async def test_a_paused_vm_is_named_when_the_agent_is_silent() -> None:
    service, channel = await make_service()
    try:
        await service.call("guest-ping")
        channel.silent = True
        service.event(RunStateChanged("paused", "paused"))
        channel.status = "paused"
        with pytest.raises(AgentTimeout, match="the VM is not running: QEMU status 'paused'"):
            await service.call("guest-ping", timeout_s=0.3)
    finally:
        await service.close()
