"""The control channel over real ZeroMQ (ipc:// in a short /tmp directory): sessions, errors, peers that vanish.

Most tests run on both the stdlib loop and uvloop (the daemons run on uvloop). Each test runs its own loop with
an overall deadline; every child process is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
import uvloop
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ipc_messages import any_frame

from ipc.channel import (
    AttachTimeout,
    ChannelError,
    ClientChannel,
    ClientInfo,
    CoreChannel,
    CoreStatus,
    CurveClient,
    CurveServer,
    NotAttached,
    RemoteError,
    RemoteProtocolError,
    RequestError,
    VersionMismatch,
    curve_supported,
    generate_curve_keypair,
    ipc_endpoint,
)
from ipc.messages import (
    MAX_FRAME,
    AgentData,
    AgentWriteOp,
    Broadcast,
    Bye,
    ErrorCode,
    ErrorFrame,
    EventBody,
    Heartbeat,
    Hello,
    InputOp,
    KeyEvent,
    Message,
    Migrated,
    Op,
    PointerEvent,
    ProtocolError,
    QmpEvent,
    QmpOp,
    RefreshOp,
    Reply,
    Request,
    RunStateChanged,
    Welcome,
    WheelEvent,
    decode,
)
from ipc.rundir import RunDirError

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ["asyncio", "uvloop"]
T = TypeVar("T")


def run(loop: str, coro: Coroutine[Any, Any, T], deadline: float = 20.0) -> T:
    """Run one test scenario on a fresh loop of the given kind, with an overall deadline."""
    async def bounded() -> T:
        async with asyncio.timeout(deadline):
            return await coro
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(bounded())


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Core:
    """A CoreChannel with a handler that records calls and a few special QMP commands."""

    def __init__(self, endpoint: str, *, vm_name: str = "vm1", offered: frozenset[str] | None = None,
                 **options: Any) -> None:
        self.calls: list[tuple[str, str, Op]] = []
        self.attached: list[ClientInfo] = []
        self.gone: list[tuple[ClientInfo, float]] = []
        status = CoreStatus("running", shm="/vmfront.vm1.1.abc", shm_generation=3,
                            display_socket="/run/x/display.sock")
        if offered is not None:
            status = CoreStatus("running", capabilities=offered)
        self.channel = CoreChannel(
            endpoint, vm_name=vm_name, handler=self.handle, status=lambda: status,
            on_client_attached=self.attached.append,
            on_client_gone=lambda c: self.gone.append((c, time.monotonic())), **options)

    async def handle(self, client: ClientInfo, op: str, body: Op) -> Any:
        self.calls.append((client.name, op, body))
        if isinstance(body, QmpOp):
            if body.command == "boom":
                raise RuntimeError("a bug in the handler")
            if body.command == "fail":
                raise RequestError("DeviceNotFound", "no such device")
            if body.command == "hang":
                await asyncio.Event().wait()
            if body.command == "echo":
                return body.arguments
            if body.command == "unencodable":
                return object()
            return {"status": "running"}
        return None


@contextlib.asynccontextmanager
async def running_core(endpoint: str, **options: Any) -> AsyncIterator[Core]:
    core = Core(endpoint, **options)
    await core.channel.start()
    try:
        yield core
    finally:
        await core.channel.close()


@contextlib.asynccontextmanager
async def attached_client(endpoint: str, name: str = "c1", **options: Any) -> AsyncIterator[ClientChannel]:
    client = ClientChannel(endpoint, name=name, client_version="test 1", **options)
    await client.connect(timeout_s=10)
    try:
        yield client
    finally:
        await client.close()


class RawPeer:
    """A bare ZeroMQ socket that sends whatever a test wants."""

    def __init__(self, endpoint: str, kind: int = zmq.DEALER, **options: int) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            self.sock.setsockopt(getattr(zmq, name), value)
        self.sock.connect(endpoint)

    async def send(self, *parts: bytes) -> None:
        await asyncio.wait_for(self.sock.send_multipart(list(parts)), 5)

    async def recv(self, timeout_s: float = 5.0) -> Message:
        """The next frame that is not a heartbeat."""
        async with asyncio.timeout(timeout_s):
            while True:
                parts = await self.sock.recv_multipart()
                assert len(parts) == 1
                message = decode(parts[0])
                if not isinstance(message, Heartbeat):
                    return message

    async def recv_until(self, wanted: type[T], timeout_s: float = 5.0) -> T:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.recv(timeout_s)
                if isinstance(message, wanted):
                    return message

    async def hello(self, hello_id: int = 1, instance: str = "raw", **fields: Any) -> Message:
        frame = Hello(id=hello_id, versions=fields.pop("versions", (1,)), instance=instance, pid=os.getpid(),
                      uid=os.getuid(), client_name=fields.pop("client_name", "raw"), client_version="",
                      capabilities=fields.pop("capabilities", ("qmp",)))
        await self.send(frame.encode())
        return await self.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


async def wait_until(predicate: Any, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --- sessions, requests, broadcasts -------------------------------------------------------------------------


def test_hello_welcome_and_the_client_record(loop: str, tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint) as core, attached_client(endpoint, capabilities=["qmp", "input"]) as c:
            assert stat.S_IMODE((tmp / "control.sock").stat().st_mode) == 0o660
            welcome = c.welcome
            assert welcome is not None and c.attached
            assert (welcome.vm, welcome.instance, welcome.core_pid) == ("vm1", core.channel.instance, os.getpid())
            assert (welcome.shm, welcome.shm_generation, welcome.display_socket) == (
                "/vmfront.vm1.1.abc", 3, "/run/x/display.sock")
            assert welcome.capabilities == ("qmp", "input") and welcome.heartbeat_interval == 1.0
            await wait_until(lambda: core.attached, what="on_client_attached")
            info = core.attached[0]
            assert (info.pid, info.uid, info.name, info.client_version) == (os.getpid(), os.getuid(), "c1", "test 1")
            [described] = core.channel.describe_clients()
            assert described["pid"] == os.getpid() and described["uid"] == os.getuid()
            assert abs(described["since"] - time.time()) < 30
        assert not (tmp / "control.sock").exists()
        assert [c.name for c, _ in core.gone] == ["c1"]

    run(loop, scenario())


def test_requests_and_replies(loop: str, tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint) as core, attached_client(endpoint) as c:
            assert await c.qmp("query-status") == {"status": "running"}
            assert await c.qmp("echo", {"a": [1, "x", None, {"b": 2.5}]}) == {"a": [1, "x", None, {"b": 2.5}]}
            events = (KeyEvent(True, qcode="a"), KeyEvent(False, scancode=0xE01D), PointerEvent(10, 20, 1),
                      WheelEvent(-2))
            await c.send_input(events)
            await c.refresh()
            await c.agent_write(b"\xff{\"execute\":\"guest-ping\"}")
            assert [(op, body) for _, op, body in core.calls[2:]] == [
                ("input", InputOp(events)), ("refresh", RefreshOp()),
                ("agent_write", AgentWriteOp(b"\xff{\"execute\":\"guest-ping\"}"))]
            results = await asyncio.gather(*(c.qmp("echo", {"n": n}) for n in range(50)))
            assert results == [{"n": n} for n in range(50)]  # pipelined, in order

    run(loop, scenario())


def test_handler_errors_become_error_replies(loop: str, tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint), attached_client(endpoint) as c:
            with pytest.raises(RemoteError) as failed:
                await c.qmp("fail")
            assert (failed.value.error_class, failed.value.desc) == ("DeviceNotFound", "no such device")
            with pytest.raises(RemoteError) as crashed:
                await c.qmp("boom")
            assert crashed.value.error_class == "GenericError"
            assert "bug" not in crashed.value.desc  # internals stay in the core's log
            with pytest.raises(RemoteError, match="cannot be sent"):
                await c.qmp("unencodable")
            assert await c.qmp("query-status") == {"status": "running"}  # the channel goes on

    run(loop, scenario())
    assert any(r.exc_info and "request" in r.getMessage() for r in caplog.records)


def test_capabilities_limit_ops_and_broadcasts(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        offered = frozenset({"qmp", "input", "qmp-events"})
        async with running_core(endpoint, offered=offered) as core, \
                attached_client(endpoint, "narrow", capabilities=["qmp", "agent"]) as narrow, \
                attached_client(endpoint, "wide", capabilities=["qmp", "qmp-events", "input"]) as wide:
            assert narrow.welcome is not None and narrow.welcome.capabilities == ("qmp",)  # no agent offered
            with pytest.raises(RemoteError) as refused:
                await narrow.send_input([KeyEvent(True, qcode="a")])
            assert refused.value.error_class == "CapabilityNotGranted"
            await wide.send_input([KeyEvent(True, qcode="a")])
            with narrow.subscribe() as narrow_events, wide.subscribe() as wide_events:
                assert core.channel.broadcast(QmpEvent({"event": "STOP"})) == 1
                assert core.channel.broadcast(RunStateChanged("paused", "paused")) == 2
                assert await asyncio.wait_for(wide_events.get(), 5) == QmpEvent({"event": "STOP"})
                assert await asyncio.wait_for(wide_events.get(), 5) == RunStateChanged("paused", "paused")
                assert await asyncio.wait_for(narrow_events.get(), 5) == RunStateChanged("paused", "paused")

    run("uvloop", scenario())


def test_two_clients_both_receive_broadcasts(loop: str, tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")
    seen_by_b: list[EventBody] = []

    async def scenario() -> None:
        async with running_core(endpoint) as core, attached_client(endpoint, "a") as a, \
                attached_client(endpoint, "b", on_event=seen_by_b.append) as b:
            await wait_until(lambda: len(core.channel.clients) == 2, what="two clients")
            sent: list[EventBody] = [RunStateChanged("paused", "paused"), QmpEvent({"event": "STOP", "data": {}}),
                    AgentData(b"\x00\xff"), Migrated("ipc:///elsewhere/control.sock")]
            with a.subscribe() as events_a, b.subscribe(kinds={"run_state"}) as run_states_b:
                for event in sent:
                    assert core.channel.broadcast(event) == 2
                got = [await asyncio.wait_for(events_a.get(), 5) for _ in sent]
                assert got == sent
                assert await asyncio.wait_for(run_states_b.get(), 5) == sent[0]
            await wait_until(lambda: len(seen_by_b) == len(sent), what="b's callback")
            assert seen_by_b == sent
            assert await a.qmp("query-status") == await b.qmp("query-status")

    run(loop, scenario())


# --- bad peers ----------------------------------------------------------------------------------------------


def test_malformed_frames_get_error_frames_and_the_core_goes_on(loop: str, tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def expect_error(peer: RawPeer, code: ErrorCode, *parts: bytes, msg_id: int | None = None) -> None:
        await peer.send(*parts)
        answer = await peer.recv()
        assert isinstance(answer, ErrorFrame), answer
        assert (answer.code, answer.id) == (code, msg_id), answer

    async def scenario() -> None:
        async with running_core(endpoint) as core, attached_client(endpoint) as good:
            raw = RawPeer(endpoint)
            try:
                await expect_error(raw, ErrorCode.MALFORMED, b"\xc1garbage")
                await expect_error(raw, ErrorCode.MALFORMED, msgpack.packb([1, 2, 3]))
                await expect_error(raw, ErrorCode.MALFORMED, Heartbeat("x").encode(), b"second part")
                await expect_error(raw, ErrorCode.UNKNOWN_TYPE, msgpack.packb({"v": 1, "t": "teleport"}))
                await expect_error(raw, ErrorCode.UNSUPPORTED_VERSION,
                                   msgpack.packb({"v": 2, "t": "heartbeat", "instance": "x"}))
                await expect_error(raw, ErrorCode.NOT_ATTACHED, Request(5, RefreshOp()).encode(), msg_id=5)
                await expect_error(raw, ErrorCode.UNKNOWN_OP,
                                   msgpack.packb({"v": 1, "t": "request", "id": 6, "op": "teleport"}), msg_id=6)
                # An error frame is never answered: the next answer is the one to the frame after it.
                await raw.send(ErrorFrame("malformed", "your fault").encode())
                await expect_error(raw, ErrorCode.MALFORMED, b"")
                answer = await raw.hello(hello_id=9, versions=(7, 8))
                assert isinstance(answer, ErrorFrame) and answer.code == ErrorCode.UNSUPPORTED_VERSION
                assert answer.id == 9 and "[1]" in answer.detail
                welcome = await raw.hello(hello_id=10)
                assert isinstance(welcome, Welcome) and welcome.id == 10
                await expect_error(raw, ErrorCode.UNEXPECTED, Broadcast(RunStateChanged("running")).encode())
                await expect_error(raw, ErrorCode.INVALID, msgpack.packb(
                    {"v": 1, "t": "request", "id": 11, "op": "input", "args": {"events": [{"type": "key"}]}}),
                    msg_id=11)
                await raw.send(Request(12, QmpOp("query-status")).encode())
                reply = await raw.recv_until(Reply)
                assert reply == Reply(12, {"status": "running"})
            finally:
                raw.close()
            assert await good.qmp("query-status") == {"status": "running"}
            assert core.channel.clients

    run(loop, scenario())


def test_oversized_frame_is_dropped(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint), attached_client(endpoint) as good:
            raw = RawPeer(endpoint)
            try:
                assert isinstance(await raw.hello(), Welcome)
                await raw.send(b"\x00" * (MAX_FRAME + 1))
                with pytest.raises(TimeoutError):
                    await raw.recv_until(ErrorFrame, timeout_s=0.5)  # never read, so never answered
                # ZeroMQ reconnects the peer by itself; it can attach again and be served.
                async with asyncio.timeout(10):
                    while True:
                        await raw.send(Hello(2, (1,), "raw2", 1, 0, "raw", "", ("qmp",)).encode())
                        with contextlib.suppress(TimeoutError):
                            if isinstance(await raw.recv_until(Welcome, timeout_s=0.5), Welcome):
                                break
            finally:
                raw.close()
            assert await good.qmp("query-status") == {"status": "running"}

    run("asyncio", scenario())


def test_same_hello_twice_keeps_one_session(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint) as core:
            raw = RawPeer(endpoint)
            try:
                assert isinstance(await raw.hello(1, instance="same"), Welcome)
                assert isinstance(await raw.hello(2, instance="same"), Welcome)
                await asyncio.sleep(0.1)
                assert len(core.attached) == 1 and not core.gone
                assert isinstance(await raw.hello(3, instance="other"), Welcome)
                await wait_until(lambda: len(core.gone) == 1 and len(core.attached) == 2, what="new session")
            finally:
                raw.close()

    run("uvloop", scenario())


def test_busy_when_too_many_requests_wait(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint) as core:
            raw = RawPeer(endpoint)
            try:
                assert isinstance(await raw.hello(), Welcome)
                await raw.send(Request(1, QmpOp("hang")).encode())
                await wait_until(lambda: core.calls, what="the first request to run")
                for request_id in range(2, 301):  # 256 wait; the rest are refused
                    await raw.send(Request(request_id, QmpOp("hang")).encode())
                refused = [await raw.recv_until(ErrorFrame) for _ in range(300 - 1 - 256)]
                assert {e.code for e in refused} == {ErrorCode.BUSY}
                assert [e.id for e in refused] == list(range(258, 301))
            finally:
                raw.close()

    run("uvloop", scenario())


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(any_frame, min_size=1, max_size=12), loop_kind=st.sampled_from(LOOPS))
def test_fuzzed_frames_never_break_the_core(frames: list[bytes], loop_kind: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    tmp = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint):
            raw = RawPeer(endpoint)
            try:
                for frame in frames:
                    await raw.send(frame)
                answer = await raw.hello(hello_id=424242, instance="probe")
                while not (isinstance(answer, Welcome) and answer.id == 424242):
                    answer = await raw.recv()
                await raw.send(Request(424243, QmpOp("query-status")).encode())
                while not (isinstance(answer, Reply) and answer.id == 424243):
                    answer = await raw.recv()
                assert answer.result == {"status": "running"}
            finally:
                raw.close()

    try:
        run(loop_kind, scenario())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert not [r for r in caplog.records if r.name == "ipc.channel" and r.exc_info]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(any_frame, min_size=1, max_size=12), loop_kind=st.sampled_from(LOOPS))
def test_fuzzed_frames_never_break_a_client(frames: list[bytes], loop_kind: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A fake core (a bare ROUTER) welcomes the client, then sends it garbage; the client must still work."""
    caplog.clear()
    tmp = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def fake_core(sock: zmq.asyncio.Socket) -> None:
        while True:
            identity, *rest = await sock.recv_multipart()
            with contextlib.suppress(ProtocolError):
                message = decode(rest[0])
                if isinstance(message, Hello):
                    welcome = Welcome(message.id, 1, "fake", "fake-core", 1, "running", 1.0)
                    await sock.send_multipart([identity, welcome.encode()])
                elif isinstance(message, Request):
                    await sock.send_multipart([identity, Reply(message.id, "pong").encode()])

    async def scenario() -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        server = asyncio.get_running_loop().create_task(fake_core(sock))
        try:
            async with attached_client(endpoint) as client:
                for frame in frames:
                    await sock.send_multipart([client.instance.encode(), frame])
                async with asyncio.timeout(10):
                    while True:
                        try:
                            assert await client.qmp("anything", timeout_s=1) == "pong"
                            break
                        except (NotAttached, RemoteProtocolError):
                            await asyncio.sleep(0.05)
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            sock.close(linger=0)

    try:
        run(loop_kind, scenario())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert not [r for r in caplog.records if r.name == "ipc.channel" and r.exc_info]


# --- peers that vanish --------------------------------------------------------------------------------------

CHILD_CLIENT = """
import asyncio, sys
from ipc.channel import ClientChannel

async def main():
    channel = ClientChannel(sys.argv[1], name="victim")
    await channel.connect(timeout_s=20)
    print("attached", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""

CHILD_CORE = """
import asyncio, sys
from ipc.channel import CoreChannel, CoreStatus

async def handler(client, op, body):
    if getattr(body, "command", "") == "hang":
        await asyncio.Event().wait()
    return "from the child core"

async def main():
    core = CoreChannel(sys.argv[1], vm_name="child", handler=handler, status=lambda: CoreStatus("running"))
    await core.start()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def child(script: str, endpoint: str, expect: bytes) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python child running ``script``; yields once it printed ``expect``; always ended by its pid."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, endpoint, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == expect, line
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)


def test_killed_client_process_is_noticed_within_3_seconds(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> float:
        async with running_core(endpoint) as core, child(CHILD_CLIENT, endpoint, b"attached") as proc:
            await wait_until(lambda: any(c.pid == proc.pid for c in core.attached), what="child attached")
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            await wait_until(lambda: any(c.pid == proc.pid for c, _ in core.gone), timeout_s=10, what="gone")
            gone_at = next(at for c, at in core.gone if c.pid == proc.pid)
            assert not core.channel.clients
            return gone_at - killed_at

    noticed_after = run("uvloop", scenario())
    print(f"killed client noticed after {noticed_after:.3f} s")
    assert noticed_after < 3.5, f"the core noticed the killed client only after {noticed_after:.2f} s"


def test_silent_client_is_dropped_by_heartbeat_expiry(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint, interval=0.2) as core:
            raw = RawPeer(endpoint)  # connected, attached, then never says anything again
            try:
                welcome = await raw.hello()
                assert isinstance(welcome, Welcome) and welcome.heartbeat_interval == 0.2
                started = time.monotonic()
                await wait_until(lambda: core.gone, timeout_s=5, what="expiry")
                assert 0.4 <= core.gone[0][1] - started < 2.0
                bye = await raw.recv_until(Bye)  # best effort, so that a live but stuck client re-attaches
                assert "heartbeat" in bye.reason
            finally:
                raw.close()

    run("asyncio", scenario())


def test_client_that_stops_reading_is_dropped(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        async with running_core(endpoint, send_hwm=4) as core:
            raw = RawPeer(endpoint, RCVHWM=1)
            try:
                assert isinstance(await raw.hello(capabilities=("agent",)), Welcome)
                chunk = AgentData(b"x" * (256 << 10))
                for _ in range(2000):
                    if core.channel.broadcast(chunk) == 0:
                        break
                    await asyncio.sleep(0)
                assert not core.channel.clients
                await wait_until(lambda: core.gone, what="on_client_gone")
            finally:
                raw.close()

    run("uvloop", scenario())


def test_core_restart_on_the_same_path_is_followed(loop: str, tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")
    reattached: list[Welcome] = []
    detached: list[str] = []

    async def scenario() -> None:
        first = Core(endpoint)
        await first.channel.start()
        async with attached_client(endpoint, on_reattached=reattached.append, on_detached=detached.append) as c:
            pending = asyncio.ensure_future(c.qmp("hang", timeout_s=30))
            await wait_until(lambda: first.calls, what="request in the core")
            closing = asyncio.ensure_future(first.channel.close())
            with pytest.raises(NotAttached):
                await asyncio.wait_for(pending, 1.0)  # pending requests fail at once, they do not hang
            await closing
            with pytest.raises(NotAttached):
                await c.qmp("query-status")  # not queued for a later core
            async with running_core(endpoint) as second:
                await wait_until(lambda: reattached, timeout_s=10, what="re-attach")
                assert reattached[0].instance == second.channel.instance != first.channel.instance
                assert await c.qmp("query-status") == {"status": "running"}
                assert detached and "bye" in detached[0]

    run(loop, scenario())


def test_core_crash_fails_pending_requests_fast_and_the_client_reattaches(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")
    reattached: list[Welcome] = []

    async def scenario() -> float:
        async with child(CHILD_CORE, endpoint, b"ready") as proc, \
                attached_client(endpoint, on_reattached=reattached.append) as c:
            assert await c.qmp("query-status") == "from the child core"
            pending = asyncio.ensure_future(c.qmp("hang", timeout_s=30))
            await asyncio.sleep(0.2)
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(NotAttached):
                await pending
            failed_after = time.monotonic() - killed_at
            async with running_core(endpoint) as restarted:  # same path, new instance, no bye from the old one
                await wait_until(lambda: reattached, timeout_s=10, what="re-attach")
                assert reattached[0].instance == restarted.channel.instance
                assert await c.qmp("query-status") == {"status": "running"}
            return failed_after

    failed_after = run("uvloop", scenario())
    print(f"pending request failed {failed_after:.3f} s after the core was killed")
    assert failed_after < 3.5, f"the pending request failed only {failed_after:.2f} s after the core died"


def test_a_dropped_client_that_is_still_there_attaches_again(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")
    reattached: list[Welcome] = []

    async def scenario() -> None:
        async with running_core(endpoint) as core, attached_client(endpoint, on_reattached=reattached.append) as c:
            await wait_until(lambda: core.attached, what="attached")
            core.channel.disconnect(core.attached[0], "kicked by the test")
            await wait_until(lambda: reattached, what="re-attach")
            assert reattached[0].instance == core.channel.instance  # the same core: the client refreshes anyway
            assert [info.name for info, _ in core.gone] == ["c1"] and len(core.attached) == 2
            assert await c.qmp("query-status") == {"status": "running"}

    run("asyncio", scenario())


def test_version_mismatch_and_no_core(tmp: Path) -> None:
    endpoint = ipc_endpoint(tmp / "control.sock")

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(AttachTimeout):
            await ClientChannel(endpoint, name="early").connect(timeout_s=0.5)
        assert time.monotonic() - started < 2
        async with running_core(endpoint):
            with pytest.raises(VersionMismatch, match=r"\[1\]"):
                await ClientChannel(endpoint, name="future", versions=(7, 8)).connect(timeout_s=5)

    run("asyncio", scenario())


def test_move_to_another_core(tmp: Path) -> None:
    endpoint_a = ipc_endpoint(tmp / "a.sock")
    endpoint_b = ipc_endpoint(tmp / "b.sock")
    reattached: list[Welcome] = []

    async def scenario() -> None:
        async with running_core(endpoint_a, vm_name="source") as a, \
                running_core(endpoint_b, vm_name="destination") as b:
            moved = asyncio.Event()

            def on_event(event: EventBody) -> None:
                if isinstance(event, Migrated):
                    client.move_to(event.endpoint)
                    moved.set()

            async with attached_client(endpoint_a, on_event=on_event,
                                       on_reattached=reattached.append) as client:
                a.channel.broadcast(Migrated(b.channel.endpoint))
                await asyncio.wait_for(moved.wait(), 5)
                await wait_until(lambda: reattached, timeout_s=10, what="attach to the destination")
                assert reattached[0].vm == "destination"
                await client.qmp("query-status")
                assert b.calls and not a.calls
                await wait_until(lambda: a.gone, what="the source to notice")
                await asyncio.sleep(0.3)
                assert len(reattached) == 1 and client.attached  # leaving the source is no reason to detach

    run("uvloop", scenario())


def test_endpoints_are_checked(tmp: Path) -> None:
    with pytest.raises(RunDirError, match="too long"):
        CoreChannel(f"ipc://{tmp}/{'x' * 120}.sock", vm_name="v", handler=Core.handle,  # type: ignore[arg-type]
                    status=lambda: CoreStatus("running"))
    with pytest.raises(ChannelError, match="CurveZMQ"):
        CoreChannel("tcp://127.0.0.1:*", vm_name="v", handler=Core.handle,  # type: ignore[arg-type]
                    status=lambda: CoreStatus("running"))
    with pytest.raises(ChannelError, match="CurveZMQ"):
        ClientChannel("tcp://127.0.0.1:5555", name="c")
    with pytest.raises(ChannelError, match="unsupported"):
        ClientChannel("inproc://x", name="c")


@pytest.mark.skipif(not curve_supported(), reason="libzmq without CURVE")
def test_tcp_with_curve_keys(tmp: Path) -> None:
    server, allowed, stranger = generate_curve_keypair(), generate_curve_keypair(), generate_curve_keypair()

    async def scenario() -> None:
        async with running_core("tcp://127.0.0.1:*", curve=CurveServer(server, frozenset({allowed.public}))) as core:
            endpoint = core.channel.endpoint
            assert endpoint.startswith("tcp://127.0.0.1:")
            async with attached_client(endpoint, curve=CurveClient(allowed, server.public)) as c:
                assert await c.qmp("query-status") == {"status": "running"}
            with pytest.raises(AttachTimeout):
                await ClientChannel(endpoint, name="stranger",
                                    curve=CurveClient(stranger, server.public)).connect(timeout_s=1)
            with pytest.raises(AttachTimeout):
                await ClientChannel(endpoint, name="wrong-server-key",
                                    curve=CurveClient(allowed, stranger.public)).connect(timeout_s=1)

    run("uvloop", scenario())
