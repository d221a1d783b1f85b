"""Every command docs/monitor.md lists, through vmfront's monitor and through QEMU's own HMP on the same VM.

QEMU is started (by the core) with a real HMP monitor on a socket of the test's (``-monitor unix:...``: one
persistent session, so stateful commands such as ``cpu``, ``x``'s default format and the mouse buttons behave as
in an operator's session) and with its input trace (``-trace input_event_*`` into a file). Each row of ``ROWS``
runs a few command lines on QEMU's HMP, then the same lines on vmfront's monitor, and requires the same output
(normalised only where docs/monitor.md says why) and, for the input commands, the same input events in QEMU's
trace. The client's policy here lets it run everything but raw HMP, so QEMU's answers are compared; what the
default policy allows and refuses is tested in test_monitor.py.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, wait_for
from test_client import ClientProcess
from test_monitor import Monitor

from clients.monitor.commands import COMMANDS, INFO_COMMANDS
from core_daemon.demo_guest import demo_image_path, demo_qemu_args

VM = "table"
#: More hardware than the demo VM: two CPUs on two NUMA nodes, a DIMM, a NIC on a user netdev, a CD-ROM drive,
#: a VM generation ID and a watchdog.
RICH_ARGS = [
    "-smp", "2", "-m", "16M,slots=2,maxmem=64M",
    "-object", "memory-backend-ram,id=m0,size=8M", "-object", "memory-backend-ram,id=m1,size=8M",
    "-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1",
    "-object", "memory-backend-ram,id=mem1,size=8M", "-device", "pc-dimm,id=dimm1,memdev=mem1",
    "-device", "vmgenid,guid=324e6eaf-d1d1-4bf6-bf41-b9bb6c91fb87",
    "-netdev", "user,id=n0", "-device", "e1000,netdev=n0,id=nic0", "-device", "i6300esb",
    "-drive", "if=ide,index=2,media=cdrom", "-device", "usb-hub,id=hub0,port=2",
]
#: The client may run everything but raw HMP (and device_add without the default argument rule), so that QEMU's
#: own answers are what gets compared.
WIDE_POLICY = ('[sockets.client]\ndefault = "allow"\ndeny = ["human-monitor-command"]\n'
               "[sockets.client.arguments.device_add]\n[sockets.client.arguments.qom-list]\n"
               "[sockets.client.arguments.qom-get]\n")

_ECHO_END = b"\x1b[K\r\n"


class QemuHmp:
    """A session on QEMU's own HMP socket: it echoes what is typed (readline), then answers, then prompts."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.buf = b""
        self._until_prompt()

    def _until_prompt(self) -> bytes:
        while not self.buf.endswith(b"(qemu) "):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"QEMU's monitor closed; got {self.buf!r}")
            self.buf += chunk
        out, self.buf = self.buf[:-len(b"(qemu) ")], b""
        return out

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        out = self._until_prompt()
        echo_end = out.find(_ECHO_END)
        return out[echo_end + len(_ECHO_END):].decode() if echo_end >= 0 else out.decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Table:
    core: CoreProcess
    root: Path
    ours: Monitor
    qemu: QemuHmp
    trace: Path
    peer: RawQmpPeer

    def close(self) -> None:
        self.ours.close()
        self.qemu.close()
        self.peer.close()

    def trace_lines(self) -> list[str]:
        return self.trace.read_text().splitlines() if self.trace.exists() else []

    def settled_trace(self, start: int) -> list[str]:
        """The trace lines from ``start`` on, once QEMU has written no new one for a while (sendkey releases its
        keys 100 ms later)."""
        last, quiet_since = -1, time.monotonic()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            count = len(self.trace_lines())
            if count != last:
                last, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since > 0.4:
                break
            time.sleep(0.05)
        return self.trace_lines()[start:]


def start_table(fleet: Fleet, name: str, qemu_args: list[str]) -> Table:
    """A core (wide client policy) whose QEMU also has an HMP socket and an input trace, and a client monitor."""
    root = fleet.root
    policy = root / "policy.toml"
    policy.write_text(WIDE_POLICY)
    trace, hmp = root / "trace.log", root / "hmp.sock"
    qemu_args = [*qemu_args, "-monitor", f"unix:{hmp},server=on,wait=off", "-trace", "input_event_*",
                 "-D", str(trace)]
    core = fleet.core(name, "--policy", str(policy), run_dir=root / "run", qemu_args=qemu_args)
    client = fleet.add(ClientProcess(core, name, "--monitor"))
    wait_for(lambda: (core.run_dir / "monitor.sock").exists() and "attached to the core" in client.text(), 15,
             "the client's monitor")
    table = Table(core, root, Monitor(core.run_dir / "monitor.sock", timeout=30), QemuHmp(hmp), trace,
                  RawQmpPeer(core.qmp_socket).negotiate())
    fleet.add(table)
    return table


@pytest.fixture(scope="module")
def table() -> Iterator[Table]:
    with Fleet() as fleet:
        yield start_table(fleet, VM, [*demo_qemu_args(demo_image_path()), *RICH_ARGS])


# --- documented normalisations (docs/monitor.md, "Same output as QEMU") ------------------------------------------

Normaliser = Callable[[str], str]


def _registers(text: str) -> str:
    """info registers: what the core's dump of the CPU state lacks (II, A20, SMM, HLT, DRn, EFER, FPU, SSE)."""
    text = re.sub(r" II=\d A20=\d SMM=\d HLT=\d", "", text)
    return "".join(line for line in text.splitlines(keepends=True)
                   if not re.match(r"(DR[0-7]|EFER|FCW|FPR|XMM|YMM|ZMM|MXCSR)", line))


def _qtree(text: str) -> str:
    """info qtree: the order of a device's property and GPIO lines (QOM does not keep QEMU's), and a sysbus
    device's ``mmio`` lines (QOM does not say which of its memory regions it registered)."""
    lines = [line for line in text.splitlines(keepends=True) if not line.lstrip().startswith("mmio ")]
    out: list[str] = []
    block: list[str] = []
    attribute = re.compile(r"^\s*(gpio-(in|out) |[\w.-]+ = )")
    for line in lines:
        if attribute.match(line) and (not block or _indent(block[0]) == _indent(line)):
            block.append(line)
            continue
        out.extend(sorted(block))
        block = [line] if attribute.match(line) else []
        if not block:
            out.append(line)
    out.extend(sorted(block))
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _network(text: str) -> str:
    """info network: a netdev's type and options are not in QOM; its name is."""
    return re.sub(r"^ \\ ([^:\n]+):.*$", r" \\ \1", text, flags=re.MULTILINE)


def _snapshot_times(text: str) -> str:
    """info snapshots of snapshots taken at different moments: size, date and clock differ."""
    return re.sub(r"^(--\s+\S+)\s+.*$", r"\1 SIZE DATE CLOCK", text, flags=re.MULTILINE)


def _progress(text: str) -> str:
    """savevm/loadvm/delvm: vmfront prints job progress lines while a snapshot job runs; QEMU prints none."""
    return re.sub(r"^(savevm|loadvm|delvm): .*\n", "", text, flags=re.MULTILINE)


def _auto_nodes(text: str) -> str:
    """A medium changed twice gets two nodes: QEMU numbers automatic node names (#blockNNN) as it makes them."""
    return re.sub(r"#block\d+", "#blockN", text)


def _blockstats(text: str) -> str:
    return re.sub(r"idle_time_ns=\d+", "idle_time_ns=N", text)


@dataclass(frozen=True)
class Row:
    name: str
    lines: tuple[str, ...]
    normalise: Normaliser | None = None
    #: Also compare QEMU's input trace.
    trace: bool = False
    #: Run with the guest paused (state that moves by itself: registers, video memory, interrupt counts).
    paused: bool = False
    #: Run on QEMU's HMP before and after both sides (a state both compare against).
    setup: tuple[str, ...] = ()
    teardown: tuple[str, ...] = ()


def _info_rows() -> list[Row]:
    simple = ["status", "version", "name", "uuid", "kvm", "cpus", "block", "block -n", "block ide0-hd0",
              "block ide1-cd0", "chardev", "mice", "migrate", "migrate_parameters", "migrate_capabilities", "pci",
              "hotpluggable-cpus", "memdev", "iothreads", "snapshots", "block-jobs", "memory_size_summary",
              "dump", "tpm", "memory-devices", "vm-generation-id", "numa", "usb", "balloon"]
    rows = [Row(f"info {topic}", (f"info {topic}",)) for topic in simple]
    rows += [Row("info blockstats", ("info blockstats",), _blockstats),
             Row("info irq", ("info irq",), paused=True),
             Row("info network", ("info network",), _network),
             Row("info qtree", ("info qtree",), _qtree)]
    return rows


ROWS: list[Row] = [
    *_info_rows(),
    # Registers and expressions, paused: the core reads them from a guest-memory dump (docs/monitor.md).
    Row("info registers", ("info registers", "info registers -a", "info registers 1", "info registers 5"),
        _registers, paused=True),
    Row("cpu", ("cpu 1", "info cpus", "info registers", "p $eax", "cpu 0", "cpu 5", "cpu", "info cpus"),
        _registers, paused=True),
    Row("print", ("p 5", "p /x 255", "print /o 8", "p /c 65", "p /c 10", "p /d -1", "p /u -1", "p /x -1",
                  "p 1+2*3", "p 7/-2", "p 1 + 6 & 3", "p ~0", "p 'a'", "p 010", "p 0x10|1", "p (1", "p 1/0",
                  "p 09", "p $eax", "p /x $pc", "p $cs.limit", "p $nosuch", "p /x $eip+1", "p /z 1"),
        paused=True),
    Row("x", ("x /4xw 0xb8000", "x /8xb 0xb8000", "x 0xb8000", "x /2c 0xb8000", "x /3dh 0xb8000",
              "x /2ug 0xb8000", "x /4o 0xb8000", "x /5cw 0xb8000", "x/2x 0xb8000", "x /20xb 0xb8000",
              "x /2x 0xfffffffff000", "x /3i $pc", "x /2i 0x7c00", "x /0x 0", "x /4q 0"), paused=True),
    Row("xp", ("xp /8xb 0xb8000", "xp /2xg 0xb8000", "xp /16xb 0xfff0", "xp /3i 0x7c00", "xp /2dw 0x400"),
        paused=True),
    # Input: the same events in QEMU's trace.
    Row("mouse_move", ("mouse_move 5 0 1", "mouse_move -3 4 -2", "mouse_move 1 1", "mouse_move 0x10 x 0",
                       "mouse_move 2"), trace=True),
    Row("mouse_button", ("mouse_button 1", "mouse_button 1", "mouse_button 9", "mouse_button 4",
                         "mouse_button 0", "mouse_button x"), trace=True),
    Row("sendkey", ("sendkey a", "sendkey shift-b 50", "sendkey ctrl-alt-f1", "sendkey 0x1e", "sendkey <",
                    "sendkey ctrl-", "sendkey ctrl--", "sendkey 0x", "sendkey foo", "sendkey"), trace=True),
    Row("input while paused", ("mouse_move 1 1 1", "mouse_button 1", "mouse_button 0"), trace=True, paused=True),
    # Lifecycle and state that the row puts back.
    Row("stop/cont", ("stop", "info status", "s", "c", "info status", "cont", "stop x")),
    Row("system_reset", ("system_reset", "system_powerdown", "system_wakeup", "nmi")),
    Row("balloon", ("balloon 8", "balloon -1", "balloon x")),
    Row("set_link", ("set_link nic0 off", "set_link nic0 on", "set_link n0 off", "set_link n0 on",
                     "set_link nosuch off", "set_link nic0 maybe")),
    Row("watchdog_action", ("watchdog_action pause", "watchdog_action NONE", "watchdog_action reset",
                            "watchdog_action foo")),
    Row("announce_self", ("announce_self", "announce_self nic0 myid", "announce_self nic0,")),
    Row("qom", ("qom-list", "qom-list /machine", "qom-list /machine/peripheral", "qom-get /machine smp",
                "qom-get /machine/peripheral/nic0 mac", "qom-get /machine boot", "qom-list /nonexist",
                "qom-get /machine nosuch", "qom-get /machine")),
    Row("migrate settings", ("migrate_set_capability xbzrle on", "info migrate_capabilities",
                             "migrate_set_capability xbzrle off", "migrate_set_capability foo on",
                             "migrate_set_capability xbzrle maybe", "migrate_set_parameter downtime-limit 500",
                             "info migrate_parameters", "migrate_set_parameter downtime-limit 300",
                             "migrate_start_postcopy", "migrate_cancel")),
    Row("block jobs", ("block_job_cancel foo", "block_job_cancel -f foo", "block_job_complete foo",
                       "block_job_pause foo", "block_job_resume foo", "block_job_set_speed foo 1M",
                       "block_job_cancel -x foo", "block_job_set_speed foo x", "info block-jobs")),
    Row("block_resize", ("block_resize nosuch 1M", "block_resize ide0-hd0 x", "block_resize ide1-cd0 1M",
                         "block_resize")),
    Row("media", ("change ide1-cd0 CDROM raw", "info block ide1-cd0", "eject ide1-cd0", "info block ide1-cd0",
                  "change ide0-hd0 CDROM", "eject nosuch", "eject -f ide1-cd0"), _auto_nodes),
    Row("device_add", ("device_add usb-mouse,id=mouse1,port=2.1", "info usb", "device_del mouse1",
                       "device_add nosuch", "device_add e1000,nosuch=1", "device_del nosuch", "device_add",
                       "device_add usb-kbd,id=kbd1,port=2.2", "info usb", "device_del kbd1",
                       "device_add usb-kbd,port=1")),
    Row("device_add help", ("device_add e1000,help", "device_add usb-mouse,?")),
    Row("snapshots present", ("info snapshots",), setup=("savevm common",), teardown=("delvm common",)),
    Row("savevm", ("savevm snap1", "info snapshots", "loadvm snap1", "delvm snap1", "info snapshots",
                   "loadvm nosuch", "delvm nosuch"), lambda text: _snapshot_times(_progress(text)), paused=True),
    Row("errors", ("foo", "  foo", "info foo", "info  foo", "help nonexist", "stop x", "info status extra",
                   "balloon x", "cont extra", "migrate_set_parameter foo 1", "migrate_set_parameter downtime-limit x",
                   "info registers x", "qom-list \"unterminated", "x /4xw", "screendump")),
]


def _run(table: Table, send: Callable[[str], str], lines: tuple[str, ...]) -> tuple[list[str], list[str]]:
    start = len(table.trace_lines())
    outputs = [send(line.replace("CDROM", str(table.root / "cd.iso"))) for line in lines]
    return outputs, table.settled_trace(start)


def _ours(table: Table, line: str) -> str:
    return table.ours.cmd(line).replace("\r\n", "\n")


def _qemus(table: Table, line: str) -> str:
    return table.qemu.cmd(line).replace("\r\n", "\n")


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_same_as_qemus_hmp(table: Table, row: Row) -> None:
    (table.root / "cd.iso").write_bytes(bytes(2048 * 16))
    setup = (*(("stop",) if row.paused else ()), *row.setup)
    for line in setup:
        _qemus(table, line)
    try:
        qemu_out, qemu_trace = _run(table, lambda line: _qemus(table, line), row.lines)
        ours_out, ours_trace = _run(table, lambda line: _ours(table, line), row.lines)
    finally:
        for line in (*row.teardown, *(("cont",) if row.paused else ())):
            _qemus(table, line)
    normalise = row.normalise or (lambda text: text)
    mismatches = [f"{line}:\n qemu: {normalise(q)!r}\n ours: {normalise(o)!r}"
                  for line, q, o in zip(row.lines, qemu_out, ours_out, strict=True) if normalise(q) != normalise(o)]
    assert not mismatches, "\n".join(mismatches)
    if row.trace:
        assert qemu_trace == ours_trace, f"input trace differs:\n qemu: {qemu_trace}\n ours: {ours_trace}"
        assert qemu_trace or row.paused, "the row should have produced input events"


#: Ours only, by design (docs/monitor.md): ``info vnc`` shows the client's VNC server, ``info commands`` is
#: vmfront's.
OURS_ONLY = {"vnc", "commands"}


def test_help_of_every_command_is_qemus(table: Table) -> None:
    mismatches = []
    topics = [c.name for c in COMMANDS.values() if c.name != "info"]  # `help info` lists: checked below
    topics += [f"info {n}" for n in INFO_COMMANDS if n not in OURS_ONLY]
    for topic in topics:
        ours, qemu = _ours(table, f"help {topic}"), _qemus(table, f"help {topic}")
        if ours != qemu:
            mismatches.append(f"help {topic}:\n ours: {ours!r}\n qemu: {qemu!r}")
    assert not mismatches, "\n".join(mismatches)
    # Every line of our full help is one of QEMU's (the policy here allows everything, so nothing is left out).
    qemu_help = _qemus(table, "help") + _qemus(table, "help info")
    missing = [line for line in (_ours(table, "help") + _ours(table, "help info")).splitlines(keepends=True)
               if line not in qemu_help and not any(f"info {n} " in line for n in OURS_ONLY)]
    assert not missing, missing


def test_what_qemu_has_and_the_monitor_cannot(table: Table) -> None:
    """``info mtree`` has no QMP form and QOM lacks what it prints; ``device_add help`` lacks QEMU's categories."""
    assert "address-space: memory" in _qemus(table, "info mtree")
    assert _ours(table, "info mtree").startswith("Error: 'info mtree' is not available: ")
    ours, qemu = _ours(table, "device_add help"), _qemus(table, "device_add help")
    assert 'name "usb-tablet"\n' in ours and 'name "usb-tablet", bus usb-bus' in qemu


def test_screendump_pixels_same_as_qemus(table: Table) -> None:
    """Paused, QEMU's screendump and ours (from the shared framebuffer) are the same file, once the capture has
    caught up with the last screen update (the keys typed by the rows above)."""
    _qemus(table, "stop")
    try:
        theirs, ours = table.root / "qemu.ppm", table.root / "ours.ppm"

        def same() -> bool:
            assert _qemus(table, f"screendump {theirs}") == ""
            assert _ours(table, f"screendump {ours}") == ""
            return theirs.read_bytes() == ours.read_bytes()

        wait_for(same, 10, "the same screendump from QEMU and from the monitor")
    finally:
        _qemus(table, "cont")


def test_drive_add_makes_a_node_device_add_can_use(table: Table) -> None:
    """HMP's drive_add has no QMP form: vmfront's makes a blockdev-add node (a policy must allow it)."""
    image = table.root / "extra.img"
    image.write_bytes(bytes(1 << 20))
    assert _ours(table, f"drive_add 0 if=none,file={image},format=raw,id=extra0") == "OK\n"
    nodes = table.peer.execute("query-named-block-nodes")["return"]
    assert any(n.get("node-name") == "extra0" and n["image"]["filename"] == str(image) for n in nodes)
    # What QEMU cannot hot-add, it says so in the same words; a format must be named (QMP cannot probe).
    line = f"drive_add 0 file={image},format=raw"
    assert _ours(table, line) == _qemus(table, line) == "Can't hot-add drive to type 1\n"
    assert "needs format=FORMAT" in _ours(table, f"drive_add 0 if=none,file={image},id=extra1")
    assert table.peer.execute("blockdev-del", arguments={"node-name": "extra0"}) == {"return": {}}


@pytest.mark.linux_guest
@pytest.mark.timeout(400)
def test_long_mode_registers_and_memory_same_as_qemus() -> None:
    """A 64-bit Linux guest: registers in long mode, its kernel's virtual addresses (translated by the CPU, as
    QEMU's memsave does) and 64-bit disassembly."""
    from test_agent_linux_guest import BOOT_TIMEOUT, build_image

    image = build_image()
    with Fleet() as fleet:
        console = fleet.root / "console.log"
        linux = start_table(fleet, "lmt", image.qemu_args(console))
        wait_for(lambda: console.exists() and "vmfront-guest:" in console.read_text(errors="replace"),
                 BOOT_TIMEOUT, "the Linux guest's init")
        _qemus(linux, "stop")
        lines = ("info registers", "info registers -a", "x /4i $pc", "x /2gx $esp", "x /8xb $pc",
                 "p /x $esp", "p $cs", "xp /4xw 0x1000")
        mismatches = []
        for line in lines:
            qemu, ours = _registers(_qemus(linux, line)), _registers(_ours(linux, line))
            if qemu != ours:
                mismatches.append(f"{line}:\n qemu: {qemu!r}\n ours: {ours!r}")
        assert not mismatches, "\n".join(mismatches)
        assert "RAX=" in _ours(linux, "info registers"), "the guest should be in long mode"
