"""An encoder worker process: ``python -m clients.vnc.encoder_worker FD PARENT_PID [COPY_FD]``.

Started by clients/vnc/encoder_pool.py with one end of a socketpair (FD). It maps the shared framebuffer
segment read-only by name (shm.ShmReader) and, when given one, the VNC service's frame copy (a memfd) read-only,
and answers encode requests one at a time: pixels never travel over the socket, only the request (a few
rectangles and an encoder's settings) and the encoded rectangles.

Lifetime is tied to the parent twice: PR_SET_PDEATHSIG kills the worker when the parent dies (even by
SIGKILL), and the socket's EOF ends it when the parent closes it. The worker runs at a lower priority so the
client's event loop wins the CPU when both want it.

Wire format, both directions: a 4-byte big-endian length, then a msgpack map. A reply with ``size`` > 0 is
followed by that many bytes: the encoded rectangles, concatenated.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

import msgpack
import posix_ipc

from rfb.encodings import EncoderSettings, encode_frame_rects
from rfb.wire import Buffer, PixelFormat
from shm import LayoutError, Mode, ShmReader

from .framecopy import frame_array

log = logging.getLogger(__name__)

LENGTH = struct.Struct(">I")
MAX_REQUEST = 1 << 20
PR_SET_PDEATHSIG = 1
NICENESS = 19


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl
        sys.exit(0)


def recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


#: Buffers per sendmsg call (below IOV_MAX).
MAX_IOV = 512


def send_message(sock: socket.socket, meta: dict[str, Any], payload: Sequence[Buffer] = ()) -> None:
    """The reply header, then the payload's buffers gathered by sendmsg (no joining copy)."""
    views = [memoryview(b).cast("B") for b in payload]
    views = [v for v in views if len(v)]
    body = msgpack.packb({**meta, "size": sum(len(v) for v in views)})
    sock.sendall(LENGTH.pack(len(body)) + body)
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + MAX_IOV])
        while sent and first < len(views):
            if sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            else:
                views[first] = views[first][sent:]
                sent = 0


class Sources:
    """The framebuffers a request may name: the shared segment (by name) and the service's copy."""

    def __init__(self, copy_fd: int | None) -> None:
        self.reader: ShmReader | None = None
        self.copy = mmap.mmap(copy_fd, 0, prot=mmap.PROT_READ) if copy_fd is not None else None

    def segment(self, name: str) -> ShmReader:
        if self.reader is None or self.reader.name != name:
            if self.reader is not None:
                self.reader.close()
                self.reader = None
            self.reader = ShmReader(name)
        return self.reader

    def frame(self, request: dict[str, Any]) -> Any:
        mode = Mode(0, request["width"], request["height"], request["stride"], 1)
        if request["source"] == "copy":
            if self.copy is None:
                raise LayoutError("no frame copy was handed to this worker")
            return frame_array(self.copy, mode)
        return frame_array(self.segment(request["segment"]).framebuffer, mode)


def handle(sources: Sources, request: dict[str, Any]) -> tuple[dict[str, Any], list[Buffer]]:
    settings = EncoderSettings(request["encoding"], request["level"], request["quality"],
                               tuple(request["started"]))
    fmt = PixelFormat.unpack(request["format"])
    frame = sources.frame(request)
    pieces, count, after = encode_frame_rects(settings, fmt, frame, [tuple(r) for r in request["rects"]])
    del frame  # no view of a mapping may outlive the request (a segment may be closed by the next one)
    return {"id": request["id"], "count": count, "started": list(after.started)}, pieces


def serve(sock: socket.socket, sources: Sources) -> None:
    while True:
        head = recv_exact(sock, LENGTH.size)
        if head is None:
            return
        (length,) = LENGTH.unpack(head)
        if length > MAX_REQUEST:
            raise ValueError(f"request of {length} bytes")
        body = recv_exact(sock, length)
        if body is None:
            return
        request = msgpack.unpackb(body)
        try:
            meta, payload = handle(sources, request)
        except (LayoutError, ValueError, KeyError, TypeError, OSError, posix_ipc.Error) as exc:
            send_message(sock, {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"})
            continue
        send_message(sock, meta, payload)


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    copy_fd = int(argv[2]) if len(argv) > 2 else None
    die_with_parent(parent_pid)
    os.nice(NICENESS)
    logging.basicConfig(level=logging.WARNING, format="vnc encoder worker %(process)d: %(message)s")
    sock = socket.socket(fileno=fd)
    try:
        serve(sock, Sources(copy_fd))
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
