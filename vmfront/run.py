"""``vmfront run``: core and client together for interactive use, the way an operator's supervisor would.

Both are child processes of this one (reaped through pidfds, no threads). The client starts first: it binds its
listeners and says it is ready, so a taken port fails the whole command at once, before any QEMU starts. Then
the core starts QEMU. While both run, ``run`` supervises them: a client that dies is started again (one that
cannot start, e.g. its port was taken meanwhile, ends everything instead of looping); a core that dies while its
QEMU still runs is started again and adopts that QEMU (``--on-core-death stop``: adopts it only to shut it down).
Ctrl-C reaches all three (same process group): each stops itself cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core_daemon.qemu_process import ProcessWatch, find_vm_qemu, spawn
from core_daemon.state import read_state
from ipc.rundir import RunDir, follow_migrations
from shm.naming import pid_alive as process_alive  # a zombie is not alive

log = logging.getLogger("vmfront.run")

CLIENT_RESTART_MIN, CLIENT_RESTART_MAX = 0.5, 10.0
#: A child that ran this long before dying starts again at once (its restart delay is reset).
HEALTHY_AFTER = 30.0
#: At most this many core restarts within CORE_RESTART_WINDOW seconds; more means something is wrong.
CORE_RESTARTS, CORE_RESTART_WINDOW = 3, 60.0
READY_TIMEOUT = 90.0
CLIENT_READY_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
#: Exit statuses of ``vmfront client`` that mean "cannot run as configured": starting it again cannot help.
CLIENT_CONFIG_ERRORS = frozenset({1, 2})


@dataclass
class RunConfig:
    name: str
    run_dir: Path | None = None
    qemu_args: list[str] = field(default_factory=list)
    #: The client's user (``--user``) and the core's ``--client-group``: None runs the client as ourselves.
    client_user: str | None = None
    client_group: int | None = None
    verbose: int = 0
    vnc: str = "127.0.0.1:5900"
    websocket: str | None = None
    web: str | None = None
    #: Given to the core, which holds the VNC credentials; the keymap to the client, which maps keysyms.
    vnc_password_file: Path | None = None
    keymap: str | None = None
    agent: bool = False
    serial: bool = False
    clipboard: bool = False
    accel: str | None = None
    #: What to do when the core dies while QEMU runs: "restart" (adopt QEMU again) or "stop" everything.
    on_core_death: str = "restart"

    def base(self, subcommand: str) -> list[str]:
        argv = [sys.executable, "-m", "vmfront", *(["-v"] * self.verbose), subcommand, "--name", self.name]
        if self.run_dir is not None:
            argv += ["--run-dir", str(self.run_dir)]
        return argv

    def core_argv(self) -> list[str]:
        argv = self.base("core")
        if self.agent:
            argv.append("--agent")
        if self.serial:
            argv.append("--serial")
        if self.clipboard:
            argv.append("--clipboard")
        if self.accel:
            argv += ["--accel", self.accel]
        if self.vnc_password_file is not None:
            argv += ["--vnc-password-file", str(self.vnc_password_file)]
        if self.client_group is not None:
            # The unprivileged client must be able to open control.sock, display.sock and the segment.
            argv += ["--client-group", str(self.client_group)]
        return argv

    def client_argv(self) -> list[str]:
        argv = [*self.base("client"), "--vnc", self.vnc, "--monitor"]
        if self.websocket:
            argv += ["--websocket", self.websocket]
        if self.web:
            argv += ["--web", self.web]
        if self.keymap:
            argv += ["--keymap", self.keymap]
        if self.serial:
            argv.append("--console")
        argv += ["--user", self.client_user] if self.client_user else ["--as-root"] if os.geteuid() == 0 else []
        return argv


def _run_dir_arg(config: RunConfig) -> str:
    return f" --run-dir {config.run_dir}" if config.run_dir is not None else ""


async def _wait_ready(read_fd: int, child: ProcessWatch, within: float) -> str | None:
    """The child's ready line, or None if it exited (or took too long) first."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(read_fd, readable.set)
    ready = asyncio.ensure_future(readable.wait())
    exited = asyncio.ensure_future(child.wait())
    try:
        done, _ = await asyncio.wait({ready, exited}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if ready in done and select.select([read_fd], [], [], 0)[0]:
            return os.read(read_fd, 4096).decode(errors="replace").strip() or None
        return None
    finally:
        loop.remove_reader(read_fd)


async def _start(argv: list[str], within: float) -> tuple[ProcessWatch, str | None]:
    """Start a child with ``--ready-fd`` (inserted before any ``--``) and wait for its ready line."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        child = ProcessWatch(spawn([*argv[:split], "--ready-fd", str(write_fd), *argv[split:]]), child=True)
    finally:
        os.close(write_fd)
    try:
        line = await _wait_ready(read_fd, child, within)
    finally:
        os.close(read_fd)
    return child, line


async def _stop(*children: ProcessWatch) -> None:
    """SIGTERM, wait, SIGKILL: each child tears itself down on SIGTERM."""
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.wait(), STOP_TIMEOUT)
        if not child.exited:
            child.send_signal(signal.SIGKILL)
            await child.wait()


def _orphaned_qemu(run_dir: RunDir) -> int | None:
    """The QEMU a dead core left running (what a new core adopts): found as a core finds it, by its arguments."""
    found = find_vm_qemu(run_dir.qemu_qmp_socket)
    return found.pid if found is not None else None


def _migrated_core(run_dir: RunDir) -> ProcessWatch | None:
    """After the VM migrated away (state.json's ``migrated_to``, hop by hop), the core that now runs it."""
    here = f"ipc://{run_dir.control_socket}"
    there = follow_migrations(here, run_dir.state_file)
    if there == here:
        return None
    state = read_state(Path(there.removeprefix("ipc://")).parent / "state.json") or {}
    pid = state.get("core_pid")
    if not isinstance(pid, int) or not process_alive(pid):
        return None
    return ProcessWatch(pid, child=False)


def _describe(code: int | None) -> str:
    if code is None:
        return "status unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _say(text: str) -> None:
    print(f"vmfront run: {text}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.run_dir = RunDir.for_vm(config.name, config.run_dir)
        self.core: ProcessWatch | None = None
        self.client: ProcessWatch | None = None
        self.endpoints: dict[str, str] = {}
        self.stopping = asyncio.Event()
        self._core_restarts: list[float] = []

    async def start_client(self) -> bool:
        client, line = await _start(self.config.client_argv(), CLIENT_READY_TIMEOUT)
        self.client = client
        if line is None:
            if not client.exited:
                await _stop(client)
            return False
        with contextlib.suppress(ValueError):
            endpoints = json.loads(line.removeprefix("READY").strip() or "{}")
            if isinstance(endpoints, dict):
                self.endpoints = {str(k): str(v) for k, v in endpoints.items()}
        return True

    async def start_core(self) -> str | None:
        core, line = await _start([*self.config.core_argv(), "--", *self.config.qemu_args], READY_TIMEOUT)
        self.core = core
        if line is None and not core.exited:
            await _stop(core)
        return line

    async def run(self) -> int:
        # The client first: a listener that cannot be bound fails here, before any QEMU runs.
        if not await self.start_client():
            assert self.client is not None
            _say(f"the client could not start ({_describe(self.client.returncode)}; its error is above); "
                 "nothing else was started")
            return 1
        line = await self.start_core()
        if line is None:
            assert self.core is not None and self.client is not None
            _say(f"the core did not start ({_describe(self.core.returncode)}; its error is above)")
            await _stop(self.client)
            code = self.core.returncode
            return code if code and code > 0 else 1
        self._banner(line)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            return await self._supervise()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _banner(self, core_line: str) -> None:
        assert self.core is not None and self.client is not None
        name, where = self.config.name, _run_dir_arg(self.config)
        vnc = self.endpoints.get("vnc", self.config.vnc)
        host, _, port = vnc.rpartition(":")
        viewer = f"vncviewer {host}::{port}" if not vnc.startswith("unix:") else f"VNC socket {vnc[5:]}"
        lines = [f"VM {name!r} is up; core pid {self.core.pid}, client pid {self.client.pid}.",
                 f"  VNC:     {viewer}  (or any VNC viewer)"]
        if "websocket" in self.endpoints:
            lines.append(f"  noVNC:   ws://{self.endpoints['websocket']}")
        if "web" in self.endpoints:
            lines.append(f"  web:     {self.endpoints['web']}  (overview; the console at vm/{name}/console)")
        lines.append(f"  monitor: vmfront monitor {name}{where}")
        if self.config.serial:
            lines.append(f"  console: vmfront console {name}{where}  (Ctrl-] leaves it)")
        lines += [f"  QMP:     {core_line.removeprefix('READY qmp=')}",
                  f"  status:  vmfront status {name}{where}; stop: vmfront stop {name}{where} (or Ctrl-C here)"]
        _say("\n".join(lines))

    async def _supervise(self) -> int:
        client_started = time.monotonic()
        client_delay = CLIENT_RESTART_MIN
        stop_asked = asyncio.ensure_future(self.stopping.wait())
        try:
            while True:
                assert self.core is not None and self.client is not None
                core_done = asyncio.ensure_future(self.core.wait())
                client_done = asyncio.ensure_future(self.client.wait())
                await asyncio.wait({core_done, stop_asked, client_done}, return_when=asyncio.FIRST_COMPLETED)
                core_done.cancel()
                client_done.cancel()
                if stop_asked.done():
                    await _stop(self.client, self.core)
                    return self._core_status()
                if self.core.exited:
                    code = await self._core_exited()
                    if code is not None:
                        return code
                    continue
                # The client died.
                status = self.client.returncode
                if status in CLIENT_CONFIG_ERRORS:
                    _say(f"the client cannot run ({_describe(status)}; its error is above): stopping the VM")
                    await _stop(self.core)
                    return 1
                if time.monotonic() - client_started > HEALTHY_AFTER:
                    client_delay = CLIENT_RESTART_MIN
                log.warning("the client (pid %d) ended (%s); starting a new one in %.1f s", self.client.pid,
                            _describe(status), client_delay)
                await asyncio.sleep(client_delay)
                client_delay = min(client_delay * 2, CLIENT_RESTART_MAX)
                client_started = time.monotonic()
                if not await self.start_client():
                    _say(f"the client could not start again ({_describe(self.client.returncode)}): stopping the VM")
                    await _stop(self.core)
                    return 1
        finally:
            stop_asked.cancel()

    def _core_status(self) -> int:
        assert self.core is not None
        code = self.core.returncode
        if code is None and not self.core.child:
            return 0  # the core the guest migrated to: not ours, its status is unknown
        return code if code is not None and code >= 0 else 1

    async def _core_exited(self) -> int | None:
        """The core ended on its own: if its QEMU is gone, so is the VM (return the status to exit with);
        if QEMU still runs, start a core that adopts it (None: go on supervising)."""
        assert self.core is not None and self.client is not None
        code = self.core.returncode
        qemu = _orphaned_qemu(self.run_dir)
        moved = _migrated_core(self.run_dir) if qemu is None else None
        if moved is not None:
            # The guest migrated: the client followed it; run now watches the core that runs it (Ctrl-C stops it).
            _say(f"VM {self.config.name!r} migrated; the client follows it, and run now watches the core pid "
                 f"{moved.pid} that runs it")
            self.core = moved
            return None
        if qemu is None:
            log.info("the core (pid %d) ended (%s); stopping the client", self.core.pid, _describe(code))
            await _stop(self.client)
            return self._core_status()
        now = time.monotonic()
        self._core_restarts = [t for t in self._core_restarts if now - t < CORE_RESTART_WINDOW]
        restart = self.config.on_core_death == "restart" and len(self._core_restarts) < CORE_RESTARTS
        if restart:
            _say(f"the core (pid {self.core.pid}) died ({_describe(code)}) while QEMU pid {qemu} runs; "
                 "starting a core to adopt it")
        else:
            why = ("--on-core-death stop" if self.config.on_core_death == "stop"
                   else f"{CORE_RESTARTS} restarts within {CORE_RESTART_WINDOW:.0f} s")
            _say(f"the core (pid {self.core.pid}) died ({_describe(code)}) while QEMU pid {qemu} runs; "
                 f"stopping the VM ({why})")
        self._core_restarts.append(now)
        died = self.core.pid
        line = await self.start_core()
        if line is None:
            _say(f"no core could adopt QEMU pid {qemu}: it runs on without one; stop it with 'kill {qemu}', or "
                 f"supervise it with 'vmfront core --name {self.config.name}{_run_dir_arg(self.config)} --attach "
                 f"{self.run_dir.qemu_qmp_socket}'")
            await _stop(self.client)
            return 1
        if not restart:
            await _stop(self.client, self.core)
            return 1
        _say(f"core pid {self.core.pid} adopted QEMU pid {qemu} (the core pid {died} had died)")
        return None


async def run_both(config: RunConfig) -> int:
    return await Runner(config).run()
