"""Supervision: start-up failures, the pidfile lock, readiness, QEMU dying, teardown, reclaim, attach."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import RawQmpPeer, core_command, kill_pid, pid_alive, running_core, short_tmpdir, spawn_core

SMALL_VM = ["-machine", "pc", "-m", "16"]


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_core_to_exit(root: Path, *extra: str, qemu_args: list[str] | None = None,
                     timeout: float = 30) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(core_command("f", root / "run", *extra, qemu_args=qemu_args),
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result.returncode, result.stderr, time.monotonic() - start


def wait_for(predicate: object, within: float = 15.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.05)


def test_bad_qemu_argument_fails_fast_with_qemus_stderr(root: Path) -> None:
    code, stderr, elapsed = run_core_to_exit(root, qemu_args=["-no-such-option"])
    assert code == 1
    assert elapsed < 5, elapsed
    assert "QEMU exited with status 1 before answering QMP" in stderr
    assert "-no-such-option" in stderr  # QEMU's own words
    state = json.loads((root / "run" / "state.json").read_text())
    assert state["state"] == "crashed"
    assert not (root / "run" / "core.pid").exists()


def test_missing_qemu_binary_fails_fast(root: Path) -> None:
    code, stderr, elapsed = run_core_to_exit(root, "--qemu-binary", "/nonexistent/qemu-system-x86_64",
                                             qemu_args=SMALL_VM)
    assert code == 1 and elapsed < 5
    assert "QEMU binary not found: /nonexistent/qemu-system-x86_64" in stderr


def test_second_core_for_the_same_vm_is_refused() -> None:
    with running_core("dup", qemu_args=SMALL_VM) as core:
        start = time.monotonic()
        result = subprocess.run(core_command("dup", core.run_dir, qemu_args=SMALL_VM), capture_output=True,
                                text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 1 and time.monotonic() - start < 5
        assert f"a core for this VM is already running (pid {core.pid} holds" in result.stderr
        # The first core is untouched.
        assert core.proc.poll() is None
        assert RawQmpPeer(core.qmp_socket).negotiate().execute("query-name") == {"return": {"name": "dup"}}


def test_sigterm_stops_qemu_and_removes_what_the_core_made(root: Path) -> None:
    core = spawn_core("term", root / "run", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    try:
        assert core.ready_line == f"READY qmp={core.qmp_socket}"
        assert core.stop() == 0
        assert not pid_alive(qemu_pid)
        run = root / "run"
        leftovers = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
        assert leftovers == ["private", "qemu.log", "state.json"], leftovers
        state = core.state()
        assert state["state"] == "shutdown"
        assert "stopped by core (signal SIGTERM)" in state["last_exit"]["reason"]
    finally:
        kill_pid(qemu_pid)


def test_stop_with_a_hung_qemu_still_ends_it(root: Path) -> None:
    """A QEMU that no longer answers (here: SIGSTOPped) must not stall or crash the core's stop sequence."""
    core = spawn_core("hung", root / "run", "--stop-timeout", "1", "--graceful-timeout", "1", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    try:
        os.kill(qemu_pid, signal.SIGSTOP)
        assert core.stop(timeout=40) == 0
        assert not pid_alive(qemu_pid)
        assert core.state()["state"] == "shutdown"
        assert "did not accept 'system_powerdown'" in core.stderr()
    finally:
        kill_pid(qemu_pid)


def test_qemu_killed_is_recorded_as_crashed(root: Path) -> None:
    core = spawn_core("crash", root / "run", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    try:
        os.kill(qemu_pid, signal.SIGKILL)
        assert core.wait(timeout=30) == 4
        state = core.state()
        assert state["state"] == "crashed"
        assert state["last_exit"]["code"] == -signal.SIGKILL
        assert "killed by SIGKILL" in state["last_exit"]["reason"]
        assert not (root / "run" / "qmp.sock").exists()
        assert not (root / "run" / "private" / "qmp.sock").exists()
    finally:
        core.stop()
        kill_pid(qemu_pid)


def test_guest_quit_through_qmp_is_a_clean_shutdown(root: Path) -> None:
    core = spawn_core("quit", root / "run", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    try:
        peer = RawQmpPeer(core.qmp_socket).negotiate()
        assert peer.execute("quit") == {"return": {}}
        assert core.wait(timeout=30) == 0
        state = core.state()
        assert state["state"] == "shutdown"
        assert state["last_exit"] == {**state["last_exit"], "code": 0, "reason": "host-qmp-quit"}
    finally:
        core.stop()
        kill_pid(qemu_pid)


def test_killed_core_is_reclaimed_and_the_next_core_adopts_its_qemu(root: Path) -> None:
    run = root / "run"
    first = spawn_core("re", run, qemu_args=SMALL_VM)
    qemu_pid = first.qemu_pid
    try:
        peer = RawQmpPeer(first.qmp_socket).negotiate()
        first.proc.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert pid_alive(qemu_pid), "QEMU must survive its core"
        with pytest.raises((EOFError, ConnectionResetError)):
            peer.recv()  # the dead core's peers see it go

        # What a supervisor does after a crash: start the same core again. It adopts the running guest.
        second = spawn_core("re", run, qemu_args=SMALL_VM)
        try:
            state = second.state()
            assert state["qemu_pid"] == qemu_pid and state["adopted"] is True and state["state"] == "running"
            assert "adopting it (the QEMU arguments given are ignored)" in second.stderr()
            assert RawQmpPeer(second.qmp_socket).negotiate().execute("query-name") == {"return": {"name": "re"}}
            # An adopted QEMU is the core's to stop, as if it had started it.
            assert second.stop() == 0
            wait_for(lambda: not pid_alive(qemu_pid), what="the adopted QEMU to quit")
            assert sorted(p.name for p in run.rglob("*")) == ["private", "qemu.log", "state.json"]
        finally:
            second.stop()
    finally:
        first.stop()
        kill_pid(qemu_pid)


def test_attached_qemu_that_dies_is_recorded(root: Path) -> None:
    """Attach to a QEMU the core did not start (its own QMP socket); it quits: the core exits cleanly."""
    sock = root / "own-qmp.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg", *SMALL_VM,
                             "-qmp", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, what="QEMU's QMP socket")
        core = spawn_core("att", root / "run", "--attach", str(sock))
        try:
            assert core.qemu_pid == qemu.pid and core.state()["attached"] is True
            # Stopping an attaching core only detaches: the guest keeps running, and can be attached again.
            assert core.stop() == 0
            assert qemu.poll() is None
            assert "core detached" in core.state()["last_exit"]["reason"]
            core = spawn_core("att", root / "run", "--attach", str(sock))
            RawQmpPeer(core.qmp_socket).negotiate().execute("quit")
            assert core.wait(timeout=30) == 0
            assert core.state()["state"] == "shutdown"
            assert core.state()["last_exit"]["reason"] == "host-qmp-quit"
        finally:
            core.stop()
    finally:
        qemu.kill()
        qemu.wait(timeout=10)


def test_sd_notify_ready(root: Path) -> None:
    notify_path = root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify_path))
        listener.settimeout(60)
        core = spawn_core("sd", root / "run", qemu_args=SMALL_VM, env={"NOTIFY_SOCKET": str(notify_path)},
                          wait_ready=False)
        try:
            message = ""
            while "READY=1" not in message.splitlines():  # STATUS= updates may come first
                message = listener.recv(4096).decode()
            assert f"MAINPID={core.pid}" in message
            # Ready means QMP answers already.
            assert RawQmpPeer(core.qmp_socket).negotiate().execute("query-name") == {"return": {"name": "sd"}}
        finally:
            core.stop()
            kill_pid(core.state().get("qemu_pid"))


def test_qmp_socket_path_that_is_not_a_socket_is_left_alone(root: Path) -> None:
    precious = root / "precious.txt"
    precious.write_text("keep me")
    code, stderr, _ = run_core_to_exit(root, "--qmp-socket", str(precious), qemu_args=SMALL_VM)
    assert code == 1 and "exists and is not a socket; refusing to replace it" in stderr
    assert precious.read_text() == "keep me"


def test_invalid_name_and_long_socket_path_are_clear_errors(root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vmfront", "core", "--name", "../evil"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "invalid VM name '../evil'" in result.stderr
    deep = root / ("d" * 100)
    code, stderr, _ = run_core_to_exit(deep, qemu_args=SMALL_VM)
    assert code == 1 and "socket path too long" in stderr
    assert not deep.exists(), "nothing is created before the checks pass"


def test_socket_activation_serves_the_managers_socket(root: Path) -> None:
    """systemd's LISTEN_FDS protocol: QMP on a socket the manager bound, which the core never unlinks."""
    path = root / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    run = root / "run"
    read_fd, write_fd = os.pipe()

    command = core_command("act", run, "--ready-fd", str(write_fd), qemu_args=SMALL_VM)
    fd = listener.fileno()
    script = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=qmp exec "$@"'
    proc = subprocess.Popen(["/bin/bash", "-c", script, "bash", *command], pass_fds=(write_fd, fd),
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=(root / "core.stderr").open("wb"))
    os.close(write_fd)
    listener.close()
    qemu_pid = None
    try:
        ready = os.read(read_fd, 4096) if select_readable(read_fd, 60) else b""
        assert ready.startswith(b"READY"), (root / "core.stderr").read_text()
        state = json.loads((run / "state.json").read_text())
        qemu_pid = state["qemu_pid"]
        assert state["endpoints"]["qmp"] == str(path)
        assert not (run / "qmp.sock").exists()
        assert RawQmpPeer(path).negotiate().execute("query-name") == {"return": {"name": "act"}}
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert path.exists(), "the manager's socket is the manager's to remove"
    finally:
        os.close(read_fd)
        proc.kill()
        proc.wait(timeout=10)
        kill_pid(qemu_pid)


def select_readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])
