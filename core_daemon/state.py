"""``state.json``: the core's view of its VM, for operators, supervisors and clients.

Rewritten atomically (write a temporary file in the same directory, then rename) on every change, so a reader
never sees half a file. The record stays after the core exits: it says how the VM ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from ipc.rundir import read_state

__all__ = ["STATE_FORMAT_VERSION", "RunState", "StateFile", "read_state", "run_state_from_qemu_status"]

STATE_FORMAT_VERSION = 1


class RunState(StrEnum):
    """The VM's run state as vmfront reports it (QEMU's finer status is kept in ``qemu_status``)."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    #: The guest migrated away: QEMU lingers in postmigrate here (or has quit); ``migrated_to`` says where.
    MIGRATED = "migrated"
    INCOMING = "incoming"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    #: QEMU runs but no core supervises it (an adoption failed: QEMU did not answer); the next core adopts it.
    UNSUPERVISED = "unsupervised"


_QEMU_STATUS_TO_STATE = {
    "running": RunState.RUNNING,
    "inmigrate": RunState.INCOMING,
    "finish-migrate": RunState.MIGRATING,
    "shutdown": RunState.SHUTDOWN,
    "internal-error": RunState.CRASHED,
    "guest-panicked": RunState.CRASHED,
}


def run_state_from_qemu_status(status: str) -> RunState:
    """Map QMP ``query-status`` ``status`` to a vmfront state: every other QEMU status is a kind of paused."""
    return _QEMU_STATUS_TO_STATE.get(status, RunState.PAUSED)


class StateFile:
    """Holds the current state and writes it out whole on each change."""

    def __init__(self, path: Path, **initial: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {"version": STATE_FORMAT_VERSION, **initial}

    def update(self, **changes: Any) -> None:
        self.data.update(changes)
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = time.time()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("w") as f:
                json.dump(self.data, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
