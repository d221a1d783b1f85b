"""``MonitorService``: the text monitor on a unix socket (mode 0600) or a localhost TCP port.

Each connection gets QEMU's banner and ``(qemu) `` prompt, then is line based (socat, nc and scripts work as
with QEMU's own ``-monitor unix:...,server``). One task per connection; a connection that stops reading only
stalls itself (its writes are bounded by a drain deadline), and closing one affects nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clients.service import QuietService
from ipc.channel import ChannelError, NotAttached
from ipc.rundir import listen_unix

from .commands import MonitorError, Session, execute

if TYPE_CHECKING:
    from clients.main import ClientContext

log = logging.getLogger(__name__)

PROMPT = "(qemu) "
#: The longest command line a connection may send.
MAX_LINE = 64 * 1024
#: Monitor connections served at once (each an operator or a script; QEMU's monitor takes one per chardev): one
#: more is told so and closed, so a runaway script cannot take every descriptor of the client.
MAX_CONNECTIONS = 32
#: A peer that does not read its output for this long is dropped.
DRAIN_TIMEOUT = 30.0
#: How long a QMP request from the monitor may take.
QMP_TIMEOUT = 30.0


class PeerLog(logging.LoggerAdapter[logging.Logger]):
    """Log lines about one monitor connection, prefixed with its number."""

    def __init__(self, logger: logging.Logger, peer: int) -> None:
        super().__init__(logger, {"peer": peer})
        self.peer = peer

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, MutableMapping[str, Any]]:
        return f"monitor {self.peer}: {msg}", kwargs


class MonitorAddressError(ValueError):
    """A ``--monitor`` value the service cannot listen on."""


@dataclass(frozen=True)
class MonitorAddress:
    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


def parse_monitor_address(text: str, default_path: Path) -> MonitorAddress:
    """``unix:PATH``, ``unix:`` (the default path), ``HOST:PORT`` or ``tcp:HOST:PORT`` (localhost by default)."""
    if text in ("", "unix", "unix:"):
        return MonitorAddress(path=default_path)
    if text.startswith("unix:"):
        return MonitorAddress(path=Path(text[5:]))
    text = text.removeprefix("tcp:")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise MonitorAddressError(f"expected unix:PATH or HOST:PORT, got {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            log.warning("monitor on non-loopback address %s: anyone who can reach it controls the VM", host)
    return MonitorAddress(host=host, port=int(port))


class _ClientBackend:
    """QMP through the client's control channel; screendump from the client's shared-memory mapping."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        channel = self.ctx.channel
        if channel is None or not channel.attached:
            raise NotAttached("not attached")
        return await channel.qmp(command, arguments, timeout_s=QMP_TIMEOUT)

    async def screendump(self, path: Path, image_format: str) -> None:
        display = await self.ctx.fresh_display()  # current, even if no viewer is looking (the core paces then)
        if display is None:
            raise MonitorError("no display: the core is not capturing one (or the client is not attached)")
        # A few milliseconds of PNG encoding: done on the loop rather than in a thread (no threads here).
        _write_image(display.hello.shm, path, image_format)


def _write_image(shm_name: str, path: Path, image_format: str) -> None:
    import posix_ipc

    from clients.screendump import ScreendumpError, write_screendump
    from shm import LayoutError

    try:
        write_screendump(shm_name, path, "PNG" if image_format == "png" else "PPM")
    except (ScreendumpError, LayoutError, posix_ipc.ExistentialError) as exc:
        raise MonitorError(str(exc)) from exc
    except OSError as exc:
        raise MonitorError(f"failed to open file '{path}': {exc.strerror or exc}") from exc


class MonitorService(QuietService):
    name = "monitor"

    def __init__(self, address: MonitorAddress, *, mode: int = 0o600) -> None:
        self.address = address
        self.mode = mode
        self._server: asyncio.Server | None = None
        self._ctx: ClientContext | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._version = ""
        self._next_id = 0

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def bind(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        try:
            if self.address.path is not None:
                # A socket left by a killed client is replaced.
                self._server = await asyncio.start_unix_server(
                    self._serve, sock=listen_unix(self.address.path, mode=self.mode), limit=MAX_LINE,
                    start_serving=False)
            else:
                self._server = await asyncio.start_server(self._serve, self.address.host, self.address.port,
                                                          limit=MAX_LINE, start_serving=False)
        except OSError as exc:
            raise MonitorAddressError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        log.info("monitor listening on %s", self.where())

    def endpoints(self) -> dict[str, str]:
        return {"monitor": self.where()}

    def where(self) -> str:
        if self.address.path is not None or self._server is None:
            return str(self.address)
        return f"{self.address.host}:{self.bound_port}"

    async def start(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)
        if self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.address.path.unlink()

    async def _banner(self, backend: _ClientBackend) -> str:
        if not self._version:
            with contextlib.suppress(ChannelError, KeyError, TypeError, asyncio.TimeoutError):
                version = await asyncio.wait_for(backend.qmp("query-version"), 2.0)
                qemu = version["qemu"]
                self._version = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
        return f"QEMU {self._version + ' ' if self._version else ''}monitor - type 'help' for more information\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._ctx is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            log.warning("monitor connection refused: already %d", len(self._connections))
            writer.write(f"Error: too many monitor connections (at most {MAX_CONNECTIONS})\r\n".encode())
            writer.close()
            return
        self._connections.add(task)
        self._next_id += 1
        # An adapter, not a child logger per connection: logging keeps every named logger forever (the soak's
        # monitor churn grew the client by ~2 KiB/s that way).
        peer_log = PeerLog(log, self._next_id)
        peer_log.info("monitor connection opened")
        backend = _ClientBackend(self._ctx)

        def write(text: str) -> None:
            if not writer.is_closing():
                writer.write(text.replace("\r\n", "\n").replace("\n", "\r\n").encode())

        session = Session(backend, write)
        try:
            write(await self._banner(backend) + PROMPT)
            await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT)
            while not session.closing:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial.strip():
                        break
                    raw = exc.partial
                except asyncio.LimitOverrunError:
                    write("Error: line too long\n")
                    break
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                peer_log.debug("command: %s", line)
                await execute(session, line)
                if not session.closing:
                    write(PROMPT)
                await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT)
                if reader.at_eof():
                    break
        except (TimeoutError, ConnectionError) as exc:
            peer_log.info("monitor connection dropped: %s", exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            peer_log.exception("monitor connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            peer_log.info("monitor connection closed")
