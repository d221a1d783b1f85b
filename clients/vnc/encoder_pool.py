"""Encoder worker processes for the VNC service: encoding never runs on the client's event loop.

A few worker processes (clients/vnc/encoder_worker.py, at most one per CPU, two by default) map the shared
framebuffer segment and the service's frame copy read-only; the loop sends each a small request (which
framebuffer, which rectangles, the viewer's pixel format and EncoderSettings) and gets back encoded rectangles.
Pixels never pass through the loop or the socket. Encoders keep no state between updates (see
rfb.encodings.zlibraw.ZlibStream), so any worker can serve any viewer, and a crashed worker costs only the
updates it had in hand: their viewers get a repaint from another worker, the dead one is replaced.

Why processes and not threads: the encoders' per-tile Python code holds the GIL, which would stall the loop
(and so every other viewer, the monitor and the agent); see docs/vnc.md for measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msgpack

from rfb.encodings import EncoderSettings
from rfb.wire import PixelFormat

from .encoder_worker import LENGTH

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
#: A reply larger than this is a broken worker (a 4096x4096 frame in Raw is 64 MiB).
MAX_REPLY = 256 << 20
MAX_REPLY_META = 1 << 16
#: Socket buffers: large, so an encoded frame crosses in few system calls.
SOCKET_BUFFER = 4 << 20
#: A worker that dies this soon after starting, this many times in a row, is not restarted at once.
RESTART_BACKOFF_S = 1.0


class EncoderUnavailable(Exception):
    """The request was not encoded (its worker died or the pool is closed); the caller repaints later."""


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    """Rectangles of one framebuffer (the shared segment by name, or the service's copy) for one viewer."""

    source: str  # "segment" or "copy"
    segment: str
    width: int
    height: int
    stride: int
    fmt: PixelFormat
    settings: EncoderSettings
    rects: tuple[tuple[int, int, int, int], ...]


@dataclass
class EncodeResult:
    data: bytearray  # complete rectangles, concatenated
    count: int
    settings: EncoderSettings


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    started: float
    pending: dict[int, tuple[asyncio.Future[EncodeResult], EncodeRequest]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class EncoderPool:
    def __init__(self, workers: int | None = None, copy_fd: int | None = None) -> None:
        cpus = len(os.sched_getaffinity(0))
        self.size = max(1, min(workers or DEFAULT_WORKERS, cpus))
        self.copy_fd = copy_fd
        self._workers: list[_Worker | None] = [None] * self.size
        self._ids = itertools.count(1)
        self._closing = False
        self._restarts: list[asyncio.TimerHandle] = []
        self.crashes = 0

    def start(self) -> None:
        for index in range(self.size):
            self._spawn(index)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w is not None]

    def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (parent, child):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        argv = [sys.executable, "-m", "clients.vnc.encoder_worker", str(child.fileno()), str(os.getpid())]
        fds = [child.fileno()]
        if self.copy_fd is not None:
            argv.append(str(self.copy_fd))
            fds.append(self.copy_fd)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=fds, close_fds=True)
        finally:
            child.close()
        parent.setblocking(False)
        worker = _Worker(index, proc, parent, time.monotonic())
        worker.reader = asyncio.get_running_loop().create_task(self._read_replies(worker))
        self._workers[index] = worker
        log.debug("VNC encoder worker %d started (pid %d)", index, proc.pid)

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        """Encode on the least busy worker; raises EncoderUnavailable if that worker dies meanwhile."""
        live = [w for w in self._workers if w is not None]
        if self._closing or not live:
            raise EncoderUnavailable("no encoder worker running")
        worker = min(live, key=lambda w: len(w.pending))
        request_id = next(self._ids)
        body = msgpack.packb({
            "id": request_id, "source": request.source, "segment": request.segment, "width": request.width,
            "height": request.height, "stride": request.stride, "format": request.fmt.pack(),
            "encoding": request.settings.encoding, "level": request.settings.level,
            "quality": request.settings.quality, "started": list(request.settings.started),
            "rects": [list(r) for r in request.rects],
        })
        future: asyncio.Future[EncodeResult] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = (future, request)
        try:
            await asyncio.get_running_loop().sock_sendall(worker.sock, LENGTH.pack(len(body)) + body)
        except OSError as exc:
            worker.pending.pop(request_id, None)
            raise EncoderUnavailable(f"encoder worker {worker.proc.pid}: {exc}") from exc
        try:
            return await future
        finally:
            worker.pending.pop(request_id, None)

    async def _recv_exact(self, sock: socket.socket, size: int) -> bytearray:
        loop = asyncio.get_running_loop()
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = await loop.sock_recv_into(sock, view[got:])
            if n == 0:
                raise EOFError
            got += n
        return buf

    async def _read_replies(self, worker: _Worker) -> None:
        reason = "closed"
        try:
            while True:
                (length,) = LENGTH.unpack(await self._recv_exact(worker.sock, LENGTH.size))
                if length > MAX_REPLY_META:
                    raise ValueError(f"reply header of {length} bytes")
                meta = msgpack.unpackb(await self._recv_exact(worker.sock, length))
                size = int(meta.get("size", 0))
                if not 0 <= size <= MAX_REPLY:
                    raise ValueError(f"reply of {size} bytes")
                data = await self._recv_exact(worker.sock, size) if size else bytearray()
                entry = worker.pending.pop(meta.get("id"), None)
                if entry is None:
                    continue
                future, request = entry
                if future.done():
                    continue
                if "error" in meta:
                    future.set_exception(EncoderUnavailable(f"encoder worker {worker.proc.pid}: {meta['error']}"))
                else:
                    settings = EncoderSettings(request.settings.encoding, request.settings.level,
                                               request.settings.quality, tuple(meta["started"]))
                    future.set_result(EncodeResult(data, int(meta["count"]), settings))
        except (EOFError, OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            self._worker_gone(worker, reason)

    def _worker_gone(self, worker: _Worker, reason: str) -> None:
        for future, _ in worker.pending.values():
            if not future.done():
                future.set_exception(EncoderUnavailable(f"encoder worker {worker.proc.pid} gone ({reason})"))
        worker.pending.clear()
        worker.sock.close()
        _end(worker.proc)
        if self._workers[worker.index] is worker:
            self._workers[worker.index] = None
        if self._closing:
            return
        self.crashes += 1
        log.warning("VNC encoder worker %d (pid %d) gone (%s, exit %s); starting another", worker.index,
                    worker.proc.pid, reason, worker.proc.returncode)
        delay = RESTART_BACKOFF_S if time.monotonic() - worker.started < RESTART_BACKOFF_S else 0.0
        self._restarts.append(asyncio.get_running_loop().call_later(delay, self._respawn, worker.index))

    def _respawn(self, index: int) -> None:
        if not self._closing and self._workers[index] is None:
            try:
                self._spawn(index)
            except OSError as exc:
                log.error("cannot start a VNC encoder worker: %s", exc)

    async def close(self) -> None:
        self._closing = True
        for handle in self._restarts:
            handle.cancel()
        readers = []
        for worker in self._workers:
            if worker is None:
                continue
            with contextlib.suppress(OSError):
                worker.sock.shutdown(socket.SHUT_RDWR)  # EOF: the worker exits
            if worker.reader is not None:
                readers.append(worker.reader)
        if readers:
            await asyncio.wait(readers, timeout=2.0)
        for worker in self._workers:
            if worker is not None:
                _end(worker.proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Reap the worker, killing it by its pid first if it still runs (after SIGKILL, exit is immediate)."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)


__all__ = ["EncodeRequest", "EncodeResult", "EncoderPool", "EncoderUnavailable"]
