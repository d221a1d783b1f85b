"""The serial console, end to end: ``vmfront run --serial`` boots the real Linux test guest, ``vmfront console`` in a
terminal (tmux) shows its kernel log from the first line and a shell's answer to what is typed; a second session
reads along but may not type. The same guest then checks the agent under ``run``: copy-from into a directory,
and ``guest-shutdown`` ending the VM with success.

Every process is ended by its pid (the Fleet, the tmux server by its pid), every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import kill_pid, wait_for
from test_agent_linux_guest import BOOT_TIMEOUT, LinuxGuestImage, build_image, vmfront_agent, wait_agent_ready
from test_operator import VMFRONT, RunProcess, open_fleet
from vnclib import ROOT, free_port

from clients.console.service import READ_ONLY_NOTICE

pytestmark = [pytest.mark.linux_guest, pytest.mark.timeout(400)]


class Tmux:
    """A tmux server of our own (its socket name is ours), running one command in one pane."""

    def __init__(self, command: list[str]) -> None:
        self.name = f"vmf-{os.getpid()}-{time.monotonic_ns()}"
        self.tmux("new-session", "-d", "-x", "200", "-y", "50", " ".join(command))
        self.server_pid = int(self.tmux("display-message", "-p", "#{pid}").strip())

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=10)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {done.stderr}")
        return done.stdout

    def screen(self) -> str:
        """The pane with all its history."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.name, "has-session"], capture_output=True).returncode == 0

    def close(self) -> None:
        kill_pid(self.server_pid)


@pytest.fixture(scope="module")
def image() -> LinuxGuestImage:
    return build_image()


@pytest.fixture
def tmux_sessions() -> Iterator[list[Tmux]]:
    sessions: list[Tmux] = []
    yield sessions
    for session in sessions:
        session.close()


class RawReader:
    """A second console session on the socket, reading without blocking the test."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.data = b""

    def pump(self) -> bytes:
        while select.select([self.sock], [], [], 0)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.data += chunk
        return self.data


def test_serial_console_and_agent_under_run(image: LinuxGuestImage, tmux_sessions: list[Tmux]) -> None:
    with open_fleet() as fleet:
        run = RunProcess(fleet, "con", "--serial", "--agent", "--accel", "tcg", "--vnc", f"127.0.0.1:{free_port()}",
                         qemu_args=["-m", "160", "-vga", "std", "-kernel", str(image.kernel), "-initrd",
                                    str(image.initrd), "-append", "console=ttyS0 panic=-1", "-no-reboot"])
        state = run.wait_up()
        assert "vmfront console con" in run.text()
        console_sock = Path(state["clients"][0]["endpoints"]["console"])
        where = ["--run-dir", str(run.run_dir)]
        tmux = Tmux([*VMFRONT, "console", "con", *where])
        tmux_sessions.append(tmux)
        wait_for(lambda: "Linux version" in tmux.screen(), BOOT_TIMEOUT, "the kernel's first line on the console")
        wait_for(lambda: "vmfront test guest, ttyS0" in tmux.screen(), BOOT_TIMEOUT, "the serial shell")
        assert "Connected to VM 'con'" in tmux.screen()
        reader = RawReader(console_sock)  # another session: it gets the scrollback too
        wait_for(lambda: b"Linux version" in reader.pump(), 10, "the scrollback in a second session")

        tmux.tmux("send-keys", "echo typed-$((6*7))", "Enter")
        wait_for(lambda: "typed-42" in tmux.screen().split("echo typed-")[-1], 60, "the shell's answer")
        wait_for(lambda: b"typed-42" in reader.pump(), 10, "the second session to read along")
        reader.sock.sendall(b"echo intruder\r")  # the first session holds the keyboard
        wait_for(lambda: READ_ONLY_NOTICE in reader.pump(), 10, "the read-only notice")
        time.sleep(1)
        assert "intruder" not in tmux.screen()
        reader.sock.close()

        tmux.tmux("send-keys", "C-]")  # leaves the console; its terminal goes with it
        wait_for(lambda: not tmux.alive(), 10, "vmfront console to leave on Ctrl-]")

        # The agent under `run`: into a directory as cp does, and a shutdown that succeeds.
        wait_agent_ready(run.run_dir, run.log)
        copied = vmfront_agent(run.run_dir, "copy-from", "/etc/os-release", f"{fleet.root}/")
        assert copied.returncode == 0, copied.stderr
        assert "vmfront-test-guest" in (fleet.root / "os-release").read_text()
        stopped = vmfront_agent(run.run_dir, "guest-shutdown")
        assert stopped.returncode == 0, stopped.stderr + run.text()[-6000:]
        assert run.proc.wait(timeout=120) == 0, run.text()
        status = json.loads(subprocess.run([*VMFRONT, "status", "con", "--json", *where], capture_output=True,
                                           text=True, timeout=30, cwd=ROOT).stdout)
        assert status["state"] == "shutdown" and not status["core_running"]

