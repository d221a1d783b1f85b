"""The slower tier of the guest-agent tests: a real Linux guest under QEMU, with the real qemu-ga inside it on the
virtio-serial port ``org.qemu.guest_agent.0`` that ``vmfront core --agent`` adds. Nothing host-run stands in for
the agent here: the bytes cross QEMU's virtio-serial device and the guest kernel's virtio_console driver.

The guest is Debian's stock kernel with a busybox initramfs holding the host's qemu-ga (``tests/linux_guest/``,
built by install.sh and cached). It boots under TCG by default: the nested KVM of the machines this runs on offers
a CPUID (no SSE3) on which the Debian kernel stops after its real-mode setup; ``VMFRONT_TEST_LINUX_ACCEL=kvm``
picks KVM where it works. A boot takes ~10 s under TCG, so one guest serves the module's first tests and the
migration test boots its own.

Every process is ended by its pid, every wait has a timeout, run dirs are short mkdtemp dirs under /tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, short_tmpdir, wait_for
from PIL import Image
from test_agent_client import qga_script
from test_client import ClientProcess, client_pids
from test_migration_e2e import agent_call, set_bandwidth, wait_migration_status
from test_rfb_hextile import assert_same_as_reference, guest_screen
from vnclib import ROOT, free_port, vncdo

pytestmark = [pytest.mark.linux_guest, pytest.mark.timeout(400)]  # a boot under TCG, then the test itself

BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine; ~10 s when quiet


@dataclass(frozen=True)
class LinuxGuestImage:
    kernel: Path
    initrd: Path
    release: str

    def qemu_args(self, console: Path, memory_mib: int = 160) -> list[str]:
        """The guest's QEMU options (the core adds -nodefaults, its QMP, VNC and agent sockets)."""
        return ["-accel", os.environ.get("VMFRONT_TEST_LINUX_ACCEL", "tcg"), "-m", str(memory_mib), "-vga", "std",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", "console=ttyS0 panic=-1", "-serial", f"file:{console}", "-no-reboot"]


@pytest.fixture(scope="module")
def image() -> LinuxGuestImage:
    return build_image()


def build_image() -> LinuxGuestImage:
    """The cached build (install.sh made it); built here if missing, which needs Debian's package mirror."""
    built = subprocess.run([str(ROOT / "tests" / "linux_guest" / "build.sh")], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, f"building the Linux test guest failed:\n{built.stderr}"
    out = Path(built.stdout.strip().splitlines()[-1])
    return LinuxGuestImage(out / "vmlinuz", out / "initrd.img", (out / "kernel-release").read_text().strip())


def vmfront_agent(run_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfront", "agent", run_dir.name, "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def agent_json(run_dir: Path, *args: str) -> Any:
    result = vmfront_agent(run_dir, *args)
    assert result.returncode == 0, f"vmfront agent {' '.join(args)}: {result.stderr}"
    return json.loads(result.stdout)


def guest_sh(run_dir: Path, script: str) -> str:
    """Run a shell script in the guest (guest-exec through the client); its stdout."""
    result = vmfront_agent(run_dir, "exec", "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, f"{script!r} in the guest: exit {result.returncode}, {result.stderr}"
    return result.stdout


def wait_agent_ready(run_dir: Path, console: Path, within: float = BOOT_TIMEOUT) -> None:
    """Until the guest's qemu-ga answers a ping (the guest booted, the client resynchronised with it)."""
    deadline = time.monotonic() + within
    while True:
        if vmfront_agent(run_dir, "--timeout", "3", "ping").returncode == 0:
            return
        if time.monotonic() > deadline:
            text = console.read_text(errors="replace") if console.exists() else "(no console output)"
            raise AssertionError(f"the guest's agent did not answer within {within} s; console:\n{text[-3000:]}")
        time.sleep(0.5)


@dataclass
class BootedGuest:
    core: CoreProcess
    console: Path
    vnc_port: int
    client: ClientProcess | None = None

    def start_client(self) -> ClientProcess:
        """The client, serving VNC as an operator's would (and the agent proxy, by default)."""
        self.client = ClientProcess(self.core, "lg", "--vnc", f"127.0.0.1:{self.vnc_port}")
        return self.client

    @property
    def run_dir(self) -> Path:
        return self.core.run_dir

    def console_text(self) -> str:
        return self.console.read_text(errors="replace")

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()


@pytest.fixture(scope="module")
def guest(image: LinuxGuestImage) -> Iterator[BootedGuest]:
    with Fleet() as fleet:
        console = fleet.root / "console.log"
        core = fleet.core("lg", "--agent", qemu_args=image.qemu_args(console))
        booted = fleet.add(BootedGuest(core, console, free_port()))  # ends whichever client it has by then
        booted.start_client()
        wait_agent_ready(core.run_dir, console)
        yield booted


def qemu_ga_pid(run_dir: Path) -> int:
    """The pid, inside the guest, of the qemu-ga answering: the parent of the shell it execs."""
    return int(guest_sh(run_dir, "echo $PPID"))


# --- the tests -------------------------------------------------------------------------------------------------


def test_commands_answered_by_the_agent_inside_the_guest(guest: BootedGuest, image: LinuxGuestImage) -> None:
    run_dir = guest.run_dir
    assert agent_json(run_dir, "ping") == {}
    info = agent_json(run_dir, "info")
    assert any(c["name"] == "guest-exec" and c["enabled"] for c in info["supported_commands"])
    # The guest's own kernel and os-release, not the host's.
    osinfo = agent_json(run_dir, "osinfo")
    assert osinfo["id"] == "vmfront-test-guest" and osinfo["kernel-release"] == image.release, osinfo
    assert agent_json(run_dir, "guest-get-host-name") == {"host-name": "vmfront-guest"}
    assert guest_sh(run_dir, "uname -r").strip() == image.release
    assert "virtio_console" in guest_sh(run_dir, "cat /proc/modules")
    # The guest clock is the host's (kvmclock or the RTC it booted from), give or take the boot.
    assert abs(agent_json(run_dir, "time") / 1e9 - time.time()) < 120
    assert agent_json(run_dir, "guest-fsfreeze-status") == "thawed"
    interfaces = agent_json(run_dir, "guest-network-get-interfaces")
    assert [i["name"] for i in interfaces] == ["lo"], interfaces
    # Exit status, stdout and stderr of a guest command, as the CLI's own.
    ex = vmfront_agent(run_dir, "exec", "--", "/bin/sh", "-c", "echo out-$((6*7)); echo err >&2; exit 3")
    assert (ex.returncode, ex.stdout, ex.stderr) == (3, "out-42\n", "err\n"), ex
    bad = vmfront_agent(run_dir, "guest-file-open", '{"path": "/nonexistent/x", "mode": "r"}')
    assert bad.returncode == 1 and "vmfront agent: GenericError:" in bad.stderr, bad.stderr


def test_copy_round_trip_through_virtio_serial(guest: BootedGuest) -> None:
    run_dir = guest.run_dir
    work = short_tmpdir()
    try:
        src, back = work / "src.bin", work / "back.bin"
        src.write_bytes(os.urandom(3 << 20))
        up = vmfront_agent(run_dir, "copy-to", str(src), "/tmp/copied.bin", timeout=300)
        assert up.returncode == 0, up.stderr
        # Checked inside the guest too, by its own sha256sum.
        assert guest_sh(run_dir, "sha256sum /tmp/copied.bin").split()[0] == hashlib.sha256(src.read_bytes()).hexdigest()
        down = vmfront_agent(run_dir, "copy-from", "/tmp/copied.bin", str(back), timeout=300)
        assert down.returncode == 0, down.stderr
        assert back.read_bytes() == src.read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        vmfront_agent(run_dir, "exec", "--", "/bin/rm", "-f", "/tmp/copied.bin")


def test_unchanged_qga_script_on_the_proxy_socket(guest: BootedGuest) -> None:
    lines = qga_script(guest.run_dir / "agent.sock", "guest-get-host-name", "guest-get-osinfo", sync_id=4321)
    assert lines[0] == b'\xff{"return": 4321}'
    assert json.loads(lines[1]) == {"return": {"host-name": "vmfront-guest"}}
    assert json.loads(lines[2])["return"]["id"] == "vmfront-test-guest"


def test_a_vnc_viewer_types_into_a_shell_on_the_guest_console(guest: BootedGuest) -> None:
    """Keys from a real viewer (vncdotool) reach a real shell on the guest's VGA console (through the client's VNC
    server, the core's QMP input, the PS/2 keyboard and Linux's tty), and the agent finds the file it made."""
    work = short_tmpdir()
    try:
        vncdo(guest.vnc_port, type_text="touch /tmp/typed-via-vnc-42\n", capture=work / "console.png")
        wait_for(lambda: "typed-via-vnc-42" in guest_sh(guest.run_dir, "ls /tmp"), 20, "the typed command to run")
        with Image.open(work / "console.png") as console:
            assert console.size == (720, 400)  # Linux's VGA text console, 80x25 cells of 9x16
            assert len(console.convert("L").getcolors(1 << 16) or []) > 1, "the viewer saw a blank screen"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_hextile_in_c_matches_the_reference_on_the_linux_console(guest: BootedGuest) -> None:
    """Linux's VGA text console (its boot log, the shell): the Hextile encoder's C part writes the reference's
    bytes (tests/test_rfb_hextile.py), whole screen and rectangles of it, in every pixel format."""
    work = short_tmpdir()
    try:
        screen = guest_screen("lg", guest.run_dir, work / "console.png")
        assert screen.shape == (400, 720)
        assert {"solid", "foreground", "several subrects"} <= assert_same_as_reference(screen, rects=80)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_client_killed_mid_transfer_never_disturbs_the_guest_agent(guest: BootedGuest) -> None:
    """SIGKILL the client while the guest's qemu-ga is streaming replies: the core keeps the port open (and drops
    what arrives once it knows the client is gone; what came before went to the dead client's queue), so the agent
    (same pid) never sees a disconnect, and the next client resynchronises."""
    run_dir = guest.run_dir
    pid_before = qemu_ga_pid(run_dir)
    exits_before = guest.console_text().count("qemu-ga exited")
    doomed = guest.client
    assert doomed is not None
    guest_sh(run_dir, "dd if=/dev/urandom of=/tmp/big.bin bs=1M count=8 2>/dev/null")
    work = short_tmpdir()
    copy = subprocess.Popen([sys.executable, "-m", "vmfront", "agent", "lg", "--run-dir", str(run_dir),
                             "copy-from", "/tmp/big.bin", str(work / "big.bin")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        part = work / "big.bin.part"
        wait_for(lambda: part.exists() and part.stat().st_size > 0, 60, "the copy to be under way")
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(timeout=10)
        _, err = copy.communicate(timeout=60)
        assert copy.returncode != 0, "a copy whose client was killed claimed success"
        interrupted = re.search(r"interrupted after (\d+) of 8388608 bytes.*Nothing was written.*retry", err)
        assert interrupted and int(interrupted.group(1)) > 0, err
        assert not (work / "big.bin").exists(), "an interrupted copy left a truncated file under the target name"
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    client = guest.start_client()
    wait_for(lambda: client.pid in client_pids(guest.core), 15, "the new client to attach")
    wait_agent_ready(run_dir, guest.console, within=30)
    assert qemu_ga_pid(run_dir) == pid_before
    assert guest.console_text().count("qemu-ga exited") == exits_before
    guest_sh(run_dir, "rm -f /tmp/big.bin")


def test_agent_restarted_inside_the_guest(guest: BootedGuest) -> None:
    """qemu-ga dies in the guest (an upgrade, a crash) and its supervisor restarts it a second later: calls in the
    gap fail clearly within their deadline, and the next call reaches the new qemu-ga after a resync. Meanwhile the
    host side never disconnected: the core's socket to QEMU's port stays open (virtio-serial holds what it cannot
    deliver until the new agent opens the port, and the resync skips it)."""
    run_dir = guest.run_dir
    old_pid = qemu_ga_pid(run_dir)
    exits_before = guest.console_text().count("qemu-ga exited")
    # Killed from inside, a second after guest-exec has answered (so no reply is cut short by it).
    spawned = agent_json(run_dir, "guest-exec", json.dumps(
        {"path": "/bin/sh", "arg": ["-c", f"(sleep 1; kill -9 {old_pid}) >/dev/null 2>&1 &"]}))
    assert "pid" in spawned
    wait_for(lambda: guest.console_text().count("qemu-ga exited") > exits_before, 30, "qemu-ga to die in the guest")
    start = time.monotonic()
    gap = vmfront_agent(run_dir, "--timeout", "2", "ping")
    assert time.monotonic() - start < 2 + 5
    if gap.returncode != 0:  # the new agent may already be up; if not, a clear error
        assert "AgentTimeout" in gap.stderr or "AgentUnavailable" in gap.stderr, gap.stderr
    wait_agent_ready(run_dir, guest.console, within=60)
    assert qemu_ga_pid(run_dir) != old_pid
    assert "qemu-ga exited with 137" in guest.console_text()
    assert "guest agent channel closed" not in guest.core.stderr()


def test_migration_with_the_agent_inside_the_guest_then_guest_shutdown(image: LinuxGuestImage) -> None:
    """The guest (and its qemu-ga, same pid) moves to a second core; the client follows, --no-wait calls fail busy
    while it moves, waiting calls are answered after; guest-shutdown then powers the guest off on the destination."""
    with Fleet() as fleet:
        src_console, dst_console = fleet.root / "src.console", fleet.root / "dst.console"
        src = fleet.core("src", "--agent", qemu_args=image.qemu_args(src_console))
        dst = fleet.core("dst", "--agent", "--incoming", "auto", qemu_args=image.qemu_args(dst_console))
        client = fleet.add(ClientProcess(src, "src"))
        wait_agent_ready(src.run_dir, src_console)
        pid_before = qemu_ga_pid(src.run_dir)

        watcher = fleet.add(RawQmpPeer(src.qmp_socket).negotiate())
        set_bandwidth(watcher, 2 << 20)  # slow enough that calls surely meet the migration in flight
        migrate = fleet.add(subprocess.Popen(
            [sys.executable, "-m", "vmfront", "migrate", "src", "--run-dir", str(src.run_dir), "--to", "dst",
             "--dest-run-dir", str(dst.run_dir), "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        wait_migration_status(watcher, {"active"}, 20)
        busy_until = time.monotonic() + 10
        outcome = agent_call(src.run_dir, "guest-ping", wait=False)
        while outcome[0] == "ok":
            assert time.monotonic() < busy_until, "a --no-wait agent call never failed busy during the migration"
            time.sleep(0.05)
            outcome = agent_call(src.run_dir, "guest-ping", wait=False)
        assert outcome[0] == "AgentBusy" and "migrating" in outcome[1], outcome
        waited: list[tuple[str, Any]] = []
        waiter = threading.Thread(target=lambda: waited.append(
            agent_call(src.run_dir, "guest-get-osinfo", wait=True, timeout=60)), daemon=True)
        waiter.start()
        set_bandwidth(watcher, 1 << 34)
        assert wait_migration_status(watcher, {"completed", "failed", "cancelled"}, 60) == "completed"
        _, err = migrate.communicate(timeout=60)
        assert migrate.returncode == 0, err
        waiter.join(65)
        assert waited and waited[0][0] == "ok" and waited[0][1]["id"] == "vmfront-test-guest", waited

        wait_for(lambda: client.pid in client_pids(dst), 15, "the client to follow the guest")
        # The very same qemu-ga process answers, now through the destination's QEMU and core.
        assert qemu_ga_pid(src.run_dir) == pid_before
        assert "qemu-ga exited" not in src_console.read_text() + dst_console.read_text()

        # guest-shutdown never answers; the guest powers off, QEMU exits 0, the destination core records it and ends.
        down = vmfront_agent(src.run_dir, "guest-shutdown")
        assert down.returncode == 0, down.stderr
        assert dst.wait(timeout=60) == 0, dst.stderr()[-3000:]
        assert dst.state()["state"] == "shutdown"
        assert dst.state()["last_exit"]["reason"] == "guest-shutdown", dst.state()["last_exit"]
