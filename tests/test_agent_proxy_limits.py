"""The agent proxy's limits against hostile local peers (clients/agent/proxy.py), on its real unix socket, with
the scripted qemu-ga of test_agent_service behind the service: a connection cap whose evictions keep the
connections that do work, large unfinished requests in two slots, replies that are never read."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_service import FakeChannel, welcome

from clients.agent import proxy as proxy_module
from clients.agent.proxy import PROXY_LARGE_SLOTS, PROXY_MAX_CONNECTIONS
from clients.agent.service import AgentService
from clients.main import ClientConfig, ClientContext
from ipc.rundir import RunDir


class Script:
    """One connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, request: dict[str, Any]) -> Any:
        self.writer.write(json.dumps(request).encode() + b"\n")
        return json.loads(await asyncio.wait_for(self.reader.readline(), 10))

    async def closed(self, within: float = 10) -> bool:
        """Whether the proxy closed this connection (EOF or reset) within ``within`` seconds."""
        try:
            while await asyncio.wait_for(self.reader.read(1 << 16), within):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[AgentService, FakeChannel, Path]]:
    path = Path("/tmp") / f"vmf-proxy-limits-{time.monotonic_ns()}.sock"
    channel = FakeChannel()
    service = AgentService(path)
    channel.service = service
    await service.bind(ClientContext(ClientConfig("t", RunDir(tmp_path)), channel=channel))  # type: ignore[arg-type]
    await service.start()
    service.attached(welcome())
    try:
        yield service, channel, path
    finally:
        await service.close()


async def connect(path: Path) -> Script:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
    return Script(reader, writer)


PING = {"execute": "guest-ping"}
ECHO = {"return": {"echo": "guest-ping"}}


async def test_a_flood_of_idle_connections_only_evicts_itself(tmp_path: Path) -> None:
    async with serving(tmp_path) as (service, _, path):
        worker = await connect(path)
        assert await worker.call(PING) == ECHO
        flood = [await connect(path) for _ in range(PROXY_MAX_CONNECTIONS - 1 + 20)]
        await asyncio.sleep(0.2)
        proxy = service._proxy
        assert proxy is not None and len(proxy.sessions) == PROXY_MAX_CONNECTIONS and proxy.evicted == 20
        # The oldest of those that never completed a request went first; the one that works stayed.
        assert all([await script.closed(within=2) for script in flood[:20]])
        assert await worker.call(PING) == ECHO
        assert await flood[-1].call(PING) == ECHO
        # A burst, accepted in one turn of the loop: each newcomer evicts another connection, never one twice.
        burst = []
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            sock.connect(str(path))
            burst.append(sock)
        await asyncio.sleep(0.5)
        assert len(proxy.sessions) == PROXY_MAX_CONNECTIONS and proxy.evicted == 60
        assert await worker.call(PING) == ECHO
        for script in (worker, *flood):
            script.close()
        for sock in burst:
            sock.close()


async def test_when_all_have_worked_the_one_idle_longest_goes(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_service, _, path):
        scripts = [await connect(path) for _ in range(PROXY_MAX_CONNECTIONS)]
        for script in scripts:
            assert await script.call(PING) == ECHO
        assert await scripts[0].call(PING) == ECHO  # the first is active again: the second is idle the longest
        newcomer = await connect(path)
        assert await newcomer.call(PING) == ECHO
        assert await scripts[1].closed(within=2)
        assert await scripts[0].call(PING) == ECHO
        for script in (*scripts, newcomer):
            script.close()


async def test_when_every_connection_is_busy_a_newcomer_is_refused(tmp_path: Path) -> None:
    async with serving(tmp_path) as (service, channel, path):
        channel.silent = True
        scripts = [await connect(path) for _ in range(PROXY_MAX_CONNECTIONS)]
        for script in scripts:
            script.writer.write(json.dumps(PING).encode())  # all waiting for the (silent) agent
        await asyncio.sleep(0.3)
        refused = await connect(path)
        line = await asyncio.wait_for(refused.reader.readline(), 5)
        assert json.loads(line)["error"]["class"] == "AgentBusy" and b"16 connections" in line
        assert await refused.closed(within=2)
        assert service._proxy is not None and service._proxy.refused == 1
        for script in scripts:
            script.close()


async def test_large_unfinished_requests_wait_for_a_slot_and_stalled_holders_lose_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two connections that start 2 MiB requests and stop hold both large slots; a third one's 3 MiB request
    waits, small requests go on meanwhile, and once a holder has sent nothing for PROXY_STALL seconds it loses its
    connection and the waiting request goes through. A waiter evicts the holders stalled when it looks (their
    last bytes were read at slightly different times: one or both); a second round that needs every slot again
    takes the last holder's, so by then both are gone."""
    monkeypatch.setattr(proxy_module, "PROXY_STALL", 1.0)
    async with serving(tmp_path) as (service, channel, path):
        data = base64.b64encode(b"x" * (3 << 20)).decode()
        stalled = [await connect(path) for _ in range(PROXY_LARGE_SLOTS)]
        for script in stalled:  # staggered: usually the first waiter finds one holder stalled, not both
            script.writer.write(b'{"execute":"guest-file-write","arguments":{"handle":1,"buf-b64":"' + b"A" * (2 << 20))
            await asyncio.sleep(0.4)
        big = await connect(path)
        answer = asyncio.ensure_future(big.call({"execute": "guest-file-write",
                                                 "arguments": {"handle": 1, "buf-b64": data}}))
        small = await connect(path)
        for _ in range(3):
            assert await small.call({"execute": "guest-sync", "arguments": {"id": 5}}) == {"return": 5}
            assert await small.call(PING) == ECHO
        assert not answer.done()
        assert await asyncio.wait_for(answer, 10) == {"return": {"echo": "guest-file-write"}}
        assert channel.arguments[-1]["buf-b64"] == data
        assert service._proxy is not None and service._proxy.evicted >= 1
        # Round two, once any holder left is stalled too: a new connection takes the free slot and stops, and
        # another large request then needs the last slot: a holder left loses it now.
        await asyncio.sleep(1.2)
        filler = await connect(path)
        filler.writer.write(b'{"execute":"guest-file-write","arguments":{"handle":1,"buf-b64":"' + b"A" * (2 << 20))
        await asyncio.sleep(0.3)
        late = await connect(path)
        assert await asyncio.wait_for(late.call({"execute": "guest-file-write",
                                                 "arguments": {"handle": 1, "buf-b64": data}}), 10) == \
            {"return": {"echo": "guest-file-write"}}
        assert all([await script.closed(within=2) for script in stalled])
        assert service._proxy.evicted == PROXY_LARGE_SLOTS
        for script in (big, small, filler, late):
            script.close()


async def test_a_script_that_never_reads_its_reply_is_dropped(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_module, "PROXY_WRITE_TIMEOUT", 1.0)
    async with serving(tmp_path) as (service, channel, path):
        channel.reply = lambda command, arguments: {"buf-b64": "QUFB" * (4 << 20)} if command == "guest-file-read" \
            else {"echo": command}
        lazy = socket.socket(socket.AF_UNIX)
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        lazy.connect(str(path))
        lazy.sendall(b'{"execute":"guest-file-read","arguments":{"handle":1,"count":12582912}}')
        other = await connect(path)
        await asyncio.sleep(0.5)
        assert await other.call(PING) == ECHO  # others are answered while that reply waits
        deadline = time.monotonic() + 10
        while service._proxy is not None and service._proxy.evicted == 0:
            assert time.monotonic() < deadline, "the connection that read nothing was kept"
            await asyncio.sleep(0.1)
        assert await other.call(PING) == ECHO
        lazy.close()
        other.close()
