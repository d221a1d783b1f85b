"""The client process: one asyncio loop for the control channel, the display and every service's sockets.

The client is unprivileged and disposable: it may be killed at any moment, and a new one attaches and serves
within a second. It keeps its own listeners and peers when the core goes away (restart, crash), re-attaches by
itself when a core for the VM is back, and then re-reads the display (new segment, full repaint).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core_daemon.readiness import sd_notify, write_ready_fd
from ipc.channel import ChannelError, ClientChannel, ipc_endpoint
from ipc.messages import ALL_CAPABILITIES, Capability, DisplayChanged, EventBody, Migrated, Shutdown, Welcome
from ipc.rundir import RunDir, follow_migrations, socket_access_problem
from shm import DamageRecord, LayoutError, Overrun, Record
from shm.notify import DisplayClosed, DisplaySubscription, HelloError

from .privileges import Identity, drop_privileges, resolve_user
from .service import Service

log = logging.getLogger(__name__)

CLIENT_NAME = "vmfront-client"
#: Backoff between attach attempts while no core answers.
RETRY_MIN, RETRY_MAX = 0.1, 2.0
#: How long one attach attempt waits for the welcome (ZeroMQ connects as soon as the core's socket is there; a
#: fleet client attaching to tens of cores at once may take a while to read every welcome).
ATTACH_TIMEOUT_S = 5.0
#: The VM a log line is about, in a process that fronts many (clients/fleet.py sets it in each VM's tasks).
current_vm: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_vm", default=None)
CLIENT_GROUP_HINT = ("start the core with --client-group set to a group of this client's user (vmfront run does; "
                     "the systemd units use the group vmfront)")


class ClientError(Exception):
    """The client cannot start; the message is for the operator."""


@dataclass
class ClientConfig:
    name: str
    run_dir: RunDir
    core_endpoint: str | None = None
    user: str | None = None
    group: str | None = None
    services: list[Service] = field(default_factory=list)
    #: Write one line here once every listener is bound (and privileges are dropped), then close it.
    ready_fd: int | None = None
    #: How this client introduces itself to the core (``state.json``'s ``clients[].name``).
    client_name: str = CLIENT_NAME
    #: Make the run directory if it is missing (a client started before its core); a fleet client never does.
    make_run_dir: bool = True

    @property
    def endpoint(self) -> str:
        return self.core_endpoint or ipc_endpoint(self.run_dir.control_socket)


#: How long past the pacing interval a reader turning live waits for the core's whole frame (QEMU answers within
#: its refresh interval; a host busy with many guests booting took over a second).
FRESH_WAIT_S = 5.0


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fresh_overdue(future: asyncio.Future[None]) -> None:
    if not future.done():
        log.warning("display: the core's whole frame did not come within %.0f s of a reader turning live; "
                    "serving the segment as it is", FRESH_WAIT_S)
        future.set_result(None)


class DisplayDemand:
    """How many consumers (VNC viewers, a screendump in progress) need live pixels. While none do, the client
    tells the core, which then stops refreshing the segment (docs/display.md, pacing): an idle VM whose screen
    never rests costs next to nothing in either process. One-off readers (a screendump, a thumbnail) make it
    current first: :meth:`ClientContext.fresh_display`."""

    def __init__(self) -> None:
        self.count = 0
        self.on_change: Callable[[bool], None] | None = None

    @property
    def live(self) -> bool:
        return self.count > 0

    def acquire(self) -> None:
        self.count += 1
        if self.count == 1 and self.on_change is not None:
            self.on_change(True)

    def release(self) -> None:
        self.count = max(0, self.count - 1)
        if self.count == 0 and self.on_change is not None:
            self.on_change(False)


@dataclass
class ClientContext:
    """What services get from the client: the channel for requests and the display for pixels."""

    config: ClientConfig
    channel: ClientChannel | None = None
    display: DisplaySubscription | None = None
    #: Every service of this client, so one can find another (the web console finds the VNC service).
    services: list[Service] = field(default_factory=list)
    demand: DisplayDemand = field(default_factory=DisplayDemand)
    _fresh_waiters: list[asyncio.Future[None]] = field(default_factory=list, init=False, repr=False)

    def acquire_live(self) -> asyncio.Future[None] | None:
        """Count a reader that needs live pixels (a viewer: release with ``demand.release()``). If the core was
        pacing the display, returns a future done once the core has written the whole current frame (it answers
        a reader turning live with one, ending in a damage record), or after the pacing interval and
        ``FRESH_WAIT_S``: a reader's first picture waits for it, so it is not an old or half-written one."""
        display = self.display
        fresh: asyncio.Future[None] | None = None
        if display is not None and display.paced and display.hello.pacing is not None:
            loop = asyncio.get_running_loop()
            fresh = loop.create_future()
            self._fresh_waiters.append(fresh)
            timer = loop.call_later(display.hello.pacing + FRESH_WAIT_S, _fresh_overdue, fresh)
            fresh.add_done_callback(lambda _: timer.cancel())
        self.demand.acquire()
        return fresh

    def display_records(self, records: list[Record] | Overrun) -> None:
        """Records the display loop read: a damage record (or an overrun) means a frame was written whole."""
        if self._fresh_waiters and (isinstance(records, Overrun)
                                    or any(isinstance(record, DamageRecord) for record in records)):
            waiters, self._fresh_waiters = self._fresh_waiters, []
            for waiter in waiters:
                _resolve(waiter)

    async def fresh_display(self) -> DisplaySubscription | None:
        """The display, made current first if the core was pacing it (for a one-off read: a screendump, a web
        thumbnail)."""
        fresh = self.acquire_live()
        try:
            if fresh is not None:
                await fresh
        finally:
            self.demand.release()
        return self.display


class Client:
    """One VM's client. ``await Client(config).run()`` is the whole process (``vmfront client --name``): it
    serves until SIGTERM/SIGINT and returns the exit status. A fleet client (clients/fleet.py) runs many in one
    process with ``open``, ``start``, ``serve``, ``stop`` and ``close``."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.ctx = ClientContext(config)
        self.services = list(config.services)
        self.ctx.services = self.services
        self.ctx.demand.on_change = self._demand_changed
        self._stop = asyncio.Event()
        self._display_task: asyncio.Task[None] | None = None
        self._display_socket: str | None = None
        self.attach_count = 0
        self._core_ending = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        identity: Identity | None = None
        if self.config.user is not None:
            identity = resolve_user(self.config.user, self.config.group)
        await self.open()
        if identity is not None:
            drop_privileges(identity)
        await self.start()
        self._ready()
        try:
            await self.serve()
        finally:
            await self.close()
        return 0

    async def open(self) -> None:
        """Bind every service's listeners (while the process may still be root)."""
        if self.config.make_run_dir:
            self._make_run_dir()
        for service in self.services:
            await service.bind(self.ctx)

    async def start(self) -> None:
        for service in self.services:
            await service.start()

    async def serve(self) -> None:
        """Attach (waiting for the core if need be), then serve until :meth:`stop`."""
        await self._attach_first()
        if not self._stop.is_set():
            await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    @property
    def channel_endpoint(self) -> str:
        """The core this client is attached to or waits for (where a migration took the guest, once followed)."""
        return self.ctx.channel.endpoint if self.ctx.channel is not None else self.config.endpoint

    def _demand_changed(self, live: bool) -> None:
        if self.ctx.display is not None:
            self.ctx.display.set_live(live)

    def _make_run_dir(self) -> None:
        """A client may start before its core: its sockets in the run directory need the directory (made as the
        core would: 0755; the core accepts it if it belongs to the core's user)."""
        root = self.config.run_dir.root
        if not root.exists():
            try:
                root.mkdir(mode=0o755, parents=True)
            except OSError as exc:
                log.debug("cannot make the run directory %s: %s", root, exc)

    def _ready(self) -> None:
        """Every listener is bound: tell whoever started us (``vmfront run``, systemd)."""
        sd_notify(f"READY=1\nSTATUS=serving VM {self.config.name}")
        if self.config.ready_fd is not None:
            write_ready_fd(self.config.ready_fd, f"READY {json.dumps(self.endpoints())}")

    def _reload(self) -> None:
        """SIGHUP: every service that can re-reads its credentials (the VNC TLS certificates), keeping its peers."""
        log.info("SIGHUP: reloading")
        for service in self.services:
            reload = getattr(service, "reload", None)
            if reload is not None:
                reload()

    def warnings(self) -> list[str]:
        """What the services say is unsafe about how they are exposed (``vmfront status`` shows it)."""
        found: list[str] = []
        for service in self.services:
            warnings = getattr(service, "warnings", None)
            if warnings is not None:
                found += warnings()
        return found

    def endpoints(self) -> dict[str, str]:
        """Where this client's services listen, as they describe themselves."""
        found: dict[str, str] = {}
        for service in self.services:
            describe = getattr(service, "endpoints", None)
            if describe is not None:
                found.update(describe())
        return found

    def _capabilities(self) -> list[str]:
        """Everything but the serial console, which only a console service asks for (so no other client takes
        the boot log the core kept for it), and VNC and the clipboard, which only the VNC service asks for (so
        the core knows who serves VNC; clipboard broadcasts carry up to 1 MiB)."""
        wanted = set(ALL_CAPABILITIES) - {Capability.CONSOLE, Capability.VNC, Capability.CLIPBOARD}
        for service in self.services:
            wanted.update(getattr(service, "capabilities", ()))
        return sorted(wanted)

    async def _attach_first(self) -> None:
        """Attach, retrying with backoff while there is no core yet; later re-attaches are the channel's job.

        Waiting is quiet (one line), unless the core is there but its socket is closed to this client: that is
        said, with what to change."""
        delay = RETRY_MIN
        said = ""
        control = self.config.run_dir.control_socket if self.config.core_endpoint is None else None
        while not self._stop.is_set():
            problem = socket_access_problem(control) if control is not None else None
            if problem is not None:
                message = f"{problem}: {CLIENT_GROUP_HINT}"
                if message != said:
                    log.warning("%s", message)
                    said = message
            elif not said:
                log.info("waiting for the core of VM %r at %s", self.config.name, self.config.endpoint)
                said = "waiting"
            # A guest that migrated before this client started is found where state.json says it went.
            endpoint = (follow_migrations(self.config.endpoint, self.config.run_dir.state_file)
                        if self.config.core_endpoint is None else self.config.endpoint)
            if endpoint != self.config.endpoint and said != endpoint:
                log.info("VM %r migrated to the core at %s: attaching there", self.config.name, endpoint)
                said = endpoint
            channel = ClientChannel(endpoint, name=f"{self.config.client_name}:{self.config.name}",
                                    on_reattached=self._attached, on_detached=self._detached,
                                    on_event=self._event, endpoints=self.endpoints(), warnings=self.warnings(),
                                    capabilities=self._capabilities())
            try:
                welcome = await channel.connect(timeout_s=max(delay, ATTACH_TIMEOUT_S))
            except ChannelError as exc:
                log.debug("no core for VM %r at %s yet (%s); retrying in %.1f s", self.config.name,
                          self.config.endpoint, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self.ctx.channel = channel
            await self._attached(welcome)
            return

    async def _attached(self, welcome: Welcome) -> None:
        self.attach_count += 1
        log.info("attached to the core of VM %r (core pid %d, instance %s, %s)%s", welcome.vm, welcome.core_pid,
                 welcome.instance, welcome.run_state, " again" if self.attach_count > 1 else "")
        self._follow_display(welcome.display_socket)
        for service in self.services:
            service.attached(welcome)

    def _detached(self, reason: str) -> None:
        # A core that announced its end (QEMU exited, a stop) is no surprise; one that vanished is.
        level = logging.INFO if self._core_ending else logging.WARNING
        self._core_ending = False
        log.log(level, "core gone (%s); keeping peers, re-attaching when it is back", reason)
        for service in self.services:
            service.detached(reason)

    def _event(self, body: EventBody) -> None:
        if isinstance(body, Shutdown):
            self._core_ending = True
        if isinstance(body, DisplayChanged):
            self._follow_display(body.display_socket)
        elif isinstance(body, Migrated) and self.ctx.channel is not None:
            # The guest now lives under another core: follow it; re-attaching re-maps its display.
            log.info("guest migrated; following it to %s", body.endpoint)
            self.ctx.channel.move_to(body.endpoint)
        for service in self.services:
            service.event(body)

    def _follow_display(self, display_socket: str | None) -> None:
        """(Re)subscribe to the display a welcome names: a new core means a new segment."""
        if self._display_task is not None:
            self._display_task.cancel()
            self._display_task = None
        if self.ctx.display is not None:
            self.ctx.display.close()
            self.ctx.display = None
        self._display_socket = display_socket
        if display_socket is not None:
            self._display_task = asyncio.get_running_loop().create_task(self._display_loop(Path(display_socket)))

    async def _display_loop(self, path: Path) -> None:
        try:
            sub = await DisplaySubscription.connect(path)
        except (OSError, DisplayClosed, ValueError, HelloError, LayoutError) as exc:
            problem = socket_access_problem(path) if isinstance(exc, PermissionError) else None
            if problem is not None:
                log.warning("no display: %s: %s", problem, CLIENT_GROUP_HINT)
            else:
                log.warning("cannot subscribe to the display at %s: %s", path, exc)
            return
        self.ctx.display = sub
        sub.set_live(self.ctx.demand.live)
        log.info("display: mapped %s read-only", sub.hello.shm)
        # A fresh subscription starts with a full repaint for every service.
        self._dispatch(Overrun(0))
        try:
            while True:
                self._dispatch(await sub.read())
        except DisplayClosed:
            log.info("display closed by the core")
        except (LayoutError, TimeoutError) as exc:  # a segment that is not what a core writes: this VM's alone
            log.warning("display of VM %r unusable: %s", self.config.name, exc)

    def _dispatch(self, records: list[Record] | Overrun) -> None:
        for service in self.services:
            service.display_records(records)
        self.ctx.display_records(records)

    async def close(self) -> None:
        log.info("client of VM %r stopping", self.config.name)
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        if self._display_task is not None:
            self._display_task.cancel()
        if self.ctx.display is not None:
            self.ctx.display.close()
        if self.ctx.channel is not None:
            await self.ctx.channel.close()
