"""The monitor's command table and dispatcher: QEMU's HMP names, argument syntax, help and messages.

Sans-IO: a handler gets a ``Session`` (QMP through a ``Backend``, text out through ``write``) and the parsed
arguments; the transport (``service.py``) only feeds lines in and bytes out. Every command is built on QMP
through the core under its ``client`` policy; a denied command prints the policy's error like any QMP error, and
``help`` leaves out what the policy denies (the core's ``query-commands`` says what the client may run). Where
QEMU 7.2 has no QMP for a command, the core's own read commands (core_daemon/guest_reads.py) or QOM serve it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ipc.channel import NotAttached, RemoteError, RequestTimeout

from . import format as fmt
from . import qom
from .parser import (
    ArgError,
    ArgSpec,
    Format,
    Registers,
    command_name,
    parse_args,
    parse_keys,
    parse_size,
    parse_spec,
)

log = logging.getLogger(__name__)

#: How often long operations (migrate, savevm/loadvm/delvm) poll and print progress.
PROGRESS_INTERVAL = 0.5
#: vmfront's own QMP commands (served by the core) that read guest memory, registers and the QOM tree.
MEMORY_READ = "__org.vmfront_memory-read"
CPU_STATE = "__org.vmfront_cpu-state"
QOM_TREE = "__org.vmfront_qom-tree"
#: The core returns at most this much guest memory per request; ``x``/``xp`` read longer dumps in pieces.
READ_CHUNK = 64 << 10
#: The most one ``x``/``xp`` reads (QEMU has no limit; a monitor line that dumps more is refused).
MAX_DUMP = 1 << 20
#: Longest x86 instruction: what ``x /Ni`` reads per instruction.
MAX_INSN = 15


class Backend(Protocol):
    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """QEMU's ``return`` value; raises RemoteError, NotAttached, RequestTimeout."""

    async def screendump(self, path: Path, image_format: str) -> None:
        """Write the current frame from shared memory (never through QEMU)."""


class MonitorError(Exception):
    """A command failed in a way QEMU prints as ``Error: MESSAGE``."""


class MonitorText(Exception):
    """A command failed with a message QEMU prints as is (no ``Error:`` prefix)."""


@dataclass
class Session:
    """One monitor connection's state. QEMU keeps the current CPU per monitor; the mouse button state and the
    ``/fmt`` defaults are global in QEMU, per connection here."""

    backend: Backend
    write: Callable[[str], None]
    mouse_buttons: int = 0
    current_cpu: int | None = None
    formats: Format = field(default_factory=Format)
    closing: bool = False


Handler = Callable[[Session, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    name: str
    args_type: str
    params: str
    help: str
    handler: Handler
    aliases: tuple[str, ...] = ()
    specs: tuple[ArgSpec, ...] = field(default=(), compare=False)
    #: The QMP commands it runs (any one of them is enough to be useful); empty: it needs none.
    needs: tuple[str, ...] = ()
    #: False for a command that only says why it cannot work here: ``help`` and ``info`` do not list it.
    listed: bool = True

    @property
    def label(self) -> str:
        return "|".join((self.name, *self.aliases))

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{self.label} {self.params} -- {self.help}\n"

    def usable(self, allowed: frozenset[str] | None) -> bool:
        return self.listed and (allowed is None or not self.needs or any(name in allowed for name in self.needs))


COMMANDS: dict[str, Command] = {}
INFO_COMMANDS: dict[str, Command] = {}


def _register(table: dict[str, Command], name: str, args_type: str, params: str, help_text: str,
              aliases: tuple[str, ...] = (), needs: tuple[str, ...] = (), listed: bool = True,
              ) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        table[name] = Command(name, args_type, params, help_text, handler, aliases, parse_spec(args_type), needs,
                              listed)
        return handler
    return decorate


def command(name: str, args_type: str, params: str, help_text: str, aliases: tuple[str, ...] = (),
            needs: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    return _register(COMMANDS, name, args_type, params, help_text, aliases, needs)


def info(name: str, help_text: str, args_type: str = "", params: str = "", needs: tuple[str, ...] = (),
         listed: bool = True) -> Callable[[Handler], Handler]:
    return _register(INFO_COMMANDS, name, args_type, params, help_text, needs=needs, listed=listed)


def lookup(table: dict[str, Command], name: str) -> Command | None:
    if name in table:
        return table[name]
    return next((c for c in table.values() if name in c.aliases), None)


# --- dispatch ---------------------------------------------------------------------------------------------


async def execute(session: Session, line: str) -> None:
    """Run one command line, writing its output (and errors, QEMU-style) to the session.

    As QEMU's handle_hmp_command: the command name runs to a space or ``/``; an unknown one is quoted as typed;
    argument errors add ``Try "help NAME"`` with the name(s) as typed."""
    found = command_name(line)
    if found is None:
        return
    name, pos = found
    cmd = lookup(COMMANDS, name)
    if cmd is None:
        session.write(f"unknown command: '{line[:pos]}'\n")
        return
    while pos < len(line) and line[pos].isspace():
        pos += 1
    if cmd.name == "info" and pos < len(line):
        found = command_name(line[pos:])
        assert found is not None
        sub, end = found
        info_cmd = lookup(INFO_COMMANDS, sub)
        if info_cmd is None:
            session.write(f"unknown command: '{line[:pos + end]}'\n")
            return
        cmd, pos = info_cmd, pos + end
        while pos < len(line) and line[pos].isspace():
            pos += 1
    try:
        registers = await _registers_for(session, cmd, line[pos:])
        args = parse_args(cmd.specs, line[pos:], cmd.label, formats=session.formats, registers=registers)
    except ArgError as exc:
        session.write(f"{exc}\nTry \"help {line[:pos].rstrip()}\" for more information\n")
        return
    except _Failed as exc:
        session.write(str(exc))
        return
    try:
        await cmd.handler(session, args)
    except _Failed as exc:
        session.write(str(exc))


class _Failed(Exception):
    """What a failed command prints, already formatted."""


async def _guarded(session: Session, action: Awaitable[Any]) -> Any:
    """Run a QMP-backed step, turning its failures into QEMU-style output."""
    try:
        return await action
    except ArgError as exc:
        raise _Failed(f"{exc}\n") from exc
    except MonitorText as exc:
        raise _Failed(f"{exc}\n") from exc
    except MonitorError as exc:
        raise _Failed(f"Error: {exc}\n") from exc
    except RemoteError as exc:
        raise _Failed(f"Error: {exc.desc}\n") from exc
    except NotAttached as exc:
        raise _Failed("Error: core not attached (retrying)\n") from exc
    except RequestTimeout as exc:
        raise _Failed(f"Error: no answer from the core: {exc}\n") from exc


def _handler(func: Handler) -> Handler:
    async def run(session: Session, args: dict[str, Any]) -> None:
        await _guarded(session, func(session, args))
    run.__name__ = func.__name__
    return run


async def _registers_for(session: Session, cmd: Command, text: str) -> Registers | None:
    """A ``$register`` lookup when an expression argument may use one (``p $eax``, ``x /i $pc``)."""
    if "$" not in text or not any(spec.kind in ("i", "l", "M") for spec in cmd.specs):
        return None
    cpu = await _guarded(session, _current_cpu_state(session))
    return lambda name: fmt.register_value(cpu[0], name)


async def _cpu_states(session: Session) -> tuple[bool, list[dict[str, Any]]]:
    state = await session.backend.qmp(CPU_STATE)
    return bool(state.get("long-mode")), list(state.get("cpus", []))


def _pick_cpu(session: Session, cpus: list[dict[str, Any]]) -> dict[str, Any]:
    """The monitor's current CPU (``cpu N``), else the first (QEMU's mon_get_cpu)."""
    if not cpus:
        raise MonitorText("No CPU available")
    return next((c for c in cpus if c["cpu-index"] == session.current_cpu), cpus[0])


async def _current_cpu_state(session: Session) -> tuple[dict[str, Any], bool]:
    long_mode, cpus = await _cpu_states(session)
    return _pick_cpu(session, cpus), long_mode


async def allowed_commands(backend: Backend) -> frozenset[str] | None:
    """What the client may run (the core filters ``query-commands`` by its policy); None when unknown."""
    try:
        return frozenset(str(c.get("name")) for c in await backend.qmp("query-commands") if isinstance(c, dict))
    except (RemoteError, NotAttached, RequestTimeout, TypeError, AttributeError):
        return None


def help_text(topic: str | None, allowed: frozenset[str] | None = None) -> str:
    """``help [cmd]``; with ``allowed``, the full lists leave out what needs only QMP commands not in it."""
    def listing(table: dict[str, Command], prefix: str = "") -> str:
        return "".join(c.help_line(prefix) for c in sorted(table.values(), key=lambda c: c.name) if c.usable(allowed))

    if not topic:
        return listing(COMMANDS)
    words = topic.split()
    cmd = lookup(COMMANDS, words[0])
    if cmd is None:
        return f"unknown command: '{topic}'\n"
    if cmd.name == "info" and len(words) > 1:
        sub = lookup(INFO_COMMANDS, words[1])
        if sub is None:
            return f"unknown command: '{topic}'\n"
        return sub.help_line("info ")
    if cmd.name == "info":  # as QEMU: every subcommand, after the command's own line
        return cmd.help_line() + listing(INFO_COMMANDS, "info ")
    return cmd.help_line()


def completions(line: str) -> list[str]:
    """Words that complete the last word of ``line`` (commands, ``info`` topics, ``sendkey`` keys, ``help``)."""
    from .parser import QKEYCODES

    words = line.split()
    if line.endswith(" ") or not words:
        words.append("")
    prefix = words[-1]
    if len(words) == 1:
        names = [n for c in COMMANDS.values() for n in (c.name, *c.aliases) if len(n) > 1]
        return sorted(n for n in set(names) if n.startswith(prefix))
    first = lookup(COMMANDS, words[0])
    if first is None:
        return []
    if first.name == "info" and len(words) == 2:
        return sorted(n for n in INFO_COMMANDS if n.startswith(prefix))
    if first.name == "help" and len(words) == 2:
        return sorted(n for n in COMMANDS if n.startswith(prefix))
    if first.name == "help" and len(words) == 3 and words[1] == "info":
        return sorted(n for n in INFO_COMMANDS if n.startswith(prefix))
    if first.name == "sendkey" and len(words) == 2:
        head, sep, last = prefix.rpartition("-")
        return [f"{head}{sep}{k}" for k in QKEYCODES if k.startswith(last)]
    if first.name == "migrate_set_parameter" and len(words) == 2:
        return sorted(n for n in MIGRATE_PARAMETER_TYPES if n.startswith(prefix))
    return []


# --- commands ---------------------------------------------------------------------------------------------


@command("help", "name:S?", "[cmd]", "show the help", aliases=("?",))
async def _help(session: Session, args: dict[str, Any]) -> None:
    topic = args.get("name")
    allowed = await allowed_commands(session.backend) if not topic or topic.split()[0] == "info" else None
    session.write(help_text(topic, allowed))


@command("info", "item:s?", "[subcommand]", "show various information about the system state")
async def _info(session: Session, args: dict[str, Any]) -> None:  # ``info`` alone: its topics, as QEMU
    allowed = await allowed_commands(session.backend)
    session.write("".join(c.help_line("info ") for c in sorted(INFO_COMMANDS.values(), key=lambda c: c.name)
                          if c.usable(allowed)))


def _simple(name: str, qmp_name: str, help_text: str, aliases: tuple[str, ...] = ()) -> None:
    async def handler(session: Session, args: dict[str, Any]) -> None:
        await session.backend.qmp(qmp_name)

    command(name, "", "", help_text, aliases, needs=(qmp_name,))(_handler(handler))


_simple("stop", "stop", "stop emulation", ("s",))
_simple("cont", "cont", "resume emulation", ("c",))
_simple("system_reset", "system_reset", "reset the system")
_simple("system_powerdown", "system_powerdown", "send system power down event")
_simple("system_wakeup", "system_wakeup", "wakeup guest from suspend")
_simple("migrate_cancel", "migrate_cancel", "cancel the current VM migration")
_simple("nmi", "inject-nmi", "inject an NMI")
_simple("migrate_start_postcopy", "migrate-start-postcopy",
        "Followup to a migration command to switch the migration to postcopy mode. The postcopy-ram capability "
        "must be set on both source and destination before the original migration command .")


@command("quit", "", "", "quit the emulator", aliases=("q",), needs=("quit",))
@_handler
async def _quit(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("quit")
    session.closing = True


@command("cpu", "index:i", "index", "set the default CPU", needs=("query-cpus-fast",))
@_handler
async def _cpu(session: Session, args: dict[str, Any]) -> None:
    cpus = await session.backend.qmp("query-cpus-fast")
    if not any(c.get("cpu-index") == args["index"] for c in cpus):
        raise MonitorText("invalid CPU index")
    session.current_cpu = args["index"]


@command("sendkey", "keys:s,hold-time:i?", "keys [hold_ms]",
         "send keys to the VM (e.g. 'sendkey ctrl-alt-f1', default hold time=100 ms)", needs=("send-key",))
@_handler
async def _sendkey(session: Session, args: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"keys": parse_keys(args["keys"])}
    if "hold-time" in args:
        arguments["hold-time"] = args["hold-time"]
    await session.backend.qmp("send-key", arguments)


def _strtol(text: str) -> int:
    """C strtol(text, NULL, 0) as QEMU's mouse_move uses it (into an int): the leading number, else 0."""
    match = re.match(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if match is None:
        return 0
    sign, digits = match.groups()
    value = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 8) if digits[0] == "0" else int(digits)
    value = min(value, (1 << 63) - (0 if sign == "-" else 1))  # strtol saturates
    value = (-value if sign == "-" else value) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


async def _input(session: Session, events: list[dict[str, Any]]) -> None:
    """input-send-event; while the guest is not running QEMU's HMP drops input silently, QMP refuses it."""
    try:
        await session.backend.qmp("input-send-event", {"events": events})
    except RemoteError as exc:
        if exc.desc != "VM not running":
            raise


@command("mouse_move", "dx_str:s,dy_str:s,dz_str:s?", "dx dy [dz]", "send mouse move events",
         needs=("input-send-event",))
@_handler
async def _mouse_move(session: Session, args: dict[str, Any]) -> None:
    """As hmp_mouse_move: the move, then (for dz) a wheel press, a sync, the release; then a sync. Each
    input-send-event ends in a sync, so the press goes with the move and the release on its own."""
    events: list[dict[str, Any]] = [
        {"type": "rel", "data": {"axis": "x", "value": _strtol(args["dx_str"])}},
        {"type": "rel", "data": {"axis": "y", "value": _strtol(args["dy_str"])}},
    ]
    dz = _strtol(args["dz_str"]) if "dz_str" in args else 0
    if dz:
        button = "wheel-up" if dz > 0 else "wheel-down"
        await _input(session, [*events, {"type": "btn", "data": {"down": True, "button": button}}])
        events = [{"type": "btn", "data": {"down": False, "button": button}}]
    await _input(session, events)


#: QEMU's MOUSE_EVENT_* bits, in its InputButton order (despite the help text, 2 is the right button).
_BUTTONS = (("left", 1), ("middle", 4), ("right", 2))


@command("mouse_button", "button_state:i", "state", "change mouse button state (1=L, 2=M, 4=R)",
         needs=("input-send-event",))
@_handler
async def _mouse_button(session: Session, args: dict[str, Any]) -> None:
    """As hmp_mouse_button: a changed state sends the left/middle/right changes and a sync (only a sync if no
    such bit changed); an unchanged state sends nothing."""
    state = args["button_state"]
    if state == session.mouse_buttons:
        return
    events = [{"type": "btn", "data": {"down": bool(state & bit), "button": name}}
              for name, bit in _BUTTONS if (state ^ session.mouse_buttons) & bit]
    await _input(session, events)
    session.mouse_buttons = state


@command("screendump", "filename:F,format:-fs,device:s?,head:i?", "filename [-f format] [device [head]]",
         "save screen from head 'head' of display device 'device'in specified format 'format' as image "
         "'filename'.Currently only 'png' and 'ppm' formats are supported.")
@_handler
async def _screendump(session: Session, args: dict[str, Any]) -> None:
    image_format = args.get("format", "ppm")
    if image_format not in ("ppm", "png"):
        raise MonitorError(f"Parameter 'format' does not accept value '{image_format}'")
    if "device" in args:
        raise MonitorError("screendump of a chosen display device is not supported: the client dumps the "
                           "display the core captures")
    await session.backend.screendump(Path(args["filename"]), image_format)


@command("balloon", "value:M", "target", "request VM to change its memory allocation (in MB)", needs=("balloon",))
@_handler
async def _balloon(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("balloon", {"value": args["value"]})


# --- devices and media ------------------------------------------------------------------------------------


def _qemu_opts(text: str, implied: str) -> list[tuple[str, str]]:
    """QemuOpts syntax: ``a=b,c`` (``,,`` is a comma in a value; a bare first item is ``implied``; a bare later
    item ``x`` is ``x=on``, ``nox`` is ``x=off``)."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    pairs: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if eq:
            pairs.append((key, value))
        elif index == 0 and implied:
            pairs.append((implied, item))
        elif item.startswith("no") and item not in ("help", "?"):
            pairs.append((item[2:], "off"))
        else:
            pairs.append((item, "on"))
    return pairs


_BOOLS = {"on": True, "yes": True, "true": True, "y": True, "off": False, "no": False, "false": False, "n": False}
_INTEGER_TYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "int"})


def _typed(value: str, kind: str) -> Any:
    """An option string as the JSON value QMP's device_add wants for a property of ``kind`` (QEMU's HMP passes
    strings, parsed by the property); what does not parse stays a string for QEMU to refuse (or, like a PCI
    ``addr`` of ``06.0``, to take)."""
    if kind == "bool" and value in _BOOLS:
        return _BOOLS[value]
    if kind in _INTEGER_TYPES:
        try:
            return int(value, 16) if value[:2] in ("0x", "0X") else int(value, 8) if value[:1] == "0" and \
                len(value) > 1 else int(value, 10)
        except ValueError:
            return value
    if kind == "size":
        try:
            return parse_size(value, default_shift=0)
        except ArgError:
            return value
    return value


def _device_help_line(prop: dict[str, Any]) -> str:
    line = f"  {prop['name']}=<{prop.get('type', '')}>"
    if "description" in prop or "default-value" in prop:
        line = f"{line:<24} - {prop.get('description', '')}"
    if "default-value" in prop:
        default = prop["default-value"]
        text = ("true" if default else "false") if isinstance(default, bool) else str(default)
        line += f" (default: {text})"
    return line


@command("device_add", "device:O", "driver[,prop=value][,...]", "add device, like -device on the command line",
         needs=("device_add",))
@_handler
async def _device_add(session: Session, args: dict[str, Any]) -> None:
    options = _qemu_opts(args.get("device", ""), "driver")
    given = dict(options)
    driver = given.get("driver", "")
    if driver in ("help", "?"):
        types = await session.backend.qmp("qom-list-types", {"implements": "device", "abstract": False})
        session.write("".join(f"name \"{t['name']}\"\n" for t in sorted(types, key=lambda t: t["name"])))
        return
    properties: list[dict[str, Any]] = []
    if driver:
        with contextlib.suppress(RemoteError):  # not a device type: device_add says so in QEMU's words
            properties = await session.backend.qmp("device-list-properties", {"typename": driver})
    if any(key in ("help", "?") for key, _ in options):
        if properties:
            session.write(f"{driver} options:\n" + "".join(
                line + "\n" for line in sorted(_device_help_line(p) for p in properties)))
        else:
            session.write(f"There are no options for {driver}.\n")
        return
    kinds = {p["name"]: p.get("type", "") for p in properties}
    await session.backend.qmp("device_add", {key: value if key == "driver" else _typed(value, kinds.get(key, ""))
                                             for key, value in given.items()})


@command("device_del", "id:s", "device", "remove device", needs=("device_del",))
@_handler
async def _device_del(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("device_del", {"id": args["id"]})


#: QEMU's BlockInterfaceType numbers, for drive_add's "Can't hot-add drive to type N".
_INTERFACES = ("none", "ide", "scsi", "floppy", "pflash", "mtd", "sd", "virtio", "xen")


@command("drive_add", "node:-n,pci_addr:s,opts:s", "[-n] [[<domain>:]<bus>:]<slot>\n"
         "[file=file][,if=type][,bus=n]\n[,unit=m][,media=d][,index=i]\n[,snapshot=on|off][,cache=on|off]\n"
         "[,readonly=on|off][,copy-on-read=on|off]", "add drive to PCI storage controller", needs=("blockdev-add",))
@_handler
async def _drive_add(session: Session, args: dict[str, Any]) -> None:
    """HMP's drive_add has no QMP counterpart; its replacement is ``blockdev-add`` of a node named by ``id``
    (which ``device_add ...,drive=ID`` takes). Only ``if=none`` drives can be hot-added (as in QEMU), and the
    format must be given: QMP cannot probe an image as ``-drive`` does."""
    options = dict(_qemu_opts(str(args["opts"]), ""))
    interface = options.get("if", "none" if args["node"] else "ide")
    if interface != "none":
        kind = _INTERFACES.index(interface) if interface in _INTERFACES else -1
        raise MonitorText(f"Can't hot-add drive to type {kind}")
    if "file" not in options:
        raise MonitorError("drive_add through QMP needs file=PATH")
    if "format" not in options:
        raise MonitorError("drive_add through QMP needs format=FORMAT (QMP cannot probe an image's format)")
    node = options.get("id") or options.get("node-name") or f"drive-{uuid.uuid4().hex[:8]}"
    await session.backend.qmp("blockdev-add", {
        "node-name": node, "driver": options["format"],
        "read-only": _BOOLS.get(options.get("readonly", "off"), False),
        "file": {"driver": "file", "filename": options["file"]}})
    session.write("OK\n")


@command("eject", "force:-f,device:B", "[-f] device", "eject a removable medium (use -f to force it)",
         needs=("eject",))
@_handler
async def _eject(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("eject", {"device": args["device"], "force": args["force"]})


@command("change", "device:B,force:-f,target:F,arg:s?,read-only-mode:s?",
         "device [-f] filename [format [read-only-mode]]",
         "change a removable medium, optional format, use -f to force the operation",
         needs=("blockdev-change-medium", "change-vnc-password"))
@_handler
async def _change(session: Session, args: dict[str, Any]) -> None:
    if args["device"] == "vnc":  # the core answers change-vnc-password: the clients' VNC, not QEMU's capture
        if "read-only-mode" in args:
            raise MonitorError("Parameter 'read-only-mode' is invalid for VNC")
        if args["target"] not in ("passwd", "password"):
            raise MonitorError("Expected 'password' after 'vnc'")
        if "arg" not in args:  # QEMU prompts for it; this monitor has no hidden prompt
            raise MonitorError("give the password on the line: change vnc password PASSWORD")
        await session.backend.qmp("change-vnc-password", {"password": args["arg"]})
        return
    arguments: dict[str, Any] = {"device": args["device"], "filename": args["target"], "force": args["force"]}
    if "arg" in args:
        arguments["format"] = args["arg"]
    if "read-only-mode" in args:
        arguments["read-only-mode"] = args["read-only-mode"]
    await session.backend.qmp("blockdev-change-medium", arguments)


@command("set_password", "protocol:s,password:s,display:-ds,connected:s?",
         "protocol password [-d display] [action-if-connected]", "set spice/vnc password",
         needs=("set_password",))
@_handler
async def _set_password(session: Session, args: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"protocol": args["protocol"], "password": args["password"]}
    if "connected" in args:
        arguments["connected"] = args["connected"]
    if "display" in args:
        arguments["display"] = args["display"]
    await session.backend.qmp("set_password", arguments)


@command("expire_password", "protocol:s,time:s,display:-ds", "protocol time [-d display]",
         "set spice/vnc password expire-time", needs=("expire_password",))
@_handler
async def _expire_password(session: Session, args: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"protocol": args["protocol"], "time": args["time"]}
    if "display" in args:
        arguments["display"] = args["display"]
    await session.backend.qmp("expire_password", arguments)


@command("block_resize", "device:B,size:o", "device size", "resize a block image", needs=("block_resize",))
@_handler
async def _block_resize(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("block_resize", {"device": args["device"], "size": args["size"]})


def _block_job(name: str, qmp_name: str, help_text: str) -> None:
    async def handler(session: Session, args: dict[str, Any]) -> None:
        await session.backend.qmp(qmp_name, {"device": args["device"]})

    command(name, "device:B", "device", help_text, needs=(qmp_name,))(_handler(handler))


_block_job("block_job_complete", "block-job-complete", "stop an active background block operation")
_block_job("block_job_pause", "block-job-pause", "pause an active background block operation")
_block_job("block_job_resume", "block-job-resume", "resume a paused background block operation")


@command("block_job_cancel", "force:-f,device:B", "[-f] device",
         "stop an active background block operation (use -f\n\t\t\t if you want to abort the operation "
         "immediately\n\t\t\t instead of keep running until data is in sync)", needs=("block-job-cancel",))
@_handler
async def _block_job_cancel(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("block-job-cancel", {"device": args["device"], "force": args["force"]})


@command("block_job_set_speed", "device:B,speed:o", "device speed",
         "set maximum speed for a background block operation", needs=("block-job-set-speed",))
@_handler
async def _block_job_set_speed(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("block-job-set-speed", {"device": args["device"], "speed": args["speed"]})


# --- network, watchdog, QOM -------------------------------------------------------------------------------


@command("set_link", "name:s,up:b", "name on|off", "change the link status of a network adapter",
         needs=("set_link",))
@_handler
async def _set_link(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("set_link", {"name": args["name"], "up": args["up"]})


@command("announce_self", "interfaces:s?,id:s?", "[interfaces] [id]", "Trigger GARP/RARP announcements",
         needs=("announce-self",))
@_handler
async def _announce_self(session: Session, args: dict[str, Any]) -> None:
    """As hmp_announce_self: the migration parameters' announce timings, for the interfaces given (a comma list)."""
    params = await session.backend.qmp("query-migrate-parameters")
    arguments: dict[str, Any] = {key.removeprefix("announce-"): params[key]
                                 for key in ("announce-initial", "announce-max", "announce-rounds", "announce-step")}
    text = args.get("interfaces", "")
    interfaces = text.split(",")[:-1] if text.endswith(",") else text.split(",") if text else []
    if interfaces:
        arguments["interfaces"] = interfaces
    if "id" in args:
        arguments["id"] = args["id"]
    await session.backend.qmp("announce-self", arguments)


_WATCHDOG_ACTIONS = ("reset", "shutdown", "poweroff", "pause", "debug", "none", "inject-nmi")


@command("watchdog_action", "action:s", "[reset|shutdown|poweroff|pause|debug|none]", "change watchdog action",
         needs=("watchdog-set-action",))
@_handler
async def _watchdog_action(session: Session, args: dict[str, Any]) -> None:
    action = args["action"].lower()
    if action not in _WATCHDOG_ACTIONS:
        raise MonitorError(f"invalid parameter value: {action}")
    await session.backend.qmp("watchdog-set-action", {"action": action})


@command("qom-list", "path:s?", "path", "list QOM properties", needs=("qom-list",))
@_handler
async def _qom_list(session: Session, args: dict[str, Any]) -> None:
    if "path" not in args:
        session.write("/\n")
        return
    session.write(fmt.qom_list(await session.backend.qmp("qom-list", {"path": args["path"]})))


@command("qom-get", "path:s,property:s", "path property", "print QOM property", needs=("qom-get",))
@_handler
async def _qom_get(session: Session, args: dict[str, Any]) -> None:
    value = await session.backend.qmp("qom-get", {"path": args["path"], "property": args["property"]})
    session.write(fmt.qemu_json_pretty(value) + "\n")


# --- guest memory and expressions (x, xp, print) --------------------------------------------------------------


async def _read_memory(session: Session, address: int, size: int, physical: bool, line_size: int) -> bytes:
    """Guest memory from ``address`` on, as much as can be read of ``size`` bytes in whole ``line_size`` lines
    (QEMU's x/xp read line by line and stop at the first line they cannot read): the core reads it in pieces."""
    cpu_index = session.current_cpu if session.current_cpu is not None else await _first_cpu(session)
    data = bytearray()

    async def read(offset: int, length: int) -> bytes | None:
        arguments: dict[str, Any] = {"address": (address + offset) & 0xFFFFFFFFFFFFFFFF, "size": length,
                                     "physical": physical}
        if not physical:
            arguments["cpu-index"] = cpu_index
        try:
            reply = await session.backend.qmp(MEMORY_READ, arguments)
        except RemoteError as exc:
            if exc.desc.startswith("Invalid addr"):  # memsave: an address the CPU cannot translate
                return None
            raise
        return base64.b64decode(reply["data"])

    while len(data) < size:
        length = min(READ_CHUNK, size - len(data))
        chunk = await read(len(data), length)
        if chunk is not None:
            data += chunk
            continue
        # Find the readable lines of this piece (monotonic: the first unreadable line ends it).
        low, high = 0, -(-length // line_size)
        while low < high:
            middle = (low + high + 1) // 2
            if await read(len(data), min(middle * line_size, length)) is not None:
                low = middle
            else:
                high = middle - 1
        if low:
            piece = await read(len(data), min(low * line_size, length))
            data += piece or b""
        break
    return bytes(data)


async def _first_cpu(session: Session) -> int:
    cpus = await session.backend.qmp("query-cpus-fast")
    return int(cpus[0]["cpu-index"]) if cpus else 0


async def _memory_dump(session: Session, args: dict[str, Any], physical: bool) -> None:
    count, fmt_letter, size, address = args["count"], args["format"], args["size"], args["addr"]
    address &= 0xFFFFFFFFFFFFFFFF
    if fmt_letter == "i":
        cpu, long_mode = await _current_cpu_state(session)
        length = min(max(count, 0) * MAX_INSN, READ_CHUNK)
        data = await _read_memory(session, address, length, physical, 1) if length else b""
        session.write(fmt.disassembly(address, data, count, fmt.cpu_mode_bits(cpu, long_mode)))
        return
    length = size * count
    if length > MAX_DUMP:
        raise MonitorError(f"at most {MAX_DUMP} bytes per dump here ({length} asked)")
    line_size = 8 if size == 1 else 16
    data = await _read_memory(session, address, length, physical, line_size) if length > 0 else b""
    session.write(fmt.memory_dump(address, data, count, fmt_letter, size))


@command("x", "fmt:/,addr:l", "/fmt addr", "virtual memory dump starting at 'addr'", needs=(MEMORY_READ,))
@_handler
async def _x(session: Session, args: dict[str, Any]) -> None:
    await _memory_dump(session, args, physical=False)


@command("xp", "fmt:/,addr:l", "/fmt addr", "physical memory dump starting at 'addr'", needs=(MEMORY_READ,))
@_handler
async def _xp(session: Session, args: dict[str, Any]) -> None:
    await _memory_dump(session, args, physical=True)


@command("print", "fmt:/,val:l", "/fmt expr", "print expression value (use $reg for CPU register access)",
         aliases=("p",))
@_handler
async def _print(session: Session, args: dict[str, Any]) -> None:
    session.write(fmt.print_value(args["val"], args["format"]))


# --- migration --------------------------------------------------------------------------------------------

#: migrate_set_parameter's value types (QEMU 7.2's MigrateSetParameters).
MIGRATE_PARAMETER_TYPES: dict[str, str] = {
    "announce-initial": "size", "announce-max": "size", "announce-rounds": "size", "announce-step": "size",
    "compress-level": "uint", "compress-threads": "uint", "compress-wait-thread": "bool",
    "decompress-threads": "uint", "throttle-trigger-threshold": "uint", "cpu-throttle-initial": "uint",
    "cpu-throttle-increment": "uint", "cpu-throttle-tailslow": "bool", "max-cpu-throttle": "uint",
    "tls-creds": "str", "tls-hostname": "str", "tls-authz": "str", "max-bandwidth": "size",
    "downtime-limit": "uint", "x-checkpoint-delay": "uint", "block-incremental": "bool",
    "multifd-channels": "uint", "multifd-compression": "str", "multifd-zlib-level": "uint",
    "multifd-zstd-level": "uint", "xbzrle-cache-size": "size", "max-postcopy-bandwidth": "size",
}

_SIZE_ERROR = ("Parameter '{}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means "
               "kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")


@command("migrate_set_parameter", "parameter:s,value:s", "parameter value", "Set the parameter for migration",
         needs=("migrate-set-parameters",))
@_handler
async def _migrate_set_parameter(session: Session, args: dict[str, Any]) -> None:
    name, text = args["parameter"], args["value"]
    kind = MIGRATE_PARAMETER_TYPES.get(name)
    if kind is None:
        raise MonitorError(f"invalid parameter value: {name}")
    value: object
    if kind == "bool":
        if text not in ("on", "off", "true", "false", "yes", "no"):
            raise MonitorError(f"Parameter '{name}' expects 'on' or 'off'")
        value = text in ("on", "true", "yes")
    elif kind == "str":
        value = text
    else:
        try:
            value = parse_size(text, default_shift=0) if kind == "size" else int(text, 0)
        except (ArgError, ValueError):
            value = -1
        if not isinstance(value, int) or value < 0:
            raise MonitorError(_SIZE_ERROR.format(name))
        if name in ("max-bandwidth", "xbzrle-cache-size") and text.isdigit():
            value = int(text) << 20 if name == "max-bandwidth" else int(text)
    await session.backend.qmp("migrate-set-parameters", {name: value})


@command("migrate_set_capability", "capability:s,state:b", "capability state",
         "Enable/Disable the usage of a capability for migration", needs=("migrate-set-capabilities",))
@_handler
async def _migrate_set_capability(session: Session, args: dict[str, Any]) -> None:
    known = {c["capability"] for c in await session.backend.qmp("query-migrate-capabilities")}
    if args["capability"] not in known:
        raise MonitorError(f"invalid parameter value: {args['capability']}")
    await session.backend.qmp("migrate-set-capabilities",
                              {"capabilities": [{"capability": args["capability"], "state": args["state"]}]})


async def _poll_job(session: Session, what: str, is_done: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
    while True:
        done, progress = await is_done()
        if done:
            return
        if progress:
            session.write(f"{what}: {progress}\n")
        await asyncio.sleep(PROGRESS_INTERVAL)


@command("migrate", "detach:-d,blk:-b,inc:-i,resume:-r,uri:s", "[-d] [-b] [-i] [-r] uri",
         "migrate to URI (using -d to not wait for completion)\n\t\t\t -b for migration without shared storage with "
         "full copy of disk\n\t\t\t -i for migration without shared storage with incremental copy of disk (base "
         "image shared between src and destination)\n\t\t\t -r to resume a paused migration", needs=("migrate",))
@_handler
async def _migrate(session: Session, args: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"uri": args["uri"]}
    for key in ("blk", "inc", "resume"):
        if args[key]:
            arguments[key] = True
    await session.backend.qmp("migrate", arguments)
    if args["detach"]:
        return

    async def status() -> tuple[bool, str]:
        info = await session.backend.qmp("query-migrate")
        state = info.get("status", "none")
        if state == "failed":
            raise MonitorError(info.get("error-desc", "migration failed"))
        if state in ("completed", "cancelled", "none"):
            if state == "cancelled":
                session.write("migrate: cancelled\n")
            return True, ""
        ram = info.get("ram", {})
        total = ram.get("total") or 0
        done_pct = 100 * (total - ram.get("remaining", total)) // total if total else 0
        return False, f"{state}, {done_pct}% of RAM sent"

    await _poll_job(session, "migrate", status)


# --- snapshots (QMP snapshot-save/-load/-delete jobs) --------------------------------------------------


async def _snapshot_nodes(session: Session) -> list[str]:
    nodes: list[str] = []
    for block in await session.backend.qmp("query-block"):
        inserted = block.get("inserted")
        if inserted and not inserted.get("ro") and "node-name" in inserted:
            nodes.append(inserted["node-name"])
    if not nodes:
        raise MonitorError("No block device can accept snapshots")
    return nodes


async def _snapshot_job(session: Session, qmp_name: str, tag: str, what: str, vmstate: bool) -> None:
    nodes = await _snapshot_nodes(session)
    job_id = f"vmfront-{what}-{uuid.uuid4().hex[:8]}"
    arguments: dict[str, Any] = {"job-id": job_id, "tag": tag, "devices": nodes}
    if vmstate:
        arguments["vmstate"] = nodes[0]
    await session.backend.qmp(qmp_name, arguments)

    async def status() -> tuple[bool, str]:
        job = next((j for j in await session.backend.qmp("query-jobs") if j["id"] == job_id), None)
        if job is None:
            return True, ""
        if job["status"] == "concluded":
            await session.backend.qmp("job-dismiss", {"id": job_id})
            if "error" in job:
                raise MonitorError(job["error"])
            return True, ""
        total = job.get("total-progress") or 0
        return False, f"{job['status']}, {100 * job.get('current-progress', 0) // total if total else 0}%"

    await _poll_job(session, what, status)


@command("savevm", "name:s?", "tag", "save a VM snapshot. If no tag is provided, a new snapshot is created",
         needs=("snapshot-save",))
@_handler
async def _savevm(session: Session, args: dict[str, Any]) -> None:
    tag = args.get("name") or time.strftime("vm-%Y%m%d%H%M%S")
    await _snapshot_job(session, "snapshot-save", tag, "savevm", True)


@command("loadvm", "name:s", "tag", "restore a VM snapshot from its tag", needs=("snapshot-load",))
@_handler
async def _loadvm(session: Session, args: dict[str, Any]) -> None:
    await _snapshot_job(session, "snapshot-load", args["name"], "loadvm", True)


@command("delvm", "name:s", "tag", "delete a VM snapshot from its tag", needs=("snapshot-delete",))
@_handler
async def _delvm(session: Session, args: dict[str, Any]) -> None:
    await _snapshot_job(session, "snapshot-delete", args["name"], "delvm", False)


# --- info -------------------------------------------------------------------------------------------------


def _info_query(name: str, query: str, formatter: Callable[[Any], str], help_text: str) -> None:
    async def handler(session: Session, args: dict[str, Any]) -> None:
        session.write(formatter(await session.backend.qmp(query)))

    info(name, help_text, needs=(query,))(_handler(handler))


_info_query("status", "query-status", fmt.info_status, "show the current VM status (running|paused)")
_info_query("version", "query-version", fmt.info_version, "show the version of QEMU")
_info_query("name", "query-name", fmt.info_name, "show the current VM name")
_info_query("uuid", "query-uuid", fmt.info_uuid, "show the current VM UUID")
_info_query("kvm", "query-kvm", fmt.info_kvm, "show KVM information")
_info_query("blockstats", "query-blockstats", fmt.info_blockstats, "show block device statistics")
_info_query("chardev", "query-chardev", fmt.info_chardev, "show the character devices")
_info_query("mice", "query-mice", fmt.info_mice, "show which guest mouse is receiving events")
_info_query("migrate_parameters", "query-migrate-parameters", fmt.info_migrate_parameters,
            "show current migration parameters")
_info_query("migrate_capabilities", "query-migrate-capabilities", fmt.info_migrate_capabilities,
            "show current migration capabilities")
_info_query("pci", "query-pci", fmt.info_pci, "show PCI info")
_info_query("balloon", "query-balloon", fmt.info_balloon, "show balloon information")
_info_query("hotpluggable-cpus", "query-hotpluggable-cpus", fmt.info_hotpluggable_cpus,
            "Show information about hotpluggable CPUs")
_info_query("memdev", "query-memdev", fmt.info_memdev, "show memory backends")
_info_query("iothreads", "query-iothreads", fmt.info_iothreads, "show iothreads")
_info_query("block-jobs", "query-block-jobs", fmt.info_block_jobs,
            "show progress of ongoing block device operations")
_info_query("commands", "query-commands", fmt.info_commands,
            "list the QMP commands QEMU offers (vmfront addition; not in QEMU's HMP)")
_info_query("memory_size_summary", "query-memory-size-summary", fmt.info_memory_size_summary,
            "show the amount of initially allocated and present hotpluggable (if enabled) memory in bytes.")
_info_query("dump", "query-dump", fmt.info_dump, "Display the latest dump status")
_info_query("tpm", "query-tpm", fmt.info_tpm, "show the TPM device")
_info_query("memory-devices", "query-memory-devices", fmt.info_memory_devices, "show memory devices")
_info_query("vm-generation-id", "query-vm-generation-id", fmt.info_vm_generation_id,
            "Show Virtual Machine Generation ID")
_info_query("numa", "x-query-numa", fmt.human_readable_text, "show NUMA information")
_info_query("usb", "x-query-usb", fmt.human_readable_text, "show guest USB devices")
_info_query("irq", "x-query-irq", fmt.human_readable_text, "show the interrupts statistics (if available)")


_info_query("vnc", "query-vnc-servers", fmt.info_vnc, "show the vnc server status")


@info("cpus", "show infos for each CPU", needs=("query-cpus-fast",))
@_handler
async def _info_cpus(session: Session, args: dict[str, Any]) -> None:
    session.write(fmt.info_cpus(await session.backend.qmp("query-cpus-fast"), session.current_cpu))


@info("block", "show info of one block device or all block devices (-n: show named nodes; -v: show details)",
      "nodes:-n,verbose:-v,device:B?", "[-n] [-v] [device]", needs=("query-block",))
@_handler
async def _info_block(session: Session, args: dict[str, Any]) -> None:
    blocks = await session.backend.qmp("query-block")
    nodes = await session.backend.qmp("query-named-block-nodes") if args["nodes"] else None
    session.write(fmt.info_block(blocks, nodes, args.get("device")))


_info_query("migrate", "query-migrate", fmt.info_migrate, "show migration status")


@info("snapshots", "show the currently saved VM snapshots", needs=("query-block",))
@_handler
async def _info_snapshots(session: Session, args: dict[str, Any]) -> None:
    """The writable disks that can hold snapshots (qcow2, or any with snapshots), in QEMU's order."""
    disks: list[tuple[str, list[dict[str, Any]]]] = []
    for block in await session.backend.qmp("query-block"):
        inserted = block.get("inserted")
        if not inserted or inserted.get("ro"):
            continue
        snapshots = inserted.get("image", {}).get("snapshots", [])
        if snapshots or inserted.get("drv") == "qcow2":
            disks.append((block.get("device", ""), snapshots))
    session.write(fmt.info_snapshots(disks))


@info("registers", "show the cpu registers (-a: show register info for all cpus; vcpu: specific vCPU to query; "
      "show the current CPU's registers if no argument is specified)", "cpustate_all:-a,vcpu:i?", "[-a|vcpu]",
      needs=(CPU_STATE,))
@_handler
async def _info_registers(session: Session, args: dict[str, Any]) -> None:
    long_mode, cpus = await _cpu_states(session)
    if args["cpustate_all"]:
        chosen = cpus
    elif "vcpu" in args and args["vcpu"] >= 0:
        chosen = [c for c in cpus if c["cpu-index"] == args["vcpu"]]
        if not chosen:
            raise MonitorText(f"CPU#{args['vcpu']} not available")
    else:
        chosen = [_pick_cpu(session, cpus)]
    session.write("".join(fmt.info_registers(cpu, long_mode) for cpu in chosen))


#: Objects whose property values info qtree and info network never print (CPUs have hundreds of feature flags).
_QOM_SKIP = ["*-cpu", "memory-region", "irq", "container"]


async def _qom_objects(session: Session) -> dict[str, qom.QomObject]:
    return qom.objects_from_walk(await session.backend.qmp(QOM_TREE, {"path": "/machine",
                                                                      "skip-values": _QOM_SKIP}))


@info("network", "show the network state", needs=(QOM_TREE,))
@_handler
async def _info_network(session: Session, args: dict[str, Any]) -> None:
    session.write(qom.info_network(await _qom_objects(session)))


@info("qtree", "show device tree", needs=(QOM_TREE,))
@_handler
async def _info_qtree(session: Session, args: dict[str, Any]) -> None:
    objects = await _qom_objects(session)
    static: dict[str, list[str]] = {}
    for obj in objects.values():
        if obj.is_device and obj.type not in static:
            try:
                properties = await session.backend.qmp("device-list-properties", {"typename": obj.type})
            except RemoteError:
                properties = []
            static[obj.type] = qom.static_property_names(properties)
    try:
        usb_text = fmt.human_readable_text(await session.backend.qmp("x-query-usb"))
    except RemoteError:
        usb_text = ""
    sources = qom.QtreeSources(objects, static, await session.backend.qmp("query-pci"), usb_text)
    session.write(qom.info_qtree(sources))


@info("mtree", "show memory tree (-f: dump flat view for address spaces;-d: dump dispatch tree, valid with -f "
      "only);-o: dump region owners/parents;-D: dump disabled regions", "flatview:-f,dispatch_tree:-d,owner:-o,"
      "disabled:-D", "[-f][-d][-o][-D]", listed=False)
@_handler
async def _info_mtree(session: Session, args: dict[str, Any]) -> None:
    raise MonitorError("'info mtree' is not available: QEMU 7.2 has no QMP query for the memory tree, and the "
                       "memory regions QOM shows lack their kind, alias target and enabled state")
