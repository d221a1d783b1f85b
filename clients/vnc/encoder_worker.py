"""An encoder worker process: ``python -m clients.vnc.encoder_worker FD PARENT_PID``.

Started by clients/vnc/encoder_pool.py with one end of a SOCK_SEQPACKET socketpair (FD). It maps shared
framebuffer segments read-only by name (shm.ShmReader; a few kept, for a client that fronts many VMs) and the
VNC services' frame copies (memfds, each sent once with the first request that names it, by its key) read-only,
and answers encode requests one at a time. Pixels never travel over the socket: a request is
a few rectangles and an encoder's settings; the encoded rectangles are written to a new memfd whose descriptor
goes back with the reply (SCM_RIGHTS), so the client maps them and hands the mapping to the viewer's socket
without copying them itself.

Lifetime is tied to the parent twice: PR_SET_PDEATHSIG kills the worker when the parent dies (even by
SIGKILL), and the socket's EOF ends it when the parent closes it. The worker runs at a lower priority so the
client's event loop wins the CPU when both want it.

Wire format, both directions: one packet, a msgpack map. A reply with ``size`` > 0 carries one descriptor: a
memfd holding that many bytes, the encoded rectangles, concatenated.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import posix_ipc

from rfb.encodings import EncoderSettings, encode_frame_rects
from rfb.encodings.base import Arena
from rfb.wire import Buffer, PixelFormat
from shm import LayoutError, Mode, ShmReader

from .framecopy import frame_array

log = logging.getLogger(__name__)

#: Largest packet either side sends (requests list at most a few rectangles; replies are metadata only).
MAX_PACKET = 1 << 16
#: Buffers per writev call (below IOV_MAX).
MAX_IOV = 512
#: Bytes kept free before a reply's arena, for the small pieces (rectangle headers) that go before its arrays.
HEADROOM = 4096
#: Output memfds a worker keeps for reuse (replies the client still holds, plus one being written).
MAX_SLOTS = 4
#: Segments kept mapped (a fleet client's workers serve many VMs; mapping one costs a few system calls).
MAX_SEGMENTS = 8
#: Frame copies a worker may hold (one per VM whose viewers take CopyRect; the client says when one goes).
MAX_COPIES = 1024
PR_SET_PDEATHSIG = 1
NICENESS = 19


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl
        sys.exit(0)


class Output:
    """The memfd a reply's bytes go to. Large gathered arrays are built in it directly (its Arena, after
    HEADROOM bytes); when the encoded pieces are those arrays, in order and back to back, with only small pieces
    before and after them, the small ones are written around them and nothing is copied again."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.fd = os.memfd_create("vmfront-vnc-update", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, HEADROOM + capacity)  # sparse: only the pages written are allocated
        self.map = mmap.mmap(self.fd, HEADROOM + capacity)
        self.arena = Arena(memoryview(self.map), HEADROOM)

    def reset(self) -> None:
        self.arena.offset = self.arena.start

    def place(self, pieces: Sequence[Buffer]) -> tuple[int, int]:
        """(offset, size) of the reply's bytes in the memfd, after writing whatever is not there yet."""
        views = [v for v in (memoryview(b).cast("B") for b in pieces) if len(v)]
        size = sum(len(v) for v in views)
        base = _address(self.arena.buffer)
        offsets = [_address(v) - base for v in views]
        inside = [self.arena.start <= o < self.arena.offset for o in offsets]
        if any(inside):
            first = inside.index(True)
            last = len(inside) - 1 - inside[::-1].index(True)
            before = sum(len(v) for v in views[:first])
            in_place = all(inside[first : last + 1]) and before <= offsets[first] and all(
                offsets[k + 1] == offsets[k] + len(views[k]) for k in range(first, last))
            if in_place:
                start = offsets[first] - before
                _pwrite_all(self.fd, views[:first], start)
                _pwrite_all(self.fd, views[last + 1 :], offsets[last] + len(views[last]))
                return start, size
        _pwrite_all(self.fd, views, self.arena.offset)  # otherwise: everything, after what the arena used
        return self.arena.offset, size

    def close(self) -> None:
        self.arena.buffer.release()
        with contextlib.suppress(BufferError):  # a numpy view of the arena may still be referenced
            self.map.close()
        os.close(self.fd)


class Slots:
    """Output memfds kept from one reply to the next: their pages stay allocated and mapped (allocating and
    faulting in 8 MB of fresh pages per frame costs as much as encoding it). The client gives a slot back
    when its mapping of that reply is gone; until then the worker never writes to it."""

    def __init__(self) -> None:
        self.outputs: list[Output] = []
        self.free: set[int] = set()

    def get(self, capacity: int) -> tuple[int | None, Output]:
        """(slot, output) for a reply of up to ``capacity`` bytes; slot None: a one-off output to close after."""
        for slot in sorted(self.free):
            self.free.discard(slot)
            if self.outputs[slot].capacity < capacity:
                self.outputs[slot].close()
                self.outputs[slot] = Output(capacity)
            self.outputs[slot].reset()
            return slot, self.outputs[slot]
        if len(self.outputs) < MAX_SLOTS:
            self.outputs.append(Output(capacity))
            return len(self.outputs) - 1, self.outputs[-1]
        return None, Output(capacity)

    def release(self, slot: int) -> None:
        if 0 <= slot < len(self.outputs):
            self.free.add(slot)


def _pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + MAX_IOV], offset)
        offset += written
        while written and first < len(views):
            if written >= len(views[first]):
                written -= len(views[first])
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0


def _address(buffer: Buffer) -> int:
    address: int = np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0]
    return address


def send_reply(sock: socket.socket, meta: dict[str, Any], pieces: Sequence[Buffer] = (),
               output: Output | None = None, slot: int | None = None) -> bool:
    """The reply packet; the pieces, if any, in ``output``'s memfd, whose descriptor goes with it (and the slot
    the client must give back). False if nothing went out in ``output`` (its slot is free again)."""
    if output is None or not any(len(memoryview(p)) for p in pieces):
        sock.send(msgpack.packb({**meta, "size": 0}))
        return False
    offset, size = output.place(pieces)
    reply = {**meta, "offset": offset, "size": size, **({"slot": slot} if slot is not None else {})}
    socket.send_fds(sock, [msgpack.packb(reply)], [output.fd])
    return True


class Sources:
    """The framebuffers a request may name: shared segments (by name) and the services' copies (by key)."""

    def __init__(self) -> None:
        self.readers: dict[str, ShmReader] = {}  # least recently used first
        self.copies: dict[int, mmap.mmap] = {}

    def segment(self, name: str) -> ShmReader:
        reader = self.readers.pop(name, None)
        if reader is None:
            while len(self.readers) >= MAX_SEGMENTS:
                self.readers.pop(next(iter(self.readers))).close()
            reader = ShmReader(name)
        self.readers[name] = reader
        return reader

    def add_copy(self, key: int, fd: int) -> None:
        if key in self.copies or len(self.copies) >= MAX_COPIES:
            raise ValueError(f"frame copy {key}: already known, or too many copies")
        self.copies[key] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)

    def forget_copy(self, key: int) -> None:
        mapping = self.copies.pop(key, None)
        if mapping is not None:
            with contextlib.suppress(BufferError):
                mapping.close()

    def frame(self, request: dict[str, Any]) -> Any:
        mode = Mode(0, request["width"], request["height"], request["stride"], 1)
        if request["source"] == "copy":
            key = request.get("copy")
            copy = self.copies.get(key) if isinstance(key, int) else None
            if copy is None:
                raise LayoutError(f"frame copy {key!r} was not handed to this worker")
            return frame_array(copy, mode)
        return frame_array(self.segment(request["segment"]).framebuffer, mode)


def handle(sources: Sources, request: dict[str, Any], output: Output) -> tuple[dict[str, Any], list[Buffer]]:
    settings = EncoderSettings(request["encoding"], request["level"], request["quality"],
                               tuple(request["started"]))
    fmt = PixelFormat.unpack(request["format"])
    frame = sources.frame(request)
    pieces, count, after = encode_frame_rects(settings, fmt, frame, [tuple(r) for r in request["rects"]],
                                              output.arena)
    del frame  # no view of a mapping may outlive the request (a segment may be closed by the next one)
    return {"id": request["id"], "count": count, "started": list(after.started)}, pieces


def serve(sock: socket.socket, sources: Sources) -> None:
    slots = Slots()
    while True:
        body, fds, _flags, _addr = socket.recv_fds(sock, MAX_PACKET, 1)
        if not body:
            for fd in fds:
                os.close(fd)
            return
        request = msgpack.unpackb(body)
        if fds:  # a frame copy, sent once with the first request that names it
            try:
                sources.add_copy(int(request["copy"]), fds[0])
            finally:
                os.close(fds[0])
        if "release" in request:
            slots.release(int(request["release"]))
            continue
        if "forget_copy" in request:
            sources.forget_copy(int(request["forget_copy"]))
            continue
        pixels = sum(r[2] * r[3] for r in request.get("rects", ()) if isinstance(r, list) and len(r) == 4)
        slot, output = slots.get(pixels * 5 + (64 << 10))
        sent = False
        try:
            meta, pieces = handle(sources, request, output)
            sent = send_reply(sock, meta, pieces, output, slot)
            del pieces
        except (LayoutError, ValueError, KeyError, TypeError, OSError, posix_ipc.Error) as exc:
            send_reply(sock, {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if slot is None:
                output.close()
            elif not sent:
                slots.release(slot)


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    die_with_parent(parent_pid)
    os.nice(NICENESS)
    logging.basicConfig(level=logging.WARNING, format="vnc encoder worker %(process)d: %(message)s")
    sock = socket.socket(fileno=fd)
    try:
        sock.send(msgpack.packb({"ready": True}))  # imports done: requests are answered from now on
        serve(sock, Sources())
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
