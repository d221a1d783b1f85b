"""``vmfront migrate NAME --to DEST``: live-migrate a guest to another core, with progress.

DEST is a VM name whose core waits with ``--incoming`` (its state.json gives the URI and its control endpoint,
so the source core can send its clients there), or a plain QEMU migration URI (clients then stay behind).
Everything goes through the source core's management QMP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from core_daemon.state import read_state
from core_daemon.supervisor import MIGRATE_TARGET_COMMAND
from ipc.channel import ipc_endpoint
from ipc.rundir import RunDir, RunDirError, check_vm_name

POLL_INTERVAL = 0.25


class MigrateError(Exception):
    """The migration could not be started or did not complete; the message says why."""


def resolve_destination(dest: str, dest_run_dir: Path | None) -> tuple[str, str | None]:
    """(migration URI, destination control endpoint or None)."""
    if ":" in dest:
        return dest, None
    try:
        run_dir = RunDir.for_vm(check_vm_name(dest), dest_run_dir)
    except RunDirError as exc:
        raise MigrateError(str(exc)) from None
    state = read_state(run_dir.state_file)
    if not state or state.get("state") != "incoming" or not state.get("incoming"):
        raise MigrateError(f"VM {dest!r} ({run_dir.root}) is not waiting for an incoming migration: "
                           "start its core with --incoming")
    return str(state["incoming"]), ipc_endpoint(run_dir.control_socket)


async def migrate(source_qmp: Path, uri: str, control: str | None, *, within: float, quiet: bool) -> dict[str, Any]:
    client = QMPClient("vmfront-migrate")
    try:
        await asyncio.wait_for(client.connect(str(source_qmp)), 10)
    except (QMPError, OSError, TimeoutError) as exc:
        raise MigrateError(f"cannot reach the source core at {source_qmp}: {exc}") from exc
    completed = False

    def saw_completion() -> bool:
        """The source core ends itself right after a completed migration: its event may beat our next poll."""
        nonlocal completed
        for event in client.events.clear():
            data = event.get("data")
            if event["event"] == "MIGRATION" and isinstance(data, dict) and data.get("status") == "completed":
                completed = True
        return completed

    info: Any = {}
    try:
        await client.execute(MIGRATE_TARGET_COMMAND, {"control": control})
        await client.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + within
        while True:
            try:
                info = await client.execute("query-migrate")
            except (QMPError, OSError, EOFError) as exc:
                if saw_completion():
                    return {**info, "status": "completed"}
                raise MigrateError(f"the source core went away during the migration: {exc}") from exc
            status = info.get("status", "none")
            ram = info.get("ram") or {}
            if not quiet and ram:
                total = ram.get("total") or 1
                done = total - ram.get("remaining", total)
                print(f"\rmigrating: {status:10} {done * 100 // total:3d}% of {total >> 20} MiB, "
                      f"{ram.get('mbps', 0):.0f} Mbit/s", end="", file=sys.stderr, flush=True)
            if status == "completed" or saw_completion():
                if not quiet:
                    print(file=sys.stderr)
                result: dict[str, Any] = info
                return result
            if status in ("failed", "cancelled"):
                raise MigrateError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                await client.execute("migrate_cancel")
                raise MigrateError(f"migration did not complete within {within:.0f} s; cancelled")
            await asyncio.sleep(POLL_INTERVAL)
    except ExecuteError as exc:
        raise MigrateError(f"{exc.error_class}: {exc}") from exc
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
