"""``vmfront migrate NAME --to DEST``: live-migrate a guest to another core, with progress.

DEST is a VM name whose core waits with ``--incoming`` (its state.json gives the URI and its control endpoint,
so the source core can send its clients there; both QEMUs' arguments are compared first), or a plain QEMU
migration URI (a vmfront core waiting on it on this host is found by the source core itself). Everything goes
through the source core's management QMP socket. Once the guest has left, the source (which would linger, as
QEMU does) is quit; a destination whose core died is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from core_daemon.migration import TARGET_COMMAND as MIGRATE_TARGET_COMMAND
from core_daemon.migration import destination_failure
from core_daemon.state import read_state
from ipc.channel import ipc_endpoint
from ipc.rundir import RunDir, RunDirError, check_vm_name
from shm.naming import pid_alive

POLL_INTERVAL = 0.25


class MigrateError(Exception):
    """The migration could not be started or did not complete; the message says why."""


@dataclass(frozen=True)
class Destination:
    """Where to migrate: a URI, and when DEST is a VM on this host, its control endpoint and run directory."""

    uri: str
    control: str | None = None
    run_dir: RunDir | None = None


def resolve_destination(dest: str, dest_run_dir: Path | None) -> Destination:
    if ":" in dest:
        return Destination(dest)
    try:
        run_dir = RunDir.for_vm(check_vm_name(dest), dest_run_dir)
    except RunDirError as exc:
        raise MigrateError(str(exc)) from None
    state = read_state(run_dir.state_file)
    if not state or state.get("state") != "incoming" or not state.get("incoming"):
        raise MigrateError(f"VM {dest!r} ({run_dir.root}) is not waiting for an incoming migration: "
                           "start its core with --incoming")
    core_pid = state.get("core_pid")
    if not isinstance(core_pid, int) or not pid_alive(core_pid):
        raise MigrateError(f"VM {dest!r}: its core (pid {core_pid}) is not running; start it again (it adopts "
                           "its waiting QEMU)")
    return Destination(str(state["incoming"]), ipc_endpoint(run_dir.control_socket), run_dir)


def check_same_machine(source: RunDir, dest: Destination) -> None:
    """Both QEMUs must be started with the same machine and devices (QEMU fails the migration otherwise, with
    the reason only in the destination's log): refuse a mismatch, showing the difference."""
    if dest.run_dir is None:
        return
    ours, theirs = read_state(source.state_file) or {}, read_state(dest.run_dir.state_file) or {}
    if not isinstance(ours.get("qemu_argv"), list) or not isinstance(theirs.get("qemu_argv"), list):
        return
    a = machine_arguments(ours["qemu_argv"], source.root)
    b = machine_arguments(theirs["qemu_argv"], dest.run_dir.root)
    if a != b:
        diff = "\n".join(line for line in difflib.unified_diff(a, b, "source", "destination", lineterm="", n=1)
                         if not line.startswith(("---", "+++")))
        raise MigrateError("the two QEMUs are not started with the same machine and devices (QEMU would fail "
                           f"the migration); the difference, one argument a line:\n{diff}")


#: Options that differ between any two instances of a VM without changing the machine.
_INSTANCE_OPTIONS = frozenset({"-name", "-incoming", "-pidfile", "-D", "-trace"})


def machine_arguments(argv: list[str], run_dir: Path) -> list[str]:
    """QEMU's arguments less what differs per instance (name, incoming, the run directory in socket paths)."""
    out: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in _INSTANCE_OPTIONS:
            skip = True
            continue
        out.append(arg.replace(str(run_dir), "RUN_DIR"))
    return out


async def migrate(source: RunDir, dest: Destination, *, within: float, quiet: bool,
                  stop_source: bool = True) -> dict[str, Any]:
    client = QMPClient("vmfront-migrate")
    try:
        await asyncio.wait_for(client.connect(str(source.qmp_socket)), 10)
    except (QMPError, OSError, TimeoutError) as exc:
        raise MigrateError(f"cannot reach the source core at {source.qmp_socket}: {exc}") from exc
    completed = False

    def saw_completion() -> bool:
        nonlocal completed
        for event in client.events.clear():
            data = event.get("data")
            if event["event"] == "MIGRATION" and isinstance(data, dict) and data.get("status") == "completed":
                completed = True
        return completed

    info: Any = {}
    progress = False
    try:
        if dest.control is not None:
            await client.execute(MIGRATE_TARGET_COMMAND, {"control": dest.control})
        await client.execute("migrate", {"uri": dest.uri})
        deadline = time.monotonic() + within
        while True:
            try:
                info = await client.execute("query-migrate")
            except (QMPError, OSError, EOFError) as exc:
                if saw_completion():
                    info = {**info, "status": "completed"}
                    break
                raise MigrateError(f"the source core went away during the migration: {exc}") from exc
            status = info.get("status", "none")
            ram = info.get("ram") or {}
            if not quiet and ram and status not in ("completed", "failed", "cancelled"):
                total = ram.get("total") or 1
                done = total - ram.get("remaining", total)
                print(f"\rmigrating: {status:10} {done * 100 // total:3d}% of {total >> 20} MiB, "
                      f"{ram.get('mbps', 0):.0f} Mbit/s", end="", file=sys.stderr, flush=True)
                progress = True
            if status == "completed" or saw_completion():
                break
            if status in ("failed", "cancelled"):
                reason = info.get("error-desc") or "QEMU gave no reason"
                theirs = destination_failure(dest.control)
                raise MigrateError(f"migration {status}: {reason}" + (f"; the destination said: {theirs}"
                                                                       if theirs else ""))
            if time.monotonic() > deadline:
                await client.execute("migrate_cancel")
                raise MigrateError(f"migration did not complete within {within:.0f} s; cancelled")
            await asyncio.sleep(POLL_INTERVAL)
        if stop_source:
            # The source lingers after a plain QMP migration (as QEMU does); this command ends it at once.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.execute("quit")
    except ExecuteError as exc:
        raise MigrateError(f"{exc}") from exc
    finally:
        if progress:
            print(file=sys.stderr)
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
    result: dict[str, Any] = info
    return result


def destination_after(dest: Destination) -> str | None:
    """A problem with the destination after a completed migration (its core died: the guest runs unsupervised)."""
    if dest.run_dir is None:
        return None
    state = read_state(dest.run_dir.state_file) or {}
    core_pid = state.get("core_pid")
    if isinstance(core_pid, int) and pid_alive(core_pid):
        return None
    return (f"the guest runs on the destination (QEMU pid {state.get('qemu_pid')}), but its core (pid {core_pid}) is "
            f"gone: start it again (vmfront core --name {state.get('name', '?')} --run-dir {dest.run_dir.root}) "
            "and it adopts the guest")
