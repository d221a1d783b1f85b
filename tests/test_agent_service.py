"""AgentService in-process against a scripted agent: queueing, timeouts, resync, simulated migration."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from clients.agent.service import AgentBusy, AgentService, AgentState, AgentTimeout
from clients.main import ClientConfig, ClientContext
from ipc.messages import AgentData, Migrated, Migrating, RunStateChanged, Welcome
from ipc.rundir import RunDir


class FakeChannel:
    """Stands in for ClientChannel: what the service writes goes to a tiny scripted qemu-ga."""

    def __init__(self) -> None:
        self.service: AgentService | None = None
        self.silent = False
        self.commands: list[str] = []

    async def agent_write(self, data: bytes) -> None:
        assert self.service is not None
        service = self.service
        for line in data.split(b"\n"):
            if not line.strip(b"\xff"):
                continue
            request = json.loads(line.lstrip(b"\xff"))
            self.commands.append(request["execute"])
            if self.silent:
                continue
            if request["execute"] == "guest-sync-delimited":
                reply = b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
            else:
                reply = json.dumps({"return": {"echo": request["execute"]}, "id": request["id"]}).encode() + b"\n"
            asyncio.get_running_loop().call_later(0.01, service.event, AgentData(reply))


def welcome(run_state: str = "running") -> Welcome:
    return Welcome(vm="t", instance="i", core_pid=1, run_state=run_state, heartbeat_interval=1.0, shm=None,
                   shm_generation=None, display_socket=None, capabilities=("agent",), version=1, id=1)


async def make_service() -> tuple[AgentService, FakeChannel]:
    channel = FakeChannel()
    service = AgentService(None)
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
