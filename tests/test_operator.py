"""An operator's day against real QEMU: ``vmfront run`` (unprivileged client, fail fast, supervision), ``list``,
``stop``, ``kill``, a client that starts before its core, ``--vnc :N``, and the CLI's manners.

Every process is ended by its pid (the Fleet), every wait has a timeout. ``vmfront run`` as root runs its client as
the system user install.sh creates (``vmfront``), so these run dirs are made reachable to it (mode 0755).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from corelib import Fleet, LoggedProcess, client_command, pid_alive, wait_for
from vnclib import ROOT, free_port

VMFRONT = [sys.executable, "-m", "vmfront"]


class RunProcess(LoggedProcess):
    """``vmfront run`` for a VM in ROOT/NAME; its log has the run's, the core's and the client's lines."""

    def __init__(self, fleet: Fleet, name: str, *extra: str, qemu_args: list[str] | None = None) -> None:
        self.run_dir = fleet.root / name
        self.log = fleet.root / f"run-{name}-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([*VMFRONT, "run", "--name", name, "--run-dir", str(self.run_dir), *extra,
                                          "--", *(qemu_args or [])], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, cwd=ROOT)
        fleet.add(self)
        self.fleet = fleet

    def wait_up(self, within: float = 60) -> dict[str, Any]:
        wait_for(lambda: "is up" in self.text() or self.proc.poll() is not None, within, "vmfront run to be up")
        assert self.proc.poll() is None, self.text()
        state = self.state()
        self.fleet.track_qemu(state["qemu_pid"])
        wait_for(lambda: self.state().get("clients"), 15, "the client to attach")
        return self.state()

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.run_dir / "state.json").read_text())
        return data


def vmfront(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMFRONT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def uids(pid: int) -> list[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return [int(uid) for uid in line.split()[1:]]


def open_fleet() -> Fleet:
    fleet = Fleet()
    os.chmod(fleet.root, 0o755)  # the client's unprivileged user must reach the run dirs
    return fleet


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="runs the client as another user: needs root")


@root_only
def test_run_as_root_runs_the_client_unprivileged_and_list_stop_kill_two_vms() -> None:
    client_user = pwd.getpwnam("vmfront")  # install.sh creates it
    with open_fleet() as fleet:
        ports = [free_port(), free_port()]
        runs = [RunProcess(fleet, f"vm{i}", "--vnc", f"127.0.0.1:{port}") for i, port in enumerate(ports)]
        states = [run.wait_up() for run in runs]
        for run, state in zip(runs, states, strict=True):
            client = state["clients"][0]
            assert uids(client["pid"]) == [client_user.pw_uid] * 4, "the client must not run as root"
            assert client["uid"] == client_user.pw_uid
            assert "dropped privileges to vmfront" in run.text()
            # It is in the group the core opened its sockets to, and uses them: the display is mapped.
            wait_for(lambda r=run, s=state: f"display: mapped {s['display']['shm']} read-only" in r.text(),  # type: ignore[misc]
                     10, "the unprivileged client to map the display")

        listed = vmfront("list", "--run-root", str(fleet.root), "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        for i, (port, state) in enumerate(zip(ports, states, strict=True)):
            assert rows[f"vm{i}"] | {"run_dir": ""} == {
                "name": f"vm{i}", "state": "running", "core_running": True, "qemu_pid": state["qemu_pid"],
                "clients": 1, "vnc": f"127.0.0.1:{port}", "run_dir": ""}
        table = vmfront("list", "--run-root", str(fleet.root)).stdout.splitlines()
        assert table[0].split() == ["NAME", "STATE", "QEMU", "PID", "CLIENTS", "VNC"]
        assert table[1].split() == ["vm0", "running", str(states[0]["qemu_pid"]), "1", f"127.0.0.1:{ports[0]}"]

        # stop: the demo guest ignores the power button, so QEMU is quit after the deadline (status 3).
        started = time.monotonic()
        stopped = vmfront("stop", "vm0", "--run-dir", str(runs[0].run_dir), "--timeout", "1")
        assert stopped.returncode == 3, stopped.stdout + stopped.stderr
        assert "did not power off within 1 s; QEMU was quit" in stopped.stdout
        assert time.monotonic() - started < 20
        assert runs[0].proc.wait(timeout=30) == 0, runs[0].text()  # run ends with its VM
        assert not pid_alive(states[0]["qemu_pid"])
        # kill: at once.
        killed = vmfront("kill", "vm1", "--run-dir", str(runs[1].run_dir))
        assert killed.returncode == 0, killed.stdout + killed.stderr
        assert runs[1].proc.wait(timeout=30) == 0, runs[1].text()
        assert not pid_alive(states[1]["qemu_pid"])

        assert vmfront("list", "--run-root", str(fleet.root), "--json").stdout.strip() == "[]"
        every = json.loads(vmfront("list", "--all", "--run-root", str(fleet.root), "--json").stdout)
        assert [(r["name"], r["state"], r["qemu_pid"], r["clients"]) for r in every] == [
            ("vm0", "shutdown", None, 0), ("vm1", "shutdown", None, 0)]
        again = vmfront("stop", "vm0", "--run-dir", str(runs[0].run_dir))
        assert again.returncode == 1 and "is not running" in again.stderr
        for run in runs:  # clean stops say so at INFO: no warnings for what needs no action (what QEMU itself
            # said at start depends on the host: nested KVM lacks CPU features QEMU asks for)
            warnings = [line for line in run.text().splitlines()
                        if (" WARNING " in line or " ERROR " in line) and "QEMU said:" not in line]
            assert not warnings, "\n".join(warnings)
            assert "core exiting, status 0" in run.text() and "client exiting, status 0" in run.text()


def test_a_taken_vnc_port_fails_run_at_once() -> None:
    with open_fleet() as fleet, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = RunProcess(fleet, "busy", "--vnc", f"127.0.0.1:{port}")
        # It ends on its own (the wait's timeout is the bound: no restart loop; "at once" is what the checks below
        # show: the client failed once and no QEMU was started, not a wall-clock figure on a shared machine).
        code = run.proc.wait(timeout=30)
        text = run.text()
        assert code != 0
        assert f"cannot listen on 127.0.0.1:{port}" in text and "Address already in use" in text, text
        assert "the client could not start" in text and "starting QEMU" not in text, text
        assert text.count("client exiting") == 1, "the client must not be started again"


def test_a_client_with_a_monitor_started_before_its_core_serves_once_it_comes() -> None:
    with open_fleet() as fleet:
        run_dir = fleet.root / "late" / "run"  # neither exists yet
        log = fleet.root / "client.log"
        with log.open("wb") as out:
            client = fleet.add(subprocess.Popen(client_command("late", run_dir, "--monitor"),
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT))
        monitor = run_dir / "monitor.sock"
        wait_for(lambda: "waiting for the core of VM 'late'" in log.read_text(), 15, "the client to wait")
        assert client.poll() is None and monitor.is_socket(), log.read_text()
        assert log.read_text().count("waiting for the core") == 1  # quietly: one line, not one per retry
        core = fleet.core("late", run_dir=run_dir)
        wait_for(lambda: core.state().get("clients"), 15, "the client to attach")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(monitor))
            out = b""
            sock.sendall(b"info status\n")
            while b"VM status" not in out or not out.endswith(b"(qemu) "):
                chunk = sock.recv(4096)
                assert chunk, out
                out += chunk
        assert b"VM status: running" in out


@root_only
def test_killing_the_core_under_run_starts_one_that_adopts_the_same_qemu() -> None:
    with open_fleet() as fleet:
        run = RunProcess(fleet, "adopt", "--vnc", f"127.0.0.1:{free_port()}")
        before = run.wait_up()
        os.kill(before["core_pid"], signal.SIGKILL)
        wait_for(lambda: run.state().get("core_pid") != before["core_pid"] and run.state().get("state") == "running",
                 60, "a new core to adopt QEMU")
        after = run.state()
        assert after["adopted"] is True and after["qemu_pid"] == before["qemu_pid"]
        assert pid_alive(before["qemu_pid"]) and run.proc.poll() is None
        assert f"the core (pid {before['core_pid']}) died (killed by SIGKILL) while QEMU pid {before['qemu_pid']} " \
               "runs; starting a core to adopt it" in run.text()
        wait_for(lambda: [c["pid"] for c in run.state().get("clients", [])] == [before["clients"][0]["pid"]], 15,
                 "the same client to re-attach to the new core")
        status = vmfront("status", "adopt", "--run-dir", str(run.run_dir))
        assert f"running (core pid {after['core_pid']})" in status.stdout
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=60) == 0, run.text()
        assert not pid_alive(before["qemu_pid"])


@root_only
def test_a_client_that_cannot_open_control_sock_says_why() -> None:
    with open_fleet() as fleet:
        core = fleet.core("closed", run_dir=fleet.root / "closed")  # no --client-group: the sockets stay root's
        log = fleet.root / "client.log"
        with log.open("wb") as out:
            client = fleet.add(subprocess.Popen(client_command("closed", core.run_dir, "--user", "vmfront"),
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT))
        control = core.run_dir / "control.sock"
        wait_for(lambda: f"cannot open {control}: permission denied" in log.read_text(), 15,
                 "the client to say why it cannot attach")
        text = log.read_text()
        assert "owner root (0), group root (0), mode 0660" in text and "--client-group" in text, text
        assert "runs as user vmfront" in text and "waiting for the core" not in text
        time.sleep(3)
        assert log.read_text().count("permission denied") == 1, "said once, not per retry"
        assert client.poll() is None


def test_vnc_display_number_listens_on_loopback() -> None:
    display = next(n for n in range(3, 90) if _port_free(5900 + n))
    with open_fleet() as fleet:
        log = fleet.root / "client.log"
        with log.open("wb") as out:
            fleet.add(subprocess.Popen(client_command("disp", fleet.root / "disp", "--vnc", f":{display}"),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT))
        wait_for(lambda: f"VNC: listening on 127.0.0.1:{5900 + display}" in log.read_text(), 15,
                 f"the client to listen on display {display}")
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{5900 + display}"], capture_output=True, text=True)
        assert listening.stdout.split()[3] == f"127.0.0.1:{5900 + display}", listening.stdout
        assert "not only on loopback" not in log.read_text()
    with open_fleet() as fleet:
        log = fleet.root / "client.log"
        port = free_port()
        with log.open("wb") as out:
            fleet.add(subprocess.Popen(client_command("pub", fleet.root / "pub", "--vnc", f"0.0.0.0:{port}"),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT))
        wait_for(lambda: f"VNC: listening on 0.0.0.0:{port}" in log.read_text(), 15, "the client to listen")
        assert f"VNC listens on 0.0.0.0:{port}, not only on loopback" in log.read_text()
    bad = vmfront("client", "--name", "x", "--run-dir", "/tmp/vmf-none", "--as-root", "--vnc", ":5901")
    assert bad.returncode == 1 and "for port 5901 write 127.0.0.1:5901" in bad.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_cli_manners() -> None:
    """-v anywhere, help for operators, status --json into a closed pipe, image formats, no reprs."""
    with open_fleet() as fleet:
        core = fleet.core("cli", run_dir=fleet.root / "cli")
        where = ["--run-dir", str(core.run_dir)]
        assert vmfront("status", "cli", "-v", *where).returncode == 0
        helped = vmfront("--help").stdout
        assert "vmfront run --name NAME" in helped and "Argument parsing" not in helped
        for verb in ("list", "stop", "kill", "console"):
            assert verb in helped
        piped = subprocess.run(["sh", "-c", f"{sys.executable} -m vmfront status cli --json --run-dir "
                                f"{core.run_dir} | head -1"], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert piped.returncode == 0 and piped.stdout == "{\n" and piped.stderr == "", piped.stderr
        closed = subprocess.Popen([*VMFRONT, "status", "cli", "--json", *where], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=ROOT)
        assert closed.stdout is not None and closed.stderr is not None
        closed.stdout.close()  # the reader is gone before a byte is written
        assert closed.wait(timeout=30) == 0
        assert closed.stderr.read() == b""
        for name, magic in (("s.jpg", b"\xff\xd8\xff"), ("s.png", b"\x89PNG"), ("s.ppm", b"P6")):
            dumped = vmfront("screendump", "cli", str(fleet.root / name), *where)
            assert dumped.returncode == 0, dumped.stderr
            assert (fleet.root / name).read_bytes().startswith(magic), name
        unknown = vmfront("screendump", "cli", str(fleet.root / "s.xyz"), *where)
        assert unknown.returncode == 1 and "unknown image format '.xyz'" in unknown.stderr
        no_agent = vmfront("agent", "cli", "--socket", str(fleet.root / "none.sock"), "ping")
        assert no_agent.returncode == 1 and "<" not in no_agent.stderr


def test_status_hides_a_dead_cores_clients() -> None:
    with open_fleet() as fleet:
        core = fleet.core("dead", run_dir=fleet.root / "dead")
        log = fleet.root / "client.log"
        with log.open("wb") as out:
            fleet.add(subprocess.Popen(client_command("dead", core.run_dir), stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=out, cwd=ROOT))
        wait_for(lambda: core.state().get("clients"), 15, "the client to attach")
        qemu = core.qemu_pid
        core.proc.send_signal(signal.SIGKILL)
        core.proc.wait(timeout=10)
        status = vmfront("status", "dead", "--run-dir", str(core.run_dir))
        assert "core not running" in status.stdout and "clients:" not in status.stdout, status.stdout
        assert json.loads(vmfront("status", "dead", "--json", "--run-dir", str(core.run_dir)).stdout)["clients"] == []
        row = json.loads(vmfront("list", "--run-root", str(fleet.root), "--json").stdout)[0]
        assert (row["state"], row["qemu_pid"], row["clients"]) == ("no core", qemu, 0)
        killed = vmfront("kill", "dead", "--run-dir", str(core.run_dir))  # no core: its QEMU is killed
        assert killed.returncode == 0 and f"no core; killing its QEMU pid {qemu}" in killed.stdout, killed.stderr
        wait_for(lambda: not pid_alive(qemu), 10, "the orphaned QEMU to be gone")
