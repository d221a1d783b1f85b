"""ipc.rundir.listen_unix: the socket file appears only once it listens, with its mode, replacing only a socket."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import short_tmpdir

from ipc.rundir import default_run_dir, listen_unix, socket_access_problem


@pytest.fixture
def directory() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_appears_listening_with_its_mode_and_replaces_a_stale_socket(directory: Path) -> None:
    path = directory / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a killed process leaves it
    sock = listen_unix(path, mode=0o600)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(str(path))  # listening already: no accept() needed for connect() to succeed
        assert sorted(os.listdir(directory)) == ["s.sock"], "the temporary name was left behind"
    finally:
        sock.close()


def test_seqpacket_and_no_mode(directory: Path) -> None:
    path = directory / "p.sock"
    sock = listen_unix(path, mode=None, kind=socket.SOCK_SEQPACKET)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as peer:
            peer.connect(str(path))
    finally:
        sock.close()


def test_refuses_to_replace_what_is_not_a_socket(directory: Path) -> None:
    path = directory / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        listen_unix(path, mode=0o600)
    assert path.read_text() == "keep me"
    assert sorted(os.listdir(directory)) == ["notes.txt"]


def test_root_uses_run_vmfront_whatever_xdg_runtime_dir_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ssh login sets XDG_RUNTIME_DIR for root too: the VMs the systemd units started must stay visible."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/0")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_run_dir("web") == Path("/run/vmfront/web")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_run_dir("web") == Path("/run/user/0/vmfront/web")


def test_no_access_problem_for_a_missing_or_open_socket(directory: Path) -> None:
    """(A socket closed to the client is reported as test_operator.py's unprivileged client sees it.)"""
    path = directory / "control.sock"
    assert socket_access_problem(path) is None  # nothing there yet: no problem, just no core
    assert socket_access_problem(directory / "no-dir" / "control.sock") is None
    sock = listen_unix(path, mode=0o660)
    try:
        assert socket_access_problem(path) is None
    finally:
        sock.close()
