"""An encoder worker process: ``python -m clients.vnc.encoder_worker FD PARENT_PID [COPY_FD]``.

Started by clients/vnc/encoder_pool.py with one end of a SOCK_SEQPACKET socketpair (FD). It maps the shared
framebuffer segment read-only by name (shm.ShmReader) and, when given one, the VNC service's frame copy (a
memfd) read-only, and answers encode requests one at a time. Pixels never travel over the socket: a request is
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
import posix_ipc

from rfb.encodings import EncoderSettings, encode_frame_rects
from rfb.wire import Buffer, PixelFormat
from shm import LayoutError, Mode, ShmReader

from .framecopy import frame_array

log = logging.getLogger(__name__)

#: Largest packet either side sends (requests list at most a few rectangles; replies are metadata only).
MAX_PACKET = 1 << 16
#: Buffers per writev call (below IOV_MAX).
MAX_IOV = 512
PR_SET_PDEATHSIG = 1
NICENESS = 19


def die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl
        sys.exit(0)


def send_reply(sock: socket.socket, meta: dict[str, Any], payload: Sequence[Buffer] = ()) -> None:
    """The reply packet; the payload, if any, written to a new memfd that goes with it."""
    views = [v for v in (memoryview(b).cast("B") for b in payload) if len(v)]
    size = sum(len(v) for v in views)
    packet = msgpack.packb({**meta, "size": size})
    if not size:
        sock.send(packet)
        return
    fd = os.memfd_create("vmfront-vnc-update", os.MFD_CLOEXEC)
    try:
        first = 0
        while first < len(views):
            written = os.writev(fd, views[first : first + MAX_IOV])
            while written and first < len(views):
                if written >= len(views[first]):
                    written -= len(views[first])
                    first += 1
                else:
                    views[first] = views[first][written:]
                    written = 0
        socket.send_fds(sock, [packet], [fd])
    finally:
        os.close(fd)


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
        body = sock.recv(MAX_PACKET)
        if not body:
            return
        request = msgpack.unpackb(body)
        try:
            meta, payload = handle(sources, request)
        except (LayoutError, ValueError, KeyError, TypeError, OSError, posix_ipc.Error) as exc:
            send_reply(sock, {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"})
            continue
        send_reply(sock, meta, payload)


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
