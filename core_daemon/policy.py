"""QMP command policy: which commands each of the core's sockets may run.

The management socket gets full access by default; the control channel used by the unprivileged client is
denied what grants host access (arbitrary HMP, file descriptors, objects and chardevs, host paths). A TOML file
can change either; see docs/policy.md.

Format::

    [sockets.qmp]                 # the management QMP socket (qmp-tcp is the optional TCP one)
    default = "allow"             # what happens to commands not listed
    deny = ["human-monitor-command"]

    [sockets.client]
    default = "deny"
    allow = ["query-*", "stop", "cont"]

Names are shell-style patterns (``query-*``); ``@host-access`` stands for the whole default deny list of the
client socket. ``deny`` wins over ``allow``; ``qmp_capabilities`` is protocol, not a command, and is always
allowed. A socket's table replaces only the keys it gives: ``[sockets.client]`` with just ``allow = [...]`` keeps
the default deny list.
"""

from __future__ import annotations

import fnmatch
import tomllib
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

#: Write this in a policy list to mean every command of HOST_ACCESS_COMMANDS.
HOST_ACCESS_MACRO = "@host-access"


class PolicyError(Exception):
    """The policy file is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class SocketPolicy:
    default_allow: bool = True
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def allows(self, command: str) -> bool:
        if command == "qmp_capabilities":
            return True
        if any(fnmatch.fnmatchcase(command, pattern) for pattern in self.deny):
            return False
        if any(fnmatch.fnmatchcase(command, pattern) for pattern in self.allow):
            return True
        return self.default_allow


@dataclass(frozen=True)
class Policy:
    sockets: dict[str, SocketPolicy] = field(default_factory=dict)

    def for_socket(self, socket_name: str) -> SocketPolicy:
        return self.sockets.get(socket_name, DEFAULT_POLICY.sockets[socket_name])

    def allows(self, socket_name: str, command: str) -> bool:
        return self.for_socket(socket_name).allows(command)

    def host_access_allowed(self, socket_name: str) -> list[str]:
        """Host-access commands this socket may run (patterns like ``x-*`` are checked as written)."""
        policy = self.for_socket(socket_name)
        return [c for c in HOST_ACCESS_COMMANDS if policy.allows(c.replace("*", "anything"))]

    @staticmethod
    def denial(socket_name: str, command: str) -> str:
        """The error text a denied peer sees: it names the command and the socket."""
        return f"command '{command}' is denied by vmfront policy on socket '{socket_name}'"


DEFAULT_POLICY = Policy(
    {
        "qmp": SocketPolicy(default_allow=True),
        "qmp-tcp": SocketPolicy(default_allow=True),
        "client": SocketPolicy(default_allow=True, deny=HOST_ACCESS_COMMANDS),
    }
)


def _string_list(source: str, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{source}: {where} must be a list of command names or patterns")
    expanded: list[str] = []
    for item in value:
        if item == HOST_ACCESS_MACRO:
            expanded.extend(HOST_ACCESS_COMMANDS)
        elif item.startswith("@"):
            raise PolicyError(f"{source}: {where}: unknown group {item!r}; known: {HOST_ACCESS_MACRO}")
        else:
            expanded.append(item)
    return tuple(expanded)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse a policy document; sockets it does not mention keep their defaults."""
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
        unknown = set(table) - {"default", "allow", "deny"}
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
