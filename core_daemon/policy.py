"""QMP command policy: which commands, with which arguments, each of the core's sockets may run.

The management socket gets full access by default. The control channel used by the unprivileged client gets an
**allow-list**: what a VNC server, a human monitor and a guest-agent front end need, and nothing else (a command
QEMU adds later is denied until someone decides otherwise). Where a command is only partly safe the policy matches
its arguments too (``qom-get`` only under ``/machine``, ``migrate`` only to the migration socket of a vmfront core
on this host). A TOML file can change any socket; see docs/policy.md, which gives the reason for every entry.

Format::

    [sockets.client]
    default = "deny"                      # what happens to commands not listed
    allow = ["query-status", "qom-get"]
    deny = []

    [sockets.client.arguments.qom-get]    # qom-get is allowed only with these arguments
    path = ["/machine/*"]                 # if given, the value must match one of these patterns

Names are shell-style patterns (``query-*``); ``@host-access`` stands for the list of commands that reach the
host, and ``@client`` for the default client allow-list. ``deny`` wins over ``allow``; ``qmp_capabilities`` is
protocol, not a command, and is always allowed. A socket's table replaces only the keys it gives.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Sockets a policy can name.
SOCKET_NAMES = ("qmp", "qmp-tcp", "client")

#: Commands that let a QMP peer reach beyond the guest: host files and paths, file descriptors, new host
#: objects, raw HMP (which can do all of those), host command execution through migration URIs.
HOST_ACCESS_COMMANDS = (
    "human-monitor-command",
    "getfd",
    "closefd",
    "add-fd",
    "remove-fd",
    "object-add",
    "object-del",
    "chardev-add",
    "chardev-change",
    "chardev-remove",
    "netdev_add",
    "blockdev-add",
    "blockdev-create",
    "blockdev-reopen",
    "blockdev-snapshot-sync",
    "blockdev-change-medium",
    "drive-mirror",
    "drive-backup",
    "blockdev-mirror",
    "block-commit",
    "block-stream",
    "screendump",
    "dump-guest-memory",
    "pmemsave",
    "memsave",
    "migrate",
    "migrate-incoming",
    "xen-save-devices-state",
    "xen-load-devices-state",
    "qom-set",
    "set_password",
    "expire_password",
    "display-reload",
    "display-update",
    "change-vnc-password",
    "transaction",  # can wrap blockdev-snapshot-sync / drive-backup, which take host paths
    "migrate-recover",
    "device_add",  # romfile= host paths, host pass-through devices (usb-host, vfio-pci)
    "nbd-server-start",
    "nbd-server-add",
    "block-export-add",
    "dumpdtb",
    "change-backing-file",
    "__org.vmfront_*",  # vmfront's own commands: e.g. where clients follow a migration
    "x-*",
)

#: The client's allow-list: what the client's services need (docs/policy.md gives the reason for each).
CLIENT_ALLOWED = (
    # Guest lifecycle, as the monitor's stop/cont/system_reset/system_powerdown/system_wakeup/quit/nmi.
    "stop", "cont", "system_reset", "system_powerdown", "system_wakeup", "quit", "inject-nmi",
    # Keyboard and mouse from the monitor (sendkey, mouse_move, mouse_button); viewers' input uses the input op.
    "send-key", "input-send-event",
    # Guest memory and removable media (balloon, eject): the guest's own virtual hardware, no host paths.
    "balloon", "eject",
    # The guest's NICs and watchdog (set_link, announce_self, watchdog_action): what the guest could do itself.
    "set_link", "announce-self", "watchdog-set-action",
    # The monitor's device_add, of devices without host backends only (see the argument rules).
    "device_add",
    # The monitor's savevm/loadvm/delvm: internal snapshots inside the VM's own images, jobs named vmfront-*.
    "snapshot-save", "snapshot-load", "snapshot-delete", "job-dismiss",
    # The monitor's migrate, to another vmfront core on this host only (see the argument rules).
    "migrate",
    # Reading the machine's device tree, types and properties (the monitor's device help, qom-list, qom-get).
    "qom-get", "qom-list", "qom-list-types", "qom-list-properties", "device-list-properties",
    # Read-only state the monitor's info commands show; none carries secrets.
    "query-status", "query-version", "query-name", "query-uuid", "query-kvm", "query-target", "query-machines",
    "query-current-machine", "query-cpus-fast", "query-cpu-definitions", "query-hotpluggable-cpus",
    "query-block", "query-blockstats", "query-named-block-nodes", "query-block-jobs", "query-jobs",
    "query-chardev", "query-mice", "query-pci", "query-balloon", "query-memdev", "query-memory-size-summary",
    "query-memory-devices", "query-iothreads", "query-acpi-ospm-status", "query-vm-generation-id", "query-tpm",
    "query-dump", "query-display-options", "query-migrate", "query-migrate-capabilities",
    "query-migrate-parameters", "query-vnc", "query-vnc-servers", "query-commands", "query-command-line-options",
    "query-qmp-schema",
    # The monitor's `change vnc password`, `set_password vnc`, `expire_password vnc`: the core answers them for the
    # clients' own VNC server (never QEMU's), which a client serves anyway (see the argument rules).
    "change-vnc-password", "set_password", "expire_password",
    # The text of QEMU's own `info usb`, `info irq`, `info numa`: read-only, guest devices only.
    "x-query-usb", "x-query-irq", "x-query-numa",
    # vmfront's reads of the guest where QMP has none (core_daemon/guest_reads.py): memory (x, xp), registers
    # (info registers), the QOM tree under /machine (info qtree, info network); bounded, into the core's own files.
    "__org.vmfront_memory-read", "__org.vmfront_cpu-state", "__org.vmfront_qom-tree",
)

#: Devices a client may add: guest hardware that uses nothing of the host (no disk images, chardevs, netdevs,
#: host devices, ROM files; a NIC is added unplugged).
CLIENT_DEVICES = (
    "usb-tablet", "usb-mouse", "usb-kbd", "usb-hub", "virtio-keyboard-pci", "virtio-mouse-pci", "virtio-tablet-pci",
    "qemu-xhci", "nec-usb-xhci", "usb-ehci", "ich9-usb-ehci1", "piix3-usb-uhci", "piix4-usb-uhci",
    "e1000", "e1000e", "rtl8139", "virtio-net-pci", "virtio-scsi-pci", "lsi53c895a", "ich9-ahci",
    "virtio-serial-pci", "virtio-balloon-pci", "virtio-rng-pci", "pci-bridge", "pcie-root-port",
    "i6300esb", "ib700", "pvpanic",
)
#: The device_add arguments a client may give: placement and identity, never a backend or a host file.
CLIENT_DEVICE_ARGUMENTS = ("driver", "id", "bus", "addr", "multifunction", "port", "mac", "chassis", "slot",
                           "rombar")

#: Where the client's allowed commands are only partly safe: argument name -> patterns a given value must match.
#: ``{run_root}`` is the directory holding every VM's run directory (the parent of this core's).
CLIENT_ARGUMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    # Objects under /objects are host backends (secrets hold LUKS keys and passwords: qom-get would read them).
    "qom-get": {"path": ("/machine", "/machine/*")},
    "qom-list": {"path": ("/machine", "/machine/*")},
    # Only into the migration socket of a vmfront core (never exec:, which runs a host command, nor any other
    # socket QEMU would connect to with root's rights).
    "migrate": {"uri": ("unix:{run_root}/*/migration.sock",), "@only": ("uri", "detach", "resume")},
    # The monitor's own snapshot jobs, not the management's.
    "snapshot-save": {"job-id": ("vmfront-*",)},
    "snapshot-load": {"job-id": ("vmfront-*",)},
    "snapshot-delete": {"job-id": ("vmfront-*",)},
    "job-dismiss": {"id": ("vmfront-*",)},
    "device_add": {"driver": CLIENT_DEVICES, "@only": CLIENT_DEVICE_ARGUMENTS},
    # The walk follows child<> properties only, so it stays under the path it starts from.
    "__org.vmfront_qom-tree": {"path": ("/machine", "/machine/*")},
    # VNC only: the core answers these for the clients' VNC; SPICE's password would go to QEMU.
    "set_password": {"protocol": ("vnc",), "@only": ("protocol", "password", "connected", "display")},
    "expire_password": {"protocol": ("vnc",), "@only": ("protocol", "time", "display")},
    "change-vnc-password": {"@only": ("password",)},
}

#: Write this in a policy list to mean every command of HOST_ACCESS_COMMANDS (or of CLIENT_ALLOWED).
HOST_ACCESS_MACRO = "@host-access"
CLIENT_MACRO = "@client"
#: An argument rule's key naming the only arguments the command may be given (others are refused).
ONLY_KEY = "@only"


class PolicyError(Exception):
    """The policy file is malformed; the message names the file and the problem."""


def _normalised(value: str) -> bool:
    """A path (or ``unix:`` path) with nothing that could step outside what a pattern names."""
    path = value.removeprefix("unix:")
    return not path.startswith("/") or posixpath.normpath(path) == path


@dataclass(frozen=True)
class SocketPolicy:
    default_allow: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    #: command -> {argument: patterns}; the command is allowed only with arguments that match.
    arguments: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def allows(self, command: str) -> bool:
        """Whether the command may run at all (with some arguments): what ``query-commands`` lists."""
        if command == "qmp_capabilities":
            return True
        if any(fnmatch.fnmatchcase(command, pattern) for pattern in self.deny):
            return False
        if any(fnmatch.fnmatchcase(command, pattern) for pattern in self.allow):
            return True
        return self.default_allow

    def refuses(self, command: str, arguments: dict[str, Any] | None, run_root: str = "") -> str | None:
        """Why this command with these arguments is denied (the argument at fault), or None if it may run."""
        if not self.allows(command):
            return ""
        rules = self.arguments.get(command)
        if not rules or command == "qmp_capabilities":
            return None
        given = arguments or {}
        only = rules.get(ONLY_KEY)
        if only is not None:
            extra = sorted(set(given) - set(only))
            if extra:
                return f"argument '{extra[0]}'"
        for name, patterns in rules.items():
            if name == ONLY_KEY or name not in given:
                continue
            value = given[name]
            expanded = [p.replace("{run_root}", run_root) for p in patterns]
            if not (isinstance(value, str) and _normalised(value)
                    and any(fnmatch.fnmatchcase(value, pattern) for pattern in expanded)):
                return f"{name} {json.dumps(value)[:80]}"
        return None


@dataclass(frozen=True)
class Policy:
    sockets: dict[str, SocketPolicy] = field(default_factory=dict)
    #: What ``{run_root}`` in argument patterns stands for (set by the core: the parent of its run directory).
    run_root: str = ""

    def for_socket(self, socket_name: str) -> SocketPolicy:
        return self.sockets.get(socket_name, DEFAULT_POLICY.sockets[socket_name])

    def allows(self, socket_name: str, command: str) -> bool:
        return self.for_socket(socket_name).allows(command)

    def refusal(self, socket_name: str, command: str, arguments: dict[str, Any] | None) -> str | None:
        """The error text a denied peer sees, or None when the command may run with these arguments."""
        why = self.for_socket(socket_name).refuses(command, arguments, self.run_root)
        if why is None:
            return None
        return self.denial(socket_name, command, why)

    def host_access_allowed(self, socket_name: str) -> list[str]:
        """Host-access commands this socket may run with any arguments (patterns like ``x-*`` checked as written)."""
        policy = self.for_socket(socket_name)
        return [c for c in HOST_ACCESS_COMMANDS
                if policy.allows(c.replace("*", "anything")) and c not in policy.arguments]

    @staticmethod
    def denial(socket_name: str, command: str, argument: str = "") -> str:
        """The error text a denied peer sees: it names the command (and argument) and the socket."""
        what = f"command '{command}'" + (f" with {argument}" if argument else "")
        return f"{what} is denied by vmfront policy on socket '{socket_name}'"


DEFAULT_POLICY = Policy(
    {
        "qmp": SocketPolicy(default_allow=True),
        "qmp-tcp": SocketPolicy(default_allow=True),
        "client": SocketPolicy(default_allow=False, allow=CLIENT_ALLOWED, arguments=CLIENT_ARGUMENTS),
    }
)


def _string_list(source: str, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{source}: {where} must be a list of command names or patterns")
    expanded: list[str] = []
    for item in value:
        if item == HOST_ACCESS_MACRO:
            expanded.extend(HOST_ACCESS_COMMANDS)
        elif item == CLIENT_MACRO:
            expanded.extend(CLIENT_ALLOWED)
        elif item.startswith("@"):
            raise PolicyError(f"{source}: {where}: unknown group {item!r}; known: {HOST_ACCESS_MACRO}, "
                              f"{CLIENT_MACRO}")
        else:
            expanded.append(item)
    return tuple(expanded)


def _argument_rules(source: str, socket_name: str, table: Any) -> dict[str, dict[str, tuple[str, ...]]]:
    where = f"[sockets.{socket_name}.arguments]"
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: {where} must be a table of commands")
    rules: dict[str, dict[str, tuple[str, ...]]] = {}
    for command, arguments in table.items():
        if not isinstance(arguments, dict):
            raise PolicyError(f"{source}: {where[:-1]}.{command}] must be a table of argument names")
        rules[command] = {}
        for argument, patterns in arguments.items():
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise PolicyError(f"{source}: {where[:-1]}.{command}] {argument} must be a list of patterns")
            rules[command][argument] = tuple(patterns)
    return rules


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse a policy document; sockets it does not mention keep their defaults."""
    import tomllib  # only with a policy file: a core on the defaults does not load it

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from exc
    unknown_top = set(doc) - {"sockets"}
    if unknown_top:
        raise PolicyError(f"{source}: unknown section(s) {sorted(unknown_top)}; expected [sockets.NAME]")
    sockets_doc = doc.get("sockets", {})
    if not isinstance(sockets_doc, dict):
        raise PolicyError(f"{source}: 'sockets' must be a table")
    sockets = dict(DEFAULT_POLICY.sockets)
    for name, table in sockets_doc.items():
        if name not in SOCKET_NAMES:
            raise PolicyError(f"{source}: unknown socket {name!r}; known: {', '.join(SOCKET_NAMES)}")
        if not isinstance(table, dict):
            raise PolicyError(f"{source}: [sockets.{name}] must be a table")
        unknown = set(table) - {"default", "allow", "deny", "arguments"}
        if unknown:
            raise PolicyError(f"{source}: [sockets.{name}] has unknown key(s) {sorted(unknown)}")
        # Keys a table leaves out keep that socket's defaults; keys it gives replace them.
        base = DEFAULT_POLICY.sockets[name]
        default = table.get("default", "allow" if base.default_allow else "deny")
        if default not in ("allow", "deny"):
            raise PolicyError(f"{source}: [sockets.{name}] default must be \"allow\" or \"deny\"")
        sockets[name] = SocketPolicy(
            default_allow=default == "allow",
            allow=_string_list(source, f"[sockets.{name}] allow", table["allow"]) if "allow" in table else base.allow,
            deny=_string_list(source, f"[sockets.{name}] deny", table["deny"]) if "deny" in table else base.deny,
            # Per command: a file's rule for a command replaces that command's (an empty table lifts it).
            arguments={**base.arguments, **_argument_rules(source, name, table.get("arguments", {}))},
        )
    return Policy(sockets)


def load_policy(path: Path | None) -> Policy:
    if path is None:
        return DEFAULT_POLICY
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
    return parse_policy(text, str(path))
