"""The monitor's sans-IO parts: QEMU's argument syntax, the command table and HMP text formats.

Expected strings were captured from QEMU 7.2's own HMP (human-monitor-command) on the demo guest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from clients.monitor import format as fmt
from clients.monitor.commands import Session, completions, execute, help_text
from clients.monitor.parser import ArgError, parse_args, parse_int, parse_keys, parse_size, parse_spec
from ipc.channel import NotAttached, RemoteError


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
    run(backend, "mouse_button 5")
    assert backend.calls[-1][1] == {"events": [{"type": "btn", "data": {"down": True, "button": "left"}},
                                               {"type": "btn", "data": {"down": True, "button": "right"}}]}
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
