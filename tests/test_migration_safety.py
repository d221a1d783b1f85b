"""Migration that can never split the brain, against real QEMU 7.2 (two demo guests under two cores on this host):
cores killed mid-way on either side, a second migration during the first, postcopy, plain-QMP migration from a
management peer, and clients (``vmfront client``, ``vmfront run``, one restarted after the move) that end
attached to wherever the guest runs.

Throughout every test, :class:`SplitBrainWatch` polls both cores' QMP sockets: at no moment may both QEMUs be
``running``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, kill_pid, pid_alive, wait_for
from guestlib import is_demo_text_screen, text_row
from PIL import ImageChops
from test_client import ClientProcess, client_pids
from test_migration_e2e import Viewer, screendump, set_bandwidth, vmfront, wait_migration_status
from vnclib import ROOT, VncClientProcess, free_port

BANDWIDTH = 256 << 10  # bytes/s: a few seconds for the demo guest's RAM that is not zero


class SplitBrainWatch:
    """Polls ``query-status`` on every run dir's management socket, the destination first: if it runs and the
    source is then seen running too, both ran at that moment (a source never resumes after its guest left)."""

    def __init__(self, *run_dirs: Path) -> None:
        self.run_dirs = run_dirs
        self.both_running: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._peers: dict[Path, RawQmpPeer | None] = dict.fromkeys(run_dirs)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _status(self, run_dir: Path) -> str | None:
        peer = self._peers[run_dir]
        try:
            if peer is None:
                peer = self._peers[run_dir] = RawQmpPeer(run_dir / "qmp.sock", timeout=2).negotiate()
            return str(peer.execute("query-status")["return"]["status"])
        except (OSError, EOFError, ValueError, KeyError, AssertionError):
            if peer is not None:
                peer.close()
            self._peers[run_dir] = None
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            statuses = [self._status(run_dir) for run_dir in reversed(self.run_dirs)]
            self.polls += 1
            if statuses.count("running") > 1:
                self.both_running.append(f"{time.monotonic():.3f}: {statuses}")
            time.sleep(0.03)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for peer in self._peers.values():
            if peer is not None:
                peer.close()
        assert self.polls > 10, "the watch did not poll"
        assert not self.both_running, f"two QEMUs of the VM ran at once: {self.both_running[:5]}"


@dataclass
class Vms:
    fleet: Fleet
    src: CoreProcess
    dst: CoreProcess

    @property
    def root(self) -> Path:
        return self.fleet.root


@pytest.fixture
def vms() -> Iterator[Vms]:
    with Fleet() as fleet:
        src = fleet.core("src")
        dst = fleet.core("dst", "--incoming", "auto")
        wait_for(lambda: is_demo_text_screen(screendump("src", src.run_dir, fleet.root / "boot.png")), 30,
                 "the demo guest to boot")
        yield Vms(fleet, src, dst)


def start_migrate(src: Path, dst: Path, dst_name: str = "dst") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmfront", "migrate", "src", "--run-dir", str(src),
                             "--to", dst_name, "--dest-run-dir", str(dst), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def slow_migration_under_way(vms: Vms, watcher: RawQmpPeer) -> subprocess.Popen[str]:
    set_bandwidth(watcher, BANDWIDTH)
    migrate = vms.fleet.add(start_migrate(vms.src.run_dir, vms.dst.run_dir))
    wait_migration_status(watcher, {"active"}, 20)
    return migrate


def restart_core(vms: Vms, core: CoreProcess, *extra: str) -> CoreProcess:
    """What a service manager does after a crash: start the same core again (it adopts its QEMU)."""
    return vms.fleet.core(core.name, *extra, run_dir=core.run_dir)


def test_source_core_killed_mid_migration(vms: Vms) -> None:
    """Core A dies during the migration; QEMU A completes it anyway. The restarted core A adopts a QEMU whose
    guest has left: it says so, sends its clients to B, and refuses to run the stale source again."""
    watch = SplitBrainWatch(vms.src.run_dir, vms.dst.run_dir)
    client = vms.fleet.add(ClientProcess(vms.src, "src"))
    try:
        wait_for(lambda: client.pid in client_pids(vms.src), 15, "the client to attach to A")
        watcher = vms.fleet.add(RawQmpPeer(vms.src.qmp_socket).negotiate())
        migrate = slow_migration_under_way(vms, watcher)
        assert vms.src.state()["outgoing"]["control"] == f"ipc://{vms.dst.run_dir / 'control.sock'}"
        qemu_a = vms.src.qemu_pid
        vms.src.proc.kill()
        vms.src.wait(timeout=10)
        _, err = migrate.communicate(timeout=30)
        assert migrate.returncode == 1 and "the source core went away" in err, err
        wait_for(lambda: vms.dst.state()["state"] == "running", 60, "the guest to run on B")
        assert pid_alive(qemu_a)

        again = restart_core(vms, vms.src)
        state = again.state()
        assert state["qemu_pid"] == qemu_a and state["state"] == "migrated", state
        assert state["migrated_to"] == f"ipc://{vms.dst.run_dir / 'control.sock'}"
        wait_for(lambda: client.pid in client_pids(vms.dst), 20, "the client to follow the guest to B")
        peer = vms.fleet.add(RawQmpPeer(again.qmp_socket).negotiate())
        for command in ("cont", "system_reset"):
            refused = peer.execute(command)
            assert "the guest has migrated to" in refused["error"]["desc"], refused
        assert peer.execute("query-status")["return"]["status"] == "postmigrate"
    finally:
        watch.close()


def test_destination_core_killed_mid_migration(vms: Vms) -> None:
    """Core B dies during the migration; QEMU B receives the guest anyway. `vmfront migrate` says the guest runs
    unsupervised on B (and exits 2); a restarted core B adopts the running guest, and clients reach it."""
    watch = SplitBrainWatch(vms.src.run_dir, vms.dst.run_dir)
    client = vms.fleet.add(ClientProcess(vms.src, "src"))
    try:
        wait_for(lambda: client.pid in client_pids(vms.src), 15, "the client to attach to A")
        watcher = vms.fleet.add(RawQmpPeer(vms.src.qmp_socket).negotiate())
        migrate = slow_migration_under_way(vms, watcher)
        qemu_b = vms.dst.qemu_pid
        vms.dst.proc.kill()
        vms.dst.wait(timeout=10)
        out, err = migrate.communicate(timeout=60)
        assert migrate.returncode == 2, (out, err)
        assert "the guest runs on the destination" in err and "its core" in err and "is gone" in err, err
        assert pid_alive(qemu_b)

        again = restart_core(vms, vms.dst)
        try:
            wait_for(lambda: again.state()["state"] == "running", 15, "the restarted core B to report running")
        except AssertionError:
            raise AssertionError(f"{again.state()}\n{again.stderr()[-4000:]}") from None
        assert again.state()["qemu_pid"] == qemu_b and again.state()["adopted"] is True
        wait_for(lambda: client.pid in client_pids(again), 20, "the client to reach the guest on B")
    finally:
        watch.close()


def test_destination_core_restarted_while_waiting(vms: Vms) -> None:
    """B's core is killed while its QEMU waits; the restarted core keeps waiting on the recorded URI, so the
    migration still works."""
    incoming = vms.dst.state()["incoming"]
    qemu_b = vms.dst.qemu_pid
    vms.dst.proc.kill()
    vms.dst.wait(timeout=10)
    again = restart_core(vms, vms.dst, "--incoming", "auto")
    state = again.state()
    assert state["state"] == "incoming" and state["incoming"] == incoming and state["qemu_pid"] == qemu_b, state
    watch = SplitBrainWatch(vms.src.run_dir, vms.dst.run_dir)
    try:
        result = vmfront("migrate", "src", "--run-dir", str(vms.src.run_dir), "--to", "dst", "--dest-run-dir",
                         str(vms.dst.run_dir))
        assert result.returncode == 0, result.stderr
        wait_for(lambda: again.state()["state"] == "running", 15, "the guest to run on B")
    finally:
        watch.close()


def test_a_second_migration_while_one_runs_is_refused(vms: Vms) -> None:
    """A third core C waits too; `vmfront migrate src --to C` during the slow migration to B is refused before
    anything changes: clients follow the guest to B, and state.json points there."""
    third = vms.fleet.core("third", "--incoming", "auto")
    watch = SplitBrainWatch(vms.src.run_dir, vms.dst.run_dir)
    client = vms.fleet.add(ClientProcess(vms.src, "src"))
    try:
        wait_for(lambda: client.pid in client_pids(vms.src), 15, "the client to attach to A")
        watcher = vms.fleet.add(RawQmpPeer(vms.src.qmp_socket).negotiate())
        first = slow_migration_under_way(vms, watcher)
        second = vmfront("migrate", "src", "--run-dir", str(vms.src.run_dir), "--to", "third", "--dest-run-dir",
                         str(third.run_dir))
        assert second.returncode == 1 and "already in progress" in second.stderr, second.stderr
        set_bandwidth(watcher, 1 << 30)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert vms.src.state()["migrated_to"] == f"ipc://{vms.dst.run_dir / 'control.sock'}"
        wait_for(lambda: client.pid in client_pids(vms.dst), 20, "the client to follow the guest to B")
        assert third.state()["state"] == "incoming"
    finally:
        watch.close()


def test_a_client_started_after_the_migration_finds_the_guest(vms: Vms) -> None:
    watch = SplitBrainWatch(vms.src.run_dir, vms.dst.run_dir)
    try:
        result = vmfront("migrate", "src", "--run-dir", str(vms.src.run_dir), "--to", "dst", "--dest-run-dir",
                         str(vms.dst.run_dir))
        assert result.returncode == 0, result.stderr
        assert vms.src.wait(timeout=30) == 0 and vms.src.state()["state"] == "migrated"
        client = vms.fleet.add(ClientProcess(vms.src.run_dir, "src"))
        wait_for(lambda: client.pid in client_pids(vms.dst), 20, "a new client of 'src' to attach to B")
        assert "migrated to the core at" in client.text()
    finally:
        watch.close()


def test_unanswering_qemu_is_never_joined_by_a_second_one(vms: Vms) -> None:
    """QEMU stopped (SIGSTOP: it answers nothing) and its core killed: a new core cannot adopt it within its
    start timeout; it exits 5 leaving QEMU alone (state 'unsupervised'), never starting another. Once QEMU
    answers again, the next core adopts it."""
    qemu = vms.src.qemu_pid
    vms.src.proc.kill()
    vms.src.wait(timeout=10)
    import os

    os.kill(qemu, signal.SIGSTOP)
    try:
        result = subprocess.run([sys.executable, "-m", "vmfront", "core", "--name", "src", "--run-dir",
                                 str(vms.src.run_dir), "--start-timeout", "3"], capture_output=True, text=True,
                                timeout=60, cwd=ROOT)
        assert result.returncode == 5, result.stderr
        state = vms.src.state()
        assert state["state"] == "unsupervised" and state["qemu_pid"] == qemu, state
        found = subprocess.run(["pgrep", "-f", f"path={vms.src.run_dir}/private/qmp.sock"], capture_output=True,
                               text=True).stdout.split()
        assert [int(pid) for pid in found] == [qemu]
    finally:
        os.kill(qemu, signal.SIGCONT)
    again = restart_core(vms, vms.src)
    assert again.state()["qemu_pid"] == qemu and again.state()["adopted"] is True


def test_plain_qmp_migration_is_followed(vms: Vms) -> None:
    """A management peer migrates with plain QMP, as libvirt-style tools do: `migrate` to B's URI, then polls
    `query-migrate` until `completed`, and never sees EOF (the source lingers, as QEMU does). The source core
    finds B from the URI, so its client follows: a viewer connected through it stays connected, its captures
    equal B's screendump, and its keys reach B's guest. The source ends after the linger period."""
    from qemu.qmp import QMPClient

    src = vms.fleet.core("psrc", "--migrated-linger", "3")
    wait_for(lambda: is_demo_text_screen(screendump("psrc", src.run_dir, vms.root / "pboot.png")), 30, "boot")
    port = free_port()
    client = vms.fleet.add(VncClientProcess(src.run_dir, "psrc", port))
    viewer = vms.fleet.add(Viewer(port))
    watch = SplitBrainWatch(src.run_dir, vms.dst.run_dir)
    uri = vms.dst.state()["incoming"]

    async def migrate() -> list[str]:
        qmp = QMPClient("libvirt-style")
        await qmp.connect(str(src.qmp_socket))
        seen: list[str] = []
        try:
            await qmp.execute("migrate", {"uri": uri})
            for _ in range(600):
                info = await qmp.execute("query-migrate")
                seen.append(str(info.get("status")))
                if info.get("status") == "completed":
                    # Still there after completion: the source answers as QEMU does.
                    assert (await qmp.execute("query-status"))["status"] == "postmigrate"
                    return seen
                await asyncio.sleep(0.1)
            raise AssertionError(f"no completion: {seen[-5:]}")
        finally:
            await qmp.disconnect()

    try:
        statuses = asyncio.run(migrate())
        assert statuses[-1] == "completed"
        wait_for(lambda: client.pid in client_pids(vms.dst), 20, "the client to follow the guest to B")
        peer_b = vms.fleet.add(RawQmpPeer(vms.dst.qmp_socket).negotiate())
        viewer.command("keys q")
        wait_for(lambda: text_row(peer_b, 4, vms.root) == "KEYS: q", 15, "the viewer's key on B's guest")
        assert "return" in peer_b.execute("stop")
        time.sleep(0.5)
        capture = viewer.capture(vms.root / "after.png")
        dump = screendump("dst", vms.dst.run_dir, vms.root / "dst.png")
        assert capture.size == dump.size and ImageChops.difference(capture, dump).getbbox() is None
        assert "return" in peer_b.execute("cont")
    finally:
        watch.close()
    # Nobody is connected to the source any more (the watch was its last QMP peer): it ends after the linger
    # period, as migrated.
    assert src.wait(timeout=30) == 0
    assert src.state()["state"] == "migrated"


def test_run_keeps_its_client_across_the_migration(vms: Vms) -> None:
    """`vmfront run` started the source; after `vmfront migrate` its client is attached to B and is the same
    process; a client run restarts after that attaches to B too."""
    port = free_port()
    run = vms.fleet.add(subprocess.Popen(
        [sys.executable, "-m", "vmfront", "run", "--name", "rs", "--run-dir", str(vms.root / "rs"), "--client-as-root",
         "--vnc", f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=ROOT))
    run_dir = vms.root / "rs"
    wait_for(lambda: (run_dir / "state.json").exists() and RunState(run_dir).get("clients"), 60, "run to start")
    first_client = RunState(run_dir)["clients"][0]["pid"]
    wait_for(lambda: is_demo_text_screen(screendump("rs", run_dir, vms.root / "rboot.png")), 30, "boot")
    result = vmfront("migrate", "rs", "--run-dir", str(run_dir), "--to", "dst", "--dest-run-dir",
                     str(vms.dst.run_dir))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: first_client in client_pids(vms.dst), 20, "run's client to follow the guest to B")
    source_core = RunState(run_dir)["core_pid"]
    assert isinstance(source_core, int)
    wait_for(lambda: not pid_alive(source_core), 30, "the source core to end (vmfront migrate quits it)")
    time.sleep(1.0)
    assert run.poll() is None, "vmfront run ended with its VM's migration"
    kill_pid(first_client)
    wait_for(lambda: any(pid != first_client for pid in client_pids(vms.dst)), 30,
             "the client run restarts to attach to B")


class RunState(dict[str, object]):
    """state.json of a run dir, read once."""

    def __init__(self, run_dir: Path) -> None:
        import json

        with contextlib.suppress(OSError, ValueError):
            super().__init__(json.loads((run_dir / "state.json").read_text()))


def test_postcopy_clients_switch_when_the_guest_runs_on_the_destination(vms: Vms) -> None:
    """With postcopy, the guest runs on B from `postcopy-active` on, while pages still come from A: clients move
    then, not at `completed`. A viewer connected through the source's client shows B's screen and its keys reach
    B's guest during postcopy-active; the source refuses input from then on."""
    from guestlib import TEXT_BOXES, crop

    port = free_port()
    client = vms.fleet.add(VncClientProcess(vms.src.run_dir, "src", port))
    viewer = vms.fleet.add(Viewer(port))
    watch = SplitBrainWatch(vms.src.run_dir, vms.dst.run_dir)
    try:
        peer_a = vms.fleet.add(RawQmpPeer(vms.src.qmp_socket).negotiate())
        peer_b = vms.fleet.add(RawQmpPeer(vms.dst.qmp_socket).negotiate())
        for peer in (peer_a, peer_b):
            reply = peer.execute("migrate-set-capabilities",
                                 arguments={"capabilities": [{"capability": "postcopy-ram", "state": True}]})
            assert reply == {"return": {}}, reply
        reply = peer_a.execute("migrate-set-parameters",
                               arguments={"max-bandwidth": BANDWIDTH, "max-postcopy-bandwidth": 64 << 10})
        assert reply == {"return": {}}, reply
        migrate = vms.fleet.add(start_migrate(vms.src.run_dir, vms.dst.run_dir))
        wait_migration_status(peer_a, {"active"}, 20)
        assert peer_a.execute("migrate-start-postcopy") == {"return": {}}
        wait_migration_status(peer_a, {"postcopy-active"}, 20)
        wait_for(lambda: client.pid in client_pids(vms.dst), 15, "the client to move at postcopy-active")
        assert peer_a.execute("query-migrate")["return"]["status"] == "postcopy-active", "postcopy ended too soon"
        viewer.command("keys p")
        wait_for(lambda: text_row(peer_b, 4, vms.root) == "KEYS: p", 20, "the viewer's key on B's guest")
        wait_for(lambda: crop(viewer.capture(vms.root / "v.png"), TEXT_BOXES["keys"])
                 == crop(screendump("dst", vms.dst.run_dir, vms.root / "b.png"), TEXT_BOXES["keys"]), 15,
                 "the viewer to show B's screen")
        assert peer_a.execute("query-migrate")["return"]["status"] in ("postcopy-active", "completed")
        _, err = migrate.communicate(timeout=120)
        assert migrate.returncode == 0, err
        assert text_row(peer_b, 4, vms.root) == "KEYS: p"
    finally:
        watch.close()


def test_a_mismatch_is_refused_with_the_difference_and_a_failure_says_why(vms: Vms) -> None:
    """B has a guest-agent port A lacks: `vmfront migrate` refuses, naming the difference. Forced (--no-check),
    QEMU fails the migration; the reason, which only B's QEMU knows, reaches `vmfront migrate` and A's state.json;
    the guest runs on in A."""
    odd = vms.fleet.core("odd", "--incoming", "auto", "--agent")
    refused = vmfront("migrate", "src", "--run-dir", str(vms.src.run_dir), "--to", "odd", "--dest-run-dir",
                      str(odd.run_dir))
    assert refused.returncode == 1, refused.stderr
    assert "not started with the same machine and devices" in refused.stderr
    assert "+virtserialport,bus=vmfront-vserial.0" in refused.stderr, refused.stderr
    forced = vmfront("migrate", "src", "--run-dir", str(vms.src.run_dir), "--to", "odd", "--dest-run-dir",
                     str(odd.run_dir), "--no-check")
    assert forced.returncode == 1
    assert "the destination said:" in forced.stderr and "load of migration failed" in forced.stderr, forced.stderr
    wait_for(lambda: (vms.src.state().get("last_migration") or {}).get("destination_error"), 10,
             "the reason in the source's state.json")
    assert vms.src.state()["state"] == "running"


def test_the_vm_keeps_its_name_after_migrating(vms: Vms) -> None:
    """After `vmfront migrate src --to dst`, both names reach the guest's client: `vmfront monitor`/`agent` of
    either name find the client's sockets where the guest runs now, and `status src` says where it went."""
    from test_monitor import Monitor

    client = vms.fleet.add(ClientProcess(vms.src, "src", "--monitor"))
    wait_for(lambda: (vms.src.run_dir / "monitor.sock").exists(), 15, "the monitor socket")
    result = vmfront("migrate", "src", "--run-dir", str(vms.src.run_dir), "--to", "dst", "--dest-run-dir",
                     str(vms.dst.run_dir))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: client.pid in client_pids(vms.dst), 20, "the client to follow")
    for name, run_dir in (("src", vms.src.run_dir), ("dst", vms.dst.run_dir)):
        session = subprocess.run([sys.executable, "-m", "vmfront", "monitor", name, "--run-dir", str(run_dir)],
                                 input="info status\n", capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert "VM status: running" in session.stdout, (name, session.stdout, session.stderr)
    status = vmfront("status", "src", "--run-dir", str(vms.src.run_dir))
    assert f"migrated:  to ipc://{vms.dst.run_dir / 'control.sock'}" in status.stdout, status.stdout
    del Monitor
