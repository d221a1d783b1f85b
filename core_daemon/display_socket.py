"""``RUN_DIR/display.sock``: where readers of the display segment get their hello and their eventfd.

The wire format (one SOCK_SEQPACKET message: JSON hello + one descriptor) lives in ``shm.notify``. Each reader
gets an eventfd of its own, so a reader can only ever disturb itself: writing to its eventfd wakes nobody
else, and a reader that saturates its counter only loses its own wake-ups (the core's writes are
non-blocking). ``notify()`` costs one ``write(2)`` per reader and never blocks. The reader's socket stays open
while it is attached; when it closes (the client exited or was killed) the core closes the eventfd. A reader may
say on it that it needs no live pixels (``idle``) or does again (``live``): while no reader is live, the capture
is paced (``on_demand``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ipc.rundir import listen_unix
from shm.notify import IDLE, LIVE, encode_hello

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
    live: bool = True  # needs live pixels (every reader starts so; it may say ``idle``)


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
                 max_readers: int = DEFAULT_MAX_READERS, pacing: float | None = None,
                 on_demand: Callable[[bool], None] | None = None) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.max_readers = max_readers
        self.shm_name = shm_name
        #: Seconds between refreshes while no reader is live (told in the hello); None: readers may not say idle.
        self.pacing = pacing
        #: Called with True when the first reader turns live, False when the last live reader goes or turns idle.
        self.on_demand = on_demand
        self._live = False
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

    @property
    def live(self) -> bool:
        """Some reader needs live pixels."""
        return any(reader.live for reader in self._readers.values())

    def _demand_changed(self) -> None:
        live = self.live
        if live != self._live:
            self._live = live
            log.debug("display: %s", "a reader is live: capturing at QEMU's pace" if live
                      else "no live reader: capture paused" if not self.pacing
                      else f"no live reader: refreshing every {self.pacing} s")
            if self.on_demand is not None:
                self.on_demand(live)

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
        hello = encode_hello(self.shm_name, pacing=self.pacing, paced=not self._live)
        try:
            conn.setblocking(False)
            conn.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [eventfd]))])
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
        self._demand_changed()

    def _on_readable(self, reader: _Reader) -> None:
        try:
            data = reader.sock.recv(64)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("display reader %s: %s", reader.peer, exc)
            data = b""
        if data in (LIVE, IDLE) and self.pacing is not None:
            reader.live = data == LIVE
            self._demand_changed()
            return
        if data:
            log.warning("display reader %s sent data the protocol does not allow; dropping it", reader.peer)
        self._drop(reader)
        log.info("display reader %s detached (%d readers)", reader.peer, len(self._readers))
        self._demand_changed()

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
