"""One client process for every VM of a host (``vmfront client --all``): the cores stay one per VM (one
privilege domain per guest), the unprivileged side is shared.

The fleet client watches the run root (``/run/vmfront`` for root) and runs one :class:`clients.main.Client` per
VM whose core lives there, in this one event loop: its own VNC port from ``--vnc-ports``, its monitor, agent
and console sockets, its control channel and display subscription. Everything a single-VM client does happens
per VM (migration following, re-attach after a core restart); what is shared is the process, the encoder
workers (one lazily started pool) and the WebSocket port (``/vnc/NAME?token=...``, clients/vnc/websocket_router.py).

A VM is picked up within ``SCAN_INTERVAL_S`` of its core appearing, and let go (port and sockets released) once
its core is gone and its QEMU too: a core that crashed while QEMU runs is waited for (a new one adopts QEMU).
A VM this process already follows to another core (a migration) is not served twice. See docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core_daemon.readiness import sd_notify, write_ready_fd
from ipc.channel import ipc_endpoint
from ipc.rundir import RunDir, RunDirError, check_vm_name, read_state
from shm.naming import pid_alive

from .main import Client, ClientConfig, current_vm
from .privileges import Identity, drop_privileges, resolve_user
from .service import QuietService, Service

if TYPE_CHECKING:
    from .tokens import TokenFile
    from .vnc.encoder_pool import EncoderPool
    from .vnc.service import VncService
    from .vnc.tls import TlsCredentials, TlsSettings
    from .vnc.websocket_router import WebSocketRouter
    from .web.server import VmView, WebServer

log = logging.getLogger(__name__)

FLEET_CLIENT_NAME = "vmfront-fleet"
#: How often the run root is looked at for cores that appeared (and detached VMs for cores that went).
SCAN_INTERVAL_S = 0.5
#: The fleet's record of which VM had which VNC port (so a restarted fleet client gives each the same one).
PORTS_FILE = ".vmfront-fleet-ports.json"
#: States in which a core's VM is not served on its own: a migration's destination waits for its guest (whoever
#: served the source follows it there); a guest that left or ended needs no client.
NOT_SERVED = frozenset({"incoming", "migrated", "shutdown", "crashed"})

#: After a VM could not be served (a socket that cannot be made), try it again this much later.
RETRY_S = 10.0


class VmLogFilter(logging.Filter):
    """Prefixes log lines written on behalf of one VM with ``[NAME]``: in a fleet's log, ``viewer ...:
    connected`` must say which VM."""

    def filter(self, record: logging.LogRecord) -> bool:
        vm = current_vm.get()
        if vm is not None and not getattr(record, "vm_tagged", False):
            record.msg = f"[{vm}] {record.msg}"
            record.vm_tagged = True
        return True


class FleetError(Exception):
    """The fleet client cannot start; the message is for the operator."""


def parse_port_range(text: str) -> range:
    """``FIRST-LAST`` (inclusive) within 1..65535."""
    first, sep, last = text.partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise FleetError(f"expected --vnc-ports FIRST-LAST, got {text!r}")
    low, high = int(first), int(last)
    if not 1 <= low <= high <= 65535:
        raise FleetError(f"port range {text!r} is empty or outside 1-65535")
    return range(low, high + 1)


@dataclass
class FleetConfig:
    run_root: Path
    #: Serve only these VMs (``--name``, repeated); None: every VM under the run root (``--all``).
    names: list[str] | None = None
    vnc_ports: range | None = None
    vnc_host: str = "127.0.0.1"
    #: Each VM's VNC server as ``client --vnc-share/--vnc-connections/--vnc-handshake-timeout/--keymap``.
    vnc_share: str = "allow-exclusive"
    vnc_connections: int = 32
    vnc_handshake_timeout: float = 10.0
    keymap: str | None = None
    websocket: str | None = None
    #: The web console (overview, screens, noVNC) for every VM, on HOST:PORT.
    web: str | None = None
    #: HTTPS for the web console: X.509 credentials in QEMU's layout (server-cert.pem, server-key.pem).
    web_tls_creds: Path | None = None
    #: VeNCrypt for every VM's VNC port, and wss:// for the WebSocket router: one set of credentials for the host
    #: (``--vnc-tls-*``), loaded once before privileges are dropped.
    vnc_tls: TlsSettings | None = None
    tokens: TokenFile | None = None
    monitor: bool = False
    console: bool = False
    agent: bool = True
    #: Per-VM sockets in SOCKET_DIR/NAME/ instead of each VM's run directory (for a client that cannot write
    #: there: the systemd unit's DynamicUser).
    socket_dir: Path | None = None
    user: str | None = None
    group: str | None = None
    ready_fd: int | None = None
    encoder_workers: int | None = None
    scan_interval: float = SCAN_INTERVAL_S


@dataclass
class _Served:
    name: str
    run_dir: RunDir
    client: Client
    vnc: VncService | None
    port: int | None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class PortBook:
    """Which VM had which port, kept in a small JSON file when the fleet can write one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.ports: dict[str, int] = {}
        self._dirty = False
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self.ports = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}

    def remember(self, name: str, port: int) -> None:
        if self.ports.get(name) != port:
            self.ports[name] = port
            self._dirty = True

    def save(self) -> None:
        if not self._dirty or self.path is None:
            return
        self._dirty = False
        temp = self.path.with_name(f"{self.path.name}.{os.getpid()}")
        try:
            temp.write_text(json.dumps(self.ports, sort_keys=True))
            os.replace(temp, self.path)
        except OSError as exc:
            log.debug("VNC port assignments not kept in %s: %s", self.path, exc)
            self.path = None


def vm_alive(run_dir: RunDir) -> bool:
    """A core holds the VM's pidfile, or its QEMU runs on (a crashed core's: the next core adopts it)."""
    from core_daemon.pidlock import is_locked

    if is_locked(run_dir.pidfile):
        return True
    state = read_state(run_dir.state_file) or {}
    qemu = state.get("qemu_pid")
    return isinstance(qemu, int) and state.get("state") not in NOT_SERVED and pid_alive(qemu)


class FleetClient:
    """``await FleetClient(config).run()`` serves until SIGTERM/SIGINT; returns the exit status."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.served: dict[str, _Served] = {}
        self._stop = asyncio.Event()
        self._failed: dict[str, float] = {}  # VM name -> when to try again (loop time)
        self._pool: EncoderPool | None = None
        self.router: WebSocketRouter | None = None
        self.web: WebServer | None = None
        self.tls: TlsCredentials | None = None
        #: VMs served before and let go (their core stopped): the web overview still shows them, as stopped.
        self._gone: dict[str, RunDir] = {}
        book_dir = config.socket_dir or config.run_root
        self._ports = PortBook(book_dir / PORTS_FILE)

    # --- the process ------------------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        _tag_log_lines()
        identity: Identity | None = None
        if self.config.user is not None:
            identity = resolve_user(self.config.user, self.config.group)
        if self.config.vnc_tls is not None and self.config.vnc_tls.enabled:
            from .vnc.tls import TlsCredentials, TlsError

            try:
                self.tls = TlsCredentials(self.config.vnc_tls)
                self.tls.load()  # before privileges are dropped: the key may be root's alone
            except TlsError as exc:
                raise FleetError(str(exc)) from exc
        if self.config.websocket is not None:
            from .vnc.service import VncError, parse_listen
            from .vnc.websocket_router import RouterError, WebSocketRouter

            try:
                self.router = WebSocketRouter(parse_listen(self.config.websocket), self.vnc_service,
                                              self.config.tokens, self.tls)
                self.router.bind()
            except (RouterError, VncError) as exc:
                raise FleetError(str(exc)) from exc
        if self.config.web is not None:
            from .vnc.service import VncError, parse_listen
            from .web.server import WebError, WebServer

            try:
                self.web = WebServer(parse_listen(self.config.web), self, self.config.tokens,
                                     tls_creds=self.config.web_tls_creds)
                self.web.bind()
            except (WebError, VncError) as exc:
                raise FleetError(str(exc)) from exc
        if self.config.socket_dir is not None:
            self._make_socket_dir(identity)
        if identity is not None:
            drop_privileges(identity)
        from .vnc.encoder_pool import EncoderPool

        self._pool = EncoderPool(self.config.encoder_workers, lazy=True)
        try:
            if self.router is not None:
                await self.router.start()
            if self.web is not None:
                await self.web.start()
            await self._scan()
            for served in list(self.served.values()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(served.ready.wait(), 10)
            self._ready()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.config.scan_interval)
                if not self._stop.is_set():
                    await self._scan()
        finally:
            await self._shutdown()
        return 0

    def _reload(self) -> None:
        """SIGHUP: the VNC and web console TLS certificates are read again (tokens are re-read whenever their
        file changes); viewers stay connected."""
        log.info("SIGHUP: reloading")
        if self.tls is not None and self.tls.reload() is None:
            log.info("VNC: TLS credentials reloaded for every VM")
        if self.web is not None:
            self.web.reload()

    def _make_socket_dir(self, identity: Identity | None) -> None:
        root = self.config.socket_dir
        assert root is not None
        try:
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
            if identity is not None and os.geteuid() == 0:
                os.chown(root, identity.uid, identity.gid)
        except OSError as exc:
            raise FleetError(f"cannot make the socket directory {root}: {exc}") from exc

    def _ready(self) -> None:
        sd_notify(f"READY=1\nSTATUS=serving {len(self.served)} VMs")
        if self.config.ready_fd is not None:
            endpoints = {"websocket": self.router.where} if self.router is not None else {}
            if self.web is not None:
                endpoints["web"] = self.web.url()
            write_ready_fd(self.config.ready_fd, f"READY {json.dumps(endpoints)}")

    async def _shutdown(self) -> None:
        log.info("fleet client stopping (%d VMs)", len(self.served))
        await asyncio.gather(*(self._let_go(name, "client stopping") for name in list(self.served)),
                             return_exceptions=True)
        if self.router is not None:
            await self.router.close()
        if self.web is not None:
            await self.web.close()
        if self._pool is not None:
            await self._pool.close()

    def vms(self) -> list[VmView]:
        """For the web console: the VMs served now, and those let go while this client ran (as stopped)."""
        from .web.server import VmView

        for name in [n for n, d in self._gone.items() if not d.root.exists()]:
            del self._gone[name]
        views = [VmView(s.name, s.run_dir, s.client.ctx) for s in self.served.values()]
        views += [VmView(name, run_dir, None) for name, run_dir in self._gone.items() if name not in self.served]
        return sorted(views, key=lambda view: view.name)

    def vnc_service(self, name: str) -> VncService | None:
        served = self.served.get(name)
        return served.vnc if served is not None else None

    # --- finding cores ------------------------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        if self.config.names is not None:
            return list(self.config.names)
        try:
            entries = [entry.name for entry in os.scandir(self.config.run_root) if entry.is_dir()]
        except OSError as exc:
            log.debug("cannot list the run root %s: %s", self.config.run_root, exc)
            return []
        found = []
        for name in entries:
            with contextlib.suppress(RunDirError):
                found.append(check_vm_name(name))
        return sorted(found)

    async def _scan(self) -> None:
        """Serve the cores that appeared; let go of VMs whose core and QEMU are gone."""
        for name, served in list(self.served.items()):
            if served.client.ctx.channel is not None and served.client.ctx.channel.attached:
                continue  # attached: the core is there (the cheap, common case)
            where = RunDir(Path(served.client.channel_endpoint.removeprefix("ipc://")).parent)
            if served.task is not None and served.task.done():
                self._failed[name] = asyncio.get_running_loop().time() + RETRY_S
                await self._let_go(name, "it could not be served")
            elif not vm_alive(where):
                await self._let_go(name, "its core stopped")
        followed = {s.client.channel_endpoint for s in self.served.values()}
        now = asyncio.get_running_loop().time()
        for name in self._candidates():
            if name in self.served or self._failed.get(name, 0.0) > now:
                continue
            run_dir = RunDir(self.config.run_root / name)
            if ipc_endpoint(run_dir.control_socket) in followed:
                continue  # a served VM migrated there: its client follows it
            state = read_state(run_dir.state_file)
            if state is None or state.get("state") in NOT_SERVED or not vm_alive(run_dir):
                continue
            self._serve(name, run_dir)
        self._ports.save()

    def _serve(self, name: str, run_dir: RunDir) -> None:
        sockets = run_dir.root if self.config.socket_dir is None else self.config.socket_dir / name
        services: list[Service] = []
        vnc, port = self._vnc_for(name)
        if vnc is not None:
            services.append(vnc)
        if self.web is not None:
            services.append(Endpoints({"web": self.web.url(f"/vm/{name}/console")}))
        if self.config.monitor:
            from .monitor.service import MonitorAddress, MonitorService

            services.append(MonitorService(MonitorAddress(path=sockets / "monitor.sock")))
        if self.config.console:
            from .console.service import ConsoleService

            services.append(ConsoleService(sockets / "console.sock"))
        if self.config.agent:
            from .agent.service import AgentService

            services.append(AgentService(sockets / "agent.sock"))
        config = ClientConfig(name=name, run_dir=run_dir, services=services, client_name=FLEET_CLIENT_NAME,
                              make_run_dir=False)
        served = _Served(name, run_dir, Client(config), vnc, port)
        self.served[name] = served
        self._gone.pop(name, None)
        context = contextvars.copy_context()
        context.run(current_vm.set, name)
        served.task = asyncio.get_running_loop().create_task(self._run_vm(served, sockets), name=f"vm-{name}",
                                                             context=context)
        log.info("serving VM %r (run dir %s%s)", name, run_dir.root, f", VNC port {port}" if port else "")

    def _vnc_for(self, name: str) -> tuple[VncService | None, int | None]:
        """The VM's VNC service: its own port from the range (the one it had before, if free), and the
        shared WebSocket router."""
        if self.config.vnc_ports is None and self.router is None and self.web is None:
            return None, None
        from .vnc.service import VncError, VncService, bind_socket, parse_listen

        sock: socket.socket | None = None
        port: int | None = None
        if self.config.vnc_ports is not None:
            taken = {s.port for s in self.served.values()}
            preferred = self._ports.ports.get(name)
            others = {p for vm, p in self._ports.ports.items() if vm != name}
            free = [p for p in self.config.vnc_ports if p not in taken and p != preferred]
            # Its own port first, then ports no other VM had (that one may be back in a moment), then the rest.
            order = [preferred] if preferred is not None and preferred in self.config.vnc_ports else []
            order += [p for p in free if p not in others] + [p for p in free if p in others]
            for candidate in order:
                try:
                    sock = bind_socket(parse_listen(f"{self.config.vnc_host}:{candidate}"))
                except VncError:
                    continue
                port = candidate
                self._ports.remember(name, candidate)
                break
            else:
                log.warning("VM %r: every port of %d-%d is taken; no VNC port of its own", name,
                            self.config.vnc_ports.start, self.config.vnc_ports.stop - 1)
        config = self.config
        service = VncService(None, pool=self._pool, listen_socket=sock, share=config.vnc_share,
                             connections=config.vnc_connections, handshake_timeout=config.vnc_handshake_timeout,
                             keymap=config.keymap,
                             websocket_url=self.router.url(name) if self.router is not None else None,
                             credentials=self.tls)
        for entry in (self.router, self.web):
            if entry is not None and entry.listener is not None:
                service.add_entry(entry.listener)
        return service, port

    async def _run_vm(self, served: _Served, sockets: Path) -> None:
        client = served.client
        try:
            if self.config.socket_dir is not None:
                sockets.mkdir(mode=0o755, exist_ok=True)
            await client.open()
            await client.start()
            served.ready.set()
            await client.serve()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one VM's failure (a socket that cannot be made) is that VM's alone
            log.error("VM %r not served: %s", served.name, exc, exc_info=not isinstance(exc, OSError | ValueError))
        finally:
            served.ready.set()
            with contextlib.suppress(Exception):
                await client.close()

    async def _let_go(self, name: str, why: str) -> None:
        served = self.served.pop(name, None)
        if served is None:
            return
        self._gone[name] = served.run_dir
        log.info("letting go of VM %r (%s)", name, why)
        served.client.stop()
        if served.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(served.task), 10)
            except TimeoutError:
                served.task.cancel()
            except Exception:  # its own errors were logged by _run_vm
                pass
        if self.config.socket_dir is not None:
            with contextlib.suppress(OSError):
                (self.config.socket_dir / name).rmdir()

    def describe(self) -> dict[str, Any]:
        return {name: {"run_dir": str(s.run_dir.root), "vnc_port": s.port, "attached": bool(
            s.client.ctx.channel is not None and s.client.ctx.channel.attached)} for name, s in self.served.items()}


class Endpoints(QuietService):
    """A service that serves nothing itself and tells the core where this VM is also reached (the web console's
    page for it), so state.json lists it with the VM's other endpoints."""

    name = "endpoints"

    def __init__(self, where: dict[str, str]) -> None:
        self.where = where

    def endpoints(self) -> dict[str, str]:
        return dict(self.where)


def _tag_log_lines() -> None:
    """Every handler of the root logger says which VM a line is about."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, VmLogFilter) for f in handler.filters):
            handler.addFilter(VmLogFilter())


__all__ = ["FleetClient", "FleetConfig", "FleetError", "VmLogFilter", "parse_port_range", "vm_alive"]
