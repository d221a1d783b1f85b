"""A hostile vmfront core **test double** (not a core): ``python tests/hostile_core.py RUN_DIR``.

What no real core sends, for the fleet client's isolation test: it holds RUN_DIR/core.pid locked and writes a
``running`` state.json as a core does, so a fleet client serves it; on RUN_DIR/control.sock (a bare ZeroMQ
ROUTER) it welcomes every client and names a display socket of its own, whose hello names a shared-memory
segment full of random bytes (and whose eventfd it rings over and over); then it sends every client malformed
frames (not msgpack, wrong field types, unknown types, an oversized broadcast) every 50 ms until it is killed.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import random
import signal
import socket
import sys
from pathlib import Path

import msgpack
import posix_ipc
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipc.messages import Hello, Welcome, decode

GARBAGE = [b"", b"\x00", b"\xc1" * 7, msgpack.packb({"v": 1, "type": "broadcast", "body": 3}),
           msgpack.packb({"v": 1, "type": "welcome", "id": "x"}), msgpack.packb([1, 2, 3]),
           msgpack.packb({"v": 99, "type": "heartbeat"}), msgpack.packb({"v": 1, "type": "reply", "id": -1}),
           msgpack.packb({"v": 1, "type": "broadcast", "body": {"kind": "x" * 5000}})]


async def control(run_dir: Path, display_path: Path) -> None:
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{run_dir / 'control.sock'}")
    clients: set[bytes] = set()

    async def spam() -> None:
        while True:
            for identity in list(clients):
                await sock.send_multipart([identity, random.choice(GARBAGE)])
                await sock.send_multipart([identity, os.urandom(random.randrange(1, 300))])
            await asyncio.sleep(0.05)

    spammer = asyncio.get_running_loop().create_task(spam())
    try:
        while True:
            identity, *rest = await sock.recv_multipart()
            try:
                message = decode(rest[0])
            except Exception:
                continue
            if isinstance(message, Hello):
                clients.add(identity)
                welcome = Welcome(message.id, 1, run_dir.name, "hostile", os.getpid(), "running", 1.0,
                                  display_socket=str(display_path))
                await sock.send_multipart([identity, welcome.encode()])
    finally:
        spammer.cancel()


async def display(path: Path, shm_name: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(8)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    hello = json.dumps({"type": "vmfront-display", "version": 1, "shm": shm_name, "layout": 1,
                        "notify": "eventfd", "pacing": 1.0, "paced": False}).encode()
    keep = []
    while True:
        conn, _ = await loop.sock_accept(listener)
        eventfd = os.eventfd(0)
        conn.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [eventfd]))])
        keep.append((conn, eventfd))
        for _ in range(100):
            os.eventfd_write(eventfd, 1)


async def main(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile = os.open(run_dir / "core.pid", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(pidfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(pidfile, f"{os.getpid()}\n".encode())
    (run_dir / "state.json").write_text(json.dumps({"name": run_dir.name, "state": "running",
                                                    "core_pid": os.getpid()}))
    shm_name = f"/vmfront-hostile-{os.getpid()}"
    segment = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, size=1 << 20)
    os.write(segment.fd, os.urandom(1 << 20))
    signal.signal(signal.SIGTERM, lambda *_: (segment.unlink(), os._exit(0)))
    try:
        await asyncio.gather(control(run_dir, run_dir / "display.sock"), display(run_dir / "display.sock", shm_name))
    finally:
        segment.unlink()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
