"""The web console: one HTTP port (aiohttp) for the overview page, each VM's screen as PNG, noVNC's own files
(Debian's novnc package, served from where it is installed) and each VM's VNC over WebSocket (``/vnc/NAME``).

aiohttp rather than the ``websockets`` package the VNC service uses for its plain WebSocket port: this port
serves pages too, and needs what websockets' server does not do (it answers GET upgrades only): HEAD, static
files with their content types, bounded request bodies (the login form), cookies, and per-route handlers.

Access: with a token file (``--websocket-tokens``, clients/tokens.py) every URL but the login form wants a
token, which the form (or ``?token=`` once) puts in an HttpOnly, SameSite=Strict cookie; the overview lists the
VMs the token opens. A non-loopback address without a token file is refused at start. Every answer carries
``Cache-Control: no-store``; the access log names method, path (never the query) and status; WebSockets from
another origin are refused. With ``--web-tls-creds`` (or the VNC service's X.509 credentials) the port speaks TLS
only: HTTPS pages, ``wss://`` consoles, a ``Secure`` cookie. See docs/web.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from clients.connection_guard import ConnectionGuard
from clients.screendump import ScreendumpError, frame_image
from clients.service import QuietService
from clients.tokens import ANY_VM
from clients.vnc.service import ListenAddress, bind_socket, describe, is_loopback, vnc_address
from clients.vnc.tls import HANDSHAKE_TIMEOUT_S as TLS_HANDSHAKE_TIMEOUT_S
from clients.vnc.tls import TlsCredentials, TlsError, TlsSettings
from ipc.rundir import RunDir, RunDirError, check_vm_name
from rfb import ProtocolError
from shm import LayoutError

from . import pages

if TYPE_CHECKING:
    from clients.main import ClientContext
    from clients.tokens import TokenFile
    from clients.vnc.service import VncService

log = logging.getLogger(__name__)

NOVNC_DIR = Path("/usr/share/novnc")
COOKIE = "vmfront_token"
#: The login form is the only body a client sends; nothing else may be larger than this.
MAX_BODY = 4096
MAX_LINE = 8190
MAX_FIELD = 8190
#: Connections open at once (pages, images, consoles): at the limit the oldest that is not a console goes, so a
#: flood of idle connections cannot take the client's file descriptors, nor keep out an operator's console.
MAX_CONNECTIONS = 64
#: An idle keep-alive connection is closed after this long.
KEEPALIVE_S = 15.0
MAX_MESSAGE = 1 << 20
THUMBNAIL_WIDTH = 320
MAX_WIDTH = 4096
#: A PNG is made at most this often per VM and width (an overview open in several browsers costs one).
PNG_CACHE_S = 0.5


class WebError(ValueError):
    """The web console cannot start (address, port, no token file on a non-loopback address)."""


@dataclass(frozen=True)
class VmView:
    """A VM as the web console shows it; ``ctx`` None: not served now (its core stopped)."""

    name: str
    run_dir: RunDir
    ctx: ClientContext | None

    @property
    def vnc(self) -> VncService | None:
        from clients.vnc.service import VncService

        for service in self.ctx.services if self.ctx is not None else ():
            if isinstance(service, VncService):
                return service
        return None


class VmDirectory(Protocol):
    def vms(self) -> list[VmView]:
        """Every VM to show, served or not, by name."""


class _AccessLog(AbstractAccessLogger):
    """Method, path and status: never the query string (``?token=``) or a cookie."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %d (%.0f ms)", request.remote, request.method, request.path, response.status,
                         time * 1000)


class AiohttpTransport:
    """RFB over an aiohttp WebSocket (binary messages), for clients.vnc.service's viewers."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self._ws = ws
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.peer = f"ws:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "ws:unix"
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        self.address = vnc_address(sock.family if sock is not None else -1, peer, websocket=True)
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        self._tls: ssl.SSLObject | None = tls
        self.encrypted = tls is not None

    async def recv(self) -> bytes:
        message = await self._ws.receive()
        if message.type == WSMsgType.BINARY:
            return bytes(message.data)
        if message.type == WSMsgType.TEXT:
            raise ProtocolError("text WebSocket message (RFB needs binary frames)")
        return b""  # closing, closed or an error

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:  # RuntimeError: aiohttp's "closing transport"
            raise ConnectionResetError(str(exc)) from exc

    async def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        await self.send(b"".join(parts))

    def write_nowait(self, data: bytes) -> None:
        pass  # a frame cannot be written without awaiting; the close reason goes in the log

    def close(self) -> None:
        transport = self._ws._req.transport if self._ws._req is not None else None
        if transport is not None:
            transport.abort()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        raise ProtocolError("VeNCrypt inside a WebSocket is not supported")

    def ssl_object(self) -> ssl.SSLObject | None:
        return self._tls


class WebServer:
    def __init__(self, address: ListenAddress, directory: VmDirectory, tokens: TokenFile | None, *,
                 novnc: Path = NOVNC_DIR, tls_creds: Path | None = None) -> None:
        """``tls_creds``: serve HTTPS (and wss://) with the X.509 server certificate and key of that directory
        (QEMU's tls-creds-x509 layout, as ``--vnc-tls-creds``); read at :meth:`bind`, re-read by :meth:`reload`."""
        if address.path is not None:
            raise WebError("the web console listens on HOST:PORT, not a unix socket")
        if not is_loopback(address.host or "") and tokens is None:
            raise WebError(f"the web console on {address} is not on loopback: give --websocket-tokens (without "
                           "tokens, whoever reaches it sees and controls every VM)")
        self.address = address
        self.directory = directory
        self.tokens = tokens
        self.novnc = novnc
        self.tls = TlsCredentials(TlsSettings(creds_dir=tls_creds), "web console") if tls_creds is not None else None
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._acceptor: asyncio.Task[None] | None = None
        #: Connections handed to aiohttp; those that carry a console's WebSocket are never evicted for newcomers.
        self._connections = ConnectionGuard(MAX_CONNECTIONS, "web")
        self._consoles: set[asyncio.BaseTransport] = set()
        #: Accepted connections still in their TLS handshake (their tasks), oldest first.
        self._handshakes: dict[asyncio.Task[None], None] = {}
        self._pngs: dict[tuple[str, int | None], tuple[float, bytes]] = {}

    def bind(self) -> None:
        """Read the certificates (before privileges are dropped: the key may be root's alone), then bind."""
        if self.tls is not None:
            try:
                self.tls.load()
            except TlsError as exc:
                raise WebError(f"web console: {exc}") from exc
        self._sock = bind_socket(self.address)

    def reload(self) -> str | None:
        """Re-read the TLS certificates (SIGHUP): None if done, else why not. Open pages and consoles keep their
        connections; later handshakes use the new certificate."""
        return self.tls.reload() if self.tls is not None else "the web console has no TLS"

    @property
    def listener(self) -> socket.socket | None:
        """The bound socket (once bound): VNC services list it among their servers (``VncService.add_entry``)."""
        return self._sock

    @property
    def where(self) -> str:
        return describe(self._sock) if self._sock is not None else str(self.address)

    def url(self, path: str = "/") -> str:
        host, _, port = self.where.rpartition(":")
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{path}"

    async def start(self) -> None:
        assert self._sock is not None
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.on_response_prepare.append(self._no_store)
        app.router.add_get("/", self._overview)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_get("/api/vms", self._api_vms)
        app.router.add_get("/vm/{name}/screen.png", self._screen)
        app.router.add_get("/vm/{name}/console", self._console)
        app.router.add_get("/vnc/{name}", self._websocket)
        if (self.novnc / "vnc_lite.html").exists():
            app.router.add_static("/novnc/", self.novnc, follow_symlinks=True, show_index=False)
        else:
            log.warning("web: no noVNC at %s (apt install novnc): consoles are not available", self.novnc)
        self._runner = web.AppRunner(app, access_log_class=_AccessLog, access_log=logging.getLogger("aiohttp.access"),
                                     handler_cancellation=True, keepalive_timeout=KEEPALIVE_S,
                                     max_line_size=MAX_LINE, max_field_size=MAX_FIELD)
        await self._runner.setup()
        self._sock.setblocking(False)
        self._acceptor = asyncio.get_running_loop().create_task(self._accept(), name="web-accept")
        log.info("web console on %s (%s)", self.url(), "tokens required" if self.tokens else "no tokens: loopback")
        for warning in self.warnings():
            log.warning("%s", warning)

    def warnings(self) -> list[str]:
        """What makes this port unsafe where it listens (logged at start; ``vmfront status`` shows it)."""
        if self.tls is None and not is_loopback(self.address.host or ""):
            return [f"the web console listens on {self.where}, not only on loopback, without TLS (--web-tls-creds): "
                    "tokens, screens and keys cross the network in the clear"]
        return []

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        for task in list(self._handshakes):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- connections ----------------------------------------------------------------------------------------------

    async def _accept(self) -> None:
        """Our own accept loop rather than aiohttp's site: each connection is counted before aiohttp sees it, and
        a TLS handshake has a deadline of its own."""
        assert self._sock is not None and self._runner is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and the like: wait, as asyncio's own servers do
                log.warning("web: cannot accept a connection: %s", exc)
                await asyncio.sleep(1)
                continue
            if not self._make_room():
                log.warning("web: connection refused: %d connections open, every one a console",
                            self._connections.count())
                conn.close()
                continue
            self._handshakes[loop.create_task(self._serve(conn))] = None

    async def _serve(self, conn: socket.socket) -> None:
        """Hand the connection to aiohttp, after its TLS handshake (within TLS_HANDSHAKE_TIMEOUT_S)."""
        assert self._runner is not None and self._runner.server is not None
        context = self.tls.x509 if self.tls is not None else None
        try:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                self._runner.server, conn, ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if context is not None else None)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError) as exc:
            log.info("web: connection dropped before HTTP: %s", exc or type(exc).__name__)
            conn.close()
            return
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._handshakes.pop(task, None)
        self._connections.admit(transport, lambda: transport in self._consoles, len(self._handshakes))

    def _make_room(self) -> bool:
        """At the limit close the oldest connection still in its TLS handshake, else the oldest one that is not a
        console. False: every connection is a console (the newcomer must go)."""
        if self._connections.count() + len(self._handshakes) < MAX_CONNECTIONS:
            return True
        for task in self._handshakes:
            task.cancel()
            del self._handshakes[task]
            return True
        return self._connections.evict()

    # --- access ---------------------------------------------------------------------------------------------------

    def _opened(self, request: web.Request) -> frozenset[str] | None:
        """The VMs this request may see (``*``: all); None: no valid token."""
        if self.tokens is None:
            return frozenset({ANY_VM})
        token = request.query.get("token") or request.cookies.get(COOKIE)
        if not token:
            return None
        opened = self.tokens.opens(token)
        return opened or None

    @staticmethod
    def _may(opened: frozenset[str], name: str) -> bool:
        return ANY_VM in opened or name in opened

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/login":
            response: web.StreamResponse = await handler(request)
            return response
        opened = self._opened(request)
        if opened is None:
            return self._refuse(request)
        if "token" in request.query and request.method in ("GET", "HEAD") and not request.path.startswith("/vnc/"):
            # A link with ?token=: keep it in the cookie, take it out of the address bar (and of any Referer).
            rest = {k: v for k, v in request.query.items() if k != "token"}
            response = web.Response(status=303, headers={"Location": str(request.rel_url.with_query(rest))})
            self._set_cookie(response, request.query["token"])
            return response
        request["opened"] = opened
        response = await handler(request)
        return response

    @staticmethod
    async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
        """Every answer, errors and noVNC's files included: never kept by a cache, never framed elsewhere."""
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"

    def _refuse(self, request: web.Request) -> web.Response:
        log.warning("web: %s %s from %s refused: no valid token", request.method, request.path, request.remote)
        if request.path == "/" and request.method in ("GET", "HEAD"):
            failed = "token" in request.query or COOKIE in request.cookies
            return web.Response(status=401, text=pages.login(failed), content_type="text/html",
                                headers={"WWW-Authenticate": 'Token realm="vmfront"'})
        return web.Response(status=401, text="401: a token is required\n",
                            headers={"WWW-Authenticate": 'Token realm="vmfront"'})

    def _set_cookie(self, response: web.StreamResponse, token: str) -> None:
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/", secure=self.tls is not None)

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=pages.login(False), content_type="text/html")

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        token = form.get("token")
        response = web.Response(status=303, headers={"Location": "/"})
        if self.tokens is None:
            return response  # nothing to log in to
        if not isinstance(token, str) or not self.tokens.opens(token):
            log.warning("web: login from %s refused: not a valid token", request.remote)
            return web.Response(status=401, text=pages.login(True), content_type="text/html")
        self._set_cookie(response, token)
        return response

    # --- pages ------------------------------------------------------------------------------------------------

    def _visible(self, request: web.Request) -> list[VmView]:
        opened: frozenset[str] = request["opened"]
        return [vm for vm in self.directory.vms() if self._may(opened, vm.name)]

    def _find(self, request: web.Request) -> VmView:
        name = request.match_info["name"]
        try:
            check_vm_name(name)
        except RunDirError:
            raise web.HTTPNotFound(text="404: no such VM\n") from None
        for vm in self._visible(request):
            if vm.name == name:
                return vm
        raise web.HTTPNotFound(text="404: no such VM\n")

    async def _overview(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=pages.overview(), content_type="text/html")

    async def _api_vms(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=json.dumps([describe_vm(vm) for vm in self._visible(request)]),
                            content_type="application/json")

    async def _screen(self, request: web.Request) -> web.StreamResponse:
        vm = self._find(request)
        width: int | None = None
        if "width" in request.query:
            try:
                width = int(request.query["width"])
            except ValueError:
                raise web.HTTPBadRequest(text="400: width is a number of pixels\n") from None
            if not 16 <= width <= MAX_WIDTH:
                raise web.HTTPBadRequest(text=f"400: width is 16 to {MAX_WIDTH} pixels\n")
        display = vm.ctx.display if vm.ctx is not None else None
        if vm.ctx is None or display is None:
            raise web.HTTPNotFound(text="404: no screen (the VM is not running, or has no display)\n")
        key = (vm.name, width)
        cached = self._pngs.get(key)
        now = time.monotonic()
        if cached is None or now - cached[0] > PNG_CACHE_S:
            display = await vm.ctx.fresh_display() or display  # nobody watching: the core fetches the frame now
            try:
                image = frame_image(display.reader, width)
            except (ScreendumpError, LayoutError, TimeoutError) as exc:
                raise web.HTTPServiceUnavailable(text=f"503: no frame now: {exc}\n") from None
            out = io.BytesIO()
            image.save(out, format="PNG", compress_level=1)
            cached = (now, out.getvalue())
            self._pngs[key] = cached
            for stale in [k for k, (made, _) in self._pngs.items() if now - made > 10]:
                del self._pngs[stale]
        return web.Response(body=cached[1], content_type="image/png")

    async def _console(self, request: web.Request) -> web.StreamResponse:
        vm = self._find(request)
        if not (self.novnc / "vnc_lite.html").exists():
            raise web.HTTPNotFound(text="404: noVNC is not installed (apt install novnc)\n")
        # noVNC's page connects to ws://THIS_HOST:THIS_PORT/vnc/NAME; the cookie (if any) goes with it.
        raise web.HTTPSeeOther(f"/novnc/vnc_lite.html?path={quote('vnc/' + vm.name)}&scale=true")

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        vm = self._find(request)
        origin = request.headers.get("Origin")
        if origin is not None and origin.partition("://")[2] != request.host:
            log.warning("web: WebSocket for VM %s from %s refused: origin %s is not this site", vm.name,
                        request.remote, origin)
            raise web.HTTPForbidden(text="403: another site's page\n")
        service = vm.vnc
        if service is None:
            raise web.HTTPNotFound(text="404: the VM is not served now\n")
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=MAX_MESSAGE, compress=False,
                                   autoping=True, heartbeat=None)
        await ws.prepare(request)
        from clients.main import current_vm

        current_vm.set(vm.name)
        if request.transport is not None:
            self._consoles.add(request.transport)
        try:
            await service.serve_transport(AiohttpTransport(ws, request), self._sock)
        finally:
            if request.transport is not None:
                self._consoles.discard(request.transport)
            if not ws.closed:
                await ws.close()
        return ws


def describe_vm(vm: VmView) -> dict[str, Any]:
    """What the overview shows of a VM: its state (from its core's state.json), screen size, links."""
    from vmfront.lifecycle import describe_vm as describe_run_dir

    row = describe_run_dir(vm.run_dir, vm.name) or {}
    state = str(row.get("state") or "stopped")
    if vm.ctx is None and row.get("core_running") is False and state in ("running", "paused"):
        state = "stopped"
    size: list[int] | None = None
    display = vm.ctx.display if vm.ctx is not None else None
    if display is not None:
        try:
            mode = display.reader.mode()
        except (LayoutError, TimeoutError):
            mode = None
        if mode is not None and mode.generation:
            size = [mode.width, mode.height]
    served = vm.ctx is not None and display is not None
    return {"name": vm.name, "state": state, "size": size, "served": served,
            "screen": f"/vm/{quote(vm.name)}/screen.png" if served else None,
            "console": f"/vm/{quote(vm.name)}/console" if served and vm.vnc is not None else None}




class WebService(QuietService):
    """The web console of a one-VM client (``vmfront client --name NAME --web HOST:PORT``), as a client service."""

    name = "web"

    def __init__(self, listen: str, tokens: TokenFile | None, tls_creds: Path | None = None) -> None:
        from clients.vnc.service import VncError, parse_listen

        try:
            self.address = parse_listen(listen)
        except VncError as exc:
            raise WebError(str(exc)) from exc
        self.tokens = tokens
        self.tls_creds = tls_creds
        self.server: WebServer | None = None
        self._view: VmView | None = None

    def vms(self) -> list[VmView]:
        return [self._view] if self._view is not None else []

    async def bind(self, ctx: ClientContext) -> None:
        self._view = VmView(ctx.config.name, ctx.config.run_dir, ctx)
        self.server = WebServer(self.address, self, self.tokens, tls_creds=self.tls_creds)
        self.server.bind()
        vnc = self._view.vnc
        if vnc is not None and self.server.listener is not None:
            vnc.add_entry(self.server.listener)

    def endpoints(self) -> dict[str, str]:
        return {"web": self.server.url()} if self.server is not None else {}

    async def start(self) -> None:
        assert self.server is not None
        await self.server.start()

    def reload(self) -> str | None:
        return self.server.reload() if self.server is not None else None

    def warnings(self) -> list[str]:
        return self.server.warnings() if self.server is not None else []

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


__all__ = ["NOVNC_DIR", "AiohttpTransport", "VmDirectory", "VmView", "WebError", "WebServer", "WebService",
           "describe_vm"]
