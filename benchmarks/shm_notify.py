"""Wake-up latency of the ways the core can tell a reader "new records"; run: .venv/bin/python benchmarks/shm_notify.py

For each mechanism a writer process signals a reader process ``--samples`` times, ``--interval`` ms apart (so
each signal is its own wake-up). Just before signalling, the writer puts CLOCK_MONOTONIC (ns) into a shared
page; the reader's asyncio loop watches the descriptor with ``loop.add_reader``, the callback drains it and
sets an ``asyncio.Event``, and the task waiting on that event takes the time: the same path a client's
``DisplaySubscription.wait()`` takes. Printed per mechanism and event loop: median and p99 latency
writer -> reader task, the writer's cost per signal (median), and the reader's CPU time over an idle second.

Mechanisms (one per reader in every case, so readers cannot steal each other's wake-ups):
- eventfd: the writer adds 1 (``eventfd_write``), the reader reads the counter (resets it): what ships,
  handed to the reader with SCM_RIGHTS over display.sock;
- mqueue: a POSIX message queue with max_messages=1: ``mq_send`` fails with EAGAIN while one is pending
  (coalescing), the reader ``mq_receive``s it;
- socket: one byte on a unix socket (a doorbell on a control-channel-like connection); the reader drains.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import posix_ipc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAMP = struct.Struct("<Q")


class Mechanism:
    """A writer-side ``signal()`` and a reader-side ``fd`` + ``drain()``, made before fork."""

    name = ""

    def signal(self) -> None:
        raise NotImplementedError

    def reader_fd(self) -> int:
        raise NotImplementedError

    def drain(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EventFd(Mechanism):
    name = "eventfd"

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def signal(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def reader_fd(self) -> int:
        return self.fd

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class MessageQueue(Mechanism):
    name = "mqueue"

    def __init__(self) -> None:
        self.mq = posix_ipc.MessageQueue(f"/vmfront-bench-{os.getpid()}", posix_ipc.O_CREX, max_messages=1,
                                         max_message_size=1)
        self.mq.unlink()  # both processes keep the descriptor; no name left behind

    def signal(self) -> None:
        with contextlib.suppress(posix_ipc.BusyError):
            self.mq.send(b"", timeout=0)

    def reader_fd(self) -> int:
        fd: int = self.mq.mqd
        return fd

    def drain(self) -> None:
        with contextlib.suppress(posix_ipc.BusyError):
            self.mq.receive(timeout=0)

    def close(self) -> None:
        self.mq.close()


class SocketDoorbell(Mechanism):
    name = "socket"

    def __init__(self) -> None:
        self.writer, self.reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.writer.setblocking(False)
        self.reader.setblocking(False)

    def signal(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.writer.send(b"\x01")

    def reader_fd(self) -> int:
        return self.reader.fileno()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.reader.recv(4096)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


MECHANISMS: list[type[Mechanism]] = [EventFd, MessageQueue, SocketDoorbell]


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _reader(mech: Mechanism, stamp: mmap.mmap, loop_kind: str, samples: int, pipe: Connection) -> None:
    """Child: wait for signals on the loop, record the latency of each, then measure an idle second."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def on_readable() -> None:
            mech.drain()
            woken.set()

        loop.add_reader(mech.reader_fd(), on_readable)
        latencies: list[int] = []
        pipe.send("ready")
        while len(latencies) < samples:
            try:
                await asyncio.wait_for(woken.wait(), 5)
            except TimeoutError:
                break
            latencies.append(time.monotonic_ns() - STAMP.unpack_from(stamp)[0])
            woken.clear()
        cpu = time.process_time()
        await asyncio.sleep(1.0)  # idle, the descriptor still watched
        idle_cpu = time.process_time() - cpu
        loop.remove_reader(mech.reader_fd())
        pipe.send((latencies, idle_cpu))

    loop = _new_loop(loop_kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def run(make: type[Mechanism], loop_kind: str, samples: int, interval: float) -> dict[str, float]:
    mech = make()
    stamp = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and shared with the forked child
    parent, child = multiprocessing.Pipe()
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_reader, args=(mech, stamp, loop_kind, samples, child))
    proc.start()
    try:
        if not parent.poll(10) or parent.recv() != "ready":
            raise RuntimeError("reader did not start")
        costs: list[int] = []
        for _ in range(samples):
            time.sleep(interval)
            STAMP.pack_into(stamp, 0, time.monotonic_ns())
            start = time.perf_counter_ns()
            mech.signal()
            costs.append(time.perf_counter_ns() - start)
        if not parent.poll(30):
            raise RuntimeError("reader did not report")
        latencies, idle_cpu = parent.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        mech.close()
    latencies.sort()
    return {
        "samples": len(latencies),
        "median_us": statistics.median(latencies) / 1000,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] / 1000,
        "signal_ns": statistics.median(costs),
        "idle_cpu_ms": idle_cpu * 1000,
    }


def bench_coalesced_signal_cost(rounds: int = 200_000) -> dict[str, float]:
    """Writer cost per signal while one is already pending (the reader is busy): the burst case."""
    out = {}
    for make in MECHANISMS:
        mech = make()
        mech.signal()
        start = time.perf_counter_ns()
        for _ in range(rounds):
            mech.signal()
        out[mech.name] = (time.perf_counter_ns() - start) / rounds
        mech.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--interval", type=float, default=2.0, help="ms between signals")
    parser.add_argument("--loops", default="asyncio,uvloop", help="event loops for the reader")
    args = parser.parse_args()
    print(f"{args.samples} wake-ups {args.interval} ms apart per row; latency = writer's stamp -> reader task runs")
    print(f"{'mechanism':10} {'loop':8} {'median µs':>10} {'p99 µs':>10} {'signal ns':>10} {'idle CPU ms/s':>14}")
    for loop_kind in args.loops.split(","):
        for make in MECHANISMS:
            r = run(make, loop_kind, args.samples, args.interval / 1000)
            print(f"{make.name:10} {loop_kind:8} "
                  f"{r['median_us']:10.1f} {r['p99_us']:10.1f} {r['signal_ns']:10.0f} {r['idle_cpu_ms']:14.2f}")
    costs = bench_coalesced_signal_cost()
    print("signal while one is pending (reader busy): "
          + ", ".join(f"{name} {ns:.0f} ns" for name, ns in costs.items()))


if __name__ == "__main__":
    main()
