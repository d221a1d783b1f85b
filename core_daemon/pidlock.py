"""Pidfile with an flock: at most one core per VM, and a crashed core's lock frees itself.

The kernel drops an flock when its holder dies (even by SIGKILL), so a stale pidfile is detected by simply
trying the lock: no pid-reuse guessing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    """Another live core holds the lock for this VM."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"a core for this VM is already running ({who} holds {path})")
        self.pid = pid


def read_pid(path: Path) -> int | None:
    """The pid written in a pidfile, or None if absent or unreadable."""
    try:
        return int(path.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock (used by `vmfront status` to tell a live core from a record)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class PidLock:
    """Holds ``core.pid`` locked for the life of the core."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        #: The pid found in a pidfile whose holder had died (a crashed core), if any.
        self.stale_pid: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AlreadyRunning(self.path, read_pid(self.path)) from None
            # A releasing core unlinks the file before unlocking: if we locked that orphaned inode, retry.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale_pid = read_pid(self.path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the pidfile, then drop the lock (in that order, so no one locks a file about to vanish)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
