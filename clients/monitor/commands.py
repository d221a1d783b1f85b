"""The monitor's command table and dispatcher: QEMU's HMP names, argument syntax, help and messages.

Sans-IO: a handler gets a ``Session`` (QMP through a ``Backend``, text out through ``write``) and the parsed
arguments; the transport (``service.py``) only feeds lines in and bytes out. Every command is built on QMP
through the core under its ``client`` policy; a denied command prints the policy's error like any QMP error.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ipc.channel import NotAttached, RemoteError, RequestTimeout

from . import format as fmt
from .parser import ArgError, ArgSpec, next_word, parse_args, parse_int, parse_keys, parse_size, parse_spec

log = logging.getLogger(__name__)

#: How often long operations (migrate, savevm/loadvm/delvm) poll and print progress.
PROGRESS_INTERVAL = 0.5


class Backend(Protocol):
    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """QEMU's ``return`` value; raises RemoteError, NotAttached, RequestTimeout."""

    async def screendump(self, path: Path, image_format: str) -> None:
        """Write the current frame from shared memory (never through QEMU)."""

    def vnc_servers(self) -> list[dict[str, Any]]:
        """This client's own VNC server and viewers (QEMU's VNC is the core's private capture source)."""


class MonitorError(Exception):
    """A command failed in a way QEMU prints as ``Error: MESSAGE``."""


@dataclass
class Session:
    """One monitor connection's state: QEMU keeps the mouse button state and the current CPU per monitor."""

    backend: Backend
    write: Callable[[str], None]
    mouse_buttons: int = 0
    current_cpu: int | None = None
    closing: bool = False

    def error(self, message: str) -> None:
        self.write(f"Error: {message}\n")


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

    @property
    def label(self) -> str:
        return "|".join((self.name, *self.aliases))

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{self.label} {self.params} -- {self.help}\n"


COMMANDS: dict[str, Command] = {}
INFO_COMMANDS: dict[str, Command] = {}


def _register(table: dict[str, Command], name: str, args_type: str, params: str, help_text: str,
              aliases: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        table[name] = Command(name, args_type, params, help_text, handler, aliases, parse_spec(args_type))
        return handler
    return decorate


def command(name: str, args_type: str, params: str, help_text: str,
            aliases: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    return _register(COMMANDS, name, args_type, params, help_text, aliases)


def info(name: str, help_text: str, args_type: str = "", params: str = "") -> Callable[[Handler], Handler]:
    return _register(INFO_COMMANDS, name, args_type, params, help_text)


def lookup(table: dict[str, Command], name: str) -> Command | None:
    if name in table:
        return table[name]
    return next((c for c in table.values() if name in c.aliases), None)


# --- dispatch ---------------------------------------------------------------------------------------------


async def execute(session: Session, line: str) -> None:
    """Run one command line, writing its output (and errors, QEMU-style) to the session."""
    try:
        word = next_word(line, 0) if line.strip() else None
        found = lookup(COMMANDS, word[0]) if word is not None else None
        sub = next_word(line, word[1]) if word is not None and found is not None and found.name == "info" else None
    except ArgError as exc:  # e.g. a quoted command name with no closing quote
        session.write(f"Error: {exc}\n")
        return
    if word is None:
        return
    name, pos = word
    cmd = lookup(COMMANDS, name)
    if cmd is None:
        session.write(f"unknown command: '{name}'\n")
        return
    help_name = cmd.name
    if cmd.name == "info":
        if sub is None:
            session.write("".join(c.help_line("info ") for c in sorted(INFO_COMMANDS.values(), key=lambda c: c.name)))
            return
        cmd = lookup(INFO_COMMANDS, sub[0])
        if cmd is None:
            session.write(f"unknown command: 'info {sub[0]}'\n")
            return
        pos = sub[1]
        help_name = f"info {cmd.name}"
    try:
        args = parse_args(cmd.specs, line[pos:], cmd.label)
    except ArgError as exc:
        session.write(f"{exc}\nTry \"help {help_name}\" for more information\n")
        return
    try:
        await cmd.handler(session, args)
    except ArgError as exc:
        session.write(f"{exc}\n")
    except MonitorError as exc:
        session.error(str(exc))
    except RemoteError as exc:
        session.error(exc.desc)
    except NotAttached:
        session.error("core not attached (retrying)")
    except RequestTimeout as exc:
        session.error(f"no answer from the core: {exc}")


def help_text(topic: str | None) -> str:
    if not topic:
        return "".join(c.help_line() for c in sorted(COMMANDS.values(), key=lambda c: c.name))
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
        return cmd.help_line() + "".join(c.help_line("info ") for c in sorted(INFO_COMMANDS.values(),
                                                                                key=lambda c: c.name))
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
    session.write(help_text(args.get("name")))


@command("info", "item:s?", "[subcommand]", "show various information about the system state")
async def _info(session: Session, args: dict[str, Any]) -> None:  # dispatched in execute()
    raise AssertionError("unreachable")


def _simple(name: str, qmp_name: str, help_text: str, aliases: tuple[str, ...] = ()) -> None:
    async def handler(session: Session, args: dict[str, Any]) -> None:
        await session.backend.qmp(qmp_name)

    command(name, "", "", help_text, aliases)(handler)


_simple("stop", "stop", "stop emulation", ("s",))
_simple("cont", "cont", "resume emulation", ("c",))
_simple("system_reset", "system_reset", "reset the system")
_simple("system_powerdown", "system_powerdown", "send system power down event")
_simple("system_wakeup", "system_wakeup", "wakeup guest from suspend")
_simple("migrate_cancel", "migrate_cancel", "cancel the current VM migration")


@command("quit", "", "", "quit the emulator", aliases=("q",))
async def _quit(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("quit")
    session.closing = True


@command("sendkey", "keys:s,hold-time:i?", "keys [hold_ms]",
         "send keys to the VM (e.g. 'sendkey ctrl-alt-f1', default hold time=100 ms)")
async def _sendkey(session: Session, args: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"keys": parse_keys(args["keys"])}
    if "hold-time" in args:
        arguments["hold-time"] = args["hold-time"]
    await session.backend.qmp("send-key", arguments)


def _strtol(text: str) -> int:
    """C strtol(text, NULL, 0) as QEMU's mouse_move uses it: a bad number is 0."""
    try:
        return int(text, 0)
    except ValueError:
        return 0


@command("mouse_move", "dx_str:s,dy_str:s,dz_str:s?", "dx dy [dz]", "send mouse move events")
async def _mouse_move(session: Session, args: dict[str, Any]) -> None:
    events: list[dict[str, Any]] = [
        {"type": "rel", "data": {"axis": "x", "value": _strtol(args["dx_str"])}},
        {"type": "rel", "data": {"axis": "y", "value": _strtol(args["dy_str"])}},
    ]
    dz = _strtol(args.get("dz_str", "0"))
    if dz:
        button = "wheel-up" if dz < 0 else "wheel-down"
        events += [{"type": "btn", "data": {"down": True, "button": button}},
                   {"type": "btn", "data": {"down": False, "button": button}}]
    await session.backend.qmp("input-send-event", {"events": events})


_BUTTONS = (("left", 1), ("middle", 2), ("right", 4), ("wheel-up", 8), ("wheel-down", 16))


@command("mouse_button", "button_state:i", "state", "change mouse button state (1=L, 2=M, 4=R)")
async def _mouse_button(session: Session, args: dict[str, Any]) -> None:
    state = args["button_state"]
    events = [{"type": "btn", "data": {"down": bool(state & bit), "button": name}}
              for name, bit in _BUTTONS if (state ^ session.mouse_buttons) & bit]
    if events:
        await session.backend.qmp("input-send-event", {"events": events})
    session.mouse_buttons = state


@command("screendump", "filename:F,format:-fs,device:s?,head:i?", "filename [-f format] [device [head]]",
         "save screen from head 'head' of display device 'device'in specified format 'format' as image "
         "'filename'.Currently only 'png' and 'ppm' formats are supported.")
async def _screendump(session: Session, args: dict[str, Any]) -> None:
    image_format = args.get("format", "ppm")
    if image_format not in ("ppm", "png"):
        raise MonitorError(f"Parameter 'format' does not accept value '{image_format}'")
    if "device" in args:
        raise MonitorError("screendump of a chosen display device is not supported: the client dumps the "
                           "display the core captures")
    await session.backend.screendump(Path(args["filename"]), image_format)


@command("balloon", "value:i", "target", "request VM to change its memory allocation (in MB)")
async def _balloon(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("balloon", {"value": args["value"] << 20})


@command("device_add", "device:S", "driver[,prop=value][,...]", "add device, like -device on the command line")
async def _device_add(session: Session, args: dict[str, Any]) -> None:
    text: str = args["device"]
    driver, _, rest = text.partition(",")
    arguments: dict[str, Any] = {"driver": driver}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        arguments[key] = value if eq else "on"
    if driver in ("help", "?"):
        types = await session.backend.qmp("qom-list-types", {"implements": "device", "abstract": False})
        session.write("".join(f"name \"{t['name']}\"\n" for t in sorted(types, key=lambda t: t["name"])))
        return
    await session.backend.qmp("device_add", arguments)


@command("device_del", "id:s", "device", "remove device")
async def _device_del(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("device_del", {"id": args["id"]})


@command("drive_add", "node:-n,pci_addr:s,opts:s", "[-n] [[<domain>:]<bus>:]<slot>\n"
         "[file=file][,if=type][,bus=n]\n[,unit=m][,media=d][,index=i]\n[,snapshot=on|off][,cache=on|off]\n"
         "[,readonly=on|off][,copy-on-read=on|off]", "add drive to PCI storage controller")
async def _drive_add(session: Session, args: dict[str, Any]) -> None:
    # HMP's drive_add has no QMP counterpart; its QMP replacement (blockdev-add) takes host paths, which the
    # client policy denies by default. Try it so a policy that allows blockdev-add makes this work.
    options: dict[str, Any] = {}
    for item in filter(None, str(args["opts"]).split(",")):
        key, _, value = item.partition("=")
        options[key] = value
    if "file" not in options:
        raise MonitorError("drive_add through QMP needs file=PATH")
    node = options.get("id") or options.get("node-name") or f"drive-{uuid.uuid4().hex[:8]}"
    await session.backend.qmp("blockdev-add", {
        "node-name": node, "driver": options.get("format", "raw"),
        "read-only": options.get("readonly", "off") == "on",
        "file": {"driver": "file", "filename": options["file"]}})
    session.write("OK\n")


@command("eject", "force:-f,device:s", "[-f] device", "eject a removable medium (use -f to force it)")
async def _eject(session: Session, args: dict[str, Any]) -> None:
    await session.backend.qmp("eject", {"device": args["device"], "force": args["force"]})


@command("change", "device:s,force:-f,target:F,arg:s?,read-only-mode:s?",
         "device [-f] filename [format [read-only-mode]]",
         "change a removable medium, optional format, use -f to force the operation")
async def _change(session: Session, args: dict[str, Any]) -> None:
    if args["device"] == "vnc":
        if args["target"] != "password":
            raise MonitorError("Expected 'password' after 'vnc'")
        password = args.get("arg")
        if password is None:
            raise MonitorError("Parameter 'password' is missing")
        await session.backend.qmp("change-vnc-password", {"password": password})
        return
    arguments: dict[str, Any] = {"id": args["device"], "filename": args["target"], "force": args["force"]}
    if "arg" in args:
        arguments["format"] = args["arg"]
    if "read-only-mode" in args:
        arguments["read-only-mode"] = args["read-only-mode"]
    await session.backend.qmp("blockdev-change-medium", arguments)


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


@command("migrate_set_parameter", "parameter:s,value:s", "parameter value", "Set the parameter for migration")
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


async def _poll_job(session: Session, what: str, is_done: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
    while True:
        done, progress = await is_done()
        if done:
            return
        if progress:
            session.write(f"{what}: {progress}\n")
        await asyncio.sleep(PROGRESS_INTERVAL)


@command("migrate", "detach:-d,blk:-b,inc:-i,resume:-r,uri:s", "[-d] [-b] [-i] [-r] uri",
         "migrate to URI (using -d to not wait for completion)")
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


@command("savevm", "name:s?", "tag",
         "save a VM snapshot. If no tag is provided, a new snapshot is created")
async def _savevm(session: Session, args: dict[str, Any]) -> None:
    import time

    tag = args.get("name") or time.strftime("vm-%Y%m%d%H%M%S")
    await _snapshot_job(session, "snapshot-save", tag, "savevm", True)


@command("loadvm", "name:s", "tag", "restore a VM snapshot from its tag")
async def _loadvm(session: Session, args: dict[str, Any]) -> None:
    await _snapshot_job(session, "snapshot-load", args["name"], "loadvm", True)


@command("delvm", "name:s", "tag", "delete a VM snapshot from its tag")
async def _delvm(session: Session, args: dict[str, Any]) -> None:
    await _snapshot_job(session, "snapshot-delete", args["name"], "delvm", False)


# --- info -------------------------------------------------------------------------------------------------


def _info_query(name: str, query: str, formatter: Callable[[Any], str], help_text: str) -> None:
    async def handler(session: Session, args: dict[str, Any]) -> None:
        session.write(formatter(await session.backend.qmp(query)))

    info(name, help_text)(handler)


_info_query("status", "query-status", fmt.info_status, "show the current VM status (running|paused)")
_info_query("version", "query-version", fmt.info_version, "show the version of QEMU")
_info_query("name", "query-name", fmt.info_name, "show the current VM name")
_info_query("uuid", "query-uuid", fmt.info_uuid, "show the current VM UUID")
_info_query("kvm", "query-kvm", fmt.info_kvm, "show KVM information")
_info_query("blockstats", "query-blockstats", fmt.info_blockstats, "show block device statistics")
_info_query("chardev", "query-chardev", fmt.info_chardev, "show the character devices")
_info_query("mice", "query-mice", fmt.info_mice, "show which guest mouse is receiving events")


@info("vnc", "show the vnc server status")
async def _info_vnc(session: Session, args: dict[str, Any]) -> None:
    session.write(fmt.info_vnc(session.backend.vnc_servers()))


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


@info("cpus", "show infos for each CPU")
async def _info_cpus(session: Session, args: dict[str, Any]) -> None:
    session.write(fmt.info_cpus(await session.backend.qmp("query-cpus-fast"), session.current_cpu))


@info("block", "show info of one block device or all block devices (-n: show named nodes; -v: show details)",
      "nodes:-n,verbose:-v,device:s?", "[-n] [-v] [device]")
async def _info_block(session: Session, args: dict[str, Any]) -> None:
    blocks = await session.backend.qmp("query-block")
    nodes = await session.backend.qmp("query-named-block-nodes") if args["nodes"] else None
    session.write(fmt.info_block(blocks, nodes, args.get("device")))


@info("migrate", "show migration status")
async def _info_migrate(session: Session, args: dict[str, Any]) -> None:
    session.write(fmt.info_migrate(await session.backend.qmp("query-migrate")))


@info("snapshots", "show the currently saved VM snapshots")
async def _info_snapshots(session: Session, args: dict[str, Any]) -> None:
    blocks = await session.backend.qmp("query-block")
    per_disk: list[list[dict[str, Any]]] = []
    for block in blocks:
        inserted = block.get("inserted")
        if inserted and not inserted.get("ro"):
            per_disk.append(inserted.get("image", {}).get("snapshots", []))
    # Like QEMU: the VM snapshots are those present on every writable disk (the first one's list, filtered).
    common = [s for s in (per_disk[0] if per_disk else [])
              if all(any(o["name"] == s["name"] for o in other) for other in per_disk[1:])]
    session.write(fmt.info_snapshots([s for s in common if s.get("vm-state-size", 0) > 0]))


_ = parse_int  # re-exported for callers that evaluate HMP expressions


def _not_in_qmp(name: str, help_text: str) -> None:
    async def handler(session: Session, args: dict[str, Any]) -> None:
        raise MonitorError(f"'info {name}' is not available: QEMU has no QMP query for it, and this monitor "
                           "does not use human-monitor-command")

    info(name, help_text)(handler)


_not_in_qmp("network", "show the network state (not available through QMP)")
_not_in_qmp("qtree", "show device tree (not available through QMP)")
_not_in_qmp("mtree", "show memory tree (not available through QMP)")
