"""The monitor's sans-IO parts: QEMU's argument syntax, the command table and HMP text formats.

Expected strings were captured from QEMU 7.2's own HMP (human-monitor-command) on the demo guest.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clients.monitor import format as fmt
from clients.monitor.commands import Session, completions, execute, help_text
from clients.monitor.parser import ArgError, Format, parse_args, parse_int, parse_keys, parse_size, parse_spec
from core_daemon.guest_reads import parse_cpu_states
from ipc.channel import NotAttached, RemoteError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_args_words_quotes_flags_and_rest() -> None:
    specs = parse_spec("detach:-d,blk:-b,uri:s")
    assert parse_args(specs, " -d tcp:host:4444", "migrate") == {"detach": True, "blk": False, "uri": "tcp:host:4444"}
    assert parse_args(parse_spec("name:s"), ' "a b\\"c"', "x") == {"name": 'a b"c'}
    # As QEMU: the rest of the line, trailing spaces included.
    assert parse_args(parse_spec("device:S"), " e1000,id=n1 ", "device_add") == {"device": "e1000,id=n1 "}
    assert parse_args(parse_spec("filename:F,format:-fs,device:s?"), " /t/x -f png", "screendump") == {
        "filename": "/t/x", "format": "png"}
    with pytest.raises(ArgError, match=r"^stop: extraneous characters at the end of line$"):
        parse_args((), " x", "stop")
    with pytest.raises(ArgError, match=r"^sendkey: string expected$"):
        parse_args(parse_spec("keys:s,hold-time:i?"), "", "sendkey")
    with pytest.raises(ArgError, match=r"^unexpected end of expression$"):
        parse_args(parse_spec("button_state:i"), "", "mouse_button")


def test_int_expressions_and_sizes() -> None:
    assert parse_int("0x10+2*3") == 22
    assert parse_int("-(4-6)") == 2
    with pytest.raises(ArgError, match="invalid char 'x' in expression"):
        parse_int("x")
    assert parse_size("1G", 0) == 1 << 30
    assert parse_size("512", 0) == 512
    assert parse_size("2", 20) == 2 << 20


def test_sendkey_syntax() -> None:
    assert parse_keys("ctrl-alt-f1") == [{"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"},
                                         {"type": "qcode", "data": "f1"}]
    assert parse_keys("0x1d-a") == [{"type": "number", "data": 0x1D}, {"type": "qcode", "data": "a"}]
    assert parse_keys("ctrl-alt-<") == [{"type": "qcode", "data": "ctrl"}, {"type": "qcode", "data": "alt"},
                                        {"type": "qcode", "data": "less"}]
    with pytest.raises(ArgError, match=r"^invalid parameter: foo$"):
        parse_keys("ctrl-foo")
    # As QEMU's hmp_sendkey: every "-" separates, so "ctrl-" and "ctrl--" name an empty key; "0x" needs digits.
    for keys, bad in (("ctrl-", ""), ("ctrl--", ""), ("-", ""), ("0x", "0x"), ("0x1g", "0x1g"), ("0X1d", "0X1d")):
        with pytest.raises(ArgError, match=rf"^invalid parameter: {bad}$"):
            parse_keys(keys)


def test_formats_match_qemu_captures() -> None:
    assert fmt.info_status({"running": True, "singlestep": False, "status": "running"}) == "VM status: running\n"
    assert fmt.info_status({"running": False, "status": "paused"}) == "VM status: paused\n"
    assert fmt.info_status({"running": False, "status": "shutdown"}) == "VM status: paused (shutdown)\n"
    assert fmt.info_version({"qemu": {"major": 7, "minor": 2, "micro": 22},
                             "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}) == \
        "7.2.22Debian 1:7.2+dfsg-7+deb12u18+b3\n"
    assert fmt.info_kvm({"enabled": True, "present": True}) == "kvm support: enabled\n"
    assert fmt.info_cpus([{"cpu-index": 0, "thread-id": 30016}]) == "* CPU #0: thread_id=30016\n"
    assert fmt.info_mice([{"name": "QEMU HID Tablet", "index": 3, "current": False, "absolute": True},
                          {"name": "QEMU PS/2 Mouse", "index": 2, "current": True, "absolute": False}]) == \
        "  Mouse #3: QEMU HID Tablet (absolute)\n* Mouse #2: QEMU PS/2 Mouse\n"
    assert fmt.info_vnc([{"id": "default", "auth": "none", "server": [
        {"auth": "none", "host": "", "service": "/r/vnc.sock", "family": "unix", "websocket": False}],
        "clients": [{"host": "", "service": "", "family": "unix", "websocket": False}]}]) == (
        "default:\n  Server: :/r/vnc.sock (unix)\n    Auth: none (Sub: none)\n  Client: : (unix)\n"
        "    x509_dname: none\n    sasl_username: none\n")
    assert fmt.info_pci([{"bus": 0, "devices": [{
        "bus": 0, "slot": 2, "function": 0, "class_info": {"class": 768, "desc": "VGA controller"},
        "id": {"vendor": 0x1234, "device": 0x1111, "subsystem-vendor": 0x1AF4, "subsystem": 0x1100},
        "regions": [{"bar": 6, "type": "memory", "address": 0xFFFFFFFFFFFFFFFF, "size": 0x10000,
                     "mem_type_64": False, "prefetch": False}], "qdev_id": ""}]}]) == (
        "  Bus  0, device   2, function 0:\n    VGA controller: PCI device 1234:1111\n"
        "      PCI subsystem 1af4:1100\n      BAR6: 32 bit memory at 0xffffffffffffffff [0x0000fffe].\n"
        "      id \"\"\n")
    assert fmt.info_snapshots([("ide0-hd0", [])]) == "There is no snapshot available.\n"
    assert fmt.info_mice([]) == "No mouse devices connected\n"


class FakeBackend:
    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append((command, arguments))
        reply = self.replies.get(command)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def screendump(self, path: Path, image_format: str) -> None:
        self.calls.append(("screendump", {"path": str(path), "format": image_format}))


def run(backend: FakeBackend, line: str) -> str:
    out: list[str] = []
    asyncio.run(execute(Session(backend, out.append), line))
    return "".join(out)


def test_dispatch_errors_and_qmp_calls() -> None:
    backend = FakeBackend({"device_del": RemoteError("DeviceNotFound", "Device 'x' not found"),
                           "stop": NotAttached("gone")})
    assert run(backend, "foo") == "unknown command: 'foo'\n"
    assert run(backend, "info foo") == "unknown command: 'info foo'\n"
    assert run(backend, "stop x") == ('stop|s: extraneous characters at the end of line\n'
                                      'Try "help stop" for more information\n')
    assert run(backend, "device_del x") == "Error: Device 'x' not found\n"
    assert run(backend, "s") == "Error: core not attached (retrying)\n"
    assert run(backend, "sendkey ctrl-alt-f1 200") == ""
    assert backend.calls[-1] == ("send-key", {"keys": parse_keys("ctrl-alt-f1"), "hold-time": 200})
    run(backend, "mouse_button 5")  # QEMU's MOUSE_EVENT bits: 4 is the middle button (whatever its help says)
    assert backend.calls[-1][1] == {"events": [{"type": "btn", "data": {"down": True, "button": "left"}},
                                               {"type": "btn", "data": {"down": True, "button": "middle"}}]}
    assert run(backend, "screendump /tmp/x.png -f png") == ""
    assert backend.calls[-1] == ("screendump", {"path": "/tmp/x.png", "format": "png"})
    assert run(backend, "migrate_set_parameter downtime-limit 500") == ""
    assert backend.calls[-1] == ("migrate-set-parameters", {"downtime-limit": 500})


def test_help_and_completion() -> None:
    assert help_text("stop") == "stop|s  -- stop emulation\n"
    assert help_text("info status") == "info status  -- show the current VM status (running|paused)\n"
    assert help_text("nonexist") == "unknown command: 'nonexist'\n"
    # As QEMU: `help info` lists every info subcommand after the command's own line.
    lines = help_text("info").splitlines()
    assert lines[0].startswith("info [subcommand]") and len(lines) > 10
    assert "info status  -- show the current VM status (running|paused)" in lines
    assert completions("info sta") == ["status"]
    assert completions("sys") == ["system_powerdown", "system_reset", "system_wakeup"]
    assert "ctrl-alt-f1" in completions("sendkey ctrl-alt-f")


def test_expressions_are_qemus() -> None:
    """expr_sum in monitor/hmp.c: & | ^ bind tighter than + -, looser than * / %; C division; int64; strtoull
    numbers; character constants; registers through a lookup."""
    cases = {"1 + 6 & 3": 3, "7/-2": -3, "-7%2": -1, "~0": -1, "'a'": 97, "010": 8, "0x10|1": 17, "2*(3+4)": 14,
             "0xffffffffffffffff": -1, "1 ^ 3 | 4": 6, "- - 5": 5}
    for text, value in cases.items():
        assert parse_int(text) == value, text
    registers = {"eax": 0xFD000135, "pc": 0x7E25}.get
    assert parse_int("$eax & 0xff", registers) == 0x35
    assert parse_int("$pc+1", registers) == 0x7E26
    for text, message in (("(1", "')' expected"), ("1/0", "division by zero"), ("$nosuch", "unknown register"),
                          ("0x10000000000000000", "number too large"), ("'a", "missing terminating ' character"),
                          ("'", "character constant expected"), ("", "unexpected end of expression"),
                          ("09", "invalid char '9' in expression")):
        with pytest.raises(ArgError, match=f"^{re.escape(message)}$"):
            parse_int(text, registers)


def test_argument_kinds_as_monitor_parse_arguments() -> None:
    fmt_state = Format()
    spec = parse_spec("fmt:/,addr:l")
    assert parse_args(spec, "/4xw 0xb8000", "x", formats=fmt_state) == {"count": 4, "format": "x", "size": 4,
                                                                        "addr": 0xB8000}
    # The last /fmt's format and size become the defaults; /i keeps the size.
    assert parse_args(spec, "/2cb 0", "x", formats=fmt_state)["size"] == 1
    assert parse_args(spec, "0 + 4", "x", formats=fmt_state) == {"count": 1, "format": "c", "size": 1, "addr": 4}
    assert parse_args(spec, "/3i 0", "x", formats=fmt_state)["size"] == -1
    assert parse_args(spec, "0", "x", formats=fmt_state) == {"count": 1, "format": "i", "size": -1, "addr": 0}
    with pytest.raises(ArgError, match=r"^invalid char in format: 'z'$"):
        parse_args(spec, "/4z 0", "x", formats=fmt_state)
    assert parse_args(parse_spec("name:s,up:b"), "nic0 off", "set_link") == {"name": "nic0", "up": False}
    with pytest.raises(ArgError, match=r"^Expected 'on' or 'off'$"):
        parse_args(parse_spec("name:s,up:b"), "nic0 maybe", "set_link")
    assert parse_args(parse_spec("device:B,size:o"), "d 1.5G", "block_resize") == {"device": "d", "size": 3 << 29}
    assert parse_args(parse_spec("device:B,size:o"), "d 2", "block_resize")["size"] == 2 << 20  # MiB by default
    with pytest.raises(ArgError, match=r"^invalid size$"):
        parse_args(parse_spec("device:B,size:o"), "d 0x10k", "block_resize")
    with pytest.raises(ArgError, match=r"^block_resize: block device name expected$"):
        parse_args(parse_spec("device:B,size:o"), "", "block_resize")
    assert parse_args(parse_spec("value:M"), "8", "balloon") == {"value": 8 << 20}
    with pytest.raises(ArgError, match=r"^enter a positive value$"):
        parse_args(parse_spec("value:M"), "-1", "balloon")
    with pytest.raises(ArgError, match=r"^'cpu' has failed: integer is for 32-bit values$"):
        parse_args(parse_spec("index:i"), "0x100000000", "cpu")
    flags = parse_spec("force:-f,device:B")
    with pytest.raises(ArgError, match=r"^block_job_cancel: unsupported option -x$"):
        parse_args(flags, "-x foo", "block_job_cancel")
    assert parse_args(flags, "-f foo", "block_job_cancel") == {"force": True, "device": "foo"}
    # A flag given before its turn is left for its turn (QEMU's is_valid_option); one whose turn has passed is not
    # an option any more.
    migrate = parse_spec("detach:-d,blk:-b,inc:-i,resume:-r,uri:s")
    assert parse_args(migrate, "-d -b u", "migrate") == {"detach": True, "blk": True, "inc": False,
                                                         "resume": False, "uri": "u"}
    assert parse_args(migrate, "-b u", "migrate")["blk"] is True
    with pytest.raises(ArgError, match=r"^migrate: unsupported option -d$"):
        parse_args(migrate, "-b -d u", "migrate")


def test_sizes_and_snapshot_table(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [fmt.size_to_str(n) for n in (0, 999, 1000, 1024, 832890, 1536 << 20, 2 << 30)] == [
        "0 B", "999 B", "0.977 KiB", "1 KiB", "813 KiB", "1.5 GiB", "2 GiB"]
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        snap = {"name": "snapA", "id": "1", "vm-state-size": 832890, "date-sec": 1796066365, "date-nsec": 0,
                "vm-clock-sec": 1, "vm-clock-nsec": 4_900_000}
        long = {**snap, "name": "averyveryverylongsnapshotname1234", "id": "2"}
        disk_only = {**snap, "name": "disk", "id": "3", "vm-state-size": 0}
        text = fmt.info_snapshots([("ide0-hd0", [snap, long, disk_only]), ("ide1-hd0", [snap, long])])
        # As captured from QEMU 7.2 (columns %-9s %-16s %8s%20s%13s%11s), with a partial snapshot on one disk.
        assert text == (
            "List of snapshots present on all disks:\n"
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n"
            "--        snapA             813 KiB 2026-11-30 19:19:25 00:00:01.004           \n"
            "--        averyveryverylongsnapshotname1234  813 KiB 2026-11-30 19:19:25 00:00:01.004           \n"
            "\nList of partial (non-loadable) snapshots on 'ide0-hd0':\n"
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n"
            "3         disk                  0 B 2026-11-30 19:19:25 00:00:01.004           \n")
        assert fmt.info_snapshots([("ide0-hd0", [snap]), ("ide1-hd0", [])]).splitlines()[1] == "None"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_memory_dump_and_print_formats() -> None:
    """Captured from QEMU 7.2's HMP on the demo guest's text screen at 0xb8000."""
    screen = bytes.fromhex("561f4d1f461f521f4f1f4e1f541f201f")
    assert fmt.memory_dump(0xB8000, screen, 4, "x", 4) == \
        "00000000000b8000: 0x1f4d1f56 0x1f521f46 0x1f4e1f4f 0x1f201f54\n"
    assert fmt.memory_dump(0xB8000, screen, 8, "x", 1) == \
        "00000000000b8000: 0x56 0x1f 0x4d 0x1f 0x46 0x1f 0x52 0x1f\n"
    assert fmt.memory_dump(0xB8000, screen, 2, "c", 1) == "00000000000b8000: 'V' '\\x1f'\n"
    assert fmt.memory_dump(0xB8000, screen, 2, "d", 2) == "00000000000b8000:  8022  8013\n"
    assert fmt.memory_dump(0xB8000, screen, 1, "o", 1) == "00000000000b8000: 0126\n"
    # A line that cannot be read ends the dump.
    assert fmt.memory_dump(0xFFFFFFFFF000, b"", 2, "x", 4) == "0000fffffffff000: Cannot access memory\n"
    assert [fmt.print_value(v, f) for v, f in ((255, "x"), (0, "x"), (8, "o"), (-1, "d"), (-1, "u"), (65, "c"),
                                                (10, "c"), (0x1FF, "c"))] == [
        "0xff\n", "0\n", "010\n", "-1\n", "18446744073709551615\n", "'A'\n", "'\\n'\n", "'\\x1ff'\n"]
    assert fmt.disassembly(0x7E25, bytes.fromhex("ebf6a16c0489c3"), 3, 16) == (
        "0x00007e25:  eb f6                    jmp      0x7e1d\n"
        "0x00007e27:  a1 6c 04                 movw     0x46c, %ax\n"
        "0x00007e2a:  89 c3                    movw     %ax, %bx\n")
    # A sign-extended immediate in long mode reads as QEMU's capstone 4 prints it (capstone 5 prints it unsigned).
    assert fmt.disassembly(0xFFFFFFFFB7582D25, bytes.fromhex("48c7c7846d3dba"), 1, 64) == (
        "0xffffffffb7582d25:  48 c7 c7 84 6d 3d ba     movq     $-0x45c2927c, %rdi\n")


def test_json_as_qemu_pretty_prints_it() -> None:
    assert fmt.qemu_json_pretty({"cpus": 2, "boot": {"order": "cad"}, "list": [1, True, None]}) == (
        '{\n    "cpus": 2,\n    "boot": {\n        "order": "cad"\n    },\n    "list": [\n        1,\n'
        '        true,\n        null\n    ]\n}')
    assert fmt.qemu_json_pretty({}) == "{\n}" and fmt.qemu_json_pretty([]) == "[\n]"
    assert fmt.qemu_json_pretty("é\x7f\"\n😀") == '"\\u00E9\\u007F\\"\\n\\uD83D\\uDE00"'


def test_input_commands_send_what_hmp_does() -> None:
    backend = FakeBackend({})
    run(backend, "mouse_move 5 0 1")
    # HMP: the move and the wheel press, a sync, the release, a sync: two input-send-event (each ends in a sync).
    assert backend.calls == [
        ("input-send-event", {"events": [{"type": "rel", "data": {"axis": "x", "value": 5}},
                                         {"type": "rel", "data": {"axis": "y", "value": 0}},
                                         {"type": "btn", "data": {"down": True, "button": "wheel-up"}}]}),
        ("input-send-event", {"events": [{"type": "btn", "data": {"down": False, "button": "wheel-up"}}]})]
    backend.calls.clear()
    run(backend, "mouse_move -3 x -2")
    assert backend.calls[0][1]["events"][1]["data"]["value"] == 0  # strtol("x") is 0
    assert backend.calls[0][1]["events"][2]["data"]["button"] == "wheel-down"
    # While the guest does not run, QEMU's HMP drops input silently; QMP's error is not printed either.
    paused = FakeBackend({"input-send-event": RemoteError("GenericError", "VM not running")})
    assert run(paused, "mouse_move 1 1") == ""


def test_help_leaves_out_what_the_policy_denies() -> None:
    allowed = frozenset({"stop", "query-status", "inject-nmi"})
    listing = help_text(None, allowed)
    assert "stop|s  -- stop emulation\n" in listing and "nmi  -- inject an NMI\n" in listing
    assert "block_resize" not in listing and "print|p /fmt expr" in listing  # print needs no QMP
    assert help_text("info", allowed).splitlines()[1:] == [
        "info status  -- show the current VM status (running|paused)"]
    assert "info vnc" in help_text("info", allowed | {"query-vnc-servers"})
    assert help_text("block_resize", allowed) == "block_resize device size -- resize a block image\n"


def _dump_seeds() -> Any:
    from fuzz.make_seeds import cpu_state_note, elf_dump

    return cpu_state_note, elf_dump


def test_cpu_state_notes_of_a_dump() -> None:
    cpu_state_note, elf_dump = _dump_seeds()
    prstatus = (b"CORE", 1, bytes(144))
    long_mode, cpus = parse_cpu_states(elf_dump([prstatus, (b"QEMU", 0, cpu_state_note(0)),
                                                 (b"QEMU", 0, cpu_state_note(1))], machine=62))
    assert long_mode is True and [c["cpu-index"] for c in cpus] == [0, 1]
    assert cpus[1]["rax"] == 0x1000 and cpus[0]["rip"] == 0x7E25 and cpus[0]["rflags"] == 0x246
    assert cpus[0]["cs"] == {"selector": 0, "limit": 0xFFFF, "flags": 0x9300, "base": 0}
    assert cpus[0]["idt"]["selector"] == 9 and cpus[0]["cr0"] == 0x10
    assert parse_cpu_states(elf_dump([(b"QEMU", 0, cpu_state_note(0))], elf64=False))[0] is False
    note = cpu_state_note(0)
    for bad, message in ((b"", "not a little-endian ELF"), (b"\x7fELF\x03\x01" + bytes(58), "unknown ELF class"),
                         (elf_dump([prstatus]), "no CPU state"),
                         (elf_dump([(b"QEMU", 0, note[:100])]), "too short"),
                         (elf_dump([(b"QEMU", 0, b"\x02" + note[1:])]), "unknown CPU state note"),
                         (elf_dump([(b"QEMU", 0, note)])[:-8], "outside the file")):
        with pytest.raises(ValueError, match=message):
            parse_cpu_states(bad)
