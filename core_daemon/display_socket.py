"""``RUN_DIR/display.sock``: where readers of the display segment get their hello and their eventfd.

The wire format (one SOCK_SEQPACKET message: JSON hello + one descriptor) lives in ``shm.notify``. Each reader
gets an eventfd of its own, so a reader can only ever disturb itself: writing to its eventfd wakes nobody
else, and a reader that saturates its counter only loses its own wake-ups (the core's writes are
non-blocking). ``notify()`` costs one ``write(2)`` per reader and never blocks. The reader's socket stays open
while it is attached; when it closes (the client exited or was killed) the core closes the eventfd.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from ipc.rundir import listen_unix
from shm.notify import encode_hello

log = logging.getLogger(__name__)

DEFAULT_MAX_READERS = 64
#: Readers one process may hold (a client maps the display once; a few more for helpers): one client cannot take
#: every place.
MAX_READERS_PER_PID = 4
#: After accept() fails for lack of descriptors, wait this long before accepting again (as asyncio's servers do):
#: the connection stays queued, and a level-triggered listener would otherwise spin the loop.
_ACCEPT_PAUSE = 1.0


@dataclass(eq=False)
class _Reader:
    sock: socket.socket
    eventfd: int
    pid: int | None
    peer: str  # "pid N uid N", for log lines


def _peer(sock: socket.socket) -> tuple[int | None, str]:
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
    except OSError:
        return None, "unknown peer"
    return pid, f"pid {pid} uid {uid}"


class DisplaySocket:
    """Serves display.sock for one shm segment. ``start()`` binds; ``notify()`` wakes every reader once."""

    def __init__(self, path: Path, shm_name: str, *, mode: int = 0o660, group: int | None = None,
                 max_readers: int = DEFAULT_MAX_READERS) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.max_readers = max_readers
        self._hello = encode_hello(shm_name)
        self._listener: socket.socket | None = None
        self._readers: dict[int, _Reader] = {}  # by socket fd
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Bind and listen (replacing a stale socket file) and start accepting on the running loop."""
        self._loop = asyncio.get_running_loop()
        sock = listen_unix(self.path, mode=self.mode, group=self.group, kind=socket.SOCK_SEQPACKET, backlog=16)
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._accept)
        log.info("display readers attach at %s", self.path)

    @property
    def readers(self) -> int:
        return len(self._readers)

    def notify(self) -> None:
        """Add 1 to every reader's eventfd: one wake-up per batch, coalesced by the counter while unread."""
        for reader in list(self._readers.values()):
            try:
                os.eventfd_write(reader.eventfd, 1)
            except BlockingIOError:
                pass  # the counter is saturated: the reader wrote to it itself; it only loses its own wake-ups
            except OSError as exc:  # pragma: no cover - an eventfd write fails only on a bad fd
                log.warning("display reader %s: eventfd write failed (%s); dropping it", reader.peer, exc)
                self._drop(reader)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave the connection queued, say why, pause accepting
                log.error("display socket: accept failed: %s; pausing accepts for %.0f s", exc, _ACCEPT_PAUSE)
                assert self._loop is not None
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(_ACCEPT_PAUSE, self._resume_accepting)
                return
            self._attach(conn)

    def _resume_accepting(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _attach(self, conn: socket.socket) -> None:
        pid, peer = _peer(conn)
        if len(self._readers) >= self.max_readers:
            log.warning("display reader %s refused: already %d readers", peer, len(self._readers))
            conn.close()
            return
        if pid is not None and sum(r.pid == pid for r in self._readers.values()) >= MAX_READERS_PER_PID:
            log.warning("display reader %s refused: that process already has %d readers", peer,
                        MAX_READERS_PER_PID)
            conn.close()
            return
        try:
            eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError as exc:
            log.error("display reader %s refused: cannot create an eventfd: %s", peer, exc)
            conn.close()
            return
        try:
            conn.setblocking(False)
            conn.sendmsg([self._hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [eventfd]))])
        except OSError as exc:
            log.warning("display reader %s: sending the hello failed: %s", peer, exc)
            os.close(eventfd)
            conn.close()
            return
        reader = _Reader(conn, eventfd, pid, peer)
        self._readers[conn.fileno()] = reader
        assert self._loop is not None
        self._loop.add_reader(conn.fileno(), self._on_readable, reader)
        log.info("display reader %s attached (%d readers)", peer, len(self._readers))

    def _on_readable(self, reader: _Reader) -> None:
        try:
            data = reader.sock.recv(64)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("display reader %s: %s", reader.peer, exc)
            data = b""
        if data:
            log.warning("display reader %s sent data, which the protocol does not allow; dropping it", reader.peer)
        self._drop(reader)
        log.info("display reader %s detached (%d readers)", reader.peer, len(self._readers))

    def _drop(self, reader: _Reader) -> None:
        fd = reader.sock.fileno()
        if self._readers.pop(fd, None) is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(fd)
        reader.sock.close()
        os.close(reader.eventfd)

    def close(self) -> None:
        """Stop accepting, detach every reader (they see EOF), and remove the socket file."""
        for reader in list(self._readers.values()):
            self._drop(reader)
        if self._listener is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
