"""The core daemon's main sequence: lock, start (or attach to) QEMU, serve QMP, follow the guest, tear down.

The core is the only process that talks to QEMU. It is ready only once QEMU has answered QMP and the core's
own sockets listen; if QEMU dies first, the core fails with QEMU's own words. While running it mirrors the
guest's state into ``state.json``. On SIGTERM/SIGINT it stops QEMU (politely first), removes what it made, and
exits; if QEMU dies on its own, the core records why and exits with a status that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError, Runstate

from ipc.messages import Migrated, Migrating
from ipc.rundir import RunDir, RunDirError, check_socket_path, remove_stale_socket

from .activation import inherited_sockets
from .agent_relay import AgentRelay, SerialRelay
from .control import ControlService
from .display import DEFAULT_MAX_HEIGHT, DEFAULT_MAX_WIDTH, DisplayError
from .guest_display import GuestDisplay
from .guest_reads import COMMANDS as GUEST_READ_COMMANDS
from .guest_reads import GuestReads
from .input import KEY_DELAY_S
from .migration import (
    GUEST_IS_HERE_COMMAND,
    TARGET_COMMAND,
    Effects,
    Migration,
    destination_failure,
    unix_socket_listening,
)
from .migration import IN_PROGRESS as MIGRATION_IN_PROGRESS
from .pidlock import AlreadyRunning, PidLock
from .policy import DEFAULT_POLICY, Policy
from .qemu_process import (
    ProcessWatch,
    QemuIdentity,
    QemuStartError,
    build_qemu_command,
    describe_exit,
    find_vm_qemu,
    log_tail,
    process_argv,
    process_start_ticks,
    spawn_qemu,
)
from .qmp_server import QmpReexport
from .qmp_values import COMMAND_NAME, arguments_problem, reserved_problem
from .readiness import sd_notify, write_ready_fd
from .state import RunState, StateFile, read_state, run_state_from_qemu_status
from .vnc_reload import display_reload
from .vnc_state import Credentials, VncState

log = logging.getLogger(__name__)

#: Exit statuses of ``vmfront core`` (documented in docs/operator.md).
EXIT_OK = 0  # stopped on request, or the guest shut down and QEMU exited 0
EXIT_START_FAILED = 1  # could not start: bad option values, lock held, QEMU died before answering QMP
# (argparse's own usage errors exit with 2.)
EXIT_QEMU_FAILED = 3  # QEMU exited on its own with a non-zero status
EXIT_QEMU_KILLED = 4  # QEMU was killed by a signal, or vanished without a shutdown

#: vmfront's own QMP command (QMP's downstream-extension naming) naming the destination core's control endpoint.
MIGRATE_TARGET_COMMAND = TARGET_COMMAND
#: The VM's QEMU runs but could not be adopted (it did not answer QMP): not a configuration error, so a service
#: manager should start the core again (the next one adopts it); see docs/operator.md.
EXIT_QEMU_UNSUPERVISED = 5

#: Events after which the core asks QEMU for its status again.
_STATUS_EVENTS = frozenset({
    "STOP", "RESUME", "SHUTDOWN", "RESET", "SUSPEND", "WAKEUP", "GUEST_PANICKED", "MIGRATION", "POWERDOWN",
})


class QemuMonitor(QMPClient):
    """The core's QMP client for QEMU: qemu.qmp's, minus the per-message ``str()`` its logging hooks pay for
    even when debug logging is off (the hooks are meant to be overridden; this halves the proxy's overhead)."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg

    async def _on_message(self, msg: Message) -> None:
        """An error without an id is QEMU refusing input it could not parse. qemu.qmp would drop the connection
        (and the core would lose QEMU); but QEMU answers in-band commands strictly in order, parse errors
        included, so it is the answer to the oldest command still waiting: give it to that one."""
        if "error" in msg and "id" not in msg and "event" not in msg:
            waiting = [key for key in self._pending if key is not None]
            if waiting:
                self.logger.warning("QEMU answered without an id (%s); taking it as the reply to %s",
                                    msg["error"], waiting[0])
                await self._pending[waiting[0]].put(Message({**msg, "id": waiting[0]}))
            else:
                self.logger.error("QEMU sent an error without an id and nothing was waiting: %s", msg["error"])
            return
        await super()._on_message(msg)


class CoreError(Exception):
    """The core cannot start; the message is for the operator. ``exit_status`` is what the core exits with."""

    exit_status = EXIT_START_FAILED


@dataclass
class CoreConfig:
    name: str
    run_dir: RunDir
    qemu_args: list[str] = field(default_factory=list)
    qemu_binary: str = "qemu-system-x86_64"
    accel: str | None = None
    attach: Path | None = None
    qmp_socket: Path | None = None
    qmp_tcp: tuple[str, int] | None = None
    policy: Policy = DEFAULT_POLICY
    ready_fd: int | None = None
    graceful_timeout: float | None = None
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    max_message: int = 1 << 20
    max_backlog: int = 8 << 20
    #: Capture the guest display into shared memory (not for --attach: a foreign QEMU has no private VNC).
    display: bool = True
    display_max: tuple[int, int] = (DEFAULT_MAX_WIDTH, DEFAULT_MAX_HEIGHT)
    #: Pause after each key event sent to the guest (QEMU's VNC key-delay-ms): 0 sends a batch at once.
    key_delay: float = KEY_DELAY_S
    #: Start QEMU waiting for an incoming migration on this URI ("auto": a unix socket in the run dir).
    incoming: str | None = None
    #: Give the guest a qemu-ga channel (virtio-serial) relayed to clients; or relay an existing agent socket.
    agent: bool = False
    agent_socket: Path | None = None
    #: Group that may open the shm segment and the client sockets (the clients' group), if not ours.
    client_group: int | None = None
    #: After the guest migrated away, keep QEMU (postmigrate) and QMP this long after the last QMP peer left.
    migrated_linger: float = 60.0
    #: Give the guest a serial port whose bytes are relayed to clients (not for --attach).
    serial: bool = False
    #: Give the guest QEMU's spice-vdagent peer (qemu-vdagent chardev): clipboard sharing with its spice-vdagent.
    clipboard: bool = False
    #: How viewers of the clients' VNC authenticate (the core holds the credentials, see vnc_state.py).
    vnc_credentials: Credentials = field(default_factory=Credentials)

    @property
    def qmp_socket_path(self) -> Path:
        return self.qmp_socket or self.run_dir.qmp_socket


def _socket_peer_pid(path: Path) -> int | None:
    """The pid of the process that listens on a unix socket (the QEMU we attach to)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid


class Core:
    """One VM's core daemon. ``await Core(config).run()`` returns the process exit status."""

    def __init__(self, config: CoreConfig) -> None:
        # Argument rules may name other VMs' run directories ("{run_root}"): the parent of this one.
        config.policy = dataclasses.replace(config.policy, run_root=str(config.run_dir.root.parent))
        self.config = config
        self.run_dir = config.run_dir
        self.lock = PidLock(self.run_dir.pidfile)
        self.state = StateFile(self.run_dir.state_file)
        self.qmp = QemuMonitor(f"qemu-{config.name}")
        self.qemu: ProcessWatch | None = None
        self.server: QmpReexport | None = None
        self.display: GuestDisplay | None = None
        self.control: ControlService | None = None
        self.agent: AgentRelay | None = None
        self.serial: SerialRelay | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stop_reason = ""
        self._shutdown_reason: str | None = None
        self._status_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.migration = Migration(run_root=config.run_dir.root.parent)
        #: Ends the core some time after the guest left, once no QMP peer is connected (the source lingers).
        self._linger: asyncio.TimerHandle | None = None
        #: What state.json said when this core started (an adopted QEMU's migration or incoming migration).
        self._previous: dict[str, Any] = {}
        self._left_unsupervised = False
        self._hangup_filter = _ExpectedHangup()
        self.qmp.logger.addFilter(self._hangup_filter)  # the logger qemu.qmp's connection tasks log to
        #: QEMU's private QMP socket, and which process answers there, when adopting the QEMU of a core that died.
        self._adopt: Path | None = None
        self._adopt_identity: QemuIdentity | None = None
        #: Where the core's QMP connection goes, for reconnecting when it is lost while QEMU lives.
        self._qmp_path: Path | None = None
        self.incoming_uri = (f"unix:{self.run_dir.migration_socket}" if config.incoming == "auto"
                             else config.incoming)
        #: Listening sockets handed in by a service manager, by name.
        self._inherited = inherited_sockets()
        self._refreshes: set[asyncio.Task[None]] = set()
        #: vmfront's own QMP commands that read the guest through files only the core sees (core_daemon/guest_reads.py).
        self._guest_reads = GuestReads(self._execute, self.run_dir.private)
        #: The VNC viewers use is the clients'; its QMP commands, credentials and events are kept here.
        self.vnc = VncState(config.vnc_credentials, emit=self._emit_event, settings_changed=self._vnc_settings_changed)

    # -- start-up -------------------------------------------------------------------------------------------

    async def run(self) -> int:
        self._stop_requested = asyncio.Event()
        raise_fd_limit()
        try:
            for path in (self.config.qmp_socket_path, *self.run_dir.socket_paths()):
                check_socket_path(path)
            self.run_dir.create()
            self.lock.acquire()
        except AlreadyRunning as exc:
            raise CoreError(f"VM {self.config.name!r}: {exc}") from None
        except RunDirError as exc:
            raise CoreError(str(exc)) from None
        except OSError as exc:
            raise CoreError(f"cannot use run directory {self.run_dir.root}: {exc}") from exc
        try:
            return await self._run_locked()
        finally:
            self.lock.release()

    async def _run_locked(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        try:
            self._reclaim()
            try:
                await self._start()
            except BaseException as exc:
                await self._teardown_failed_start()
                if isinstance(exc, CoreError) and self._left_unsupervised:
                    exc.exit_status = EXIT_QEMU_UNSUPERVISED
                raise
            return await self._supervise()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def request_stop(self, reason: str = "requested") -> None:
        log.info("stop requested (%s)", reason)
        self._stop_reason = reason
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _reclaim(self) -> None:
        """Take over a run dir a crashed core left behind.

        If this VM's QEMU still runs (a core crash must not take the guest down), adopt it: supervise it as if we
        had started it, so a supervisor that restarts a crashed core gets the same guest back. The QEMU is found
        by what it is, not by what state.json says (which may be stale, wrong or gone): a live process whose
        arguments name this run directory's private monitor socket. Never start a second QEMU beside it.
        """
        previous = self._previous = read_state(self.run_dir.state_file) or {}
        if self.lock.stale_pid is not None:
            log.info("reclaiming run directory of a core that died (pid %d)", self.lock.stale_pid)
        private_qmp = self.run_dir.qemu_qmp_socket
        attach = self.config.attach.resolve() if self.config.attach is not None else None
        hint = previous.get("qemu_pid")
        live = find_vm_qemu(private_qmp, hint if isinstance(hint, int) else None)
        if live is not None and attach != private_qmp.resolve():
            if attach is not None:
                raise CoreError(
                    f"VM {self.config.name!r}: its QEMU (pid {live.pid}) still runs; stop it, or supervise it "
                    f"with --attach {private_qmp}")
            log.warning("QEMU pid %d of VM %r still runs without a core (last recorded state: %s): adopting it%s",
                        live.pid, self.config.name, previous.get("state", "none"),
                        " (the QEMU arguments given are ignored)" if self.config.qemu_args else "")
            self._adopt = private_qmp
            self._adopt_identity = live
            self.state.data.update(accel=previous.get("accel"),
                                   qemu_argv=previous.get("qemu_argv") or process_argv(live.pid))
        elif attach is not None and self.config.qemu_args:
            log.warning("attaching to a running QEMU: the QEMU arguments given are ignored")
        if "qmp" not in self._inherited:
            remove_stale_socket(self.config.qmp_socket_path)
        if self._adopt is None and attach != private_qmp.resolve():
            remove_stale_socket(private_qmp)
            remove_stale_socket(self.run_dir.vnc_socket)
            remove_stale_socket(self.run_dir.agent_socket)
            remove_stale_socket(self.run_dir.serial_socket)
            remove_stale_socket(self.run_dir.migration_socket)
        remove_stale_socket(self.run_dir.display_socket)
        remove_stale_socket(self.run_dir.control_socket)

    async def _start(self) -> None:
        cfg = self.config
        risky = cfg.policy.host_access_allowed("client")
        if risky:
            log.warning("the policy lets clients run host-access commands: %s", ", ".join(risky))
        self.state.data.update(
            name=cfg.name, state=RunState.STARTING, core_pid=os.getpid(), qemu_pid=None, qemu_version=None,
            qemu_status=None, attached=cfg.attach is not None, adopted=self._adopt is not None, accel=None,
            started_at=time.time(),
            endpoints={}, peers=[], clients=[], last_exit=None, run_dir=str(self.run_dir.root),
        )
        self.state.write()
        attach_to = cfg.attach or self._adopt
        if cfg.serial and cfg.attach is None:
            # Connected as soon as QEMU makes the socket: the guest's first lines (the boot log) come early.
            self.serial = SerialRelay(self.run_dir.serial_socket, self._deliver_console)
            self.serial.start()
        if attach_to is not None:
            await self._attach(attach_to)
        else:
            await self._launch()
        assert self.qemu is not None
        await self._refresh_status()
        # QEMU emits MIGRATION events only with this capability: the core follows migrations by them.
        reply = await self._execute("migrate-set-capabilities",
                                    {"capabilities": [{"capability": "events", "state": True}]})
        if "error" in reply:
            log.warning("cannot enable migration events: %s", reply["error"].get("desc"))
        version = await self.qmp.execute("query-version")
        self.state.update(qemu_version=_version_string(version))
        if self._adopt is not None:
            await self._resume_adopted_migration()

        greeting = _reexported_greeting(self.qmp.greeting._asdict() if self.qmp.greeting else {})
        self.server = QmpReexport(
            self._execute, greeting, cfg.policy, max_message=cfg.max_message, max_backlog=cfg.max_backlog,
            on_peers_changed=self._peers_changed,
        )
        endpoints: dict[str, Any] = {}
        for name, sock in self._inherited.items():
            if name not in ("qmp", "qmp-tcp"):
                log.warning("ignoring socket %r from the service manager: expected 'qmp' or 'qmp-tcp'", name)
                sock.close()
                continue
            endpoints[name.replace("-", "_")] = await self.server.listen_inherited(sock, name)
        if "qmp" not in endpoints:
            await self.server.listen_unix(cfg.qmp_socket_path, "qmp")
            endpoints["qmp"] = str(cfg.qmp_socket_path)
        if cfg.qmp_tcp is not None and "qmp_tcp" not in endpoints:
            port = await self.server.listen_tcp(cfg.qmp_tcp[0], cfg.qmp_tcp[1], "qmp-tcp")
            endpoints["qmp_tcp"] = f"{cfg.qmp_tcp[0]}:{port}"
        if cfg.display and cfg.attach is None:
            await self._start_display()
            if self.display is not None:
                endpoints["display"] = str(self.run_dir.display_socket)
        self.control = ControlService(
            cfg.name, self.run_dir.control_socket, self._execute, cfg.policy, display=lambda: self.display,
            run_state=lambda: (str(self.state.data.get("state")), self.state.data.get("qemu_status")),
            migrated_to=lambda: self.migration.announced if self.migration.left else None,
            on_clients_changed=lambda clients: self.state.update(clients=clients), vnc=self.vnc,
            group=cfg.client_group)
        await self.control.start()
        endpoints["control"] = str(self.run_dir.control_socket)
        agent_path = cfg.agent_socket or (self.run_dir.agent_socket if cfg.agent and cfg.attach is None else None)
        if agent_path is not None:
            self.agent = AgentRelay(agent_path, self.control.deliver_agent_data, self.control.agent_room)
            self.control.attach_agent(self.agent)
            self.agent.start()
            endpoints["agent"] = str(agent_path)
        if self.serial is not None:
            self.control.attach_console(self.serial)
            endpoints["serial"] = str(self.run_dir.serial_socket)
        self.state.update(endpoints=endpoints, display=self.display.describe() if self.display else None)
        self._tasks.append(asyncio.get_running_loop().create_task(self._pump_events(), name="qmp-events"))

        sd_notify(f"READY=1\nSTATUS=VM {cfg.name} {self.state.data['state']}\nMAINPID={os.getpid()}")
        if cfg.ready_fd is not None:
            write_ready_fd(cfg.ready_fd, f"READY qmp={endpoints['qmp']}")
        log.info("core for VM %r ready: QEMU pid %s (%s), QMP at %s", cfg.name, self.qemu.pid,
                 self.state.data["qemu_version"], endpoints["qmp"])
        if attach_to is None:
            self._relay_qemu_warnings()

    def _relay_qemu_warnings(self) -> None:
        """What QEMU printed while starting (a CPU feature the host lacks, a deprecated option) may be why a guest
        hangs later: say it here, not only in qemu.log."""
        said = log_tail(self.run_dir.qemu_log, 4000).splitlines()
        for line in said[:20]:
            log.warning("QEMU said: %s", line)
        if len(said) > 20:
            log.warning("QEMU said %d more lines: see %s", len(said) - 20, self.run_dir.qemu_log)

    async def _start_display(self) -> None:
        """The display is a service of the core, not its reason to live: if it fails, the guest runs on."""
        display = GuestDisplay(self.config.name, self.run_dir.vnc_socket, self.run_dir.display_socket,
                               self.qmp.execute, max_size=self.config.display_max, group=self.config.client_group,
                               key_delay=self.config.key_delay, on_clipboard=self._guest_clipboard)
        try:
            await display.start(connect_timeout=self.config.start_timeout)
        except (DisplayError, OSError) as exc:
            log.error("no display capture: %s", exc)
            await display.close()
            return
        display.set_run_state(str(self.state.data.get("qemu_status")))
        self.display = display

    def _guest_clipboard(self, text: str) -> None:
        if self.control is not None:
            self.control.guest_clipboard(text)

    async def _launch(self) -> None:
        cfg = self.config
        running = find_vm_qemu(self.run_dir.qemu_qmp_socket)
        if running is not None:  # _reclaim adopts a live QEMU; this is the last line of defence
            raise CoreError(f"VM {cfg.name!r}: its QEMU (pid {running.pid}) already runs; not starting another")
        qemu_args = [*cfg.qemu_args, "-incoming", "defer"] if self.incoming_uri is not None else cfg.qemu_args
        command = build_qemu_command(cfg.qemu_binary, cfg.name, qemu_args, self.run_dir.qemu_qmp_socket,
                                     cfg.accel, self.run_dir.vnc_socket if cfg.display else None,
                                     self.run_dir.agent_socket if cfg.agent and cfg.agent_socket is None else None,
                                     self.run_dir.serial_socket if cfg.serial else None,
                                     clipboard=cfg.clipboard)
        log.info("starting QEMU: %s", " ".join(command.argv))
        try:
            pid = spawn_qemu(command, self.run_dir.qemu_log)
        except QemuStartError as exc:
            raise CoreError(str(exc)) from None
        self.qemu = ProcessWatch(pid, child=True)
        self.state.update(qemu_pid=pid, qemu_start_time=process_start_ticks(pid), accel=command.accel,
                          qemu_argv=command.argv)
        await self._connect_qmp(self.run_dir.qemu_qmp_socket)
        if self.incoming_uri is not None:
            reply = await self._execute("migrate-incoming", {"uri": self.incoming_uri})
            if "error" in reply:
                raise CoreError(f"cannot wait for an incoming migration on {self.incoming_uri}: "
                                f"{reply['error'].get('desc')}")
            log.info("waiting for the guest to arrive on %s", self.incoming_uri)
            self.state.update(incoming=self.incoming_uri)

    async def _attach(self, path: Path) -> None:
        pid = _socket_peer_pid(path)
        adopting = self._adopt_identity
        if adopting is not None and pid != adopting.pid:
            where = "is gone" if pid is None else f"is served by pid {pid}"
            raise CoreError(
                f"VM {self.config.name!r}: its QEMU (pid {adopting.pid}) still runs, but its monitor socket {path} "
                f"{where}, so it cannot be supervised; not starting a second QEMU. Stop it (kill {adopting.pid}) "
                "and start the VM again")
        if pid is None:
            raise CoreError(f"cannot attach: no QEMU QMP socket answers at {path}")
        self.qemu = ProcessWatch(pid, child=False)
        if adopting is not None and not adopting.still_alive():  # the pid was reused before the pidfd was taken
            raise CoreError(f"VM {self.config.name!r}: QEMU pid {pid} exited while being adopted")
        self.state.update(qemu_pid=pid, qemu_start_time=process_start_ticks(pid), attach_socket=str(path))
        await self._connect_qmp(path)

    async def _connect_qmp(self, path: Path) -> None:
        """Connect to QEMU's QMP, racing QEMU's exit and a deadline: failure is an error, never a hang."""
        assert self.qemu is not None
        self._qmp_path = path
        deadline = time.monotonic() + self.config.start_timeout
        delay = 0.005
        while True:
            if self.qemu.exited:
                raise CoreError(self._died_before_ready())
            if time.monotonic() > deadline:
                raise CoreError(f"QEMU did not answer QMP on {path} within {self.config.start_timeout:.0f} s")
            if path.exists():
                connect = asyncio.ensure_future(self.qmp.connect(str(path)))
                exited = asyncio.ensure_future(self.qemu.wait())
                done, _ = await asyncio.wait({connect, exited}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                exited.cancel()
                if connect in done and connect.exception() is None:
                    return
                if connect not in done:
                    connect.cancel()
                    with contextlib.suppress(BaseException):
                        await connect
                    await self._disconnect_qmp()
                    continue
                log.debug("QMP connect attempt failed: %s", connect.exception())
                await self._disconnect_qmp()
            # QEMU creates its socket early in start-up; until it exists, look again shortly.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _disconnect_qmp(self) -> None:
        """Drop the QMP connection; errors from a QEMU that already hung up say nothing new."""
        try:
            await asyncio.wait_for(self.qmp.disconnect(), timeout=5)
        except (QMPError, EOFError, OSError, TimeoutError) as exc:
            log.debug("QMP disconnect: %s", exc)

    def _died_before_ready(self) -> str:
        assert self.qemu is not None
        stderr = log_tail(self.run_dir.qemu_log)
        what = describe_exit(self.qemu.returncode)
        return f"QEMU {what} before answering QMP" + (f":\n{stderr}" if stderr else " (it printed nothing)")

    def _deliver_console(self, data: bytes) -> bool:
        return self.control is not None and self.control.deliver_console(data)

    async def _teardown_failed_start(self) -> None:
        if self.serial is not None:
            await self.serial.close()
            self.serial = None
        if self.control is not None:
            await self.control.close("the core failed to start")
            self.control = None
        if self.display is not None:
            await self.display.close()
            self.display = None
        await self._disconnect_qmp()
        if self.qemu is not None and self.qemu.child and not self.qemu.exited:
            await self._kill_qemu()
        if self.qemu is not None and self.qemu.child:
            self._remove_qemu_sockets()
        code = self.qemu.returncode if self.qemu else None
        live = find_vm_qemu(self.run_dir.qemu_qmp_socket) if self.config.attach is None else None
        if live is not None:  # an adoption that failed: QEMU runs on, and the next core adopts it
            self.state.update(state=RunState.UNSUPERVISED, qemu_pid=live.pid, qemu_start_time=live.start_time,
                              last_exit={"code": None, "reason": f"could not adopt QEMU pid {live.pid} (it still "
                                         "runs; the next core for this VM adopts it)", "at": time.time()})
            self._left_unsupervised = True
            return
        self.state.update(state=RunState.CRASHED,
                          last_exit={"code": code, "reason": "failed to start", "at": time.time()})

    # -- running --------------------------------------------------------------------------------------------

    async def _execute(self, name: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
        """Run one command on QEMU on behalf of a peer; QEMU's error replies pass through unchanged.

        Every peer's command comes through here, so this is where the core stands between peers and QEMU: only a
        command name QEMU could know and strict JSON within QEMU's parser limits go on (anything else would make
        QEMU answer without an id, which costs the core its QMP connection), and nothing may cut the core's own
        links to QEMU."""
        if not isinstance(name, str) or not COMMAND_NAME.fullmatch(name):
            return _error("CommandNotFound", f"The command {str(name)[:64]!r} has not been found")
        reload = display_reload(name, arguments, self.control)
        if reload is not None:
            return reload
        problem = arguments_problem(arguments)
        if problem is None and self.vnc.answers(name, arguments):
            return self.vnc.execute(name, arguments)
        problem = problem or reserved_problem(name, arguments)
        if problem:
            log.info("refused %r before QEMU: %s", name, problem)
            return _error("GenericError", f"'{name}' not sent to QEMU: {problem}")
        if name == MIGRATE_TARGET_COMMAND:
            return self.migration.set_target(arguments or {})
        if name in GUEST_READ_COMMANDS:
            return await self._guest_reads.execute(name, arguments)
        if name == GUEST_IS_HERE_COMMAND:
            self._apply_migration(self.migration.guest_is_here())
            self._cancel_linger()
            await self._refresh_status()
            return {"return": {}}
        refused = self.migration.check_command(name, arguments)
        if refused is not None:
            log.info("refused %r: %s", name, refused["error"]["desc"])
            return refused
        if name == "migrate":
            # Recorded before QEMU is asked: a core that dies in between must know where the guest may have gone.
            self._apply_migration(self.migration.before_migrate(arguments))
        reply = await self._execute_on_qemu(name, arguments)
        if name == "migrate":
            # Only a migration QEMU accepted moves clients: a refused one changes nothing, and savevm/snapshot
            # jobs (which emit MIGRATION events too) never count as the guest leaving.
            self._apply_migration(self.migration.after_migrate("return" in reply))
        return reply

    async def _execute_on_qemu(self, name: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
        try:
            value = await self.qmp.execute(name, arguments)
        except ExecuteError as exc:
            error = exc.received.get("error", {})
            return {"error": error if isinstance(error, dict) else {"class": "GenericError", "desc": str(exc)}}
        except (ExecInterruptedError, QMPError, ConnectionError) as exc:
            log.warning("command %s interrupted: %s", name, exc)
            return _error("GenericError", f"QEMU's monitor connection was lost before it replied to '{name}'")
        return {"return": value}

    def _apply_migration(self, effects: Effects) -> None:
        """Do what the migration state machine says: record, tell clients, stop running the guest here."""
        if effects.persist:
            self.state.update(**effects.state_fields)
        if effects.migrating:
            if self.control is not None:
                self.control.broadcast(Migrating())
            if self.state.data.get("state") != RunState.MIGRATING:
                self.state.update(state=RunState.MIGRATING)
        if effects.left:
            target = effects.migrated_to
            if self.control is not None and target:
                self.control.broadcast(Migrated(target))
            self.state.update(state=RunState.MIGRATED)
            self._update_linger()
        if effects.ended_here:
            log.warning("outgoing migration %s; the guest stays here", effects.ended_here)
            self._background(self._record_failed_migration(effects.ended_here, effects.failed_destination))
        if effects.left or effects.ended_here:
            self._schedule_refresh()

    async def _record_failed_migration(self, status: str, destination: str | None) -> None:
        """Keep why in state.json: QEMU's words here, and the destination QEMU's (the real reason is often only
        there, e.g. a device one side lacks)."""
        await asyncio.sleep(0.5)  # the destination QEMU writes its reason as it exits
        try:
            info = await self.qmp.execute("query-migrate")
        except (QMPError, ConnectionError):
            info = {}
        error = info.get("error-desc") if isinstance(info, dict) else None
        theirs = destination_failure(destination)
        self.state.update(last_migration={"status": status, "error": error, "destination_error": theirs,
                                          "at": time.time()})
        if theirs:
            log.warning("the destination said: %s", theirs)

    async def _resume_adopted_migration(self) -> None:
        """An adopted QEMU may be migrating, done migrating (its guest runs elsewhere now), or waiting for an
        incoming migration: carry on from what QEMU says, with what state.json recorded."""
        try:
            info = await self.qmp.execute("query-migrate")
            status = await self.qmp.execute("query-status")
        except (QMPError, ConnectionError) as exc:
            log.warning("cannot ask the adopted QEMU about migration: %s", exc)
            return
        qemu_status = status.get("status") if isinstance(status, dict) else None
        previous = self._previous
        if qemu_status == "inmigrate" and isinstance(previous.get("incoming"), str):
            await self._resume_incoming(previous["incoming"])
            return
        effects = self.migration.adopt(previous.get("outgoing"), previous.get("migrated_to"), info, qemu_status)
        if effects.left or self.migration.in_progress:
            log.warning("the adopted QEMU's guest %s (migration %s to %s)",
                        "has left" if self.migration.left else "is migrating", self.migration.status,
                        self.migration.destination or (self.migration.outgoing.uri if self.migration.outgoing
                                                       else "?"))
        self._apply_migration(effects)

    async def _resume_incoming(self, uri: str) -> None:
        """A destination core restarted while its QEMU waits: keep waiting on the recorded URI, and if nothing
        listens there (the core died before it sent migrate-incoming), listen now."""
        self.incoming_uri = uri
        self.state.update(incoming=uri, state=RunState.INCOMING)
        path = Path(uri.removeprefix("unix:")) if uri.startswith("unix:") else None
        if path is not None and unix_socket_listening(path):
            log.info("the adopted QEMU still waits for the guest on %s", uri)
            return
        reply = await self._execute_on_qemu("migrate-incoming", {"uri": uri})
        if "error" in reply:
            log.warning("the adopted QEMU waits for an incoming migration but does not listen on %s, and "
                        "migrate-incoming failed: %s", uri, reply["error"].get("desc"))
        else:
            log.warning("the adopted QEMU waited for an incoming migration with nothing listening: now listening "
                        "on %s", uri)

    def _update_linger(self) -> None:
        """After the guest left, the source stays (QEMU in postmigrate answers QMP, as QEMU does) while a QMP peer
        is connected, and ends ``migrated_linger`` seconds after the last one left (or with none at all)."""
        if not self.migration.left:
            return
        peers = self.server.peers if self.server is not None else []
        if peers:
            self._cancel_linger()
        elif self._linger is None:
            delay = self.config.migrated_linger
            log.info("the guest left; this core stops in %.0f s unless a QMP peer connects", delay)
            self._linger = asyncio.get_running_loop().call_later(
                delay, self.request_stop, f"migrated to {self.migration.destination or 'another QEMU'}, "
                f"nobody connected for {delay:.0f} s")

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _emit_event(self, event: dict[str, Any]) -> None:
        """An event to every QMP peer and every client, as QEMU's own are."""
        if self.server is not None:
            self.server.broadcast_event(event)
        if self.control is not None:
            self.control.qmp_event(event)

    def _vnc_settings_changed(self) -> None:
        if self.control is not None:
            self.control.vnc_settings_changed()

    async def _pump_events(self) -> None:
        """Forward every QEMU event to the peers, and follow the ones that change the run state. QEMU's VNC_*
        events are about the core's private capture connection, never a viewer: they stay here."""
        assert self.server is not None
        async for event in self.qmp.events:
            payload = dict(event)
            name = payload.get("event")
            if isinstance(name, str) and name.startswith("VNC_"):
                continue
            self._emit_event(payload)
            if name == "SHUTDOWN":
                data = payload.get("data")
                self._shutdown_reason = str(data.get("reason", "shutdown") if isinstance(data, dict) else "shutdown")
                self._hangup_filter.expected = True  # QEMU is about to hang up: qemu.qmp need not call it an error
                if self.display is not None:
                    self.display.note_qemu_ending()
            if name == "MIGRATION":
                data = payload.get("data")
                status = data.get("status") if isinstance(data, dict) else None
                self._apply_migration(self.migration.on_status(status))
                if status == "completed" and self.migration.outgoing is None:
                    self._background(self._check_unrecorded_migration())
            if name in _STATUS_EVENTS:
                self._schedule_refresh()

    def _schedule_refresh(self) -> None:
        self._background(self._refresh_status())

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _check_unrecorded_migration(self) -> None:
        """A migration finished that the core did not see start (HMP's migrate): did the guest leave?"""
        try:
            status = await self.qmp.execute("query-status")
        except (QMPError, ConnectionError):
            return
        qemu_status = status.get("status") if isinstance(status, dict) else None
        effects = self.migration.completed_without_record(qemu_status)
        if effects.left:
            log.warning("the guest migrated away without the core being asked (HMP migrate?); destination unknown")
        self._apply_migration(effects)

    async def _refresh_status(self) -> None:
        async with self._status_lock:
            try:
                status = await self.qmp.execute("query-status")
            except (QMPError, ConnectionError) as exc:
                log.debug("query-status failed: %s", exc)
                return
            qemu_status = str(status.get("status", "unknown")) if isinstance(status, dict) else "unknown"
            if self.migration.left:
                new_state = RunState.MIGRATED
            elif self.migration.outgoing is not None and self.migration.status in MIGRATION_IN_PROGRESS:
                new_state = RunState.MIGRATING
            else:
                new_state = run_state_from_qemu_status(qemu_status)
            if self.display is not None:
                self.display.set_run_state(qemu_status)
            if new_state != self.state.data.get("state") or qemu_status != self.state.data.get("qemu_status"):
                log.info("VM state %s (QEMU status %s)", new_state.value, qemu_status)
                arrived = self.state.data.get("state") == RunState.INCOMING and new_state != RunState.INCOMING
                self.state.update(state=new_state, qemu_status=qemu_status,
                                  **({"incoming": None} if arrived else {}))
                if self.control is not None:
                    self.control.run_state_changed(new_state.value, qemu_status)
                sd_notify(f"STATUS=VM {self.config.name} {new_state.value}")

    def _peers_changed(self) -> None:
        if self.server is not None:
            self.state.update(peers=[peer.describe() for peer in self.server.peers])
        self._update_linger()

    async def _supervise(self) -> int:
        """Wait until a stop is requested or QEMU goes away, then tear down. Returns the exit status.

        A lost QMP connection is not QEMU going away: while QEMU lives the core reconnects to its monitor socket
        (``server=on,wait=off`` takes a new connection) and carries on. Supervision is never given up while QEMU
        lives."""
        assert self.qemu is not None and self._stop_requested is not None
        stop = asyncio.ensure_future(self._stop_requested.wait())
        exited = asyncio.ensure_future(self.qemu.wait())
        try:
            while True:
                monitor_lost = asyncio.ensure_future(self._wait_qmp_lost())
                await asyncio.wait({stop, exited, monitor_lost}, return_when=asyncio.FIRST_COMPLETED)
                monitor_lost.cancel()
                if self._stop_requested.is_set():
                    return await self._stop()
                if self.qemu.exited:
                    return await self._qemu_gone()
                await self._reconnect_qmp()
        finally:
            stop.cancel()
            exited.cancel()

    async def _wait_qmp_lost(self) -> None:
        """Returns once the QMP connection is down (QEMU hung up, a peer's yank, a protocol error)."""
        while self.qmp.runstate == Runstate.RUNNING:
            await self.qmp.runstate_changed()
        # Give the process watch a moment to report the exit it usually implies.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.qemu.wait() if self.qemu else asyncio.sleep(0), timeout=1)

    async def _reconnect_qmp(self) -> None:
        """Connect to QEMU's monitor again, with backoff, until it answers, QEMU exits or a stop is asked for.
        Commands in flight when the link dropped got an error; commands meanwhile get one too (not sent)."""
        assert self.qemu is not None and self._qmp_path is not None and self._stop_requested is not None
        log.warning("QMP connection to QEMU pid %d lost while QEMU runs: reconnecting to %s", self.qemu.pid,
                    self._qmp_path)
        self.state.update(qmp_reconnects=int(self.state.data.get("qmp_reconnects") or 0) + 1)
        await self._disconnect_qmp()
        if not await self._connect_until_answered(self._qmp_path):
            return
        log.warning("QMP connection to QEMU pid %d restored", self.qemu.pid)
        reply = await self._execute("migrate-set-capabilities",
                                    {"capabilities": [{"capability": "events", "state": True}]})
        if "error" in reply:
            log.warning("cannot enable migration events: %s", reply["error"].get("desc"))
        await self._refresh_status()

    async def _connect_until_answered(self, path: Path) -> bool:
        """True once connected; False if QEMU exited or a stop was asked for first."""
        assert self.qemu is not None and self._stop_requested is not None
        delay = 0.02
        stop = asyncio.ensure_future(self._stop_requested.wait())
        exited = asyncio.ensure_future(self.qemu.wait())
        try:
            while not (stop.done() or exited.done()):
                try:
                    await asyncio.wait_for(self.qmp.connect(str(path)), timeout=5.0)
                    return True
                except (QMPError, OSError, EOFError, TimeoutError) as exc:
                    log.log(logging.WARNING if delay == 0.02 else logging.DEBUG,
                            "QMP reconnect to %s failed (%s); still trying", path, exc or type(exc).__name__)
                    await self._disconnect_qmp()
                    await asyncio.wait({stop, exited}, timeout=delay)
                    delay = min(delay * 2, 2.0)
            return False
        finally:
            stop.cancel()
            exited.cancel()

    async def _stop(self) -> int:
        assert self.qemu is not None
        if self.config.attach is not None:
            log.info("detaching from QEMU pid %d (it keeps running)", self.qemu.pid)
            await self._close_endpoints()
            self.state.update(state=RunState.SHUTDOWN if self.qemu.exited else self.state.data["state"],
                              last_exit={"code": None, "reason": f"core detached ({self._stop_reason})",
                                         "at": time.time()}, peers=[])
            return EXIT_OK
        migrated_away = self.migration.left
        if self.config.graceful_timeout and not self.qemu.exited and not migrated_away:
            log.info("asking the guest to power down (waiting up to %.0f s)", self.config.graceful_timeout)
            await self._ask_qemu("system_powerdown", self.config.graceful_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.qemu.wait(), timeout=self.config.graceful_timeout)
        if not self.qemu.exited:
            # QEMU hangs up on quit; qemu.qmp would log that expected reset as an error.
            logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
            await self._ask_qemu("quit", self.config.stop_timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.qemu.wait(), timeout=self.config.stop_timeout)
        if not self.qemu.exited:
            await self._kill_qemu()
        await self._close_endpoints()
        self.state.update(state=self._final_state(RunState.SHUTDOWN), peers=[], clients=[], qemu_status=None,
                          endpoints={}, display=None,
                          last_exit={"code": self.qemu.returncode, "reason": f"stopped by core ({self._stop_reason})",
                                     "at": time.time()})
        return EXIT_OK

    def _final_state(self, otherwise: RunState) -> RunState:
        """A source whose guest left ends as ``migrated`` (its state.json keeps ``migrated_to`` for clients)."""
        return RunState.MIGRATED if self.migration.left else otherwise

    async def _ask_qemu(self, command: str, within: float) -> None:
        """Send a command during teardown; a QEMU that is gone, hung or stopped must not stall the stop."""
        try:
            await asyncio.wait_for(self.qmp.execute(command), timeout=within)
        except (QMPError, ConnectionError, EOFError, TimeoutError) as exc:
            log.warning("QEMU did not accept %r during stop: %s", command, exc or type(exc).__name__)

    async def _kill_qemu(self) -> None:
        assert self.qemu is not None
        for sig, wait in ((signal.SIGTERM, self.config.stop_timeout), (signal.SIGKILL, 10.0)):
            log.info("sending %s to QEMU pid %d", sig.name, self.qemu.pid)
            self.qemu.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.qemu.wait(), timeout=wait)
                return
        log.error("QEMU pid %d did not exit after SIGKILL", self.qemu.pid)

    async def _qemu_gone(self) -> int:
        """QEMU exited (or its monitor vanished) without being asked by us: record why, pick the exit status."""
        assert self.qemu is not None
        code = self.qemu.returncode
        clean = (code == 0) or (code is None and self._shutdown_reason is not None)
        reason = self._shutdown_reason if clean and self._shutdown_reason else describe_exit(code)
        state = RunState.SHUTDOWN if clean else RunState.CRASHED
        log.log(logging.INFO if clean else logging.ERROR, "QEMU pid %d is gone: %s", self.qemu.pid, reason)
        if not clean:
            tail = log_tail(self.run_dir.qemu_log, 1000)
            if tail:
                log.error("QEMU's last output:\n%s", tail)
        await self._close_endpoints()
        self.state.update(state=self._final_state(state), peers=[], clients=[], qemu_status=None, endpoints={},
                          display=None, last_exit={"code": code, "reason": reason, "at": time.time()})
        if clean:
            return EXIT_OK
        return EXIT_QEMU_FAILED if code is not None and code > 0 else EXIT_QEMU_KILLED

    async def _close_endpoints(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.server is not None:
            await self.server.close()
        if self.agent is not None:
            await self.agent.close()
            self.agent = None
        if self.serial is not None:
            await self.serial.close()
            self.serial = None
        if self.control is not None:
            await self.control.close(self._stop_reason or "QEMU exited")
            self.control = None
        if self.display is not None:
            await self.display.close()
            self.display = None
        await self._disconnect_qmp()
        if self.qemu is not None and self.qemu.exited:
            self._remove_qemu_sockets()

    def _remove_qemu_sockets(self) -> None:
        """QEMU does not always remove its sockets (never when killed): the core does, once QEMU is gone."""
        for path in (self.run_dir.qemu_qmp_socket, self.run_dir.vnc_socket, self.run_dir.agent_socket,
                     self.run_dir.serial_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _ExpectedHangup(logging.Filter):
    """After QEMU said SHUTDOWN it closes its monitor: qemu.qmp's errors about that (broken pipe, reset, EOF)
    are expected, not errors for an operator to act on."""

    def __init__(self) -> None:
        super().__init__()
        self.expected = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.expected or record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        return not any(word in text for word in ("BrokenPipe", "ConnectionReset", "EOFError", "Broken pipe"))


#: The descriptor limit the core asks for when it may (as root): room for many peers, far below the kernel's cap.
WANTED_FD_LIMIT = 65536


def raise_fd_limit() -> None:
    """Raise the soft file-descriptor limit to the hard one, and as root (CAP_SYS_RESOURCE) both to
    WANTED_FD_LIMIT: a flood of connections must meet the core's own limits, never EMFILE inside libzmq, which
    aborts the process. systemd's default soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(hard, WANTED_FD_LIMIT) if hard != resource.RLIM_INFINITY else hard
    for target in ((wanted, wanted), (hard, hard)):
        if target[0] <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
        except (ValueError, OSError):
            continue
        log.debug("file-descriptor limit raised from %d to %d", soft, target[0])
        break
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if now < 4096:
        log.warning("file-descriptor limit is %d: fewer control connections and QMP peers can be served (set "
                    "LimitNOFILE= higher)", now)


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _version_string(version: Any) -> str:
    try:
        q = version["qemu"]
        text = f"{q['major']}.{q['minor']}.{q['micro']}"
    except (KeyError, TypeError):
        return "unknown"
    package = str(version.get("package", "")).strip()
    return f"{text} ({package})" if package else text


def _reexported_greeting(greeting: dict[str, Any]) -> dict[str, Any]:
    """QEMU's greeting, minus the 'oob' capability, which the re-export does not offer."""
    qmp = dict(greeting.get("QMP", {}))
    qmp["capabilities"] = [c for c in qmp.get("capabilities", []) if c != "oob"]
    qmp.setdefault("version", {})
    return {"QMP": qmp}
