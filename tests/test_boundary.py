"""The privilege boundary against real QEMU 7.2: nothing a client or a QMP peer sends ends supervision, reaches
beyond the guest, or exhausts the core (docs/security.md lists each claim with its test here).

Each test tries what a hostile peer would, then checks that the core still supervises the *same* QEMU pid and
answers QMP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, fd_count, wait_for

from ipc.channel import ClientChannel, RemoteError, ipc_endpoint

SMALL_VM = ["-machine", "pc", "-m", "16"]


def assert_still_supervised(core: CoreProcess, qemu_pid: int, *, reconnects: int = 0) -> None:
    """The same QEMU, the core alive, QMP answering, and the core never lost (or regained) its QMP link."""
    assert core.proc.poll() is None, core.stderr()
    wait_for(lambda: core.state()["state"] == "running", 10, "state.json to say running")  # written after events
    state = core.state()
    assert state["qemu_pid"] == qemu_pid, state
    assert state.get("qmp_reconnects", 0) == reconnects, core.stderr()
    peer = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        assert peer.execute("query-status")["return"]["status"] == "running"
    finally:
        peer.close()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with Fleet() as running:
        yield running


def test_yank_of_the_cores_qmp_link_never_ends_supervision(fleet: Fleet) -> None:
    """A peer's yank of the core's own chardev is refused; and if the link is cut anyway (here through a second
    QMP monitor of QEMU's, a side door no peer has), the core reconnects to QEMU and carries on."""
    side = fleet.root / "side.sock"
    core = fleet.core("yk", qemu_args=[*SMALL_VM, "-qmp", f"unix:{side},server=on,wait=off"])
    qemu_pid = core.qemu_pid
    yank = {"instances": [{"type": "chardev", "id": "vmfront-qmp"}]}
    peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
    refused = peer.execute("yank", arguments=yank, id="y")
    assert refused["id"] == "y" and "the core's own link to QEMU" in refused["error"]["desc"]
    assert_still_supervised(core, qemu_pid)

    door = fleet.add(RawQmpPeer(side).negotiate())
    assert door.execute("yank", arguments=yank) == {"return": {}}
    wait_for(lambda: core.state().get("qmp_reconnects") == 1 and "QMP connection to QEMU pid" in core.stderr()
             and "restored" in core.stderr(), 15, "the core to reconnect to QEMU")
    # The peer connected before the cut never noticed: same connection, answers, and events still come.
    assert peer.execute("query-status", id=2) == {"return": {"status": "running", "singlestep": False,
                                                             "running": True}, "id": 2}
    peer.send({"execute": "stop"})
    assert sorted(str(m.get("event", m.get("return"))) for m in (peer.recv(), peer.recv())) == ["STOP", "{}"]
    assert peer.execute("cont") == {"return": {}}
    assert_still_supervised(core, qemu_pid, reconnects=1)


#: Raw arguments Python's JSON reader takes but QEMU's rejects (QEMU would answer without an id).
STRICT_JSON_CASES = {
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "1e400": b"1e400",
    "lone surrogate": b'"\\ud800"',
    "NUL": b'"a\\u0000b"',
    "5000-digit integer": b"9" * 5000,
    "beyond uint64": b"18446744073709551616",
}


def test_values_qemu_rejects_never_reach_it(fleet: Fleet) -> None:
    core = fleet.core("sj", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
    for number, (what, raw) in enumerate(STRICT_JSON_CASES.items()):
        peer.send(b'{"execute": "qom-get", "id": %d, "arguments": {"path": "/machine", "property": %s}}\n'
                  % (number, raw))
        reply = peer.recv_reply()
        assert reply["id"] == number, (what, reply)
        assert "not sent to QEMU" in reply["error"]["desc"], (what, reply)
    # The peer is still connected and its next command runs.
    assert peer.execute("query-name", id="after") == {"return": {"name": "sj"}, "id": "after"}
    assert_still_supervised(core, qemu_pid)


def test_qemu_parser_limits_are_enforced_before_qemu(fleet: Fleet) -> None:
    """The issue's case: 700000 empty objects are 2.1 M JSON tokens, over QEMU's 2 M: QEMU would answer without an
    id. Sent by a management peer (within a raised message limit) and by a client: refused, nothing lost."""
    core = fleet.core("tk", "--qmp-max-message", str(8 << 20), qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    peer = fleet.add(RawQmpPeer(core.qmp_socket, timeout=30).negotiate())
    reply = peer.execute("query-status", id=1, arguments={"a": [{}] * 700_000})
    assert reply["id"] == 1 and "too many JSON tokens" in reply["error"]["desc"], reply
    deep: object = 1
    for _ in range(200):
        deep = [deep]
    reply = peer.execute("query-status", id=2, arguments={"a": deep})
    assert reply["id"] == 2 and "nested deeper" in reply["error"]["desc"], reply
    assert_still_supervised(core, qemu_pid)


async def test_a_clients_700k_token_command_is_refused_and_the_client_stays(fleet: Fleet) -> None:
    """The issue's case through the control channel: a client's query-status with 700000 empty objects is refused
    from the frame's array header (before anything is built), the client stays attached, and QEMU never sees it."""
    core = fleet.core("tc", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    channel = ClientChannel(ipc_endpoint(core.run_dir / "control.sock"), name="hostile-test-client")
    try:
        await channel.connect(timeout_s=10)
        with pytest.raises(RemoteError, match="too-large"):
            await channel.qmp("query-status", {"a": [{}] * 700_000})
        # 60000 at a time fits a container, 12 of them do not fit the frame's element budget:
        with pytest.raises(RemoteError, match="too-large"):
            await channel.qmp("query-status", {"a": [[{}] * 60_000] * 12})
        assert (await channel.qmp("query-status"))["status"] == "running"
    finally:
        await channel.close()
    assert_still_supervised(core, qemu_pid)


async def test_a_client_cannot_read_secrets_or_yank(fleet: Fleet) -> None:
    """The client policy is an allow-list with argument rules: qom-get under /machine works, on a secret it is
    denied; yank, migrate-set-* and the like are denied; query-commands lists only what the client may run."""
    core = fleet.core("sec", qemu_args=[*SMALL_VM, "-object", "secret,id=sec0,data=hunter2"])
    qemu_pid = core.qemu_pid
    channel = ClientChannel(ipc_endpoint(core.run_dir / "control.sock"), name="hostile-test-client")
    try:
        await channel.connect(timeout_s=10)
        assert await channel.qmp("qom-get", {"path": "/machine", "property": "type"}) == "pc-i440fx-7.2-machine"
        for path in ("/objects/sec0", "sec0", "/machine/../objects/sec0"):
            with pytest.raises(RemoteError, match="denied by vmfront policy") as denied:
                await channel.qmp("qom-get", {"path": path, "property": "data"})
            assert "hunter2" not in str(denied.value)
        for command, arguments in (("yank", {"instances": [{"type": "chardev", "id": "vmfront-qmp"}]}),
                                   ("migrate-set-capabilities", {"capabilities": []}),
                                   ("migrate", {"uri": "exec:touch /tmp/vmfront-pwned"}),
                                   ("human-monitor-command", {"command-line": "info status"}),
                                   ("trace-event-set-state", {"name": "*", "enable": True})):
            with pytest.raises(RemoteError, match="denied by vmfront policy"):
                await channel.qmp(command, arguments)
        listed = {c["name"] for c in await channel.qmp("query-commands")}
        assert "query-status" in listed and "qom-get" in listed
        assert not listed & {"yank", "human-monitor-command", "object-add", "migrate-set-parameters"}
        # The client cannot mark a secret readable either: qom-set is not on its list.
        with pytest.raises(RemoteError, match="denied"):
            await channel.qmp("qom-set", {"path": "/objects/sec0", "property": "data", "value": "x"})
    finally:
        await channel.close()
    # The management socket keeps full access.
    peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
    assert peer.execute("qom-get", arguments={"path": "/objects/sec0", "property": "data"}) == {"return": "hunter2"}
    assert_still_supervised(core, qemu_pid)


def test_a_refused_migrate_then_savevm_never_stops_the_guest(fleet: Fleet) -> None:
    """A migrate QEMU refuses changes nothing; savevm's MIGRATION events afterwards are not the guest leaving."""
    from test_client import ClientProcess
    from test_monitor import Monitor

    disk = fleet.root / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    core = fleet.core("sv", qemu_args=[*SMALL_VM, "-blockdev",
                                       f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={disk}",
                                       "-device", "virtio-blk-pci,drive=disk0"])
    qemu_pid = core.qemu_pid
    peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
    refused = peer.execute("migrate", id="m", arguments={"uri": "unix:/nonexistent/x", "resume": True})
    assert refused["id"] == "m" and "error" in refused, refused
    client = fleet.add(ClientProcess(core, "sv", "--monitor"))
    sock = core.run_dir / "monitor.sock"
    wait_for(lambda: sock.exists() and "attached to the core" in client.text(), 15, "the monitor")
    monitor = fleet.add(Monitor(sock, timeout=60))
    assert monitor.cmd("savevm snap1") == "", client.text()
    assert "snap1" in monitor.cmd("info snapshots")
    assert_still_supervised(core, qemu_pid)
    assert core.state().get("migrated_to") is None


def test_adoption_whatever_state_json_says(fleet: Fleet) -> None:
    """A core killed with -9 leaves QEMU running; whatever state.json then says (crashed, shutdown, garbage,
    nothing), the next core adopts that QEMU and never starts a second one."""
    run = fleet.root / "ad"
    core = fleet.core("ad", run_dir=run, qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    for lie in ({"state": "crashed", "qemu_pid": qemu_pid}, {"state": "shutdown", "qemu_pid": None}, "garbage{",
                None):
        core.proc.kill()
        core.wait(timeout=10)
        state_file = run / "state.json"
        if lie is None:
            state_file.unlink()
        else:
            state_file.write_text(lie if isinstance(lie, str) else json.dumps(lie))
        core = fleet.core("ad", run_dir=run, qemu_args=SMALL_VM)
        assert core.state()["qemu_pid"] == qemu_pid and core.state()["adopted"] is True, (lie, core.stderr())
        assert qemus_of(run) == [qemu_pid]
        assert_still_supervised(core, qemu_pid)


def qemus_of(run_dir: Path) -> list[int]:
    """Every live process whose arguments name this run directory's private QMP socket."""
    found = subprocess.run(["pgrep", "-f", f"path={run_dir}/private/qmp.sock"], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


#: A child that floods the control socket: N plain connections held until stdin closes (its own fd limit raised).
FLOODER = r"""
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
path, count = sys.argv[1], int(sys.argv[2])
held, refused = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        held.append(s)
    except OSError:
        refused += 1
        s.close()
print(len(held), refused, flush=True)
sys.stdin.read()
"""


def start_flooder(path: Path, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", FLOODER, str(path), str(count)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def hwm_mib(pid: int) -> float:
    """Peak resident memory of a process (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_huge_control_frames_are_refused_before_they_are_built(fleet: Fleet) -> None:
    """Four 4 MiB frames of empty maps: refused while decoding (element budget), peak RSS stays under 100 MB, the
    client that was attached stays attached (its heartbeats were answered on time) and its requests run."""
    import msgpack
    import zmq

    core = fleet.core("fr", qemu_args=SMALL_VM)
    qemu_pid = core.qemu_pid
    detached: list[str] = []
    endpoint = ipc_endpoint(core.run_dir / "control.sock")
    legit = ClientChannel(endpoint, name="legit", on_detached=detached.append)
    ctx = zmq.Context()
    hostile = ctx.socket(zmq.DEALER)
    try:
        await legit.connect(timeout_s=10)
        before = hwm_mib(core.pid)
        hostile.connect(endpoint)
        arguments = {"a": [[{}] * 60_000 for _ in range(69)]}  # 4.1 M objects in 4 MiB
        frame = msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "qmp",
                               "args": {"command": "query-status", "arguments": arguments}})
        assert 4_000_000 < len(frame) <= 4 << 20
        for _ in range(4):
            hostile.send(frame)
            assert await legit.qmp("query-status") is not None
        assert hostile.poll(10_000), "the hostile peer got no error frame"
        error = msgpack.unpackb(hostile.recv())
        assert error["t"] == "error" and error["code"] == "too-large", error
        assert await legit.qmp("query-name") == {"name": "fr"}
        assert hwm_mib(core.pid) < 100, (before, hwm_mib(core.pid))
        assert not detached and "no heartbeat" not in core.stderr()
    finally:
        hostile.close(linger=0)
        ctx.term()
        await legit.close()
    assert_still_supervised(core, qemu_pid)


async def test_a_connection_flood_under_a_low_fd_limit_never_aborts_the_core(fleet: Fleet) -> None:
    """1100 control connections against a core held to 1024 descriptors (and unable to raise its hard limit):
    libzmq aborts the process when accept() fails with EMFILE, so the core must refuse connections before that.
    The client it had keeps being served; the flood's connections are closed; a new client gets in after."""
    core = fleet.core("fl", qemu_args=SMALL_VM,
                      prefix=["prlimit", "--nofile=1024:1024", "--", "setpriv", "--bounding-set=-sys_resource",
                              "--"])
    qemu_pid = core.qemu_pid
    assert Path(f"/proc/{core.pid}/limits").read_text().count("1024") >= 2
    endpoint = ipc_endpoint(core.run_dir / "control.sock")
    detached: list[str] = []
    legit = ClientChannel(endpoint, name="legit", on_detached=detached.append)
    try:
        await legit.connect(timeout_s=10)
        flooder = fleet.add(start_flooder(core.run_dir / "control.sock", 1100))
        assert flooder.stdout is not None
        held, refused = map(int, flooder.stdout.readline().split())
        assert held + refused == 1100
        wait_for(lambda: "refusing a connection" in core.stderr(), 10, "the core to refuse connections")
        for _ in range(3):
            assert await legit.qmp("query-status") is not None
        assert core.proc.poll() is None, core.stderr()
        # The flood's connections never spoke ZMTP: libzmq's handshake deadline closes them.
        wait_for(lambda: fd_count(core.pid) < 200, 30, "the flood's connections to close")
        flooder.kill()
        second = ClientChannel(endpoint, name="second")
        try:
            await second.connect(timeout_s=10)
            assert await second.qmp("query-name") == {"name": "fl"}
        finally:
            await second.close()
        assert not detached, detached
    finally:
        await legit.close()
    assert_still_supervised(core, qemu_pid)


async def test_silent_connections_are_closed_and_sessions_are_capped(fleet: Fleet) -> None:
    """ZeroMQ peers that connect and never say hello are closed after the hello deadline; a process cannot hold
    more than a few control connections."""
    import zmq

    core = fleet.core("sl", qemu_args=SMALL_VM)
    endpoint = ipc_endpoint(core.run_dir / "control.sock")
    fds_before = fd_count(core.pid)
    ctx = zmq.Context()
    silent = [ctx.socket(zmq.DEALER) for _ in range(12)]
    try:
        for sock in silent:
            sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # once closed, stay closed (easier to count)
            sock.connect(endpoint)
        wait_for(lambda: "already holds 8" in core.stderr(), 10, "the per-process connection limit")
        wait_for(lambda: "did not say hello" in core.stderr(), 20, "silent connections to be closed")
        wait_for(lambda: fd_count(core.pid) <= fds_before, 20,
                 "every silent connection to be closed")
    finally:
        for sock in silent:
            sock.close(linger=0)
        ctx.term()
    assert_still_supervised(core, core.qemu_pid)



def test_qmp_peers_are_capped_and_idle_ones_make_room(fleet: Fleet) -> None:
    """64 QMP connections that never negotiate cannot lock out a real peer: the oldest one still negotiating is
    evicted for it; those that stay silent are closed at the negotiation deadline."""
    import socket

    core = fleet.core("qp", qemu_args=SMALL_VM)
    idle = []
    for _ in range(64):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(core.qmp_socket))
        idle.append(fleet.add(sock))
    wait_for(lambda: len(core.state()["peers"]) == 64, 10, "64 idle peers")
    peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
    assert peer.execute("query-name") == {"return": {"name": "qp"}}
    assert "evicted (still negotiating) to make room" in core.stderr()
    idle[0].settimeout(5)
    assert b"" in (idle[0].recv(65536), idle[0].recv(65536))  # greeting, then EOF: the oldest was evicted
    # The rest are closed at the negotiation deadline; the negotiated peer is not.
    wait_for(lambda: len(core.state()["peers"]) == 1, 20, "idle peers to be closed at the deadline")
    assert peer.execute("query-status")["return"]["status"] == "running"


def test_display_readers_are_capped_per_process(fleet: Fleet) -> None:
    import socket

    core = fleet.core("dr")
    accepted = 0
    for _ in range(6):
        sock = fleet.add(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
        sock.settimeout(5)
        sock.connect(str(core.run_dir / "display.sock"))
        accepted += bool(sock.recv(4096))  # a hello, or EOF when refused
    assert accepted == 4, core.stderr()
    assert "that process already has 4 readers" in core.stderr()


def keys_row(peer: RawQmpPeer, scratch: Path) -> str | None:
    """What the demo guest shows as typed, or None before it has drawn its screen."""
    from guestlib import ROW_KEYS, text_row

    row = text_row(peer, ROW_KEYS, scratch)
    return row.removeprefix("KEYS:").strip() if row.startswith("KEYS:") else None


async def test_a_viewers_last_keys_all_arrive_and_none_stays_held(fleet: Fleet) -> None:
    """20 keys sent right before the viewer hangs up all reach the guest, in order; a Shift it pressed and never
    released is released after them (a later viewer's 'a' is not 'A')."""
    from vnclib import MiniViewer, VncClientProcess, free_port

    core = fleet.core("kb")
    client = fleet.add(VncClientProcess(core.run_dir, "kb", free_port()))
    peer = fleet.add(RawQmpPeer(core.qmp_socket).negotiate())
    wait_for(lambda: keys_row(peer, fleet.root) == "", 60, "the demo guest to draw")
    viewer = await MiniViewer.connect(client.port)
    text = "abcdefghijklmnopqrst"
    for char in text:
        viewer.key(ord(char), True)
        viewer.key(ord(char), False)
    viewer.key(0xFFE1, True)  # Shift_L, never released
    await viewer.writer.drain()
    viewer.close()
    wait_for(lambda: keys_row(peer, fleet.root) == text, 20, "every key to reach the guest")
    second = await MiniViewer.connect(client.port)
    try:
        for keysym in (ord("x"), ord("y")):
            second.key(keysym, True)
            second.key(keysym, False)
        await second.writer.drain()
        wait_for(lambda: keys_row(peer, fleet.root) == text + "xy", 10, "the next viewer's keys, unshifted")
    finally:
        second.close()


async def test_the_monitor_does_not_wait_behind_a_viewers_typing(fleet: Fleet) -> None:
    """Keys are paced (10 ms per key event, as QEMU's VNC): 1500 keys take 30 s to deliver. The monitor's QMP
    runs in its own lane meanwhile: it answers in well under the time the typing takes."""
    import time

    from test_monitor import Monitor
    from vnclib import MiniViewer, VncClientProcess, free_port

    core = fleet.core("ln")
    client = fleet.add(VncClientProcess(core.run_dir, "ln", free_port(), "--monitor"))
    sock = core.run_dir / "monitor.sock"
    wait_for(sock.exists, 10, "the monitor socket")
    monitor = fleet.add(Monitor(sock))
    viewer = await MiniViewer.connect(client.port)
    try:
        for _ in range(1500):
            viewer.key(ord("k"), True)
            viewer.key(ord("k"), False)
        await viewer.writer.drain()
        wait_for(lambda: "input" in client.text(), 5, "the client to forward input")
        start = time.monotonic()
        assert monitor.cmd("info status") == "VM status: running\r\n"
        took = time.monotonic() - start
        assert took < 5.0, f"the monitor waited {took:.1f} s behind the viewer's keys"
    finally:
        viewer.close()
