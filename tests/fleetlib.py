"""Helpers for tests and benchmarks of the fleet client (``vmfront client --all``): many demo-guest cores under
one run root, started side by side, and the fleet client process.

Every process started here is ended by its pid (through corelib.Fleet); every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from corelib import CoreProcess, Fleet, LoggedProcess, wait_for
from vnclib import ROOT

FLEET_CLIENT = "vmfront-fleet"


def start_cores(fleet: Fleet, names: list[str], *extra: str, within: float = 120.0,
                verbose: bool = False) -> list[CoreProcess]:
    """Demo-guest cores in ROOT/NAME, started together (not one after the other), each running when this
    returns."""
    cores = [fleet.core(name, *extra, wait_ready=False, verbose=verbose) for name in names]

    def running(core: CoreProcess) -> bool:
        assert core.proc.poll() is None, f"core {core.name} exited: {core.stderr()}"
        with contextlib.suppress(OSError, ValueError):
            return core.state().get("state") == "running" and (core.run_dir / "control.sock").exists()
        return False

    wait_for(lambda: all(running(c) for c in cores), within, f"{len(cores)} cores to run")
    for core in cores:
        fleet.track_qemu(core.qemu_pid)
    return cores


def fleet_client_of(core: CoreProcess) -> dict[str, Any] | None:
    """The fleet client's entry in the core's state.json (``clients[]``), if one is attached."""
    with contextlib.suppress(OSError, ValueError):
        for client in core.state().get("clients") or []:
            if str(client.get("name", "")).startswith(FLEET_CLIENT + ":"):
                found: dict[str, Any] = client
                return found
    return None


def endpoints(core: CoreProcess) -> dict[str, str]:
    client = fleet_client_of(core)
    assert client is not None, f"no fleet client attached to {core.name}: {core.state().get('clients')}"
    found: dict[str, str] = client["endpoints"]
    return found


def vnc_port(core: CoreProcess) -> int:
    return int(endpoints(core)["vnc"].rpartition(":")[2])


class FleetClientProcess(LoggedProcess):
    """``vmfront client --all --run-root ROOT ...`` (as root: ``--as-root``, as the other tests' clients)."""

    def __init__(self, root: Path, *extra: str, verbose: bool = True) -> None:
        self.root = root
        self.log = root / f"fleet-client-{time.monotonic_ns()}.log"
        as_root = ["--as-root"] if os.geteuid() == 0 and "--user" not in extra else []
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmfront", *(["-v"] if verbose else []), "client", "--all", "--run-root",
                 str(root), *as_root, *extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT)

    def wait_serving(self, cores: list[CoreProcess], within: float = 30.0) -> float:
        """Until every core lists this client; returns the seconds it took."""
        def serving() -> bool:
            assert self.proc.poll() is None, f"fleet client exited: {self.text()[-3000:]}"
            return all((c := fleet_client_of(core)) is not None and c.get("pid") == self.pid for core in cores)

        return wait_for(serving, within, f"the fleet client to serve {len(cores)} VMs")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def write_tokens(path: Path, grants: dict[str, str | tuple[str, str]]) -> Path:
    """A token file: ``{token: vm}`` or ``{token: (vm, expires)}``."""
    lines = [f"{token}: {vm}" if isinstance(vm, str) else f"{token}: {vm[0]} {vm[1]}" for token, vm in grants.items()]
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("\n".join(lines) + "\n")
    temp.replace(path)
    return path


def state_json(core: CoreProcess) -> str:
    return json.dumps(core.state(), indent=1, sort_keys=True)
