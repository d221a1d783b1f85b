"""One WebSocket port for every VM a fleet client fronts (noVNC): the VM is chosen by the path, ``/vnc/NAME``,
access by a token, ``?token=T`` (clients/tokens.py), as websockify's token plugins and nova-novncproxy do, but
with no extra hop: the connection is the VM's own VNC service's viewer.

Refusals are plain HTTP answers before the upgrade: 401 without a token, 403 for a token that does not open
that VM (wrong, expired, or for another VM), 404 for a VM this client does not serve, 503 when too many
connections are open. The token is checked before the VM is looked up, so without one nothing tells which VMs
exist. The handshake has a deadline; messages are bounded. Tokens never reach a log line.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ipc.rundir import RunDirError, check_vm_name

from .service import ListenAddress, WebSocketTransport, _binary_subprotocol, bind_socket, describe, is_loopback
from .tls import HANDSHAKE_TIMEOUT_S as TLS_HANDSHAKE_TIMEOUT_S

if TYPE_CHECKING:
    from clients.tokens import TokenFile

    from .service import VncService
    from .tls import TlsCredentials

log = logging.getLogger(__name__)

PATH_PREFIX = "/vnc/"
#: How long a connection may take to complete its WebSocket handshake.
HANDSHAKE_TIMEOUT_S = 10.0
MAX_MESSAGE = 1 << 20
#: Open WebSocket connections (handshaking or serving) over every VM.
MAX_CONNECTIONS = 256
#: TCP connections still before their upgrade, beyond those: at the limit of both the oldest of them is closed
#: (clients/connection_guard.py), so silent connections cannot take the fleet client's file descriptors.
MAX_HANDSHAKES = 32


class RouterError(Exception):
    """The router cannot be set up (a non-loopback address without tokens, a port taken)."""


def route(path: str) -> tuple[str | None, str | None]:
    """(VM name, token) from a request target ``/vnc/NAME?token=T``; None for what is missing or malformed."""
    parts = urlsplit(path)
    tokens = parse_qs(parts.query, max_num_fields=8).get("token")
    token = tokens[0] if tokens and len(tokens) == 1 else None
    if not parts.path.startswith(PATH_PREFIX):
        return None, token
    try:
        return check_vm_name(parts.path[len(PATH_PREFIX):]), token
    except RunDirError:
        return None, token


class WebSocketRouter:
    """``lookup(name)`` is the VM's VNC service, or None if this client does not serve that VM (now)."""

    def __init__(self, address: ListenAddress, lookup: Callable[[str], VncService | None],
                 tokens: TokenFile | None, tls: TlsCredentials | None = None) -> None:
        """``tls``: the fleet's VNC credentials; with X.509 ones the port is wss:// (RFB inside it offers its own
        security types, as a one-VM client's --websocket with TLS)."""
        if address.host is not None and not is_loopback(address.host) and tokens is None:
            raise RouterError(f"the WebSocket port {address} is not on loopback: give --websocket-tokens (without "
                              "tokens, whoever reaches it sees and controls every VM)")
        self.address = address
        self.lookup = lookup
        self.tokens = tokens
        self.tls = tls if tls is not None and tls.x509 is not None else None
        self._sock: socket.socket | None = None
        self._server: Any = None
        self.connections = 0

    def bind(self) -> None:
        self._sock = bind_socket(self.address)

    @property
    def listener(self) -> socket.socket | None:
        """The bound socket (once bound): VNC services list it among their servers (``VncService.add_entry``)."""
        return self._sock

    @property
    def where(self) -> str:
        return describe(self._sock) if self._sock is not None else str(self.address)

    def url(self, vm: str) -> str:
        """Where noVNC reaches ``vm`` (without the token), for state.json."""
        scheme = ("wss" if self.tls is not None else "ws") + ("+unix" if self.address.path else "")
        return f"{scheme}://{self.where.removeprefix('unix:')}{PATH_PREFIX}{vm}"

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        from clients.connection_guard import ConnectionGuard, websocket_connection

        assert self._sock is not None
        # DEBUG would log request lines, and with them the tokens.
        logging.getLogger("websockets").setLevel(logging.INFO)
        tls: dict[str, Any] = {} if self.tls is None else {"ssl": self.tls.x509,
                                                           "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S}
        guard = ConnectionGuard(MAX_CONNECTIONS + MAX_HANDSHAKES, "WebSocket router")
        self._server = await serve(self._handler, sock=self._sock, process_request=self._check,
                                   select_subprotocol=_binary_subprotocol, compression=None, max_size=MAX_MESSAGE,
                                   ping_interval=None, open_timeout=HANDSHAKE_TIMEOUT_S,
                                   create_connection=websocket_connection(guard), **tls)
        log.info("VNC over WebSocket for every VM on %s (%s)", self.where,
                 "tokens required" if self.tokens is not None else "no tokens: loopback only")
        if self.tls is None and self.address.host is not None and not is_loopback(self.address.host):
            log.warning("VNC over WebSocket on %s, not only on loopback, without TLS (--vnc-tls-creds): tokens, "
                        "screens and keys cross the network in the clear", self.where)

    def _check(self, connection: Any, request: Any) -> Any:
        """Before the upgrade: None to go on, or the refusal."""
        vm, token = route(request.path)
        peer = connection.remote_address
        if self.connections >= MAX_CONNECTIONS:
            log.warning("WebSocket from %s refused: %d connections open", peer, self.connections)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        if self.tokens is not None:
            if token is None:
                log.warning("WebSocket from %s for VM %s refused: no token", peer, vm or "?")
                return connection.respond(HTTPStatus.UNAUTHORIZED, "A token is required (?token=...)\n")
            if vm is None or not self.tokens.allows(token, vm):
                log.warning("WebSocket from %s for VM %s refused: the token does not open it", peer, vm or "?")
                return connection.respond(HTTPStatus.FORBIDDEN, "Forbidden\n")
        if vm is None or self.lookup(vm) is None:
            log.info("WebSocket from %s: no VM %s here", peer, vm or "(no /vnc/NAME path)")
            return connection.respond(HTTPStatus.NOT_FOUND, "No such VM\n")
        return None

    async def _handler(self, ws: Any) -> None:
        from clients.main import current_vm

        vm, _ = route(ws.request.path)
        current_vm.set(vm)  # this connection's task: its log lines name the VM
        service = self.lookup(vm) if vm is not None else None
        if service is None:  # the VM went between the check and the upgrade
            await ws.close(1011, "VM gone")
            return
        self.connections += 1
        try:
            await service.serve_transport(WebSocketTransport(ws), self._sock)
        finally:
            self.connections -= 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        elif self._sock is not None:
            self._sock.close()


__all__ = ["PATH_PREFIX", "RouterError", "WebSocketRouter", "route"]
