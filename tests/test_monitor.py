"""The monitor against a real core, QEMU and client: same output as QEMU's own HMP, errors, stop/cont, sendkey
reaching the guest, screendump from shared memory, TCP, several monitors with one killed, and an interactive
``vmfront monitor`` session in a real terminal (tmux)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, RawQmpPeer, running_core, short_tmpdir, wait_for
from PIL import Image
from test_client import ClientProcess

PROMPT = b"(qemu) "
VM = "mon"


class Monitor:
    """A line-based monitor connection, as socat or a script would use it."""

    def __init__(self, address: Path | tuple[str, int], timeout: float = 15.0) -> None:
        family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(address) if isinstance(address, Path) else address)
        self.buf = b""
        self.banner = self._until_prompt()

    def _until_prompt(self) -> str:
        while not (self.buf == PROMPT or self.buf.endswith(b"\n" + PROMPT)):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"monitor closed; got {self.buf!r}")
            self.buf += chunk
        out, self.buf = self.buf[: -len(PROMPT)], b""
        return out.decode()

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self._until_prompt()

    def close(self) -> None:
        self.sock.close()


def hmp(peer: RawQmpPeer, line: str) -> str:
    reply = peer.execute("human-monitor-command", arguments={"command-line": line})
    assert "return" in reply, reply
    text: str = reply["return"]
    return text


class Rig:
    def __init__(self, core: CoreProcess, client: ClientProcess) -> None:
        self.core, self.client = core, client
        self.socket = core.run_dir / "monitor.sock"
        self.peer = RawQmpPeer(core.qmp_socket).negotiate()

    def guest_keys_row(self) -> str:
        """Row 4 of the demo guest's text screen ("KEYS: ..."), read from guest memory by the management socket."""
        path = self.core.run_dir.parent / "vram.bin"
        reply = self.peer.execute("pmemsave", arguments={"val": 0xB8000, "size": 80 * 25 * 2, "filename": str(path)})
        assert reply == {"return": {}}, reply
        data = path.read_bytes()[::2]
        row = data[4 * 80:5 * 80].decode("cp437").rstrip()
        return row.removeprefix("KEYS:").strip() if row.startswith("KEYS:") else "?" + row


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with running_core(VM) as core:
        vnc_port = _free_port()
        client = ClientProcess(core, VM, "--monitor", "--vnc", f"127.0.0.1:{vnc_port}")
        client.vnc_port = vnc_port  # type: ignore[attr-defined]
        try:
            wait_for(lambda: (core.run_dir / "monitor.sock").exists() and "display: mapped" in client.text(),
                     15, "the client's monitor socket and display")
            rig = Rig(core, client)
            # The demo guest draws its screen within a second of boot.
            wait_for(lambda: not rig.guest_keys_row().startswith("?"), 60, "the demo guest to draw")
            yield rig
            rig.peer.close()
        finally:
            client.stop()


#: Info commands QEMU's HMP also has, compared through both monitors at the same guest state.
INFO_COMPARED = ["status", "version", "name", "uuid", "kvm", "cpus", "block", "block -n", "block ide0-hd0",
                 "blockstats", "chardev", "mice", "migrate", "migrate_parameters", "migrate_capabilities",
                 "pci", "balloon", "hotpluggable-cpus", "memdev", "iothreads", "snapshots", "block-jobs"]


def normalise(command: str, text: str) -> str:
    """Documented differences (docs/monitor.md): counters that move between the two calls."""
    if command == "blockstats":
        text = re.sub(r"idle_time_ns=\d+", "idle_time_ns=N", text)
    return text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_info_vnc_shows_our_vnc_server_and_viewers(rig: Rig) -> None:
    """Not QEMU's VNC (that is the core's private capture source): the client's own server and viewers."""
    port = rig.client.vnc_port  # type: ignore[attr-defined]
    mon = Monitor(rig.socket)
    viewer = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert viewer.recv(12) == b"RFB 003.008\n"
        # The client reports the connection to the core, which answers query-vnc-servers: the report may be a
        # moment behind the banner.
        wait_for(lambda: "  Client: 127.0.0.1:" in mon.cmd("info vnc"), 10, "the viewer in info vnc")
        text = mon.cmd("info vnc")
        assert f"  Server: 127.0.0.1:{port} (ipv4)" in text, text
        assert "    Auth: none (Sub: none)" in text
        assert "  Client: 127.0.0.1:" in text
        assert "vnc.sock" not in text, "the private capture socket must not show"
    finally:
        viewer.close()
        mon.close()


def test_socket_is_private_and_banner_is_qemus(rig: Rig) -> None:
    assert oct(os.stat(rig.socket).st_mode & 0o777) == "0o600"
    mon = Monitor(rig.socket)
    try:
        version = hmp(rig.peer, "info version").split("Debian")[0].strip()
        assert mon.banner == f"QEMU {version} monitor - type 'help' for more information\r\n"
    finally:
        mon.close()


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_info_output_same_as_qemu(rig: Rig, paused: bool) -> None:
    mon = Monitor(rig.socket)
    try:
        if paused:
            assert mon.cmd("stop") == ""
        mismatches = []
        for command in INFO_COMPARED:
            ours = normalise(command, mon.cmd(f"info {command}"))
            qemu = normalise(command, hmp(rig.peer, f"info {command}"))
            if ours != qemu:
                mismatches.append(f"info {command}:\n ours: {ours!r}\n qemu: {qemu!r}")
        assert not mismatches, "\n".join(mismatches)
    finally:
        if paused:
            mon.cmd("cont")
        mon.close()


ERRORS_COMPARED = ["foo", "info foo", "sendkey", "sendkey ctrl-foo", "help stop", "help sendkey", "help help",
                   "help info status", "help nonexist", "stop x", "info status extra", "mouse_button", "balloon x",
                   "eject nosuch", "migrate_set_parameter foo 1",
                   "migrate_set_parameter downtime-limit x", "mouse_move", "cont extra"]


def test_errors_and_help_same_as_qemu(rig: Rig) -> None:
    mon = Monitor(rig.socket)
    try:
        mismatches = []
        for line in ERRORS_COMPARED:
            ours, qemu = mon.cmd(line), hmp(rig.peer, line)
            if ours != qemu:
                mismatches.append(f"{line}:\n ours: {ours!r}\n qemu: {qemu!r}")
        assert not mismatches, "\n".join(mismatches)
        # What the client's policy denies prints as a QEMU error, naming the argument where that is why.
        assert mon.cmd("migrate -d tcp:127.0.0.1:1") == \
            "Error: command 'migrate' with uri \"tcp:127.0.0.1:1\" is denied by vmfront policy on socket 'client'\r\n"
        assert mon.cmd("device_del nosuch") == \
            "Error: command 'device_del' is denied by vmfront policy on socket 'client'\r\n"
    finally:
        mon.close()


def test_stop_cont_sendkey_screendump(rig: Rig) -> None:
    mon = Monitor(rig.socket)
    try:
        assert mon.cmd("stop") == ""
        assert mon.cmd("info status") == "VM status: paused\r\n"
        assert rig.peer.execute("query-status")["return"]["status"] == "paused"
        assert mon.cmd("c") == ""
        assert mon.cmd("info status") == "VM status: running\r\n"
        before = rig.guest_keys_row()
        assert mon.cmd("sendkey shift-m 50") == ""
        assert mon.cmd("sendkey o") == ""
        wait_for(lambda: rig.guest_keys_row() == before + "Mo", 10, f"'Mo' after {before!r} on the guest screen")
        out = rig.core.run_dir.parent / "shot.png"
        assert mon.cmd(f"screendump {out} -f png") == ""
        with Image.open(out) as image:
            assert image.size == (720, 400)
        ppm = rig.core.run_dir.parent / "shot.ppm"
        assert mon.cmd(f"screendump {ppm}") == ""
        assert ppm.read_bytes().startswith(b"P6")
        assert mon.cmd("mouse_move 5 5") == "" and mon.cmd("mouse_button 1") == "" and mon.cmd("mouse_button 0") == ""
    finally:
        mon.close()


def test_three_monitors_one_killed_mid_command(rig: Rig) -> None:
    monitors = [Monitor(rig.socket) for _ in range(3)]
    try:
        # Monitor 1 sends a command with a large answer and dies (RST) without reading it.
        victim = monitors[1]
        victim.sock.sendall(b"info pci\ninfo migrate_parameters\ninfo block\n")
        victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        victim.sock.close()
        for mon in (monitors[0], monitors[2]):
            assert mon.cmd("info status") == "VM status: running\r\n"
        assert monitors[0].cmd("stop") == ""
        assert monitors[2].cmd("info status") == "VM status: paused\r\n"
        assert monitors[2].cmd("cont") == ""
        assert monitors[0].cmd("info status") == "VM status: running\r\n"
        assert rig.peer.execute("query-status")["return"]["status"] == "running"
        assert rig.client.proc.poll() is None
        assert "monitor connection failed" not in rig.client.text()
        # A new monitor still connects.
        extra = Monitor(rig.socket)
        assert extra.cmd("info name") == f"{VM}\r\n"
        extra.close()
    finally:
        for mon in monitors:
            mon.close()


def test_monitor_connections_are_capped(rig: Rig) -> None:
    """A runaway script opening connections gets a clear refusal past the cap; the monitors already open work."""
    from clients.monitor.service import MAX_CONNECTIONS

    held = [Monitor(rig.socket) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        extra.connect(str(rig.socket))
        refused = b""
        while chunk := extra.recv(4096):
            refused += chunk
        extra.close()
        assert refused == f"Error: too many monitor connections (at most {MAX_CONNECTIONS})\r\n".encode()
        assert held[0].cmd("info status") == "VM status: running\r\n"
    finally:
        for monitor in held:
            monitor.close()

    def one_more() -> bool:
        monitor = Monitor(rig.socket)
        try:
            return monitor.cmd("info status") == "VM status: running\r\n"
        finally:
            monitor.close()

    wait_for(one_more, 10, "a place for a monitor again")


def test_socat_script(rig: Rig) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat not installed")
    out = subprocess.run(["socat", "-", f"UNIX-CONNECT:{rig.socket}"], input=b"info name\ninfo kvm\n",
                         capture_output=True, timeout=20).stdout.decode()
    assert f"(qemu) {VM}\r\n(qemu) kvm support: " in out


def test_tcp_monitor_and_detached_core() -> None:
    """A client with a TCP monitor and no core yet: the monitor answers, saying it is not attached."""
    root = short_tmpdir()
    run = root / "run"
    run.mkdir()
    client = ClientProcess(run, "nocore", "--monitor", "127.0.0.1:0")
    try:
        wait_for(lambda: "monitor listening on 127.0.0.1:" in client.text(), 15, "the TCP monitor")
        match = re.search(r"monitor listening on 127\.0\.0\.1:(\d+)", client.text())
        assert match is not None
        mon = Monitor(("127.0.0.1", int(match.group(1))))
        assert mon.banner == "QEMU monitor - type 'help' for more information\r\n"
        assert mon.cmd("info status") == "Error: core not attached (retrying)\r\n"
        assert mon.cmd("help cont") == "cont|c  -- resume emulation\r\n"
        mon.close()
    finally:
        client.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- interactive, through a real terminal -----------------------------------------------------------------


class Tmux:
    def __init__(self, session: str, command: list[str], env: dict[str, str]) -> None:
        self.session = session
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50",
                        f"env {exports} {' '.join(command)}"], check=True, timeout=10)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, *keys], check=True, timeout=10)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True,
                              text=True, timeout=10).stdout

    def wait(self, predicate_text: str, within: float = 10.0) -> str:
        wait_for(lambda: predicate_text in self.screen(), within, f"{predicate_text!r} in the terminal")
        return self.screen()

    def last_line(self) -> str:
        lines = [line for line in self.screen().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], check=False, timeout=10)


def test_interactive_terminal_session(rig: Rig) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed")
    state = rig.core.run_dir.parent / "state"
    env = {"XDG_STATE_HOME": str(state), "PYTHONPATH": str(Path(__file__).parent.parent),
           "TERM": "xterm", "INPUTRC": "/dev/null"}
    command = [sys.executable, "-m", "vmfront", "monitor", VM, "--run-dir", str(rig.core.run_dir)]
    name = f"vmfmon{os.getpid()}"
    term = Tmux(name, command, env)
    try:
        term.wait("type 'help' for more information")
        # Tab completion of a command and of an info topic.
        term.keys("info sta", "Tab")
        wait_for(lambda: term.last_line().endswith("(qemu) info status"), 10, "completion to 'info status'")
        term.keys("Enter")
        term.wait("VM status: running")
        term.keys("sto", "Tab")
        wait_for(lambda: term.last_line().endswith("(qemu) stop"), 10, "completion to 'stop'")
        term.keys("Enter")
        # History: the up arrow twice brings back "info status".
        term.keys("Up", "Up")
        wait_for(lambda: term.last_line().endswith("(qemu) info status"), 10, "history recall")
        term.keys("Enter")
        term.wait("VM status: paused")
        term.keys("cont", "Enter")
        wait_for(lambda: rig.peer.execute("query-status")["return"]["status"] == "running", 10, "cont")
        before = rig.guest_keys_row()
        term.keys("sendkey z", "Enter")
        wait_for(lambda: rig.guest_keys_row() == before + "z", 10, "the key typed in the terminal to reach the guest")
        term.keys("C-d")
        wait_for(lambda: subprocess.run(["tmux", "has-session", "-t", name], capture_output=True,
                                        timeout=10).returncode != 0, 10, "the front-end to exit on Ctrl-D")
        history = (state / "vmfront" / "monitor_history").read_text()
        assert "info status" in history and "sendkey z" in history
        # A new session recalls the previous one's last command.
        term = Tmux(name, command, env)
        term.wait("type 'help' for more information")
        term.keys("Up")
        wait_for(lambda: term.last_line().endswith("(qemu) sendkey z"), 10, "history from the last session")
        term.keys("C-u", "C-d")
    finally:
        term.kill()


def test_migrate_shows_progress_and_another_monitor_cancels_it() -> None:
    """With a policy that lets the client migrate: a blocking ``migrate`` prints progress; ``migrate_cancel``
    from a second monitor ends it and the guest keeps running here."""
    policy_dir = short_tmpdir()
    policy = policy_dir / "policy.toml"
    policy.write_text('[sockets.client]\ndefault = "allow"\ndeny = ["human-monitor-command"]\n'
                      '[sockets.client.arguments.migrate]\n')  # no argument rule: any URI
    try:
        with running_core("mig", "--policy", str(policy)) as core:
            client = ClientProcess(core, "mig", "--monitor")
            try:
                sock = core.run_dir / "monitor.sock"
                wait_for(lambda: sock.exists() and "attached to the core" in client.text(), 15, "the monitor")
                first, second = Monitor(sock, timeout=30), Monitor(sock)
                assert first.cmd("migrate_set_parameter max-bandwidth 200k") == ""
                assert "max-bandwidth: 204800 bytes/second\r\n" in first.cmd("info migrate_parameters")
                first.sock.sendall(b'migrate "exec:cat > /dev/null"\n')
                wait_for(lambda: "Migration status: active" in second.cmd("info migrate"), 10, "migration to start")
                time.sleep(1.0)
                assert second.cmd("migrate_cancel") == ""
                output = first._until_prompt()
                assert re.search(r"migrate: active, \d+% of RAM sent\r\n", output), output
                assert output.endswith("migrate: cancelled\r\n"), output
                assert second.cmd("info status") == "VM status: running\r\n"
                assert core.proc.poll() is None
                first.close()
                second.close()
            finally:
                client.stop()
    finally:
        shutil.rmtree(policy_dir, ignore_errors=True)


# --- the default client policy: what a monitor user may do, what is refused (docs/policy.md) ----------------------

DENIED = "is denied by vmfront policy on socket 'client'"
#: Commands that work under the default policy (their output is compared with QEMU's in test_monitor_table.py).
ALLOWED_BY_DEFAULT = ["nmi", "x /4xb 0xb8000", "xp /4xb 0xb8000", "x /2i 0x7c00", "p /x $pc", "info registers",
                      "info qtree", "info network", "info usb", "info irq", "info numa", "watchdog_action reset",
                      "announce_self", "qom-list /machine", "qom-get /machine/peripheral-anon type", "cpu 0",
                      "info memory_size_summary", "info dump", "info tpm", "info memory-devices"]
#: Refused by the default policy, with the argument at fault where an argument rule is why.
REFUSED_BY_DEFAULT = {
    "device_add usb-host,hostbus=1": "command 'device_add' with argument 'hostbus'",
    "device_add e1000,romfile=/etc/passwd": "command 'device_add' with argument 'romfile'",
    "device_add e1000,netdev=n0": "command 'device_add' with argument 'netdev'",
    "device_add ivshmem-plain": 'command \'device_add\' with driver "ivshmem-plain"',
    "device_del nosuch": "command 'device_del'",
    "block_resize ide0-hd0 1M": "command 'block_resize'",
    "block_job_cancel foo": "command 'block-job-cancel'",
    "block_job_set_speed foo 1M": "command 'block-job-set-speed'",
    "migrate_set_capability xbzrle on": "command 'migrate-set-capabilities'",
    "migrate_set_parameter downtime-limit 500": "command 'migrate-set-parameters'",
    "migrate_start_postcopy": "command 'migrate-start-postcopy'",
    "migrate_cancel": "command 'migrate_cancel'",
    "change ide0-hd0 /etc/passwd": "command 'blockdev-change-medium'",
    "drive_add 0 if=none,file=/etc/passwd,format=raw": "command 'blockdev-add'",
    "qom-list /objects": "command 'qom-list' with path \"/objects\"",
}


def test_default_policy_allows_guest_level_commands_and_refuses_the_rest(rig: Rig) -> None:
    mon = Monitor(rig.socket)
    try:
        for line in ALLOWED_BY_DEFAULT:
            out = mon.cmd(line)
            assert DENIED not in out and not out.startswith("Error:"), f"{line}: {out!r}"
        for line, what in REFUSED_BY_DEFAULT.items():
            assert mon.cmd(line) == f"Error: {what} {DENIED}\r\n", line
        # A device without a host backend may be added (and is there); the management removes it.
        assert mon.cmd("device_add usb-mouse,id=policymouse") == ""
        assert "QEMU USB Mouse, ID: policymouse" in mon.cmd("info usb")
        assert rig.peer.execute("device_del", arguments={"id": "policymouse"}) == {"return": {}}
        # What the policy refuses is not offered: help lists only what the client may run.
        listed = {line.split(" ", 1)[0].split("|")[0] for line in mon.cmd("help").splitlines()}
        assert {"nmi", "x", "xp", "print", "cpu", "device_add", "set_link", "stop", "sendkey",
                "change", "set_password", "expire_password"} <= listed  # change vnc password works
        assert not listed & {"block_resize", "block_job_cancel", "device_del", "drive_add",
                             "migrate_set_capability", "migrate_cancel", "migrate_start_postcopy"}
        topics = mon.cmd("info")
        assert "info registers [-a|vcpu]" in topics and "info qtree" in topics
        # `help CMD` still describes a command the policy refuses, as QEMU's would.
        assert mon.cmd("help block_resize") == "block_resize device size -- resize a block image\r\n"
        # The core wrote guest memory and CPU state into its own directory, and left nothing there.
        reads = rig.core.run_dir / "private" / "reads"
        assert reads.is_dir() and list(reads.iterdir()) == []
    finally:
        mon.close()


def test_core_read_commands_are_bounded(rig: Rig) -> None:
    """vmfront's own QMP read commands, on the management socket: sizes and arguments are checked before QEMU
    is asked; a memory read returns base64, the CPU state QEMU's registers."""
    peer = rig.peer
    read = peer.execute("__org.vmfront_memory-read", arguments={"address": 0xB8000, "size": 16, "physical": True})
    assert len(read["return"]["data"]) == 24  # 16 bytes of base64
    for arguments, problem in (({"address": 0, "size": 65537}, "'size' must be an integer from 1 to 65536"),
                               ({"address": -1, "size": 1}, "'address' must be an integer from 0 to"),
                               ({"address": 0, "size": 1, "path": "/etc/passwd"}, "Parameter 'path' is unexpected"),
                               ({"address": 0, "size": 1, "physical": "yes"}, "'physical' must be a boolean")):
        reply = peer.execute("__org.vmfront_memory-read", arguments=arguments)
        assert problem in reply["error"]["desc"], reply
    state = peer.execute("__org.vmfront_cpu-state")["return"]
    assert state["long-mode"] is False and state["cpus"][0]["cpu-index"] == 0 and "rip" in state["cpus"][0]
    assert "takes no arguments" in peer.execute("__org.vmfront_cpu-state", arguments={"x": 1})["error"]["desc"]
    tree = peer.execute("__org.vmfront_qom-tree", arguments={"path": "/machine/peripheral-anon"})["return"]
    assert tree["truncated"] is False and tree["objects"][0]["path"] == "/machine/peripheral-anon"
    assert {o["type"] for o in tree["objects"]} >= {"container", "VGA", "usb-tablet"}
    mon = Monitor(rig.socket)
    try:
        assert mon.cmd("x /200000xg 0") == "Error: at most 1048576 bytes per dump here (1600000 asked)\r\n"
    finally:
        mon.close()


def test_quit_ends_the_guest_and_the_core() -> None:
    with running_core("q") as core:
        client = ClientProcess(core, "q", "--monitor")
        try:
            sock = core.run_dir / "monitor.sock"
            wait_for(lambda: sock.exists() and "attached to the core" in client.text(), 15, "the monitor")
            mon = Monitor(sock)
            mon.sock.sendall(b"quit\n")
            assert mon.sock.recv(100) == b""  # the monitor closes the connection after quit, as QEMU's does
            assert core.wait(30) == 0
            mon.close()
        finally:
            client.stop()
