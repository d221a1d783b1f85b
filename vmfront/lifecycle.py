"""``vmfront list``, ``stop`` and ``kill``: the VMs of a host and their ends, as virsh's list/shutdown/destroy.

Everything goes through what the core publishes: ``state.json`` and the ``core.pid`` lock for the list, the
management QMP socket to stop a VM. A stop is over when the core has exited (it exits once QEMU is gone), so
``vmfront list`` right after shows the VM stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from core_daemon.pidlock import is_locked
from core_daemon.state import RunState, read_state
from ipc.rundir import RunDir, RunDirError, check_vm_name, default_run_root
from shm.naming import pid_alive as process_alive  # a zombie is not alive

#: How long the core may take to end once QEMU was told to quit (its own teardown included).
CORE_EXIT_TIMEOUT = 30.0
POLL_INTERVAL = 0.1

#: ``vmfront stop`` exit statuses (docs/operator.md).
STOPPED = 0
FORCED = 3


class LifecycleError(Exception):
    """The VM cannot be listed, stopped or killed; the message says why."""


def _vnc(state: dict[str, Any]) -> str | None:
    for client in state.get("clients") or []:
        vnc = (client.get("endpoints") or {}).get("vnc") if isinstance(client, dict) else None
        if isinstance(vnc, str):
            return vnc
    return None


def describe_vm(run_dir: RunDir, name: str) -> dict[str, Any] | None:
    """One row of ``vmfront list``; None if the directory holds no VM."""
    state = read_state(run_dir.state_file)
    if state is None and not run_dir.pidfile.exists():
        return None
    state = state or {}
    alive = is_locked(run_dir.pidfile)
    qemu = state.get("qemu_pid") if isinstance(state.get("qemu_pid"), int) else None
    qemu_alive = qemu is not None and process_alive(qemu)
    if alive:
        shown = str(state.get("state") or "starting")
    elif qemu_alive and state.get("state") not in (RunState.SHUTDOWN, RunState.CRASHED):
        shown = "no core"  # the core died, its QEMU runs on (a new core adopts it)
    else:
        shown = str(state.get("state") or "stopped")
    return {"name": str(state.get("name") or name), "state": shown, "core_running": alive,
            "qemu_pid": qemu if qemu_alive else None, "clients": len(state.get("clients") or []) if alive else 0,
            "vnc": _vnc(state) if alive else None, "run_dir": str(run_dir.root)}


def list_vms(run_root: Path | None, *, include_stopped: bool) -> list[dict[str, Any]]:
    root = run_root or default_run_root()
    rows = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(root.iterdir()):
            try:
                check_vm_name(entry.name)
            except RunDirError:
                continue
            if not entry.is_dir():
                continue
            row = describe_vm(RunDir(entry), entry.name)
            if row is not None and (include_stopped or row["core_running"] or row["qemu_pid"]):
                rows.append(row)
    return rows


def _qmp_path(run_dir: RunDir) -> Path:
    state = read_state(run_dir.state_file) or {}
    endpoint = (state.get("endpoints") or {}).get("qmp")
    return Path(endpoint) if isinstance(endpoint, str) else run_dir.qmp_socket


def _running_core(run_dir: RunDir, name: str) -> None:
    if not is_locked(run_dir.pidfile):
        raise LifecycleError(f"VM {name!r} is not running (no core holds {run_dir.pidfile})")


async def _core_exit(run_dir: RunDir, within: float) -> bool:
    deadline = time.monotonic() + within
    while is_locked(run_dir.pidfile):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL)
    return True


async def _connect(run_dir: RunDir, name: str) -> QMPClient:
    path = _qmp_path(run_dir)
    client = QMPClient(f"vmfront-{name}")
    try:
        await asyncio.wait_for(client.connect(str(path)), 10)
    except (QMPError, OSError, TimeoutError) as exc:
        raise LifecycleError(f"cannot reach the core of VM {name!r} at {path}: {exc or type(exc).__name__}") from exc
    return client


async def _execute(client: QMPClient, command: str) -> str | None:
    """Run a command; None if QEMU took it (or hung up doing it, as ``quit`` does), else why not."""
    try:
        await asyncio.wait_for(client.execute(command), 10)
    except ExecuteError as exc:
        return str(exc.error.error.desc)
    except (QMPError, OSError, EOFError, TimeoutError) as exc:
        if command == "quit":
            return None
        return str(exc) or type(exc).__name__
    return None


async def _stop(run_dir: RunDir, name: str, powerdown_for: float) -> int:
    _running_core(run_dir, name)
    client = await _connect(run_dir, name)
    try:
        powered_off = False
        if powerdown_for > 0:
            why = await _execute(client, "system_powerdown")
            if why is not None:
                raise LifecycleError(f"VM {name!r}: system_powerdown refused: {why}")
            print(f"VM {name}: asked the guest to power off (waiting up to {powerdown_for:g} s)", flush=True)
            powered_off = await _wait_powered_off(client, run_dir, powerdown_for)
        if not powered_off:
            why = await _execute(client, "quit")
            if why is not None:
                raise LifecycleError(f"VM {name!r}: quit refused: {why}")
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
    if not await _core_exit(run_dir, CORE_EXIT_TIMEOUT):
        raise LifecycleError(f"VM {name!r}: its core did not exit within {CORE_EXIT_TIMEOUT:.0f} s")
    if powered_off:
        print(f"VM {name}: the guest powered off")
        return STOPPED
    print(f"VM {name}: stopped (quit QEMU)" if powerdown_for <= 0 else
          f"VM {name}: the guest did not power off within {powerdown_for:g} s; QEMU was quit")
    return STOPPED if powerdown_for <= 0 else FORCED


async def _wait_powered_off(client: QMPClient, run_dir: RunDir, within: float) -> bool:
    """Until QEMU reports the guest's SHUTDOWN (then QEMU is quit if it stays, as with -no-shutdown) or the core
    is gone, at most ``within`` seconds."""

    async def shutdown_event() -> None:
        async for event in client.events:
            if event["event"] == "SHUTDOWN":
                return

    event = asyncio.ensure_future(shutdown_event())
    exited = asyncio.ensure_future(_core_exit(run_dir, within))
    try:
        done, _ = await asyncio.wait({event, exited}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        event.cancel()
        exited.cancel()
    if event in done and not event.cancelled() and event.exception() is None:
        await _execute(client, "quit")  # the guest is off; a QEMU kept by -no-shutdown goes too
        return True
    return exited in done and not exited.cancelled() and exited.exception() is None and exited.result()


def _qemu_of(run_dir: RunDir) -> int | None:
    """The QEMU of this VM if it still runs, checked by its command line naming this run dir's QMP socket (so a
    reused pid is never killed)."""
    state = read_state(run_dir.state_file) or {}
    pid = state.get("qemu_pid")
    if not isinstance(pid, int) or not process_alive(pid):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if os.fsencode(run_dir.qemu_qmp_socket) in argv else None


async def _kill(run_dir: RunDir, name: str) -> int:
    qemu = _qemu_of(run_dir)
    if is_locked(run_dir.pidfile):
        problem: str | None
        try:
            client = await _connect(run_dir, name)
        except LifecycleError as exc:
            problem = str(exc)
        else:
            try:
                problem = await _execute(client, "quit")
            finally:
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await client.disconnect()
        if problem is None and await _core_exit(run_dir, CORE_EXIT_TIMEOUT):
            print(f"VM {name}: stopped")
            return STOPPED
        if qemu is None:
            raise LifecycleError(f"VM {name!r}: {problem or 'its core did not exit'}")
        print(f"VM {name}: {problem or 'QEMU did not quit'}; killing QEMU pid {qemu}", flush=True)
    elif qemu is None:
        raise LifecycleError(f"VM {name!r} is not running (no core holds {run_dir.pidfile}, no QEMU left)")
    else:
        print(f"VM {name}: no core; killing its QEMU pid {qemu}", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(qemu, signal.SIGKILL)
    if not await _core_exit(run_dir, CORE_EXIT_TIMEOUT):
        raise LifecycleError(f"VM {name!r}: its core did not exit after QEMU was killed")
    print(f"VM {name}: killed")
    return STOPPED


def stop_vm(run_dir: RunDir, name: str, *, timeout: float) -> int:
    return asyncio.run(_stop(run_dir, name, timeout))


def kill_vm(run_dir: RunDir, name: str) -> int:
    return asyncio.run(_kill(run_dir, name))
