"""Segment names, unique per VM and core start, and reclaiming the segments of cores that died.

A name is `/vmfront.<vm>.<pid>.<token>`: `<vm>` is the VM name percent-encoded (dots too, so the name splits
unambiguously), `<pid>` the creating core's pid, `<token>` random hex chosen at core start. The pid is what
lets a later core decide that a segment's owner is gone; the token keeps a restarted core that got the same
pid from colliding with (or being confused for) the old one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote

import posix_ipc

PREFIX = "vmfront."
SHM_DIR = "/dev/shm"  # where Linux (glibc, musl) keeps POSIX shared-memory objects
MAX_NAME = 255  # NAME_MAX for the file under /dev/shm


@dataclass(frozen=True, slots=True)
class SegmentName:
    vm_name: str
    pid: int
    token: str

    def __str__(self) -> str:
        return f"/{PREFIX}{quote(self.vm_name, safe='').replace('.', '%2E')}.{self.pid}.{self.token}"


def segment_name(vm_name: str, pid: int | None = None, token: str | None = None) -> str:
    """A fresh name for this VM's segment; pid defaults to ours, token to 16 random hex digits."""
    name = SegmentName(vm_name, os.getpid() if pid is None else pid, os.urandom(8).hex() if token is None else token)
    if not vm_name or name.pid <= 0 or not name.token.isalnum() or not name.token.isascii():
        raise ValueError(f"bad segment name parts: {name!r}")
    text = str(name)
    if len(text) - 1 > MAX_NAME:
        raise ValueError(f"VM name too long for a shm segment name: {vm_name!r}")
    return text


def parse_segment_name(name: str) -> SegmentName | None:
    """The parts of a name built by `segment_name` (with or without the leading slash), else None."""
    name = name.removeprefix("/")
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX) :].split(".")
    if len(parts) != 3:
        return None
    vm, pid, token = parts
    if not vm or not pid.isdigit() or not pid.isascii() or not token.isalnum() or not token.isascii():
        return None
    return SegmentName(unquote(vm), int(pid), token)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (a dead core its parent has not reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


def process_start_time(pid: int) -> float | None:
    """When a process started (seconds since the epoch, to a clock tick), from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            ticks = int(stat.read().rpartition(b")")[2].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def owner_alive(pid: int, created: float) -> bool:
    """Whether the core that created a segment at ``created`` (its inode's ctime, which only moves forward)
    still runs: its pid is alive, and that process is not a newer one that got the pid again."""
    if not pid_alive(pid):
        return False
    started = process_start_time(pid)
    return started is None or started <= created + 1.0  # btime is whole seconds


def reclaim_stale_segments(
    vm_name: str | None = None, is_alive: Callable[[int, float], bool] = owner_alive, *, shm_dir: str = SHM_DIR
) -> list[str]:
    """Unlink the vmfront segments (of every VM, or of ``vm_name``) whose creating core is dead, judged by pid and
    start time; returns the names unlinked.

    Readers that still map such a segment keep their mapping; only the name (and, once they unmap, the
    memory) goes. Segments of other users that this process may not unlink are left alone.
    """
    reclaimed = []
    for entry in sorted(os.listdir(shm_dir)):
        parsed = parse_segment_name(entry)
        if parsed is None or (vm_name is not None and parsed.vm_name != vm_name):
            continue
        try:
            created = os.stat(os.path.join(shm_dir, entry)).st_ctime
        except OSError:
            continue
        if is_alive(parsed.pid, created):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry)
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            continue  # another core reclaimed it first, or it is another user's
        reclaimed.append("/" + entry)
    return reclaimed
