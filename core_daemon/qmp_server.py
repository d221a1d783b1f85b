"""The core's re-exported QMP: many peers on unix and TCP sockets, one QEMU behind them.

QEMU serves one peer per monitor socket; the core serves any number. Each peer's commands run in order (as on a
real monitor), replies carry that peer's own ids, events go to every negotiated peer, and a policy decides
which commands each socket may run. A peer that sends garbage gets QEMU's error; a peer that sends an oversized
message, or stops reading while replies and events pile up, is closed. Nothing a peer sends can stop the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipc.rundir import check_socket_path, listen_unix, remove_stale_socket

from .policy import Policy
from .qmp_protocol import (
    Answer,
    Command,
    ConnectionState,
    MessageTooLarge,
    Negotiated,
    QmpServerConnection,
    encode,
    error_message,
)

log = logging.getLogger(__name__)

#: Executes one command on QEMU; returns QEMU's reply as a dict with ``return`` or ``error``.
Executor = Callable[[str, dict[str, Any] | None], Awaitable[dict[str, Any]]]

_READ_CHUNK = 64 * 1024
#: QMP peers served at once (all sockets together); see _admit for who makes room.
MAX_PEERS = 64
#: A peer that has not negotiated capabilities this long after its greeting is closed (a stuck or hostile peer
#: must not hold one of the MAX_PEERS places).
NEGOTIATION_DEADLINE = 10.0


@dataclass
class QmpPeer:
    """One connected QMP peer, as shown in ``state.json``."""

    peer_id: int
    socket_name: str
    writer: asyncio.StreamWriter
    connection: QmpServerConnection
    since: float = field(default_factory=time.time)
    pid: int | None = None
    uid: int | None = None
    remote: str | None = None
    closing: bool = False

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"id": self.peer_id, "socket": self.socket_name, "since": self.since}
        if self.pid is not None:
            info.update(pid=self.pid, uid=self.uid)
        if self.remote is not None:
            info["remote"] = self.remote
        return info


def _peer_credentials(sock: socket.socket | None) -> tuple[int | None, int | None]:
    if sock is None or sock.family != socket.AF_UNIX:
        return None, None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


class QmpReexport:
    """Serves the QMP wire protocol to many peers on behalf of one QEMU."""

    def __init__(
        self,
        executor: Executor,
        greeting: dict[str, Any],
        policy: Policy,
        *,
        max_message: int = 1 << 20,
        max_backlog: int = 8 << 20,
        on_peers_changed: Callable[[], None] | None = None,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self._executor = executor
        self._greeting = greeting
        self._policy = policy
        self.max_message = max_message
        #: Bytes queued for one peer beyond which it counts as not reading and is closed.
        self.max_backlog = max_backlog
        self._on_peers_changed = on_peers_changed
        self.max_peers = max_peers
        self._servers: list[tuple[asyncio.Server, Path | None]] = []
        self._peers: dict[int, QmpPeer] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @property
    def peers(self) -> list[QmpPeer]:
        return list(self._peers.values())

    async def listen_unix(self, path: Path, socket_name: str, mode: int = 0o660) -> None:
        check_socket_path(path)
        remove_stale_socket(path)
        server = await asyncio.start_unix_server(
            lambda r, w: self._accept(r, w, socket_name), sock=listen_unix(path, mode=mode), limit=_READ_CHUNK)
        self._servers.append((server, path))
        log.info("QMP socket %r listening on %s", socket_name, path)

    async def listen_inherited(self, sock: socket.socket, socket_name: str) -> str:
        """Serve on a listening socket the service manager made (it stays the manager's: never unlinked)."""
        if sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(
                lambda r, w: self._accept(r, w, socket_name), sock=sock, limit=_READ_CHUNK)
        else:
            server = await asyncio.start_server(
                lambda r, w: self._accept(r, w, socket_name), sock=sock, limit=_READ_CHUNK)
        self._servers.append((server, None))
        address = sock.getsockname()
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        log.info("QMP socket %r listening on %s (from the service manager)", socket_name, where)
        return where

    async def listen_tcp(self, host: str, port: int, socket_name: str) -> int:
        """Listen on TCP; returns the bound port (useful with port 0)."""
        server = await asyncio.start_server(
            lambda r, w: self._accept(r, w, socket_name), host=host, port=port, limit=_READ_CHUNK
        )
        bound: int = server.sockets[0].getsockname()[1]
        self._servers.append((server, None))
        log.info("QMP socket %r listening on %s:%d", socket_name, host, bound)
        return bound

    def broadcast_event(self, event: dict[str, Any]) -> None:
        """Send a QEMU event to every peer that finished negotiation (serialised once for all)."""
        data = encode(event)
        for peer in list(self._peers.values()):
            if peer.connection.state is ConnectionState.COMMAND:
                self._send(peer, data)

    async def close(self) -> None:
        """Stop listening, remove socket files, hang up on every peer."""
        for server, path in self._servers:
            server.close()
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for peer in list(self._peers.values()):
            peer.closing = True
            peer.writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        for server, _ in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, socket_name: str) -> None:
        """One task per peer, tracked so that close() can end them all."""
        handler = asyncio.get_running_loop().create_task(self._serve(reader, writer, socket_name))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, socket_name: str) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid = _peer_credentials(sock)
        remote = writer.get_extra_info("peername") if sock is not None and sock.family != socket.AF_UNIX else None
        peer = QmpPeer(
            next(self._ids), socket_name, writer,
            QmpServerConnection(self._greeting, max_message=self.max_message),
            pid=pid, uid=uid, remote=f"{remote[0]}:{remote[1]}" if remote else None,
        )
        if not self._admit(peer):
            writer.write(encode(error_message(
                "GenericError", f"the core already serves {self.max_peers} QMP peers; try again later")))
            writer.close()
            return
        self._peers[peer.peer_id] = peer
        log.info("QMP peer %d connected on %r (pid %s, uid %s%s)", peer.peer_id, socket_name, pid, uid,
                  f", from {peer.remote}" if peer.remote else "")
        self._peers_changed()
        deadline = asyncio.get_running_loop().call_later(NEGOTIATION_DEADLINE, self._negotiation_overdue, peer)
        try:
            self._send(peer, peer.connection.greeting_bytes())
            while not peer.closing:
                data = await reader.read(_READ_CHUNK)
                if not data:
                    break
                for event in peer.connection.receive_data(data):
                    if peer.closing:
                        break
                    await self._handle(peer, event)
        except (ConnectionError, OSError) as exc:
            log.info("QMP peer %d: connection error: %s", peer.peer_id, exc)
        finally:
            deadline.cancel()
            self._peers.pop(peer.peer_id, None)  # (already gone if it was evicted)
            peer.closing = True
            writer.close()
            log.info("QMP peer %d disconnected", peer.peer_id)
            self._peers_changed()

    def _admit(self, newcomer: QmpPeer) -> bool:
        """Room for one more peer? At the limit, the oldest peer still negotiating makes room (as QEMU's VNC
        drops the oldest client still in its handshake): a flood of idle connections cannot lock out a peer
        that speaks QMP, and negotiated peers are never evicted. Otherwise the newcomer is refused."""
        if len(self._peers) < self.max_peers:
            return True
        waiting = [p for p in self._peers.values() if p.connection.state is ConnectionState.CAPABILITIES]
        if not waiting:
            log.warning("QMP peer on %r (pid %s) refused: %d peers already", newcomer.socket_name, newcomer.pid,
                        len(self._peers))
            return False
        oldest = min(waiting, key=lambda p: p.since)
        log.warning("QMP peer %d evicted (still negotiating) to make room: %d peers", oldest.peer_id,
                    len(self._peers))
        self._hang_up(oldest)
        del self._peers[oldest.peer_id]
        return True

    def _negotiation_overdue(self, peer: QmpPeer) -> None:
        if peer.connection.state is ConnectionState.CAPABILITIES and not peer.closing:
            log.info("QMP peer %d did not negotiate within %.0f s; closing it", peer.peer_id, NEGOTIATION_DEADLINE)
            self._send(peer, encode(error_message("GenericError", "capabilities negotiation timed out")))
            self._hang_up(peer)

    @staticmethod
    def _hang_up(peer: QmpPeer) -> None:
        peer.closing = True
        peer.writer.close()

    async def _handle(self, peer: QmpPeer, event: Answer | Command | Negotiated | MessageTooLarge) -> None:
        if isinstance(event, Answer):
            self._send(peer, event.data)
        elif isinstance(event, Negotiated):
            log.debug("QMP peer %d negotiated capabilities", peer.peer_id)
        elif isinstance(event, MessageTooLarge):
            log.warning("QMP peer %d sent a message over %d bytes; closing it", peer.peer_id, event.limit)
            self._send(peer, event.data)
            peer.closing = True
            peer.writer.close()
        else:
            await self._run_command(peer, event)

    async def _run_command(self, peer: QmpPeer, command: Command) -> None:
        desc = self._policy.refusal(peer.socket_name, command.name, command.arguments)
        if desc is not None:
            log.info("QMP peer %d: %s", peer.peer_id, desc)
            self._send(peer, encode(error_message("GenericError", desc, command.id, has_id=command.has_id)))
            return
        log.debug("QMP peer %d: execute %s", peer.peer_id, command.name)
        reply = await self._executor(command.name, command.arguments)
        self._send(peer, peer.connection.reply_bytes(command, reply))

    def _send(self, peer: QmpPeer, data: bytes) -> None:
        """Queue bytes without waiting; a peer whose backlog outgrows the limit is not reading: drop it."""
        if peer.closing or peer.writer.is_closing():
            return
        peer.writer.write(data)
        backlog = peer.writer.transport.get_write_buffer_size()
        if backlog > self.max_backlog:
            log.warning("QMP peer %d is not reading (%d bytes queued); closing it", peer.peer_id, backlog)
            peer.closing = True
            peer.writer.transport.abort()

    def _peers_changed(self) -> None:
        if self._on_peers_changed is not None:
            self._on_peers_changed()
