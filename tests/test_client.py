"""The client process against a real core and QEMU: kills, core restarts, broadcasts, policy, privilege drop."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import (
    CoreProcess,
    Fleet,
    LoggedProcess,
    RawQmpPeer,
    client_command,
    fd_count,
    kill_pid,
    running_core,
    short_tmpdir,
    spawn_core,
    wait_for,
)

from ipc.channel import ClientChannel, RemoteError, ipc_endpoint
from ipc.messages import InputOp, KeyEvent, RunStateChanged


class ClientProcess(LoggedProcess):
    def __init__(self, core_or_dir: CoreProcess | Path, name: str, *extra: str, log: Path | None = None) -> None:
        run_dir = core_or_dir.run_dir if isinstance(core_or_dir, CoreProcess) else core_or_dir
        self.log = log or run_dir.parent / f"client-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(client_command(name, run_dir, *extra), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out)



def client_pids(core: CoreProcess) -> list[int]:
    return [c["pid"] for c in core.state().get("clients", [])]


def shm_count(core: CoreProcess) -> int:
    """This core's segments only: other cores (even of a VM with the same name) may come and go meanwhile."""
    return sum(name.startswith(f"vmfront.{core.name}.{core.pid}.") for name in os.listdir("/dev/shm"))


@pytest.fixture
def core() -> Iterator[CoreProcess]:
    with running_core("cl") as running:
        yield running


@pytest.mark.slow
def test_client_killed_20_times_disturbs_nothing(core: CoreProcess) -> None:
    peer = RawQmpPeer(core.qmp_socket).negotiate()
    first = ClientProcess(core, "cl")
    try:
        wait_for(lambda: first.pid in client_pids(core), 10, "the first client to attach")
        fds_before, shm_before = fd_count(core.pid), shm_count(core)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        noticed = []
        for _ in range(20):
            client = ClientProcess(core, "cl")
            try:
                attach_time = wait_for(lambda c=client: c.pid in client_pids(core), 10, "a new client to attach")  # type: ignore[misc]
                # The guest and QMP peers never notice.
                status = peer.execute("query-status")
                assert status["return"]["status"] == "running", status
                client.proc.send_signal(signal.SIGKILL)
                client.proc.wait(timeout=10)
                noticed.append(wait_for(lambda c=client: c.pid not in client_pids(core), 5,  # type: ignore[misc]
                                        "the core to notice the killed client"))
            finally:
                client.stop()
        assert max(noticed) < 3.0, f"core noticed a killed client only after {max(noticed):.2f} s"
        assert attach_time < 5.0
        assert peer.execute("query-status")["return"]["status"] == "running"
        # Nothing leaks in the core: file descriptors and shared-memory segments are back where they were.
        wait_for(lambda: fd_count(core.pid) <= fds_before, 5, f"core fds back to {fds_before}")
        assert shm_count(core) == shm_before
    finally:
        first.stop()
        peer.close()


def test_client_follows_a_core_restart() -> None:
    with Fleet() as fleet:
        run = fleet.root / "run"
        core = fleet.core("rs", run_dir=run)
        client = fleet.add(ClientProcess(run, "rs"))
        wait_for(lambda: client.pid in client_pids(core), 10, "the client to attach")
        assert core.stop() == 0
        wait_for(lambda: "core gone" in client.text(), 10, "the client to notice the core went")
        assert client.proc.poll() is None, "the client must outlive its core"
        core = fleet.core("rs", run_dir=run)
        wait_for(lambda: client.pid in client_pids(core), 15, "the client to re-attach to the new core")
        new_shm = core.state()["display"]["shm"]
        wait_for(lambda: f"display: mapped {new_shm} read-only" in client.text(), 10,
                 "the client to map the new core's display")
        assert "attached to the core of VM 'rs'" in client.text() and " again" in client.text()


async def test_two_clients_get_broadcasts_and_policy_applies(core: CoreProcess) -> None:
    """Channel-level clients (the same class the client process uses) on the real core's control.sock."""
    endpoint = ipc_endpoint(core.run_dir / "control.sock")
    states: list[list[str]] = [[], []]
    channels = [ClientChannel(endpoint, name=f"test-{i}",
                              on_event=lambda body, i=i: states[i].append(body.state)  # type: ignore[misc]
                              if isinstance(body, RunStateChanged) else None) for i in range(2)]
    try:
        for channel in channels:
            welcome = await channel.connect(timeout_s=10)
            assert welcome.vm == "cl" and welcome.shm == core.state()["display"]["shm"]
        # state.json is updated by the core as each attach is processed: give it a moment.
        deadline = time.monotonic() + 10
        while len(client_pids(core)) != 2:
            assert time.monotonic() < deadline, f"state.json clients: {client_pids(core)}"
            await asyncio.sleep(0.05)
        assert (await channels[0].qmp("query-status"))["status"] == "running"
        with pytest.raises(RemoteError) as denied:
            await channels[1].qmp("human-monitor-command", {"command-line": "info status"})
        assert "command 'human-monitor-command' is denied by vmfront policy on socket 'client'" in str(denied.value)
        await channels[0].qmp("stop")
        await channels[1].qmp("cont")
        deadline = time.monotonic() + 10
        while not all("paused" in s and "running" in s for s in states):
            assert time.monotonic() < deadline, f"broadcasts missing: {states}"
            await asyncio.sleep(0.05)
        # Input through the control channel reaches QEMU (it accepts the keys).
        await channels[0].request(InputOp((KeyEvent(True, qcode="a"), KeyEvent(False, qcode="a"))))
    finally:
        for channel in channels:
            await channel.close()


def test_privilege_drop_to_nobody(core: CoreProcess) -> None:
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    # The core must let the client group in: restart it with --client-group.
    core.stop()
    kill_pid(core.qemu_pid)
    group = str(nobody.pw_gid)
    os.chmod(core.run_dir.parent, 0o755)  # mkdtemp made it 0700: the client's user must reach the run dir
    restarted = spawn_core("cl", core.run_dir, "--client-group", group)
    client = ClientProcess(restarted, "cl", "--user", "nobody")
    try:
        wait_for(lambda: client.pid in client_pids(restarted), 15, "the unprivileged client to attach")
        status = Path(f"/proc/{client.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
        assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4, uid_line
        assert gid_line.split()[1:] == [str(nobody.pw_gid)] * 4, gid_line
        assert "dropped privileges to nobody" in client.text()
        shm = restarted.state()["display"]["shm"]
        wait_for(lambda: f"display: mapped {shm} read-only" in client.text(), 10, "the client to map the display")
        # As that user, the core's private sockets and the management QMP socket are out of reach.
        targets = [restarted.run_dir / "private" / "qmp.sock", restarted.run_dir / "private" / "vnc.sock",
                   restarted.qmp_socket]
        script = (
            "import os, socket, sys\n"
            "os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]))\n"
            "for path in sys.argv[3:]:\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            "        s.connect(path); print('OPEN', path)\n"
            "    except PermissionError:\n"
            "        print('DENIED', path)\n")
        probe = subprocess.run([sys.executable, "-c", script, str(nobody.pw_uid), str(nobody.pw_gid),
                                *map(str, targets)], capture_output=True, text=True, timeout=30)
        assert probe.stdout.splitlines() == [f"DENIED {p}" for p in targets], probe.stdout + probe.stderr
    finally:
        client.stop()
        restarted.stop()
        kill_pid(restarted.state().get("qemu_pid"))


def test_client_waits_for_a_core_that_is_not_there_yet() -> None:
    root = short_tmpdir()
    run = root / "run"
    run.mkdir()
    client = ClientProcess(run, "late")
    core = None
    try:
        wait_for(lambda: "waiting for the core of VM 'late'" in client.text(), 15, "the client to say it is waiting")
        core = spawn_core("late", run)
        wait_for(lambda: client.pid in client_pids(core), 15, "the client to attach once the core is up")
    finally:
        client.stop()
        if core is not None:
            qemu = core.state().get("qemu_pid")
            core.stop()
            kill_pid(qemu)
        subprocess.run(["rm", "-rf", str(root)], check=False)



