"""Outgoing and incoming migration as the core follows it: durable, checked against QEMU, never a split brain.

The source core records an outgoing migration in state.json *before* QEMU is asked to migrate (URI, the
destination core's control endpoint, when), so a core that dies and is restarted mid-way knows where the guest
went. A migration counts as started only once QEMU accepted ``migrate``; one at a time (a second request, or a new
destination while one runs, is refused before anything changes). Once the guest has left (QEMU says
``completed``, or ``postcopy-active``: the guest already runs on the destination) the source never runs it again:
``cont``, ``system_reset`` and ``snapshot-load`` are refused for every peer, clients are told where the guest
went, and QEMU lingers in ``postmigrate`` (answering QMP, as QEMU does) until management quits it or nobody has
been connected for the linger period.

Sans-IO: :class:`Migration` is fed commands, QEMU's answers and MIGRATION events, and says what to do
(:class:`Effects`); the supervisor performs it. Destinations are found on this host from the URI alone (a core
whose state.json says ``incoming`` with that URI), so a plain-QMP ``migrate`` is followed like ``vmfront
migrate``; other destinations are announced with ``__org.vmfront_migrate-target``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipc.rundir import read_state

log = logging.getLogger(__name__)

#: Migration statuses (QAPI MigrationStatus) during which the guest still runs here (or is paused here).
IN_PROGRESS = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling",
                         "postcopy-paused", "postcopy-recover"})
#: Statuses after which the guest runs on the destination, not here.
LEFT = frozenset({"postcopy-active", "completed"})
ENDED_HERE = frozenset({"failed", "cancelled"})
#: Commands that would run the guest here again after it left: refused for every peer.
RESUMING_COMMANDS = frozenset({"cont", "system_reset", "snapshot-load", "system_wakeup", "migrate-incoming"})
#: vmfront's own QMP command: where clients follow the *next* migration (destination control endpoint).
TARGET_COMMAND = "__org.vmfront_migrate-target"
#: vmfront's own QMP command: the guest did not go on elsewhere after all (the destination died before running
#: it): lift the refusal of ``cont`` here. For management; a client may not run it.
GUEST_IS_HERE_COMMAND = "__org.vmfront_guest-is-here"


def _error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


@dataclass(frozen=True)
class Outgoing:
    """The migration the source started: kept in state.json as ``outgoing``."""

    uri: str
    control: str | None  # the destination core's control endpoint, if known
    started_at: float

    def record(self) -> dict[str, Any]:
        return {"uri": self.uri, "control": self.control, "started_at": self.started_at}

    @classmethod
    def from_record(cls, record: Any) -> Outgoing | None:
        if not isinstance(record, dict) or not isinstance(record.get("uri"), str):
            return None
        control = record.get("control")
        return cls(record["uri"], control if isinstance(control, str) else None,
                   float(record.get("started_at") or 0.0))


@dataclass
class Effects:
    """What the supervisor should do after feeding the migration something."""

    persist: bool = False  # write ``state_fields`` to state.json now
    state_fields: dict[str, Any] = field(default_factory=dict)
    migrating: bool = False  # tell clients the guest is migrating
    migrated_to: str | None = None  # tell clients (and later ones) where it went
    left: bool = False  # the guest left: stop running it here, start lingering
    ended_here: str | None = None  # the migration failed or was cancelled: the guest stays (the status)
    failed_destination: str | None = None  # ... and the destination's control endpoint, if known


class Migration:
    """One core's view of migration of its guest; see the module docstring."""

    def __init__(self, run_root: Path | None = None) -> None:
        self.run_root = run_root
        self.outgoing: Outgoing | None = None
        self._next_target: str | None = None
        self._target_given = False
        self.status: str | None = None  # QEMU's last MIGRATION status for the outgoing migration
        self.left = False
        self.announced: str | None = None  # the endpoint clients were told

    @property
    def in_progress(self) -> bool:
        return self.outgoing is not None and not self.left

    @property
    def destination(self) -> str | None:
        return self.outgoing.control if self.outgoing is not None else None

    # --- commands ---------------------------------------------------------------------------------------------

    def check_command(self, name: str, arguments: dict[str, Any] | None) -> dict[str, Any] | None:
        """An error reply if the command must not run now (before anything is sent to QEMU), else None."""
        if self.left and name in RESUMING_COMMANDS:
            where = self.outgoing.control or self.outgoing.uri if self.outgoing else "another QEMU"
            return _error(f"the guest has migrated to {where}; '{name}' would run a second copy of it here "
                          f"(if the destination never ran it, '{GUEST_IS_HERE_COMMAND}' lifts this)")
        if name == "migrate" and self.outgoing is not None:
            return _error(f"a migration of this guest is already {'done' if self.left else 'in progress'} "
                          f"(to {self.outgoing.uri})")
        return None

    def set_target(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """``__org.vmfront_migrate-target``: the destination control endpoint for the next ``migrate`` only."""
        control = arguments.get("control")
        if set(arguments) - {"control"} or not (control is None or isinstance(control, str)):
            return _error(f"{TARGET_COMMAND} takes one string argument, 'control'")
        if self.outgoing is not None:
            return _error(f"a migration of this guest is already {'done' if self.left else 'in progress'} "
                          f"(to {self.outgoing.control or self.outgoing.uri}); its destination cannot change")
        self._next_target, self._target_given = control, True
        log.info("next migration's destination core: %s", control or "(none)")
        return {"return": {}}

    def before_migrate(self, arguments: dict[str, Any] | None) -> Effects:
        """Record the migration durably, before QEMU is asked (a core that dies in between must know)."""
        uri = str((arguments or {}).get("uri", ""))
        control = self._next_target if self._target_given else find_destination_core(uri, self.run_root)
        self.outgoing = Outgoing(uri, control, time.time())
        self.status = "requested"
        return Effects(persist=True, state_fields={"outgoing": self.outgoing.record()})

    def after_migrate(self, accepted: bool) -> Effects:
        """QEMU answered ``migrate``: accepted, the migration runs; refused, nothing changed."""
        self._next_target, self._target_given = None, False
        if accepted:
            log.info("outgoing migration to %s accepted%s", self.outgoing.uri if self.outgoing else "?",
                     f"; clients will follow to {self.destination}" if self.destination else "")
            return Effects()
        self.outgoing, self.status = None, None
        return Effects(persist=True, state_fields={"outgoing": None})

    def guest_is_here(self) -> Effects:
        """Management says the guest did not go on elsewhere: run it here again if asked."""
        log.warning("management says the guest is here after all: 'cont' is allowed again")
        self.outgoing, self.status, self.left, self.announced = None, None, False, None
        return Effects(persist=True, state_fields={"outgoing": None, "migrated_to": None})

    # --- QEMU's view ------------------------------------------------------------------------------------------

    def on_status(self, status: str | None) -> Effects:
        """A MIGRATION event (or ``query-migrate`` at adoption) for the outgoing migration."""
        if self.outgoing is None or status is None or status == self.status:
            return Effects()
        self.status = status
        effects = Effects()
        if status in IN_PROGRESS and not self.left:
            effects.migrating = True
        elif status in LEFT and not self.left:
            self.left = True
            effects.left = True
            effects.migrated_to = self.announced = self.outgoing.control
            effects.persist = True
            effects.state_fields = {"migrated_to": self.outgoing.control, "migrated_uri": self.outgoing.uri}
            log.info("the guest left (%s)%s", status,
                     f"; clients move to {self.outgoing.control}" if self.outgoing.control else "")
        elif status in ENDED_HERE and not self.left:
            effects.ended_here = status
            effects.failed_destination = self.outgoing.control
            self.outgoing, self.status = None, None
            effects.persist = True
            effects.state_fields = {"outgoing": None}
        return effects

    def adopt(self, record: Any, migrated_to: Any, query_migrate: Any, qemu_status: str | None) -> Effects:
        """A core adopting a QEMU: the outgoing record a previous core left, checked against QEMU's own view.

        ``query-migrate`` alone cannot tell an outgoing migration from an incoming one (a destination reports its
        incoming migration there too); QEMU's run status can: a source whose guest left is ``postmigrate``, a
        destination receiving is ``inmigrate``."""
        self.outgoing = Outgoing.from_record(record)
        status = query_migrate.get("status") if isinstance(query_migrate, dict) else None
        if qemu_status == "inmigrate":
            self.outgoing = None
            return Effects()
        if self.outgoing is None:
            # Nothing recorded: a migration started behind the core's back (HMP through human-monitor-command).
            destination = migrated_to if isinstance(migrated_to, str) else None
            if qemu_status == "postmigrate":
                self.outgoing = Outgoing("unknown", destination, time.time())
                status = "completed"
            elif status in IN_PROGRESS:
                self.outgoing = Outgoing("unknown", destination, time.time())
            else:
                return Effects()
        self.status = "requested"
        if status not in IN_PROGRESS and status not in LEFT and status not in ENDED_HERE:
            # Recorded but QEMU never started it (the core died before QEMU answered 'migrate'): nothing happened.
            self.outgoing, self.status = None, None
            return Effects(persist=True, state_fields={"outgoing": None})
        effects = self.on_status(status)
        effects.persist = True
        effects.state_fields.setdefault("outgoing", self.outgoing.record() if self.outgoing else None)
        return effects

    def completed_without_record(self, qemu_status: str | None) -> Effects:
        """A MIGRATION 'completed' the core did not start (HMP ``migrate``, or a snapshot job): only a QEMU in
        ``postmigrate`` lost its guest."""
        if self.outgoing is not None or qemu_status != "postmigrate":
            return Effects()
        self.outgoing = Outgoing("unknown", None, time.time())
        self.status = "requested"
        effects = self.on_status("completed")
        effects.state_fields["outgoing"] = self.outgoing.record()
        return effects


def find_destination_core(uri: str, run_root: Path | None) -> str | None:
    """The control endpoint of the vmfront core on this host waiting for ``uri`` (its state.json says
    ``incoming`` with exactly that URI), or None: then only ``__org.vmfront_migrate-target`` can say."""
    if run_root is None or not uri:
        return None
    try:
        entries = list(run_root.iterdir())
    except OSError:
        return None
    for run_dir in entries:
        state = read_state(run_dir / "state.json")
        if state is None or state.get("incoming") != uri or state.get("state") != "incoming":
            continue
        control = run_dir / "control.sock"
        if control.exists():
            return f"ipc://{control}"
    return None


def destination_failure(control: str | None) -> str | None:
    """Why a destination on this host refused the guest: what its QEMU printed (an incoming migration that fails
    ends QEMU, e.g. with 'Unknown savevm section or instance 'virtio-console' 0'), from its run dir's qemu.log."""
    if control is None or not control.startswith("ipc://"):
        return None
    log_path = Path(control.removeprefix("ipc://")).parent / "qemu.log"
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.split(": ", 1)[-1] for line in text.splitlines() if line.startswith("qemu-system")]
    return "; ".join(lines[-3:]) or None


def unix_socket_listening(path: Path) -> bool:
    """Whether a process listens on this unix socket path, from /proc/net/unix (connecting would be seen: a
    QEMU waiting for a migration takes any connection as its incoming stream)."""
    target = os.fspath(path)
    try:
        with open("/proc/net/unix") as table:
            next(table)
            for line in table:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON (listening)
                if len(fields) >= 8 and fields[7] == target and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        return False
    return False
