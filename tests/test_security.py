"""Privilege boundaries as the security model states them (docs/security.md), checked as an unprivileged user."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, kill_pid, short_tmpdir, spawn_core

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")

# Runs as `nobody`, in the group the core opened its client sockets to; prints one verdict per probe.
PROBE = r"""
import mmap, os, socket, sys
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
def verdict(name, action):
    try:
        action()
        print(name, "ALLOWED")
    except PermissionError:
        print(name, "DENIED")
def connect(path):
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):  # display.sock is a seqpacket socket
        s = socket.socket(socket.AF_UNIX, kind)
        try:
            s.connect(path)
            return
        except OSError as exc:
            if exc.errno != 91:  # EPROTOTYPE: try the other kind
                raise
        finally:
            s.close()
def write_shm(name):
    fd = os.open("/dev/shm/" + name.lstrip("/"), os.O_RDWR)
    os.close(fd)
own, other, shm = sys.argv[3], sys.argv[4], sys.argv[5]
verdict("own-control", lambda: connect(own + "/control.sock"))
verdict("own-display", lambda: connect(own + "/display.sock"))
verdict("own-qmp", lambda: connect(own + "/qmp.sock"))
verdict("own-private", lambda: os.listdir(own + "/private"))
verdict("own-shm-rw", lambda: write_shm(shm))
verdict("own-shm-ro", lambda: os.close(os.open("/dev/shm/" + shm.lstrip("/"), os.O_RDONLY)))
verdict("own-log", lambda: open(own + "/qemu.log").close())
verdict("other-control", lambda: connect(other + "/control.sock"))
verdict("other-display", lambda: connect(other + "/display.sock"))
verdict("other-private", lambda: os.listdir(other + "/private"))
"""


@pytest.fixture
def two_vms() -> Iterator[tuple[CoreProcess, CoreProcess, int]]:
    """VM 'mine' opens its client sockets to nobody's group; VM 'theirs' does not."""
    nogroup = pwd.getpwnam("nobody").pw_gid
    root = short_tmpdir()
    os.chmod(root, 0o755)  # nobody must reach the run dirs at all
    cores: list[CoreProcess] = []
    try:
        cores.append(spawn_core("mine", root / "mine", "--client-group", str(nogroup)))
        cores.append(spawn_core("theirs", root / "theirs"))
        yield cores[0], cores[1], nogroup
    finally:
        for core in cores:
            qemu = core.state().get("qemu_pid")
            core.stop()
            kill_pid(qemu)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_an_unprivileged_client_reaches_only_what_it_should(two_vms: tuple[CoreProcess, CoreProcess, int]) -> None:
    mine, theirs, gid = two_vms
    nobody = pwd.getpwnam("nobody")
    shm = mine.state()["display"]["shm"]
    result = subprocess.run([sys.executable, "-c", PROBE, str(nobody.pw_uid), str(gid), str(mine.run_dir),
                             str(theirs.run_dir), shm], capture_output=True, text=True, timeout=30)
    verdicts = dict(line.split() for line in result.stdout.splitlines())
    assert verdicts == {
        "own-control": "ALLOWED", "own-display": "ALLOWED", "own-shm-ro": "ALLOWED",  # what a client needs
        "own-qmp": "DENIED", "own-private": "DENIED", "own-shm-rw": "DENIED", "own-log": "DENIED",
        "other-control": "DENIED", "other-display": "DENIED", "other-private": "DENIED",
    }, result.stdout + result.stderr


def test_sockets_and_files_have_the_documented_modes(two_vms: tuple[CoreProcess, CoreProcess, int]) -> None:
    mine, theirs, gid = two_vms

    def mode_and_group(path: Path) -> tuple[str, int]:
        info = os.stat(path)
        return oct(stat.S_IMODE(info.st_mode)), info.st_gid

    run = mine.run_dir
    assert mode_and_group(run)[0] == "0o755"
    assert mode_and_group(run / "private")[0] == "0o700"
    assert mode_and_group(run / "qmp.sock") == ("0o660", os.getgid())
    assert mode_and_group(run / "control.sock") == ("0o660", gid)
    assert mode_and_group(run / "display.sock") == ("0o660", gid)
    assert mode_and_group(Path("/dev/shm") / mine.state()["display"]["shm"].lstrip("/")) == ("0o640", gid)
    assert mode_and_group(run / "qemu.log")[0] == "0o600"
    # Without --client-group the client sockets stay in the core's own group.
    assert mode_and_group(theirs.run_dir / "control.sock") == ("0o660", os.getgid())
