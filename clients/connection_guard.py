"""A bound on the connections one listener holds, with eviction that keeps legitimate users in.

A peer that opens connections and never speaks costs the client a file descriptor each until a deadline closes
them; enough of them and nothing else in the process can accept, connect or open a file (in a fleet client,
every VM's VNC, monitor and agent share that table). So each listener counts its connections: at the limit the
oldest one not yet *established* (still in its HTTP or WebSocket handshake) is closed for the newcomer, and one
that is established (a viewer, a console) is never closed for a newcomer. When all of them are established the
newcomer goes instead.

``websocket_connection`` fits it to the ``websockets`` package's servers through their public
``create_connection`` hook; the web console (aiohttp) counts in its own accept loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

log = logging.getLogger(__name__)


class ConnectionGuard:
    """The connections of one listener, oldest first, each with a test of whether it is established."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._open: dict[asyncio.BaseTransport, Callable[[], bool]] = {}

    def count(self) -> int:
        """Connections held now (the closed ones forgotten)."""
        for transport in [t for t in self._open if t.is_closing()]:
            del self._open[transport]
        return len(self._open)

    def admit(self, transport: asyncio.BaseTransport, established: Callable[[], bool], waiting: int = 0) -> bool:
        """Count a new connection, making room first; False (and the connection closed) when every connection
        held is established. ``waiting``: connections the caller holds elsewhere (in a TLS handshake)."""
        if not self.make_room(waiting):
            log.warning("%s: connection from %s refused: %d connections open, all in use", self.what,
                        transport.get_extra_info("peername"), len(self._open))
            _abort(transport)
            return False
        self._open[transport] = established
        return True

    def make_room(self, waiting: int = 0) -> bool:
        """Below the limit (counting ``waiting`` too), closing the oldest connection not established if need be;
        False if only established ones are left."""
        return self.count() + waiting < self.limit or self.evict()

    def evict(self) -> bool:
        """Close the oldest connection that is not established; False if there is none."""
        for transport, established in self._open.items():
            if not established():
                log.warning("%s: closing the oldest connection still in its handshake (%s) to make room (%d open)",
                            self.what, transport.get_extra_info("peername"), len(self._open))
                del self._open[transport]
                _abort(transport)
                return True
        return False

    def release(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


def websocket_connection(guard: ConnectionGuard) -> type[ServerConnection]:
    """A ``create_connection`` for ``websockets.asyncio.server.serve``: each connection counted by ``guard``,
    established once its WebSocket is open."""
    from websockets.asyncio.server import ServerConnection
    from websockets.protocol import State

    class GuardedConnection(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            guard.admit(transport, lambda: self.protocol.state is not State.CONNECTING)

        def connection_lost(self, exc: Exception | None) -> None:
            guard.release(self.transport)
            super().connection_lost(exc)

    return GuardedConnection


__all__ = ["ConnectionGuard", "websocket_connection"]
