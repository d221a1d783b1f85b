"""Telling readers that the event ring has new records: the display socket's hello, and the reader's side.

``RUN_DIR/display.sock`` is a unix SOCK_SEQPACKET socket served by the core. A reader connects and receives one
message: the hello below (JSON) with one file descriptor attached (SCM_RIGHTS), an eventfd of its own. The
core adds 1 to every reader's eventfd once per batch of records; an eventfd is a counter, so any number of
batches that happen while a reader is busy become one wake-up. Closing its end of the socket (or dying) is how
the core learns a reader is gone, and the core then closes that eventfd. EOF on the socket tells the reader the
core is gone. docs/display.md documents the format and why eventfd was chosen.

Hello, version 1 (UTF-8 JSON object, at most ``MAX_HELLO`` bytes, unknown members ignored)::

    {"type": "vmfront-display", "version": 1, "shm": "/vmfront.NAME.PID.TOKEN", "layout": 1,
     "notify": "eventfd", "pacing": 0, "paced": false}

``version`` changes when a member changes meaning or the exchange changes; a reader refuses versions it does
not speak. ``layout`` is the shm layout version (the segment's header says it too).

Pacing (optional: only with a core whose hello has ``pacing``): while no reader needs live pixels, the core
refreshes the segment only every ``pacing`` seconds, or (0) not at all (an idle demo guest would otherwise cost
the core a QEMU update every 55 ms). A reader is live when it attaches; it may send one message ``idle`` (no
viewer of its own is looking) and later ``live`` again. ``paced`` says whether the capture was paced when the
hello was sent: a one-shot reader then waits for its first wake-up (the core fetches the whole frame when a
reader turns live, within QEMU's refresh interval) before reading. Any other message from a reader is a
protocol error; the core drops that reader.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .layout import LAYOUT_VERSION, Overrun, Record
from .reader import ShmReader

HELLO_TYPE = "vmfront-display"
HELLO_VERSION = 1
MAX_HELLO = 4096
#: What a reader may send (one SOCK_SEQPACKET message each): it needs live pixels, or it does not.
LIVE, IDLE = b"live", b"idle"
#: A one-shot reader turning live takes the frame as written once wake-ups pause this long.
FRESH_QUIET_S = 0.1
_MAX_FDS = 4  # room to notice (and close) extra descriptors a confused server might send


class HelloError(Exception):
    """The display socket's hello is missing, malformed, or of a version this reader does not speak."""


class DisplayClosed(ConnectionError):
    """The core closed the display socket (it stopped or restarted): re-attach."""


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    shm: str
    layout: int
    notify: str
    #: Seconds between refreshes while no reader is live, 0: none (None: a core that does not pace or take ``idle``).
    pacing: float | None = None
    #: The capture was paced when this hello was sent: the segment may be up to ``pacing`` seconds old.
    paced: bool = False


def encode_hello(shm_name: str, *, pacing: float | None = None, paced: bool = False) -> bytes:
    fields: dict[str, object] = {"type": HELLO_TYPE, "version": HELLO_VERSION, "shm": shm_name,
                                 "layout": LAYOUT_VERSION, "notify": "eventfd"}
    if pacing is not None:
        fields.update(pacing=pacing, paced=paced)
    data = json.dumps(fields, separators=(",", ":")).encode()
    assert len(data) <= MAX_HELLO
    return data


def decode_hello(data: bytes) -> Hello:
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HelloError(f"display hello is not JSON: {exc}") from None
    if not isinstance(message, dict) or message.get("type") != HELLO_TYPE:
        raise HelloError(f"not a vmfront display hello: {data[:100]!r}")
    version, shm, layout, notify = (message.get(k) for k in ("version", "shm", "layout", "notify"))
    if version != HELLO_VERSION:
        raise HelloError(f"display hello version {version!r} is not supported (this reader speaks {HELLO_VERSION})")
    if not isinstance(shm, str) or not isinstance(layout, int) or notify != "eventfd":
        raise HelloError(f"malformed display hello: {message!r}")
    pacing, paced = message.get("pacing"), message.get("paced", False)
    if pacing is not None and (isinstance(pacing, bool) or not isinstance(pacing, int | float) or pacing < 0):
        raise HelloError(f"malformed display hello: pacing {pacing!r}")
    return Hello(version, shm, layout, notify, float(pacing) if pacing is not None else None, paced is True)


def receive_hello(sock: socket.socket) -> tuple[Hello, int]:
    """Read the hello and its eventfd from a connected display socket (ready to read). Returns (hello, fd)."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_HELLO, socket.CMSG_SPACE(_MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    try:
        if not data:
            raise DisplayClosed("display socket closed before the hello")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HelloError("display hello truncated")
        if len(fds) != 1:
            raise HelloError(f"display hello carried {len(fds)} descriptors, expected 1")
        hello = decode_hello(data)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return hello, fds[0]


def read_hello(path: Path | str, *, timeout_s: float = 5.0, fresh: bool = False) -> Hello:
    """The hello of a running core (blocking; for one-shot tools such as ``vmfront screendump``). With ``fresh``,
    if the core's capture was paced, wait (up to a second past its pacing interval, and ``timeout_s``) until it
    refreshed the segment for this (live) reader: its first wake-up, then until wake-ups pause for
    ``FRESH_QUIET_S`` (a whole frame is written in bands, each followed by a wake-up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(os.fspath(path))
        hello, fd = receive_hello(sock)
        try:
            if fresh and hello.paced and hello.pacing is not None:
                deadline = time.monotonic() + min(timeout_s, hello.pacing + 1.0)
                wait = deadline - time.monotonic()
                while wait > 0 and select.select([fd], [], [], wait)[0]:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    wait = min(FRESH_QUIET_S, deadline - time.monotonic())
        finally:
            os.close(fd)
        return hello


async def _wait_fd(fd: int, *, write: bool, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout_s)
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


class DisplaySubscription:
    """A reader's attachment to a core's display: the read-only segment plus a wake-up per batch of records.

    Made by ``await DisplaySubscription.connect(path)``. Everything runs on the event loop: the eventfd and the
    socket are watched with ``loop.add_reader``, so waiting costs nothing (no polling, no thread).
    """

    def __init__(self, sock: socket.socket, hello: Hello, eventfd: int, reader: ShmReader) -> None:
        self.hello = hello
        self.reader = reader
        self.wakeups = 0  # eventfd wake-ups seen (each may stand for any number of batches)
        self._sock = sock
        self._eventfd = eventfd
        self._loop = asyncio.get_running_loop()
        self._signal = asyncio.Event()
        self._closed: str | None = None
        self._live = True  # as every reader starts
        self._wakeup_waiters: list[asyncio.Future[None]] = []
        os.set_blocking(eventfd, False)
        self._loop.add_reader(eventfd, self._on_eventfd)
        self._loop.add_reader(sock.fileno(), self._on_socket)

    @classmethod
    async def connect(cls, path: Path | str, *, timeout_s: float = 5.0) -> DisplaySubscription:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        fd = -1
        try:
            try:
                sock.connect(os.fspath(path))
            except BlockingIOError:  # the core's accept backlog is full: wait for it
                await _wait_fd(sock.fileno(), write=True, timeout_s=timeout_s)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err), os.fspath(path)) from None
            await _wait_fd(sock.fileno(), write=False, timeout_s=timeout_s)
            hello, fd = receive_hello(sock)
            if hello.layout != LAYOUT_VERSION:
                raise HelloError(f"core serves shm layout {hello.layout}; this reader speaks {LAYOUT_VERSION}")
            reader = ShmReader(hello.shm)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            sock.close()
            raise
        return cls(sock, hello, fd, reader)

    def _on_eventfd(self) -> None:
        try:
            os.eventfd_read(self._eventfd)  # resets the counter: one wake-up however many batches it counted
        except BlockingIOError:
            return  # already read
        self.wakeups += 1
        self._signal.set()
        waiters, self._wakeup_waiters = self._wakeup_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def paced(self) -> bool:
        """This reader told the core it needs no live pixels (and the core paces its capture then)."""
        return not self._live

    def set_live(self, live: bool) -> None:
        """Tell the core whether this reader needs live pixels (only to a core that paces; only on change)."""
        if live == self._live or self.hello.pacing is None or self._closed is not None:
            return
        try:
            self._sock.send(LIVE if live else IDLE)
        except OSError:
            return  # the core is going away: the socket's EOF says so in a moment
        self._live = live

    async def next_wakeup(self, timeout_s: float) -> bool:
        """Wait for the next notification from the core (False after ``timeout_s``)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._wakeup_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return False
        return True

    def _on_socket(self) -> None:
        try:
            data = self._sock.recv(1)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            self._closed = f"display socket error: {exc}"
        if not data:
            self._closed = self._closed or "the core closed the display socket"
            self._loop.remove_reader(self._sock.fileno())
            self._signal.set()

    @property
    def closed(self) -> bool:
        """True once the core has gone away (or :meth:`close` was called)."""
        return self._closed is not None

    async def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until the core signals new records (at once if it did since the last wait).

        Returns False on timeout; raises DisplayClosed when the core has gone away. A wake-up may find no
        new records (they may have been read already): always ask ``reader.read_records()``.
        """
        if not self._signal.is_set() and self._closed is None:
            self._on_eventfd()  # a signal the loop has not dispatched yet counts too (so timeout_s=0 polls)
        if not self._signal.is_set() and self._closed is None:
            try:
                await asyncio.wait_for(self._signal.wait(), timeout_s)
            except TimeoutError:
                return False
        self._signal.clear()
        if self._closed is not None:
            raise DisplayClosed(self._closed)
        return True

    async def read(self) -> list[Record] | Overrun:
        """The next non-empty batch of records (or Overrun), waiting as long as there is none."""
        while True:
            result = self.reader.read_records()
            if isinstance(result, Overrun) or result:
                return result
            await self.wait()

    def close(self) -> None:
        if self._eventfd < 0:
            return
        self._loop.remove_reader(self._eventfd)
        self._loop.remove_reader(self._sock.fileno())
        os.close(self._eventfd)
        self._eventfd = -1
        self._sock.close()
        self.reader.close()
        self._closed = self._closed or "closed"

    async def __aenter__(self) -> DisplaySubscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = [
    "HELLO_VERSION",
    "IDLE",
    "LIVE",
    "MAX_HELLO",
    "DisplayClosed",
    "DisplaySubscription",
    "Hello",
    "HelloError",
    "decode_hello",
    "encode_hello",
    "read_hello",
    "receive_hello",
]
