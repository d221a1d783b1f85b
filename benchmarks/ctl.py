"""The control channel vs a plain unix socket carrying the same msgpack messages, between two processes.

A child process serves three ways: a minimal asyncio unix-socket server that reads length-prefixed msgpack
requests and answers each with a msgpack reply (no validation, no sessions: the least any transport could do;
the baseline), a bare zmq.asyncio ROUTER doing the same (what ZeroMQ itself costs), and a CoreChannel (the
control channel: validation, sessions, per-client ordering). The parent times all three on the same loop kind,
in alternating rounds so machine noise hits them alike:

- round trip: one ``qmp`` request at a time (the core's handler returns at once): median and p99;
- input throughput: ``input`` requests with 1 event (unbatched) and with 64 events (batched), 64 requests in
  flight: events per second.

    .venv/bin/python benchmarks/ctl.py [--loop uvloop|asyncio] [--rounds N] [--batch N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipc.channel import ClientChannel, ClientInfo, CoreChannel, CoreStatus, ipc_endpoint
from ipc.messages import InputOp, KeyEvent, Op

_LENGTH = struct.Struct("!I")
WINDOW = 64


# --- the child: both servers ---------------------------------------------------------------------------------


async def serve(directory: Path) -> None:
    events = 0

    async def handler(client: ClientInfo, op: str, body: Op) -> Any:
        nonlocal events
        if isinstance(body, InputOp):
            events += len(body.events)
            return None
        return {"status": "running"}

    core = CoreChannel(ipc_endpoint(directory / "control.sock"), vm_name="bench", handler=handler,
                       status=lambda: CoreStatus("running"))
    await core.start()

    def answer(frame: bytes) -> bytes:
        nonlocal events
        request = msgpack.unpackb(frame, raw=False)
        result = None
        if request["op"] == "input":
            events += len(request["args"]["events"])
        else:
            result = {"status": "running"}
        return bytes(msgpack.packb({"v": 1, "t": "reply", "id": request["id"], "ok": True, "result": result}))

    async def bare_zmq() -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.bind(f"ipc://{directory / 'bare.sock'}")
        while True:
            identity, frame = await sock.recv_multipart()
            await sock.send_multipart([identity, answer(frame)])

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                reply = answer(await reader.readexactly(size))
                writer.write(_LENGTH.pack(len(reply)) + reply)
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_unix_server(echo, path=str(directory / "echo.sock"))
    bare = asyncio.get_running_loop().create_task(bare_zmq())
    print("ready", flush=True)
    async with server:
        await asyncio.Event().wait()
    bare.cancel()


# --- the parent: clients -------------------------------------------------------------------------------------


class PlainClient:
    """The baselines' client: same message maps, same pending table, over a unix stream or a bare DEALER."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._dealer: zmq.asyncio.Socket | None = None

    async def connect_unix(self, path: Path) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(path))

        async def frames() -> None:
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                self._dispatch(await reader.readexactly(size))

        self._task = asyncio.get_running_loop().create_task(frames())

    async def connect_zmq(self, endpoint: str) -> None:
        dealer = self._dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)

        async def frames() -> None:
            while True:
                self._dispatch(await dealer.recv())

        self._task = asyncio.get_running_loop().create_task(frames())

    def _dispatch(self, frame: bytes) -> None:
        reply = msgpack.unpackb(frame, raw=False)
        self._pending.pop(reply["id"]).set_result(reply.get("result"))

    async def request(self, op: str, args: dict[str, Any]) -> Any:
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        frame = msgpack.packb({"v": 1, "t": "request", "id": request_id, "op": op, "args": args},
                              use_bin_type=True)
        if self._writer is not None:
            self._writer.write(_LENGTH.pack(len(frame)) + frame)
        elif self._dealer is not None:
            await self._dealer.send(frame)
        return await future

    async def close(self) -> None:
        self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        if self._dealer is not None:
            self._dealer.close(linger=0)


def key_events(count: int) -> list[dict[str, Any]]:
    return [{"type": "key", "down": bool(i % 2), "qcode": "a"} for i in range(count)]


async def time_round_trips(call: Callable[[], Awaitable[Any]], count: int, into: list[float]) -> None:
    for _ in range(count):
        start = time.perf_counter()
        await call()
        into.append(time.perf_counter() - start)


async def events_per_second(call: Callable[[], Awaitable[Any]], requests: int, per_request: int) -> float:
    """``requests`` calls with WINDOW of them in flight; events delivered per second."""
    start = time.perf_counter()
    in_flight: set[asyncio.Future[Any]] = set()
    for _ in range(requests):
        if len(in_flight) >= WINDOW:
            _done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        in_flight.add(asyncio.ensure_future(call()))
    await asyncio.gather(*in_flight)
    return requests * per_request / (time.perf_counter() - start)


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def measure(directory: Path, rounds: int, batch: int, loop_name: str) -> None:
    channel = ClientChannel(ipc_endpoint(directory / "control.sock"), name="bench")
    await channel.connect(timeout_s=10)
    unix, bare = PlainClient(), PlainClient()
    await unix.connect_unix(directory / "echo.sock")
    await bare.connect_zmq(f"ipc://{directory / 'bare.sock'}")
    one = [KeyEvent(True, qcode="a")]
    many = [KeyEvent(bool(i % 2), qcode="a") for i in range(64)]
    calls: dict[str, dict[str, Callable[[], Awaitable[Any]]]] = {
        "unix": {
            "rtt": lambda: unix.request("qmp", {"command": "query-status"}),
            "input1": lambda: unix.request("input", {"events": key_events(1)}),
            "input64": lambda: unix.request("input", {"events": key_events(64)}),
        },
        "bare": {
            "rtt": lambda: bare.request("qmp", {"command": "query-status"}),
            "input1": lambda: bare.request("input", {"events": key_events(1)}),
            "input64": lambda: bare.request("input", {"events": key_events(64)}),
        },
        "channel": {
            "rtt": lambda: channel.qmp("query-status"),
            "input1": lambda: channel.send_input(one),
            "input64": lambda: channel.send_input(many),
        },
    }
    rtt: dict[str, list[float]] = {name: [] for name in calls}
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        for side in calls.values():  # warm-up, not counted
            await time_round_trips(side["rtt"], 200, [])
        for _ in range(rounds):
            for name, side in calls.items():
                await time_round_trips(side["rtt"], batch, rtt[name])
                rates.setdefault((name, "input1"), []).append(await events_per_second(side["input1"], 2000, 1))
                rates.setdefault((name, "input64"), []).append(await events_per_second(side["input64"], 200, 64))
    finally:
        await channel.close()
        await unix.close()
        await bare.close()
    labels = {"unix": "unix socket + msgpack (baseline)", "bare": "bare ZeroMQ ROUTER/DEALER + msgpack",
              "channel": "control channel"}
    base_med, base_p99 = summary(rtt["unix"])
    print(f"control channel vs plain unix socket + msgpack, two processes, {loop_name} loop")
    print(f"round trip of one request, {len(rtt['unix'])} samples each (microseconds; ratio to the baseline)")
    for name, label in labels.items():
        med, p99 = summary(rtt[name])
        print(f"  {label:36s} median {med * 1e6:7.1f} ({med / base_med:4.2f}x)   "
              f"p99 {p99 * 1e6:7.1f} ({p99 / base_p99:4.2f}x)")
    print(f"input events per second, {WINDOW} requests in flight (median of {rounds} rounds; ratio to the baseline)")
    for key, kind in (("input1", "unbatched, 1 event/request"), ("input64", "batched, 64 events/request")):
        print(f"  {kind}")
        base_rate = statistics.median(rates[("unix", key)])
        for name, label in labels.items():
            rate = statistics.median(rates[(name, key)])
            print(f"    {label:34s} {rate:11,.0f}/s ({rate / base_rate:4.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    if args.serve:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(args.serve))
        return
    directory = Path(tempfile.mkdtemp(prefix="vmf-bench-", dir="/tmp"))
    child = subprocess.Popen([sys.executable, __file__, "--loop", args.loop, "--serve", str(directory)],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise SystemExit("the benchmark server did not start")
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(measure(directory, args.rounds, args.batch, args.loop), 600))
    finally:
        os.kill(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
