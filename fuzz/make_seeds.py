"""Write the seed corpus: a few valid (and a few nearly valid) inputs per target, under tests/fuzz_corpus/TARGET/.

``python fuzz/make_seeds.py`` rewrites the seeds (never the ``crashes/`` folder). The files are committed, so this
only needs running when a protocol grows a message.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ipc.messages import (  # noqa: E402
    AgentAckOp,
    AgentData,
    AgentWriteOp,
    Broadcast,
    Bye,
    ClipboardChanged,
    ClipboardSetOp,
    ConsoleData,
    ConsoleWriteOp,
    DisplayChanged,
    ErrorFrame,
    ErrorInfo,
    Heartbeat,
    Hello,
    InputOp,
    KeyEvent,
    Message,
    Migrated,
    Migrating,
    PointerEvent,
    QmpEvent,
    QmpOp,
    RefreshOp,
    ReleaseInputOp,
    Reply,
    Request,
    RunStateChanged,
    Shutdown,
    Welcome,
    WheelEvent,
)
from rfb import auth, wire  # noqa: E402
from rfb import clipboard as extclip  # noqa: E402

SEEDS = ROOT / "tests" / "fuzz_corpus"
# BGRX8888: 32 bpp, depth 24, little-endian, true colour, max 255 each, shifts 16 8 0.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


def qmp_seeds() -> dict[str, bytes]:
    def j(obj: object) -> bytes:
        return json.dumps(obj).encode() + b"\r\n"

    caps = j({"execute": "qmp_capabilities"})
    return {
        "negotiate": caps,
        "negotiate-id": j({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "a"}),
        "commands": caps + j({"execute": "query-status", "id": 1}) + j({"execute": "query-name"})
        + j({"execute": "input-send-event", "arguments": {"events": [
            {"type": "key", "data": {"down": True, "key": {"type": "qcode", "data": "a"}}}]}, "id": [1, {"x": None}]}),
        "no-newline": b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":2}',
        "strings": caps + b'{"execute": "qom-get", "arguments": {"path": "/ma\\u0063hine\\"\\\\", "property": "t"}}\n',
        "errors": caps + b'{"execute": 1}\n[1,2]\n"str"\n{"foo": 1}\n}\n{"execute":"x","exec-oob":"y"}\nnull tru\n',
        "bad-utf8": caps + b'{"execute": "\xff\xfe"}\n{"execute": "a\x01b"}\n',
        "nested": caps + b"[" * 40 + b"]" * 40 + b"\n" + b'{"execute": "x", "arguments": {"a": 1e999, "b": NaN}}\n',
        # What QEMU's parser rejects but Python's takes: the core must refuse it, keeping the id.
        "strict-json": caps + b'{"execute": "x", "id": 1, "arguments": {"s": "\\ud800", "n": "a\\u0000", '
        b'"i": 18446744073709551616, "j": -9223372036854775809, "k": ' + b"9" * 64 + b', "f": -Infinity}}\n'
        + b'{"execute": "x", "id": NaN}\n{"execute": "y", "arguments": {"deep": ' + b"[" * 140 + b"]" * 140
        + b', "many": [' + b"{}," * 300 + b"{}]}}\n",
    }


def rfb_client_seeds() -> dict[str, bytes]:
    """What QEMU's VNC server sends the core."""
    def server_init(width: int, height: int, name: bytes = b"QEMU (fuzz)") -> bytes:
        return struct.pack(">HH", width, height) + PIXEL_FORMAT + struct.pack(">I", len(name)) + name

    hs38 = b"RFB 003.008\n" + b"\x01\x01" + b"\x00\x00\x00\x00" + server_init(4, 2)
    hs33 = b"RFB 003.003\n" + b"\x00\x00\x00\x01" + server_init(4, 2)
    raw_rect = struct.pack(">HHHHi", 0, 0, 4, 2, 0) + bytes(range(32))
    update = b"\x00\x00" + struct.pack(">H", 1) + raw_rect
    desktop = b"\x00\x00" + struct.pack(">H", 1) + struct.pack(">HHHHi", 0, 0, 8, 4, -223)
    cursor = (b"\x00\x00" + struct.pack(">H", 1) + struct.pack(">HHHHi", 1, 1, 2, 2, -239)
              + bytes(2 * 2 * 4) + b"\xc0\xc0")
    colour_map = b"\x01\x00" + struct.pack(">HH", 0, 2) + bytes(12)
    cut = b"\x03\x00\x00\x00" + struct.pack(">I", 5) + b"hello"
    led = b"\x00\x00" + struct.pack(">H", 1) + struct.pack(">HHHHi", 0, 0, 1, 1, wire.ENCODING_QEMU_LED_STATE) + b"\x04"
    qemu_clipboard = b"".join(extclip.message(3, p) for p in (
        extclip.caps(), extclip.notify(), extclip.request(), extclip.provide_text("héllo\n".encode())))
    return {
        "led-and-clipboard": hs38 + led + qemu_clipboard + update,
        "handshake-3.8": hs38,
        "handshake-3.3": hs33,
        "handshake-3.7": b"RFB 003.007\n" + b"\x01\x01" + server_init(4, 2),
        "refused": b"RFB 003.008\n" + b"\x00" + struct.pack(">I", 6) + b"no way",
        "auth-failed": b"RFB 003.008\n\x01\x01" + b"\x00\x00\x00\x01" + struct.pack(">I", 4) + b"nope",
        "updates": hs38 + update + desktop + cursor + b"\x02" + cut,
        "colour-map": hs38 + colour_map + update,
        "multi-rect": hs38 + b"\x00\x00" + struct.pack(">H", 2) + raw_rect + struct.pack(">HHHHi", 1, 1, 1, 1, 0)
        + b"\x01\x02\x03\x04",
    }


def rfb_server_seeds() -> dict[str, bytes]:
    """What a viewer sends the client's VNC server."""
    set_pf = b"\x00\x00\x00\x00" + PIXEL_FORMAT
    encodings = [wire.ENCODING_ZRLE, wire.ENCODING_HEXTILE, wire.ENCODING_RAW, wire.ENCODING_DESKTOP_SIZE,
                 wire.ENCODING_CURSOR, wire.ENCODING_LAST_RECT, wire.ENCODING_QEMU_EXTENDED_KEY_EVENT,
                 wire.ENCODING_EXTENDED_DESKTOP_SIZE, wire.ENCODING_FENCE, wire.ENCODING_CONTINUOUS_UPDATES]
    set_enc = b"\x02\x00" + struct.pack(">H", len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings)
    fbur = b"\x03\x00" + struct.pack(">HHHH", 0, 0, 640, 480) + b"\x03\x01" + struct.pack(">HHHH", 0, 0, 64, 64)
    keys = b"\x04\x01\x00\x00" + struct.pack(">I", 0x61) + b"\x04\x00\x00\x00" + struct.pack(">I", 0x61)
    pointer = b"\x05\x01" + struct.pack(">HH", 10, 20) + b"\x05\x00" + struct.pack(">HH", 11, 21)
    cut = b"\x06\x00\x00\x00" + struct.pack(">I", 3) + b"abc"
    qemu_key = struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E)
    continuous = b"\x96\x01" + struct.pack(">HHHH", 0, 0, 640, 480)
    fence = b"\xf8\x00\x00\x00" + struct.pack(">IB", 0x80000003, 4) + b"abcd"
    desktop = b"\xfb\x00" + struct.pack(">HHBx", 800, 600, 1) + struct.pack(">IHHHHI", 0, 0, 0, 800, 600, 0)
    clip_enc = b"\x02\x00" + struct.pack(">H", 2) + struct.pack(">ii", wire.ENCODING_EXTENDED_CLIPBOARD,
                                                                  wire.ENCODING_QEMU_LED_STATE)
    viewer_clipboard = clip_enc + b"".join(extclip.message(6, p) for p in (
        extclip.caps(), extclip.notify(), extclip.peek(), extclip.request(),
        extclip.provide_text(extclip.encode_text("Grüße ✓"))))
    messages = set_pf + set_enc + fbur + keys + pointer + cut + qemu_key + continuous + fence + desktop \
        + viewer_clipboard
    response = auth.response_for("secret", bytes(range(16)))
    return {
        "handshake-3.8": b"RFB 003.008\n\x01\x01",
        "handshake-3.3": b"RFB 003.003\n\x01",
        "handshake-3.7": b"RFB 003.007\n\x01\x00",
        "apple-3.889": b"RFB 003.889\n\x01\x01",
        "messages-3.8": b"RFB 003.008\n\x01\x01" + messages,
        "messages-3.3": b"RFB 003.003\n\x01" + messages,
        "auth-3.8": b"RFB 003.008\n\x02" + response + b"\x01" + messages,
        "auth-3.3": b"RFB 003.003\n" + response + b"\x00" + set_enc + fbur,
        "bad-version": b"RFB 002.000\n",
        # VeNCrypt: type 19, version 0.2, a subtype; then (inside TLS, which the target stands in for) the rest.
        "vencrypt-x509none": b"RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 260) + b"\x01" + messages,
        "vencrypt-x509vnc": b"RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 261) + response + b"\x01" + messages,
        "vencrypt-tlsnone-3.7": b"RFB 003.007\n\x13\x00\x02" + struct.pack(">I", 257) + b"\x00" + set_enc + fbur,
        "vencrypt-bad-version": b"RFB 003.008\n\x13\x00\x01" + struct.pack(">I", 260),
        "vencrypt-bad-subtype": b"RFB 003.008\n\x13\x00\x02" + struct.pack(">I", 262) + b"\x01",
    }


def clipboard_seeds() -> dict[str, bytes]:
    """Extended Clipboard payloads, as either side sends them."""
    return {
        "caps": extclip.caps(),
        "caps-many-formats": struct.pack(">I", extclip.ACTION_CAPS | 0x1F) + bytes(20),
        "notify": extclip.notify(),
        "request": extclip.request(),
        "peek": extclip.peek(),
        "provide": extclip.provide_text(extclip.encode_text("Grüße, 世界\n")),
        "provide-empty": extclip.provide_text(None),
        "provide-truncated": extclip.provide_text(b"x" * 100)[:20],
    }


def ipc_seeds() -> dict[str, bytes]:
    msgs: dict[str, Message] = {
        "hello": Hello(1, (1,), "inst", 1234, 1000, "client", "0.1", ("qmp", "input")),
        "hello-endpoints": Hello(1, (1,), "inst", 1234, 1000, "client", "0.1", ("console",),
                                 (("vnc", "127.0.0.1:5900"), ("console", "/run/vmfront/vm/console.sock"))),
        "welcome": Welcome(1, 1, "vm", "inst", 99, "running", 1.0, "vmfront.vm.99.1", 3, "/run/d.sock", ("qmp",)),
        "heartbeat": Heartbeat("inst"),
        "request-qmp": Request(2, QmpOp("query-status", {"a": [1, 2.5, None, True, "x"]})),
        "request-input": Request(3, InputOp((KeyEvent(True, qcode="a"), KeyEvent(False, scancode=0x1E),
                                             PointerEvent(10, 20, 1), WheelEvent(-2)))),
        "request-input-source": Request(6, InputOp((KeyEvent(True, qcode="shift"),), "vnc#1 127.0.0.1:50112")),
        "request-input-release": Request(7, ReleaseInputOp("vnc#1 127.0.0.1:50112")),
        # Adversarial element counts: many small containers (counted while decoding), values QEMU rejects.
        "request-qmp-many": Request(8, QmpOp("query-status", {"a": [[{}] * 50] * 20, "b": "\x00"})),
        "request-refresh": Request(4, RefreshOp()),
        "request-agent": Request(5, AgentWriteOp(b'\xff{"execute":"guest-ping"}\n')),
        "request-agent-ack": Request(9, AgentAckOp(16)),
        "request-console": Request(6, ConsoleWriteOp(b"uname -a\r")),
        "request-clipboard": Request(9, ClipboardSetOp("Grüße ✓\n", "vnc#1 127.0.0.1:50112")),
        "event-clipboard": Broadcast(ClipboardChanged("from the guest: 世界")),
        "reply-ok": Reply(2, {"status": "running", "running": True}),
        "reply-error": Reply(2, error=ErrorInfo("GenericError", "denied by policy")),
        "event-qmp": Broadcast(QmpEvent({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})),
        "event-runstate": Broadcast(RunStateChanged("paused", "paused")),
        "event-migrating": Broadcast(Migrating()),
        "event-migrated": Broadcast(Migrated("ipc:///run/x/ctl.sock")),
        "event-agent": Broadcast(AgentData(b'\xff{"return": 1}\n')),
        "event-console": Broadcast(ConsoleData(b"[    0.000000] Linux version 6.1.0\r\n")),
        "event-display": Broadcast(DisplayChanged("vmfront.vm.1.2", 2, None)),
        "event-shutdown": Broadcast(Shutdown("qemu exited")),
        "error": ErrorFrame("malformed", "not msgpack", 7),
        "bye": Bye("client stopping"),
    }
    seeds = {name: message.encode() for name, message in msgs.items()}
    # An array header that claims a million items (refused from the header) and a frame nested past the limit.
    seeds["array-header-huge"] = b"\x85\xa1v\x01\xa1t\xa7request\xa2id\x01\xa2op\xa3qmp\xa4args\xdd\x00\x0f\x42\x40"
    seeds["nested-deep"] = (b"\x85\xa1v\x01\xa1t\xa7request\xa2id\x01\xa2op\xa3qmp\xa4args\x82\xa7command\xa1x"
                            b"\xa9arguments\x81\xa1a" + b"\x91" * 60 + b"\xc0")
    return seeds


def agent_seeds() -> dict[str, bytes]:
    return {
        "sync-reply": b'\xff{"return": 42}\n{"return": {}}\n',
        "stale-then-sync": b'{"return": {"version": "7.2"}}\n\xff{"return": 7}\n\xff{"return": 42}\n{"return": {}}\n',
        "error-reply": b'\xff{"return": 42}\n{"error": {"class": "CommandNotFound", "desc": "nope"}}\n',
        "info": b'\xff{"return": 42}\n{"return": {"version": "7.2.0", "supported_commands": '
        b'[{"enabled": true, "name": "guest-ping", "success-response": true}]}}\n',
        "ids": b'\xff{"return": 42}\n{"return": {}, "id": 12345}\n{"return": 1}',
        "garbage": b'\xff{"return": 42}\nnot json\n\xff{"return": 42}\n{"return": 1}\n{"unexpected": 1}\n',
        "mid-line-ff": b'\xff{"return": 42}\n{"retu\xffrn": 1}\n\xff\xff{"return": 42}\r\n{"return": []}\n',
        # Requests, as a script sends them to the agent proxy (the same target reads them both ways).
        "requests": b'\xff{"execute":"guest-sync-delimited","arguments":{"id":42}}{"execute":"guest-ping","id":"a"}'
        b"\n{'execute':'guest-info','id':[1,2.5e3,null]} {\"execute\": \"guest-exec\", \"arguments\": "
        b'{"path": "/bin/true", "arg": ["\\u00e9\\n"]}}',
        "requests-malformed": b'{"execute":"guest-ping",}\n}]\x01hello {"execute" "x"}{"id":1}{"execute":1}'
        b'{"execute":"guest-sync"}[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]"\\ud800"01 1e "a\xff"{"execute":\xff',
    }


def monitor_seeds() -> dict[str, bytes]:
    lines = [
        "info status", "info version", "info name", "info cpus", "info block", "info vnc", "info migrate",
        "help", "help info", "? sendkey", "stop", "cont", "system_reset", "system_powerdown",
        "sendkey ctrl-alt-f1", "sendkey ctrl-- 100", "sendkey 0x1d-0x38", "mouse_move 10 -20 1",
        "mouse_button 1", "screendump /tmp/fuzz-never-written.ppm -f png", "migrate -d tcp:127.0.0.1:4444",
        "migrate_set_parameter max-bandwidth 1G", "balloon 512", "device_add e1000,id=n1", "device_del n1",
        'drive_add 0 "file=x.img,if=none"', "eject -f ide1-cd0", "change vnc password", "savevm snap1",
        "loadvm snap1", "delvm snap1", "cpu 1", "quit", "nmi", "memsave 0x1000+(2*3) 100 /tmp/x",
        '"quoted \\"word\\"\\n" extra', "info qtree", "unknowncmd arg",
        "x /4xw 0xb8000", "xp/8cb 0x1000", "x /3i $pc", "p /x ($eax & 0xff) | 'a' % 3", "info registers -a",
        "set_link nic0 off", "qom-get /machine smp", "block_resize ide0-hd0 1.5G", "info network",
    ]
    return {f"line-{i:02d}": line.encode() for i, line in enumerate(lines)} | {
        "many-lines": "\n".join(lines[:8]).encode() + b"\r\n",
        "non-utf8": b"sendkey \xff\xfe\nmouse_move 0x7fffffff 0xffffffffffffffff\n",
    }


def cpu_state_note(index: int) -> bytes:
    """A QEMUCPUState (version 1, 440 bytes) as QEMU 7.2 writes it: registers, segments, control registers."""
    registers = [0x1000 * index + i for i in range(16)] + [0x7E25, 0x246]
    segments = b"".join(struct.pack("<IIIIQ", selector, 0xFFFF, 0x9300, 0, selector << 4)
                        for selector in range(10))
    body = struct.pack("<18Q", *registers) + segments + struct.pack("<5Q", 0x10, 0, 0, 0, 0) + struct.pack("<Q", 0)
    return struct.pack("<II", 1, 8 + len(body)) + body


def elf_dump(notes: list[tuple[bytes, int, bytes]], *, elf64: bool = True, machine: int = 3) -> bytes:
    """A core file like QEMU's dump-guest-memory: ELF header, one PT_NOTE program header, the notes."""
    blob = b""
    for name, note_type, desc in notes:
        named = name + b"\0"
        blob += struct.pack("<III", len(named), len(desc), note_type)
        blob += named.ljust((len(named) + 3) // 4 * 4, b"\0") + desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    if elf64:
        header_size, phent = 64, 56
        header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
            "<HHIQQQIHHHHHH", 4, machine, 1, 0, header_size, 0, 0, header_size, phent, 1, 0, 0, 0)
        phdr = struct.pack("<IIQQQQQQ", 4, 0, header_size + phent, 0, 0, len(blob), len(blob), 0)
    else:
        header_size, phent = 52, 32
        header = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9) + struct.pack(
            "<HHIIIIIHHHHHH", 4, machine, 1, 0, header_size, 0, 0, header_size, phent, 1, 0, 0, 0)
        phdr = struct.pack("<IIIIIIII", 4, header_size + phent, 0, 0, len(blob), len(blob), 0, 0)
    return header + phdr + blob


def dump_seeds() -> dict[str, bytes]:
    prstatus = (b"CORE", 1, bytes(144))
    two_cpus = [prstatus, prstatus, (b"QEMU", 0, cpu_state_note(0)), (b"QEMU", 0, cpu_state_note(1))]
    return {
        "elf64-two-cpus": elf_dump(two_cpus),
        "elf64-long-mode": elf_dump([(b"QEMU", 0, cpu_state_note(0))], machine=62),
        "elf32": elf_dump([prstatus, (b"QEMU", 0, cpu_state_note(0))], elf64=False),
        "short-note": elf_dump([(b"QEMU", 0, cpu_state_note(0)[:100])]),
        "no-cpu": elf_dump([prstatus]),
    }


def hextile_seeds() -> dict[str, bytes]:
    """Inputs of fuzz.targets.hextile_frame: header (pixel size, raw values, offset; width, height, palette size)
    then the palette and index bytes, or the pixels."""
    def head(bpp_code: int, raw: bool, pad: int, width: int, height: int, colours: int) -> bytes:
        return bytes((bpp_code | (4 if raw else 0) | pad << 3, width - 1, height - 1, colours - 1))

    text = bytes(1 if (x // 3 + y) % 7 == 0 else 0 for y in range(24) for x in range(40))
    return {
        "text-32bpp": head(2, False, 0, 40, 24, 2) + bytes((0xC0, 0xC0, 0xC0, 0, 0, 0, 0x80, 0)) + text,
        "text-8bpp-offset": head(0, False, 5, 40, 24, 2) + bytes((7, 200)) + text,
        "three-colours-16bpp": head(1, False, 3, 33, 17, 3) + bytes(range(6)) + bytes(i % 3 for i in range(33 * 17)),
        "sixteen-colours": head(2, False, 0, 16, 16, 16) + bytes(range(64)) + bytes((i * 7) % 16 for i in range(256)),
        "seventeen-colours": head(2, False, 0, 16, 16, 17) + bytes(range(68)) + bytes(i % 17 for i in range(256)),
        "noise-32bpp": head(2, True, 1, 35, 20, 1) + bytes((i * 97 + 13) % 251 for i in range(35 * 20 * 4)),
        "solid-edge": head(2, False, 0, 17, 33, 1) + bytes((1, 2, 3, 0)),
        "one-pixel": head(0, True, 0, 1, 1, 1) + b"\x05",
    }


def main() -> None:
    for target, seeds in (("qmp", qmp_seeds()), ("rfb_client", rfb_client_seeds()),
                          ("rfb_server", rfb_server_seeds()), ("clipboard", clipboard_seeds()), ("ipc", ipc_seeds()),
                          ("agent", agent_seeds()), ("monitor", monitor_seeds()), ("dump", dump_seeds()),
                          ("hextile", hextile_seeds())):
        folder = SEEDS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / f"{name}.bin").write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {folder}")
    (SEEDS / "crashes").mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    main()
