"""Live migration between two real QEMUs under two cores; a client process follows the guest."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from corelib import Fleet, RawQmpPeer, wait_for
from test_client import ClientProcess, client_pids


def vmfront(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfront", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_migration_moves_the_guest_and_the_client_follows(tmp_path: Path) -> None:
    with Fleet() as fleet:
        src = fleet.core("src")
        dst = fleet.core("dst", "--incoming", "auto")
        src_run, dst_run = src.run_dir, dst.run_dir
        client = fleet.add(ClientProcess(src_run, "src"))
        watcher = fleet.add(RawQmpPeer(src.qmp_socket).negotiate())  # a management peer of the source
        assert dst.state()["state"] == "incoming"
        assert dst.state()["incoming"] == f"unix:{dst_run / 'private' / 'migration.sock'}"
        wait_for(lambda: client.pid in client_pids(src), 15, "the client to attach to the source")

        result = vmfront("migrate", "src", "--run-dir", str(src_run), "--to", "dst", "--dest-run-dir", str(dst_run))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("migrated src to dst")

        # The management peer saw the migration events, then the source core ended cleanly.
        statuses = []
        while True:
            try:
                message = watcher.recv()
            except (EOFError, ConnectionResetError):
                break
            if message.get("event") == "MIGRATION":
                statuses.append(message["data"]["status"])
        assert "completed" in statuses, statuses
        assert src.wait(timeout=30) == 0
        assert src.state()["state"] == "migrated"
        assert src.state()["migrated_to"] == f"ipc://{dst_run / 'control.sock'}"

        # The destination runs the guest; the client re-attached there and maps its display.
        wait_for(lambda: dst.state()["state"] == "running", 15, "the destination to run the guest")
        wait_for(lambda: client.pid in client_pids(dst), 15, "the client to follow the guest")
        shm = dst.state()["display"]["shm"]
        wait_for(lambda: f"display: mapped {shm} read-only" in client.text(), 10, "the client to map the new display")
        assert client.proc.poll() is None
        dump = vmfront("screendump", "dst", str(tmp_path / "after.png"), "--run-dir", str(dst_run))
        assert dump.returncode == 0, dump.stderr


def test_failed_migration_leaves_the_source_running() -> None:
    with Fleet() as fleet:
        root = fleet.root
        src = fleet.core("keep", run_dir=root / "src")
        result = vmfront("migrate", "keep", "--run-dir", str(root / "src"), "--to", f"unix:{root}/nobody-listens",
                         "-q")
        assert result.returncode == 1 and "vmfront migrate: error:" in result.stderr
        peer = fleet.add(RawQmpPeer(src.qmp_socket).negotiate())
        assert peer.execute("query-status")["return"]["status"] == "running"
        wait_for(lambda: src.state()["state"] == "running", 10, "the source to report running")
        refused = vmfront("migrate", "keep", "--run-dir", str(root / "src"), "--to", "ghost",
                          "--dest-run-dir", str(root / "ghost"))
        assert refused.returncode == 1 and "is not waiting for an incoming migration" in refused.stderr


def test_savevm_is_not_mistaken_for_a_migration() -> None:
    """Snapshot jobs emit MIGRATION events too: the core must not end the VM because of them."""
    with Fleet() as fleet:
        image = fleet.root / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True, timeout=30)
        core = fleet.core("snap", qemu_args=["-machine", "pc", "-m", "16",
                                             "-drive", f"file={image},format=qcow2,if=ide"])
        peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
        reply = peer.execute("human-monitor-command", arguments={"command-line": "savevm s1"})
        assert reply == {"return": ""}, reply
        time.sleep(1)
        assert core.proc.poll() is None, "the core ended the VM after a savevm"
        assert peer.execute("query-status")["return"]["status"] == "running"
        assert core.state()["state"] == "running"
