"""Helpers for tests that run a real ``vmfront core`` (which runs a real QEMU) as a child process.

Every core started here is ended by its pid when the context manager exits (SIGTERM, wait, SIGKILL), and so is
the QEMU it reported, in case a test killed the core and left the guest behind. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

READY_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], object], within: float, what: str) -> float:
    """Poll ``predicate`` (state written by another process); returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def short_tmpdir() -> Path:
    """A short directory under /tmp: unix socket paths must fit in 108 bytes, pytest's tmp_path may not."""
    return Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))


def kill_pid(pid: int | None, timeout: float = 10.0) -> None:
    """End a process we did not necessarily start (e.g. a QEMU left by a killed core): TERM, wait, KILL."""
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)


def fd_count(pid: int) -> int:
    """How many file descriptors the process holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive; /proc tells.
    with contextlib.suppress(OSError):
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    return False


class LoggedProcess:
    """A child whose output goes to a log file: its pid, its log text, and a stop by pid (TERM, wait, KILL)."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=10)


@dataclass
class CoreProcess:
    """A running ``vmfront core`` child."""

    proc: subprocess.Popen[bytes]
    run_dir: Path
    name: str
    ready_line: str = ""
    stderr_path: Path = field(default=Path("/dev/null"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / "state.json").read_text())
        return data

    @property
    def qemu_pid(self) -> int:
        pid: int = self.state()["qemu_pid"]
        return pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


def core_command(name: str, run_dir: Path, *extra: str, qemu_args: list[str] | None = None,
                 verbose: bool = True) -> list[str]:
    argv = [sys.executable, "-m", "vmfront", *(["-v"] if verbose else []),
            "core", "--name", name, "--run-dir", str(run_dir), *extra]
    if qemu_args:
        argv += ["--", *qemu_args]
    return argv


def client_command(name: str, run_dir: Path, *extra: str, verbose: bool = True) -> list[str]:
    """``vmfront client`` for a run dir. Tests run it as whoever runs them: as root that takes ``--as-root`` (the
    unprivileged default, and what a root-run client needs to be reachable, are tested in test_operator.py)."""
    as_root = ["--as-root"] if os.geteuid() == 0 and "--user" not in extra else []
    return [sys.executable, "-m", "vmfront", *(["-v"] if verbose else []), "client", "--name", name,
            "--run-dir", str(run_dir), *as_root, *extra]


def spawn_core(name: str, run_dir: Path, *extra: str, qemu_args: list[str] | None = None,
               env: dict[str, str] | None = None, wait_ready: bool = True,
               timeout: float = READY_TIMEOUT, verbose: bool = True, prefix: Sequence[str] = ()) -> CoreProcess:
    """Start a core with ``--ready-fd``; with ``wait_ready``, return once it says READY (or fail with its log).
    ``prefix`` goes before the command (e.g. ``ip netns exec NS``: the fd crosses the exec)."""
    read_fd, write_fd = os.pipe()
    stderr_path = run_dir.parent / f"{name}-{time.monotonic_ns()}.stderr"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [*prefix, *core_command(name, run_dir, "--ready-fd", str(write_fd), *extra, qemu_args=qemu_args,
                                    verbose=verbose)],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, pass_fds=(write_fd,),
            env={**os.environ, **(env or {})},
        )
    os.close(write_fd)
    core = CoreProcess(proc, run_dir, name, stderr_path=stderr_path)
    try:
        if wait_ready:
            ready, _, _ = select.select([read_fd], [], [], timeout)
            line = os.read(read_fd, 4096).decode() if ready else ""
            if not line.startswith("READY"):
                code = proc.poll()
                core.stop()
                raise AssertionError(f"core did not become ready (exit {code}); its log:\n{core.stderr()}")
            core.ready_line = line.strip()
    finally:
        os.close(read_fd)
    return core


class Stoppable(Protocol):
    def stop(self) -> object: ...


class Closable(Protocol):
    def close(self) -> object: ...


Ended = Stoppable | Closable | subprocess.Popen[Any]
EndedT = TypeVar("EndedT", bound=Ended)


class Fleet:
    """What a test started, under one short root dir, ended when the block exits whatever happened: first what
    it added (clients, viewers, agents, QMP peers, plain children: stopped, closed or killed, the last added
    first), then the cores, then every QEMU a core reported (a core killed by the test may have left its QEMU
    behind), then the root dir."""

    def __init__(self) -> None:
        self.root = short_tmpdir()
        self._processes: list[Ended] = []
        self._cores: list[CoreProcess] = []
        self._qemu_pids: list[int] = []

    def core(self, name: str, *extra: str, run_dir: Path | None = None, **options: Any) -> CoreProcess:
        """``spawn_core`` in ROOT/NAME (or ``run_dir``); the core and its QEMU are ended with the fleet."""
        return self.add_core(spawn_core(name, run_dir or self.root / name, *extra, **options))

    def add_core(self, core: CoreProcess) -> CoreProcess:
        self._cores.append(core)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self._qemu_pids.append(core.qemu_pid)
        return core

    def track_qemu(self, pid: int) -> None:
        """A QEMU started by something else (``vmfront run``): ended with the fleet, in case that did not."""
        self._qemu_pids.append(pid)

    def add(self, process: EndedT) -> EndedT:
        self._processes.append(process)
        return process

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for process in reversed(self._processes):
                with contextlib.suppress(Exception):
                    _end(process)
            for core in self._cores:
                core.stop()
        finally:
            for pid in self._qemu_pids:
                kill_pid(pid)
            shutil.rmtree(self.root, ignore_errors=True)


def _end(process: Ended) -> None:
    if isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.terminate()  # a supervisor (`vmfront run`) ends its children on SIGTERM; SIGKILL would orphan them
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait(timeout=10)
    elif hasattr(process, "stop"):
        process.stop()
    else:
        process.close()


@contextlib.contextmanager
def running_core(name: str = "t", *extra: str, qemu_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> Iterator[CoreProcess]:
    """A ready core in a fresh short run dir; everything it and its QEMU started is ended afterwards."""
    with Fleet() as fleet:
        yield fleet.core(name, *extra, run_dir=fleet.root / "run", qemu_args=qemu_args, env=env)


def screendump(core: CoreProcess, path: Path, timeout: float = 20.0) -> Any:
    """The core's shared frame as ``vmfront screendump`` writes it to ``path``, loaded as an RGB Pillow image."""
    from PIL import Image

    subprocess.run([sys.executable, "-m", "vmfront", "screendump", core.name, "--run-dir", str(core.run_dir),
                    str(path)], check=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent,
                   capture_output=True)
    with Image.open(path) as image:
        return image.convert("RGB")


def wait_demo_booted(core: CoreProcess, within: float = 30.0) -> None:
    """Until the demo guest shows its text screen: booted, its display mode no longer changes."""
    from guestlib import is_demo_text_screen

    dump = core.run_dir.parent / "boot.png"
    wait_for(lambda: is_demo_text_screen(screendump(core, dump, timeout=within)), within, "the demo guest to boot")


class RawQmpPeer:
    """A QMP peer on a plain socket, for what a library client would hide: ids, raw bytes, not reading."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.greeting = self.recv()

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        """The next message (reply or event)."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("peer closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def recv_reply(self) -> dict[str, Any]:
        """The next reply, skipping events."""
        while True:
            message = self.recv()
            if "event" not in message:
                return message

    def execute(self, command: str, **fields: Any) -> dict[str, Any]:
        self.send({"execute": command, **fields})
        return self.recv_reply()

    def negotiate(self) -> RawQmpPeer:
        assert self.execute("qmp_capabilities") == {"return": {}}
        return self

    def close(self) -> None:
        self.sock.close()
