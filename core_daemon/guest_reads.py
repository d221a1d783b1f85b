"""vmfront's own QMP commands that read the guest where QEMU 7.2's QMP has no query: guest memory (for the
monitor's ``x``/``xp``), the CPUs' registers (``info registers``, ``$reg`` expressions) and the QOM tree
(``info qtree``, ``info network``).

QEMU can only write such data to a file it opens itself (``pmemsave``, ``memsave``, ``dump-guest-memory``), which
a client must never name. So the core asks QEMU to write into a directory only the core can reach
(``RUN_DIR/private/reads``), reads the file back, removes it and returns what it held. Every read is bounded:
at most ``MAX_READ`` bytes of memory, a dump file of at most ``MAX_DUMP`` bytes (one small memory range plus the
CPU notes), a walk of at most ``MAX_OBJECTS`` objects and ``MAX_PROPERTIES`` properties; and one read runs at a
time. The dump's ELF notes are parsed here (``parse_cpu_states``, fuzzed in fuzz/targets.py) because the file
is QEMU's; the guest's register values in it are plain numbers.

The commands (documented in docs/monitor.md and docs/policy.md):

``__org.vmfront_memory-read`` ``{"address": int, "size": int, "physical": bool, "cpu-index": int}``
    -> ``{"data": BASE64}``; virtual addresses are translated by that CPU (QEMU's memsave), physical ones read
    from guest memory (pmemsave).
``__org.vmfront_cpu-state`` ``{}`` -> ``{"long-mode": bool, "cpus": [{"cpu-index", "rax".."r15", "rip",
    "rflags", "cs".."gs", "ldt", "tr", "gdt", "idt" ({"selector", "limit", "flags", "base"}), "cr0".."cr4"}]}``
``__org.vmfront_qom-tree`` ``{"path": str, "skip-values": [TYPE-PATTERN]}`` -> ``{"objects": [{"path", "type",
    "properties": [{"name", "type", "value"?}]}], "truncated": bool}``: the object at ``path`` and everything
    under it through ``child<>`` properties, level by level, with the value of every property QEMU could read (and
    that is not too large), except for objects of the types ``skip-values`` names (their properties are listed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MEMORY_READ_COMMAND = "__org.vmfront_memory-read"
CPU_STATE_COMMAND = "__org.vmfront_cpu-state"
QOM_TREE_COMMAND = "__org.vmfront_qom-tree"
COMMANDS = (MEMORY_READ_COMMAND, CPU_STATE_COMMAND, QOM_TREE_COMMAND)

#: Largest memory read, in bytes (the monitor reads longer dumps in pieces).
MAX_READ = 64 << 10
#: Largest dump file read back for the CPU state: ELF headers, one byte of memory, and a few hundred bytes of
#: notes per CPU (QEMU 7.2 allows 1024 CPUs on x86 at most: about 800 KiB).
MAX_DUMP = 1 << 20
#: QOM walk bounds: objects, properties (all objects together), and the JSON text of one value and of all values.
MAX_OBJECTS = 4096
MAX_PROPERTIES = 32768
MAX_VALUE = 4096
MAX_VALUES_TOTAL = 2 << 20
#: qom-get requests the walk has in flight at once.
QOM_BATCH = 32

_U64 = (1 << 64) - 1

Executor = Callable[[str, dict[str, Any] | None], Awaitable[dict[str, Any]]]


class ReadError(Exception):
    """The request cannot be served; the text is the QMP error description."""


def _error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


def _int_argument(arguments: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ReadError(f"'{name}' must be an integer from {low} to {high}")
    return value


class GuestReads:
    """Serves the commands above for one core, through ``execute`` (the core's own way to QEMU)."""

    def __init__(self, execute: Executor, private_dir: Path) -> None:
        self._execute = execute
        self._dir = private_dir / "reads"
        self._lock = asyncio.Lock()

    async def execute(self, name: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
        """The QMP reply (``return`` or ``error``) for one of COMMANDS."""
        arguments = arguments if isinstance(arguments, dict) else {}
        try:
            async with self._lock:
                if name == MEMORY_READ_COMMAND:
                    return {"return": await self._memory_read(arguments)}
                if name == CPU_STATE_COMMAND:
                    if arguments:
                        raise ReadError(f"{CPU_STATE_COMMAND} takes no arguments")
                    return {"return": await self._cpu_state()}
                return {"return": await self._qom_tree(arguments)}
        except ReadError as exc:
            return _error(str(exc))

    async def _qemu(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = await self._execute(name, arguments)
        if "error" in reply:
            raise ReadError(str(reply["error"].get("desc", "")))
        return reply.get("return")

    def _scratch(self) -> Path:
        """A fresh file name in the private directory (0700, the core's alone: QEMU runs as the core's user)."""
        self._dir.mkdir(mode=0o700, exist_ok=True)
        return self._dir / f"read-{os.urandom(8).hex()}"

    async def _into_file(self, command: str, arguments: dict[str, Any], limit: int) -> bytes:
        """Have QEMU write into a fresh private file (``arguments`` name it through ``{path}``); its bytes."""
        path = self._scratch()
        try:
            await self._qemu(command, {k: v.format(path=path) if isinstance(v, str) else v
                                       for k, v in arguments.items()})
            with path.open("rb") as stream:
                data = stream.read(limit + 1)
        except OSError as exc:
            raise ReadError(f"cannot read what QEMU wrote: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if len(data) > limit:
            raise ReadError(f"QEMU wrote more than {limit} bytes")
        return data

    async def _batched(self, requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """QEMU's replies to ``requests``, at most QOM_BATCH of them in flight at once."""
        replies: list[dict[str, Any]] = []
        for start in range(0, len(requests), QOM_BATCH):
            replies += await asyncio.gather(*(self._execute(name, arguments)
                                              for name, arguments in requests[start:start + QOM_BATCH]))
        return replies

    async def _memory_read(self, arguments: dict[str, Any]) -> dict[str, Any]:
        unknown = set(arguments) - {"address", "size", "physical", "cpu-index"}
        if unknown:
            raise ReadError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
        address = _int_argument(arguments, "address", 0, _U64)
        size = _int_argument(arguments, "size", 1, MAX_READ)
        cpu_index = _int_argument(arguments, "cpu-index", 0, 4095, 0)
        physical = arguments.get("physical", False)
        if not isinstance(physical, bool):
            raise ReadError("'physical' must be a boolean")
        val = address - (1 << 64) if address >= 1 << 63 else address  # QAPI's 'int': high addresses go negative
        if physical:
            data = await self._into_file("pmemsave", {"val": val, "size": size, "filename": "{path}"}, size)
        else:
            data = await self._into_file("memsave", {"val": val, "size": size, "filename": "{path}",
                                                     "cpu-index": cpu_index}, size)
        if len(data) != size:
            raise ReadError(f"QEMU wrote {len(data)} of {size} bytes")
        return {"data": base64.b64encode(data).decode("ascii")}

    async def _cpu_state(self) -> dict[str, Any]:
        # Guest memory from address 0 (where x86 RAM starts), one byte: what matters are the notes, one set per
        # CPU. QEMU pauses the guest for the dump (STOP/RESUME events) if it runs.
        data = await self._into_file("dump-guest-memory", {"paging": False, "protocol": "file:{path}", "begin": 0,
                                                           "length": 1}, MAX_DUMP)
        try:
            long_mode, cpus = parse_cpu_states(data)
        except ValueError as exc:
            raise ReadError(f"cannot read QEMU's dump: {exc}") from exc
        return {"long-mode": long_mode, "cpus": cpus}

    async def _qom_tree(self, arguments: dict[str, Any]) -> dict[str, Any]:
        unknown = set(arguments) - {"path", "skip-values"}
        root = arguments.get("path")
        skip = arguments.get("skip-values", [])
        if unknown or not isinstance(root, str) or not root.startswith("/"):
            raise ReadError(f"{QOM_TREE_COMMAND} takes 'path' (an absolute QOM path) and 'skip-values'")
        if not isinstance(skip, list) or len(skip) > 64 or not all(isinstance(p, str) for p in skip):
            raise ReadError("'skip-values' must be a list of at most 64 type name patterns")
        objects: list[dict[str, Any]] = []
        budget = {"properties": MAX_PROPERTIES, "values": MAX_VALUES_TOTAL}
        level = [root.rstrip("/") or "/"]
        truncated = False
        # Level by level, each level's requests in batches: QEMU answers them in order without a round trip in
        # between, and other peers' commands still get their turn.
        while level:
            if len(objects) + len(level) > MAX_OBJECTS:
                truncated = True
                level = level[:MAX_OBJECTS - len(objects)]
            listings = await self._batched([("qom-list", {"path": path}) for path in level])
            types = await self._batched([("qom-get", {"path": path, "property": "type"}) for path in level])
            next_level: list[str] = []
            readable: list[tuple[str, dict[str, Any]]] = []
            for path, listing, kind in zip(level, listings, types, strict=True):
                if not isinstance(listing.get("return"), list):
                    raise ReadError(f"qom-list of {path}: {listing.get('error', {}).get('desc', 'not a list')}")
                entry: dict[str, Any] = {"path": path, "type": kind.get("return", ""), "properties": []}
                wanted = not any(fnmatch.fnmatchcase(str(entry["type"]), pattern) for pattern in skip)
                for item in listing["return"]:
                    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                        continue
                    if budget["properties"] <= 0:
                        truncated = True
                        break
                    budget["properties"] -= 1
                    prop: dict[str, Any] = {"name": item["name"], "type": str(item.get("type", ""))}
                    entry["properties"].append(prop)
                    if prop["type"].startswith("child<"):
                        next_level.append(f"{path.rstrip('/')}/{item['name']}")
                    elif prop["name"] == "type":
                        prop["value"] = entry["type"]
                    elif wanted:
                        readable.append((path, prop))
                objects.append(entry)
            replies = await self._batched([("qom-get", {"path": path, "property": prop["name"]})
                                           for path, prop in readable])
            for (_, prop), reply in zip(readable, replies, strict=True):
                _keep_value(prop, reply, budget)
            level = [] if truncated else next_level
        return {"objects": objects, "truncated": truncated}



def _keep_value(prop: dict[str, Any], reply: dict[str, Any], budget: dict[str, int]) -> None:
    """A qom-get reply as the property's value, if it has one (not write-only, no getter error) and it fits."""
    if "return" not in reply:
        return
    size = len(json.dumps(reply["return"]))
    if size <= MAX_VALUE and size <= budget["values"]:
        budget["values"] -= size
        prop["value"] = reply["return"]


# --- the dump's ELF notes ---------------------------------------------------------------------------------------

_EM_X86_64 = 62
_PT_NOTE = 4
#: QEMUCPUState version 1 (target/i386/arch_dump.c): version, size, 16 GPRs, rip, rflags, 10 segments, cr[5].
_STATE_MIN = 8 + 18 * 8 + 10 * 24 + 5 * 8
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15", "rip", "rflags")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_MAX_NOTES = 8192


def _notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of every note in the ELF file's PT_NOTE segments."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[5] != 1:
        raise ValueError("not a little-endian ELF file")
    elf64 = data[4] == 2
    if data[4] not in (1, 2):
        raise ValueError("unknown ELF class")
    if elf64:
        if len(data) < 64:
            raise ValueError("truncated ELF header")
        phoff, = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
    else:
        phoff, = struct.unpack_from("<I", data, 28)
        phentsize, phnum = struct.unpack_from("<HH", data, 42)
    if phentsize < (56 if elf64 else 32) or phoff + phentsize * phnum > len(data):
        raise ValueError("program headers outside the file")
    notes: list[tuple[bytes, int, bytes]] = []
    for index in range(phnum):
        header = phoff + index * phentsize
        if elf64:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, header)
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack_from("<IIIII", data, header)
        if p_type != _PT_NOTE:
            continue
        if p_offset + p_filesz > len(data):
            raise ValueError("note segment outside the file")
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", data, pos)
            name_at = pos + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            pos = desc_at + (descsz + 3) // 4 * 4
            if pos > end:
                raise ValueError("note runs past its segment")
            notes.append((data[name_at:name_at + namesz].rstrip(b"\0"), note_type, data[desc_at:desc_at + descsz]))
            if len(notes) > _MAX_NOTES:
                raise ValueError("too many notes")
    return notes


def parse_cpu_states(data: bytes) -> tuple[bool, list[dict[str, Any]]]:
    """The CPU states in a QEMU guest-memory dump: whether the first CPU was in long mode (QEMU writes an x86-64
    ELF machine then), and each CPU's ``QEMU`` note as a dict. ValueError for anything else."""
    notes = _notes(data)
    long_mode = struct.unpack_from("<H", data, 18)[0] == _EM_X86_64
    cpus: list[dict[str, Any]] = []
    for name, note_type, desc in notes:
        if name != b"QEMU" or note_type != 0:
            continue
        if len(desc) < _STATE_MIN:
            raise ValueError("CPU state note too short")
        version, size = struct.unpack_from("<II", desc, 0)
        if version != 1 or size < _STATE_MIN or size > len(desc):
            raise ValueError(f"unknown CPU state note (version {version}, {size} bytes)")
        values = struct.unpack_from("<18Q", desc, 8)
        cpu: dict[str, Any] = {"cpu-index": len(cpus), **dict(zip(_GPRS, values, strict=True))}
        pos = 8 + 18 * 8
        for segment in _SEGMENTS:
            selector, limit, flags, _, base = struct.unpack_from("<IIIIQ", desc, pos)
            cpu[segment] = {"selector": selector, "limit": limit, "flags": flags, "base": base}
            pos += 24
        for register, value in zip(("cr0", "cr1", "cr2", "cr3", "cr4"), struct.unpack_from("<5Q", desc, pos),
                                   strict=True):
            cpu[register] = value
        cpus.append(cpu)
    if not cpus:
        raise ValueError("no CPU state in the dump")
    return long_mode, cpus
