"""The per-VM run directory: the one rendezvous every vmfront process agrees on.

The core owns the directory; clients and tools find sockets, the pidfile and ``state.json`` here by VM name.
Layout (documented in docs/rundir.md)::

    DIR/                 0755  owned by the core's user
      core.pid           pidfile, locked (flock) by the live core
      state.json         current state, rewritten atomically
      qmp.sock           management QMP socket (re-exported by the core)
      control.sock       control channel for clients (ZeroMQ)
      display.sock       display readers: shm name + notification eventfd
      qemu.log           QEMU's stdout/stderr
      private/           0700  only the core: QEMU's own sockets
        qmp.sock         QEMU's QMP monitor, spoken to only by the core
        vnc.sock         QEMU's VNC server, read only by the core's display capture
        qga.sock         the guest agent's channel (with --agent), relayed only by the core
        serial.sock      the guest's serial port (with --serial), relayed only by the core
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Linux limits a unix socket path to 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


class RunDirError(Exception):
    """The VM name or run directory cannot be used; the message says why."""


def check_vm_name(name: str) -> str:
    """Names end up in paths and shared-memory names, so keep them to a safe alphabet."""
    if not _NAME_RE.match(name):
        raise RunDirError(
            f"invalid VM name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . - (not starting with . - _)"
        )
    return name


#: Where root's VMs live, whatever the shell's environment says (the systemd units use it too).
SYSTEM_RUN_ROOT = Path("/run/vmfront")


def default_run_root() -> Path:
    """The directory holding every VM's run directory: ``/run/vmfront`` for root (always: an ssh login's
    ``XDG_RUNTIME_DIR`` must not hide the VMs the system units started), else ``$XDG_RUNTIME_DIR/vmfront``,
    else a per-user directory under the temporary directory."""
    if os.geteuid() == 0:
        return SYSTEM_RUN_ROOT
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vmfront"
    import tempfile  # the last resort only: the core does not load it otherwise

    return Path(tempfile.gettempdir()) / f"vmfront-{os.geteuid()}"


def default_run_dir(name: str) -> Path:
    """``RUN_ROOT/NAME`` (see :func:`default_run_root`)."""
    return default_run_root() / check_vm_name(name)


def check_socket_path(path: Path) -> Path:
    """Fail early with a clear message instead of a cryptic bind() error later."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise RunDirError(
            f"socket path too long for a unix socket ({len(os.fsencode(path))} > {UNIX_PATH_MAX} bytes): "
            f"{path}; choose a shorter --run-dir"
        )
    return path


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} ({uid})"
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def socket_access_problem(path: Path) -> str | None:
    """Why this process cannot connect to the unix socket at ``path``, for the operator; None if it can, or if
    nothing is there yet. (Connecting needs write permission on the socket and search on each directory.)"""
    me = (f"this process runs as user {_user_name(os.getuid())}, groups "
          f"{', '.join(_group_name(g) for g in sorted({os.getgid(), *os.getgroups()}))}")
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return f"cannot reach {path}: a directory on its way is closed to this process ({me})"
    if os.access(path, os.W_OK):
        return None
    return (f"cannot open {path}: permission denied (owner {_user_name(info.st_uid)}, group "
            f"{_group_name(info.st_gid)}, mode {stat.S_IMODE(info.st_mode):04o}; {me})")


def remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead process, and only a socket: a mistyped path must not cost a file."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RunDirError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


def listen_unix(path: Path, *, mode: int | None, group: int | None = None, kind: int = socket.SOCK_STREAM,
                backlog: int = 64) -> socket.socket:
    """A listening, non-blocking unix socket at ``path``, with ``mode`` (None: what the umask gives) and ``group``.

    It is bound under a temporary name, given its mode, put in the listening state, and only then renamed into
    place. So whoever sees the path can connect: bind() creates the file before listen(), and a process
    preempted in between leaves a socket that refuses connections, which made "wait until it exists" racy on a
    loaded machine. Nor is the path ever seen with other permissions than asked. A socket already at ``path``
    is replaced (the caller decides first whether that is allowed); anything else there is an error."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(temp)) > UNIX_PATH_MAX:
        temp = path.with_name(f".{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        sock.bind(os.fspath(temp))
        try:
            if mode is not None:
                os.chmod(temp, mode)
            if group is not None:
                os.chown(temp, -1, group)
            sock.listen(backlog)
            os.rename(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class RunDir:
    """Paths inside one VM's run directory."""

    root: Path

    @classmethod
    def for_vm(cls, name: str, run_dir: str | os.PathLike[str] | None = None) -> RunDir:
        # Absolute: QEMU's arguments name paths in it, and a later core recognises its VM's QEMU by them.
        return cls(Path(os.path.abspath(run_dir)) if run_dir is not None else default_run_dir(name))

    @property
    def pidfile(self) -> Path:
        return self.root / "core.pid"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def qmp_socket(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def qemu_log(self) -> Path:
        return self.root / "qemu.log"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def qemu_qmp_socket(self) -> Path:
        return self.private / "qmp.sock"

    @property
    def vnc_socket(self) -> Path:
        """QEMU's own VNC server, read only by the core's display capture."""
        return self.private / "vnc.sock"

    @property
    def agent_socket(self) -> Path:
        """QEMU's chardev for the guest agent's virtio-serial port, relayed only by the core."""
        return self.private / "qga.sock"

    @property
    def migration_socket(self) -> Path:
        """Where QEMU waits for an incoming migration with ``--incoming auto``."""
        return self.private / "migration.sock"

    @property
    def display_socket(self) -> Path:
        """Where display readers get the shm name and their notification eventfd."""
        return self.root / "display.sock"

    @property
    def control_socket(self) -> Path:
        """The control channel (ZeroMQ ROUTER) that clients attach to."""
        return self.root / "control.sock"

    @property
    def serial_socket(self) -> Path:
        """QEMU's chardev for the guest's serial port (with --serial), relayed only by the core."""
        return self.private / "serial.sock"

    def socket_paths(self) -> list[Path]:
        return [self.qmp_socket, self.qemu_qmp_socket, self.vnc_socket, self.agent_socket, self.serial_socket,
                self.migration_socket, self.display_socket, self.control_socket]

    def create(self) -> None:
        """Make the directory tree with the documented modes (umask must not widen ``private/``).

        An existing directory must be ours and not writable by others: run dirs under a shared /tmp are
        predictable, and another user must not be able to plant sockets or links in them.
        """
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        for path in (self.root, self.private):
            if not path.exists():
                path.mkdir(mode=0o700)
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise RunDirError(f"{path} is not a directory owned by uid {os.geteuid()}; refusing to use it")
            if info.st_mode & 0o022:
                raise RunDirError(f"{path} is writable by group or others; refusing to use it")
        os.chmod(self.private, 0o700)


#: How far ``migrated_to`` is followed across cores (A → B → C ...).
MAX_HOPS = 16


def follow_migrations(endpoint: str, state_file: Path) -> str:
    """Where a client should attach: ``endpoint``, or where the guest went from there (``migrated_to`` in each
    core's state.json, hop by hop), so a client started after a migration finds the guest."""
    seen = {endpoint}
    current, state_path = endpoint, state_file
    for _ in range(MAX_HOPS):
        state = read_state(state_path)
        target = state.get("migrated_to") if state else None
        if not isinstance(target, str) or not target.startswith("ipc://") or target in seen:
            return current
        seen.add(target)
        current = target
        state_path = Path(target.removeprefix("ipc://")).parent / "state.json"
    return current


def read_state(path: Path) -> dict[str, Any] | None:
    """A run directory's state.json, or None if there is none (or it cannot be read: it is a hint, never the
    truth)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
