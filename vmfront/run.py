"""``vmfront run``: core and client together for interactive use, the way an operator's supervisor would.

Both are child processes of this one (reaped through pidfds, no threads). The client is restarted if it dies,
which it may at any time without harm; when the core ends, the client is stopped and ``run`` exits with the
core's status. Ctrl-C reaches all three (same process group): each stops itself cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clients.privileges import resolve_user
from core_daemon.qemu_process import ProcessWatch, spawn

log = logging.getLogger("vmfront.run")

CLIENT_RESTART_DELAY = 0.5
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0


@dataclass
class RunConfig:
    name: str
    run_dir: Path | None = None
    qemu_args: list[str] = field(default_factory=list)
    client_user: str | None = None
    verbose: int = 0
    vnc: str = "127.0.0.1:5900"
    websocket: str | None = None
    agent: bool = False

    def base(self, subcommand: str) -> list[str]:
        argv = [sys.executable, "-m", "vmfront", *(["-v"] * self.verbose), subcommand, "--name", self.name]
        if self.run_dir is not None:
            argv += ["--run-dir", str(self.run_dir)]
        return argv


def _run_dir_arg(config: RunConfig) -> str:
    return f" --run-dir {config.run_dir}" if config.run_dir is not None else ""


async def _wait_ready(read_fd: int, core: ProcessWatch) -> str | None:
    """The core's ready line, or None if it exited (or took too long) first."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(read_fd, readable.set)
    ready = asyncio.ensure_future(readable.wait())
    exited = asyncio.ensure_future(core.wait())
    try:
        done, _ = await asyncio.wait({ready, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if ready in done and select.select([read_fd], [], [], 0)[0]:
            return os.read(read_fd, 4096).decode(errors="replace").strip() or None
        return None
    finally:
        loop.remove_reader(read_fd)


async def run_both(config: RunConfig) -> int:
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    try:
        core_argv = [*config.base("core"), "--ready-fd", str(write_fd)]
        if config.agent:
            core_argv.append("--agent")
        if config.client_user:
            # The unprivileged client must be able to open control.sock, display.sock and the segment.
            core_argv += ["--client-group", str(resolve_user(config.client_user).gid)]
        core = ProcessWatch(spawn([*core_argv, "--", *config.qemu_args]), child=True)
    finally:
        os.close(write_fd)
    try:
        line = await _wait_ready(read_fd, core)
    finally:
        os.close(read_fd)
    if line is None:
        core.send_signal(signal.SIGTERM)
        code = await core.wait()
        log.error("the core did not start (exit status %s)", code)
        return code if code else 1

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    client_argv = [*config.base("client"), "--vnc", config.vnc, "--monitor"]
    if config.websocket:
        client_argv += ["--websocket", config.websocket]
    if config.client_user:
        client_argv += ["--user", config.client_user]
    client = ProcessWatch(spawn(client_argv), child=True)
    print(f"vmfront run: VM {config.name!r} is up; core pid {core.pid}, client pid {client.pid}.\n"
          f"  VNC:     vncviewer {config.vnc}  (or any VNC viewer)\n"
          f"  monitor: vmfront monitor {config.name}{_run_dir_arg(config)}\n"
          f"  QMP:     {line.removeprefix('READY qmp=')}\n"
          "Ctrl-C stops both.", file=sys.stderr, flush=True)
    core_done = asyncio.ensure_future(core.wait())
    stop_asked = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            client_done = asyncio.ensure_future(client.wait())
            await asyncio.wait({core_done, stop_asked, client_done}, return_when=asyncio.FIRST_COMPLETED)
            if core_done.done() or stop_asked.done():
                client_done.cancel()
                break
            log.warning("client pid %d exited (%s); starting a new one", client.pid, client.returncode)
            await asyncio.sleep(CLIENT_RESTART_DELAY)
            client = ProcessWatch(spawn(client_argv), child=True)
        # Signals stay handled until both children are gone: a second Ctrl-C must not cut their teardown.
        for child in (client, core):
            child.send_signal(signal.SIGTERM)
        for child in (client, core):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), STOP_TIMEOUT)
            if not child.exited:
                child.send_signal(signal.SIGKILL)
                await child.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    code = core.returncode
    return code if code is not None and code >= 0 else 1
