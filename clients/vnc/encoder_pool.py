"""Encoder worker processes for the VNC service: encoding never runs on the client's event loop.

A few worker processes (clients/vnc/encoder_worker.py, at most one per CPU, two by default) map the shared
framebuffer segments and the services' frame copies read-only; the loop sends each a small request (which
framebuffer, which rectangles, the viewer's pixel format and EncoderSettings) and gets back a memfd holding the
encoded rectangles, which it maps read-only and hands to the viewer's socket as it is. A client that fronts
many VMs (clients/fleet.py) shares one pool between them; its workers start with the first request. Each viewer
has at most one update in flight, and a request goes to the least busy worker, so a VM whose screen never rests
holds at most one worker per viewer of its own while everyone else's updates go on. Neither pixels nor
encoded bytes are copied by the loop. Encoders keep no state between updates (see
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
import mmap
import os
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import msgpack

from rfb.encodings import EncoderSettings
from rfb.wire import PixelFormat

from .encoder_worker import MAX_PACKET

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
#: A reply larger than this is a broken worker (a 4096x4096 frame in Raw is 64 MiB).
MAX_REPLY = 256 << 20
#: A worker that dies this soon after starting, this many times in a row, is not restarted at once.
RESTART_BACKOFF_S = 1.0


class EncoderUnavailable(Exception):
    """The request was not encoded (its worker died or the pool is closed); the caller repaints later."""


class EncoderNotReady(EncoderUnavailable):
    """No worker has finished starting yet (the first second after the client starts): encode elsewhere."""


@dataclass(frozen=True, slots=True)
class EncodeRequest:
    """Rectangles of one framebuffer (the shared segment by name, or the service's copy) for one viewer."""

    source: str  # "segment" or "copy"
    segment: str  # the segment's name, or (source "copy") the FrameCopy's key as text
    width: int
    height: int
    stride: int
    fmt: PixelFormat
    settings: EncoderSettings
    rects: tuple[tuple[int, int, int, int], ...]


@dataclass
class EncodeResult:
    data: memoryview  # complete rectangles, concatenated (a read-only mapping, unmapped when unreferenced)
    count: int
    settings: EncoderSettings


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    started: float
    pending: dict[int, tuple[asyncio.Future[EncodeResult], EncodeRequest]] = field(default_factory=dict)
    gone: bool = False
    ready: bool = False
    copies: set[int] = field(default_factory=set)  # keys of the frame copies this worker was handed


class EncoderPool:
    """``lazy``: no worker runs until the first request (or :meth:`start`), so an idle client costs none."""

    def __init__(self, workers: int | None = None, *, lazy: bool = False) -> None:
        cpus = len(os.sched_getaffinity(0))
        self.size = max(1, min(workers or DEFAULT_WORKERS, cpus))
        self.lazy = lazy
        self.started = False
        #: Frame copies by key: their memfds go to a worker with the first request that names them.
        self._copy_fds: dict[int, int] = {}
        self._workers: list[_Worker | None] = [None] * self.size
        self._ids = itertools.count(1)
        self._closing = False
        self._restarts: list[asyncio.TimerHandle] = []
        self._all_gone = asyncio.Event()
        self._ready = asyncio.Event()
        self.crashes = 0

    def start(self) -> None:
        if self.started or self._closing:
            return
        self.started = True
        for index in range(self.size):
            self._spawn(index)

    def add_copy(self, key: int, fd: int) -> None:
        """A frame copy requests may name by ``key`` (its memfd stays the caller's: kept open until forget)."""
        self._copy_fds[key] = fd

    def forget_copy(self, key: int) -> None:
        """The copy is going away: workers drop their mapping of it."""
        self._copy_fds.pop(key, None)
        for worker in self._workers:
            if worker is not None and key in worker.copies:
                worker.copies.discard(key)
                with contextlib.suppress(OSError):
                    worker.sock.send(msgpack.packb({"forget_copy": key}))

    @property
    def ready(self) -> bool:
        """At least one worker has started and answers requests."""
        return any(w is not None and w.ready for w in self._workers)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until a worker answers requests (raises TimeoutError after ``timeout_s``)."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w is not None]

    def _spawn(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "clients.vnc.encoder_worker", str(child.fileno()), str(os.getpid())]
        fds = [child.fileno()]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=fds, close_fds=True)
        finally:
            child.close()
        parent.setblocking(False)
        worker = _Worker(index, proc, parent, time.monotonic())
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_readable, worker)
        self._workers[index] = worker
        log.debug("VNC encoder worker %d started (pid %d)", index, proc.pid)

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        """Encode on the least busy worker; raises EncoderUnavailable if that worker dies meanwhile."""
        if not self.started:
            self.start()
        live = [w for w in self._workers if w is not None]
        if self._closing or not live:
            raise EncoderUnavailable("no encoder worker running")
        live = [w for w in live if w.ready]
        if not live:
            raise EncoderNotReady("the encoder workers are still starting")
        worker = min(live, key=lambda w: len(w.pending))
        request_id = next(self._ids)
        copy_key = int(request.segment) if request.source == "copy" else None
        copy_fd = self._copy_fds.get(copy_key) if copy_key is not None and copy_key not in worker.copies else None
        body = msgpack.packb({
            "id": request_id, "source": request.source, "segment": request.segment, "copy": copy_key,
            "width": request.width,
            "height": request.height, "stride": request.stride, "format": request.fmt.pack(),
            "encoding": request.settings.encoding, "level": request.settings.level,
            "quality": request.settings.quality, "started": list(request.settings.started),
            "rects": [list(r) for r in request.rects],
        })
        future: asyncio.Future[EncodeResult] = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = (future, request)
        try:
            if copy_fd is not None and copy_key is not None:
                await self._send_with_fd(worker, body, copy_fd)
                worker.copies.add(copy_key)
            else:
                await asyncio.get_running_loop().sock_sendall(worker.sock, body)
        except OSError as exc:
            worker.pending.pop(request_id, None)
            raise EncoderUnavailable(f"encoder worker {worker.proc.pid}: {exc}") from exc
        try:
            return await future
        finally:
            worker.pending.pop(request_id, None)

    async def _send_with_fd(self, worker: _Worker, body: bytes, fd: int) -> None:
        """One packet with a descriptor (SCM_RIGHTS); waits while the socket is full."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(worker.sock, [body], [fd])
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()

                def wake(done: asyncio.Future[None] = writable) -> None:
                    if not done.done():
                        done.set_result(None)

                loop.add_writer(worker.sock.fileno(), wake)
                try:
                    await writable
                finally:
                    loop.remove_writer(worker.sock.fileno())

    def _on_readable(self, worker: _Worker) -> None:
        """Every reply waiting on the worker's socket (one packet each, a memfd with the payload)."""
        while not worker.gone:
            try:
                packet, fds, _flags, _addr = socket.recv_fds(worker.sock, MAX_PACKET, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                self._worker_gone(worker, str(exc))
                return
            try:
                if not packet:
                    self._worker_gone(worker, "closed")
                    return
                self._reply(worker, msgpack.unpackb(packet), fds)
            except (ValueError, KeyError, TypeError, OSError, msgpack.UnpackException) as exc:
                self._worker_gone(worker, f"bad reply: {type(exc).__name__}: {exc}")
                return
            finally:
                for fd in fds:
                    os.close(fd)

    def _reply(self, worker: _Worker, meta: dict[str, Any], fds: list[int]) -> None:
        if meta.get("ready"):
            worker.ready = True
            self._ready.set()
            return
        size = int(meta.get("size", 0))
        if not 0 <= size <= MAX_REPLY or not 0 <= int(meta.get("offset", 0)) <= MAX_REPLY or bool(size) != bool(fds):
            raise ValueError(f"reply of {size} bytes with {len(fds)} descriptors")
        request_id = meta.get("id")
        entry = worker.pending.pop(request_id, None) if isinstance(request_id, int) else None
        if entry is None or entry[0].done():
            return
        future, request = entry
        if "error" in meta:
            future.set_exception(EncoderUnavailable(f"encoder worker {worker.proc.pid}: {meta['error']}"))
            return
        offset = int(meta.get("offset", 0))
        if size:
            mapping = mmap.mmap(fds[0], offset + size, prot=mmap.PROT_READ)
            data = memoryview(mapping)[offset : offset + size]
            if "slot" in meta:  # the worker reuses that memfd once this mapping is gone (sent, or dropped)
                weakref.finalize(mapping, self._release_slot, worker, int(meta["slot"]))
        else:
            data = memoryview(b"")
        settings = EncoderSettings(request.settings.encoding, request.settings.level, request.settings.quality,
                                   tuple(meta["started"]))
        future.set_result(EncodeResult(data, int(meta["count"]), settings))

    def _release_slot(self, worker: _Worker, slot: int) -> None:
        if worker.gone:
            return
        packet = msgpack.packb({"release": slot})
        try:
            worker.sock.send(packet)
        except BlockingIOError:  # a full socket: send it as soon as it drains
            asyncio.get_running_loop().create_task(self._send_later(worker, packet))
        except OSError:
            pass  # the worker is going away; its reader will notice

    async def _send_later(self, worker: _Worker, packet: bytes) -> None:
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(worker.sock, packet)

    def _worker_gone(self, worker: _Worker, reason: str) -> None:
        if worker.gone:
            return
        worker.gone = True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.sock.fileno())
        for future, _ in worker.pending.values():
            if not future.done():
                future.set_exception(EncoderUnavailable(f"encoder worker {worker.proc.pid} gone ({reason})"))
        worker.pending.clear()
        worker.sock.close()
        _end(worker.proc)
        if self._workers[worker.index] is worker:
            self._workers[worker.index] = None
        if self._closing:
            if all(w is None for w in self._workers):
                self._all_gone.set()
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
        workers = [w for w in self._workers if w is not None]
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.sock.shutdown(socket.SHUT_RDWR)  # EOF: the worker exits
        if workers:
            with contextlib.suppress(TimeoutError):  # EOF from each as it exits; then any straggler is killed
                await asyncio.wait_for(self._all_gone.wait(), 2.0)
        for worker in workers:
            self._worker_gone(worker, "closed")


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Reap the worker, killing it by its pid first if it still runs (after SIGKILL, exit is immediate)."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)


__all__ = ["EncodeRequest", "EncodeResult", "EncoderNotReady", "EncoderPool", "EncoderUnavailable"]
