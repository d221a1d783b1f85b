"""``info qtree`` and ``info network`` rebuilt from QOM, sans-IO.

QEMU 7.2 has no QMP query for either; what QOM shows of the machine (the core's ``__org.vmfront_qom-tree`` walk
of ``/machine``: every object with its properties and their values) is close enough to print QEMU's text for
most of it. What QOM does not say is listed in docs/monitor.md: the order of properties and GPIO lists inside a
device (printed here in QOM's order), which memory regions a sysbus device registered (its ``mmio`` lines), and a
netdev's type and options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .format import size_to_str

Json = dict[str, Any]

_INDEX = re.compile(r"^(.*)\[(\d+)\]$")
_SIGNED = frozenset({"int8", "int16", "int32", "int64", "int"})
_UNSIGNED = frozenset({"uint8", "uint16", "uint32", "uint64"})


@dataclass
class QomObject:
    path: str
    type: str
    #: name -> QOM type, in QOM's order
    types: dict[str, str] = field(default_factory=dict)
    #: name -> value, for the properties QEMU could read
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_device(self) -> bool:
        return "parent_bus" in self.types and "realized" in self.types

    @property
    def is_bus(self) -> bool:
        return "hotplug-handler" in self.types and "realized" in self.types and "parent_bus" not in self.types


def objects_from_walk(walk: Json) -> dict[str, QomObject]:
    """The core's qom-tree reply as objects by path (malformed entries are skipped: this only formats)."""
    objects: dict[str, QomObject] = {}
    for entry in walk.get("objects", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        obj = QomObject(entry["path"], str(entry.get("type", "")))
        for prop in entry.get("properties", []):
            if not isinstance(prop, dict) or not isinstance(prop.get("name"), str):
                continue
            obj.types[prop["name"]] = str(prop.get("type", ""))
            if "value" in prop:
                obj.values[prop["name"]] = prop["value"]
        objects[obj.path] = obj
    return objects


def _children(objects: dict[str, QomObject], parent: QomObject) -> list[QomObject]:
    return [objects[f"{parent.path}/{name}"] for name, kind in parent.types.items()
            if kind.startswith("child<") and f"{parent.path}/{name}" in objects]


def _natural(name: str) -> tuple[str, int]:
    match = re.match(r"^(.*?)(\d*)$", name)
    assert match is not None
    return match.group(1), int(match.group(2) or -1)


def _format_value(obj: QomObject, name: str) -> str | None:
    """object_property_print(human=true), or the ``legacy-NAME`` string where QEMU prints that."""
    legacy = obj.values.get(f"legacy-{name}")
    if f"legacy-{name}" in obj.types:
        return legacy if isinstance(legacy, str) else None
    if name not in obj.values:
        return None
    value, kind = obj.values[name], obj.types[name]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and kind == "size":
        return f"{value} ({size_to_str(value)})"
    if isinstance(value, int) and (kind in _SIGNED or kind in _UNSIGNED):
        return f"{value} (0x{value & 0xFFFFFFFFFFFFFFFF:x})"
    if isinstance(value, str):
        return f'"{value}"'
    return None


@dataclass
class QtreeSources:
    """What ``info qtree`` is built from: the QOM walk, each device type's qdev properties (device-list-properties:
    those with a default value, or of type ``str``, are the static ones QEMU prints), ``query-pci`` and the
    ``info usb`` text (``x-query-usb``)."""

    objects: dict[str, QomObject]
    static_properties: dict[str, list[str]]
    pci: list[Json]
    usb_text: str = ""


def static_property_names(properties: list[Json]) -> list[str]:
    """From device-list-properties: the class's qdev properties (what qtree prints)."""
    return [p["name"] for p in properties if isinstance(p, dict) and isinstance(p.get("name"), str)
            and ("default-value" in p or p.get("type") == "str")]


class _Qtree:
    def __init__(self, sources: QtreeSources) -> None:
        self.src = sources
        self.out: list[str] = []
        self.pci_by_slot: dict[tuple[int, int], Json] = {}
        self.bridge_bus: dict[tuple[int, int], int] = {}
        for bus in sources.pci:
            self._index_pci(bus.get("bus", 0), bus.get("devices", []))
        self.usb = [m.groups() for m in re.finditer(
            r"^  Device (\d+)\.(\d+), Port (\S+), Speed (\S+) Mb/s, Product (.*?)(?:, ID: (.*))?$",
            sources.usb_text, re.MULTILINE)]
        self.usb_used: set[int] = set()

    def _index_pci(self, number: int, devices: list[Json]) -> None:
        for dev in devices:
            devfn = dev.get("slot", 0) << 3 | dev.get("function", 0)
            self.pci_by_slot[(dev.get("bus", number), devfn)] = dev
            bridge = dev.get("pci_bridge")
            if bridge:
                self.bridge_bus[(dev.get("bus", number), devfn)] = bridge["bus"]["secondary"]
                self._index_pci(bridge["bus"]["secondary"], bridge.get("devices", []))

    def line(self, indent: int, text: str) -> None:
        self.out.append(" " * indent + text + "\n")

    def bus(self, bus: QomObject, indent: int) -> None:
        self.line(indent, f"bus: {'main-system-bus' if bus.type == 'System' else bus.name}")
        self.line(indent + 2, f"type {bus.type}")
        kids = sorted(((int(m.group(2)), value) for name, value in bus.values.items()
                       if (m := _INDEX.match(name)) and m.group(1) == "child" and isinstance(value, str)),
                      reverse=True)
        for _, path in kids:
            device = self.src.objects.get(path)
            if device is not None:
                self.device(device, bus, indent + 2)

    def device(self, dev: QomObject, bus: QomObject, indent: int) -> None:
        device_id = dev.name if dev.path.startswith("/machine/peripheral/") else ""
        self.line(indent, f'dev: {dev.type}, id "{device_id}"')
        indent += 2
        gpios: dict[tuple[str, str], int] = {}
        for name, kind in dev.types.items():
            match = _INDEX.match(name)
            if match and kind in ("child<irq>", "link<irq>"):
                base = match.group(1)
                direction = "in" if kind == "child<irq>" else "out"
                label = "" if base == f"unnamed-gpio-{direction}" else base
                gpios[(label, direction)] = gpios.get((label, direction), 0) + 1
        for (label, direction), count in gpios.items():
            self.line(indent, f'gpio-{direction} "{label}" {count}')
        for name in self.src.static_properties.get(dev.type, []):
            if name in dev.types:
                value = _format_value(dev, name)
                if value is not None:
                    self.line(indent, f"{name} = {value or '<null>'}")
        if bus.type in ("PCI", "PCIE"):
            self.pci_lines(dev, bus, indent)
        elif bus.type == "usb-bus":
            self.usb_line(dev, indent)
        for child in sorted((c for c in _children(self.src.objects, dev) if c.is_bus),
                            key=lambda c: _natural(c.name), reverse=True):
            self.bus(child, indent)

    def pci_number(self, bus: QomObject) -> int:
        parent = self.src.objects.get(bus.path.rsplit("/", 1)[0])
        if parent is not None and isinstance(parent.values.get("addr"), int):
            grand = self.src.objects.get(str(parent.values.get("parent_bus", "")))
            if grand is not None:
                return self.bridge_bus.get((self.pci_number(grand), parent.values["addr"]), 0)
        return int(self.src.pci[0].get("bus", 0)) if self.src.pci else 0

    def pci_lines(self, dev: QomObject, bus: QomObject, indent: int) -> None:
        """pcibus_dev_print, from query-pci's entry for the device's bus number and devfn."""
        devfn = dev.values.get("addr")
        if not isinstance(devfn, int):
            return
        number = self.pci_number(bus)
        info = self.pci_by_slot.get((number, devfn))
        if info is None:
            return
        cls, ident = info.get("class_info", {}), info.get("id", {})
        desc = cls["desc"] if "desc" in cls else f"Class {cls.get('class', 0):04x}"
        self.line(indent, f"class {desc}, addr {number:02x}:{devfn >> 3:02x}.{devfn & 7:x}, pci id "
                          f"{ident.get('vendor', 0):04x}:{ident.get('device', 0):04x} (sub "
                          f"{ident.get('subsystem-vendor', 0):04x}:{ident.get('subsystem', 0):04x})")
        for region in info.get("regions", []):
            addr = region["address"] & 0xFFFFFFFFFFFFFFFF
            end = (addr + region["size"] - 1) & 0xFFFFFFFFFFFFFFFF
            kind = "i/o" if region.get("type") == "io" else "mem"
            self.line(indent, f"bar {region['bar']}: {kind} at 0x{addr:x} [0x{end:x}]")

    def usb_line(self, dev: QomObject, indent: int) -> None:
        """usb_bus_dev_print, from ``info usb`` (matched by id, else by order)."""
        device_id = dev.name if dev.path.startswith("/machine/peripheral/") else None
        index = next((i for i, entry in enumerate(self.usb) if i not in self.usb_used
                      and (entry[5] == device_id if device_id else entry[5] is None)), None)
        if index is None:
            return
        self.usb_used.add(index)
        busnr, addr, port, speed, product, _ = self.usb[index]
        attached = ", attached" if dev.values.get("attached") else ""
        self.line(indent, f"addr {busnr}.{addr}, port {port}, speed {speed}, name {product}{attached}")


def info_qtree(sources: QtreeSources) -> str:
    """qbus_print from the main system bus down."""
    printer = _Qtree(sources)
    root = next((o for o in sources.objects.values() if o.is_bus and o.type == "System"), None)
    if root is not None:
        printer.bus(root, 0)
    return "".join(printer.out)


def info_network(objects: dict[str, QomObject]) -> str:
    """hmp_info_network as far as QOM shows it: every NIC (``name: index=0,type=nic,model=...,macaddr=...``) and,
    under it, the name of its netdev (`` \\ NAME``); the netdev's own type and options are not in QOM."""
    out: list[str] = []
    counts: dict[str, int] = {}
    nics = [o for o in objects.values() if o.is_device and "netdev" in o.types and "mac" in o.types]
    for nic in sorted(nics, key=lambda o: (not o.path.startswith("/machine/peripheral-anon/"), _natural(o.path))):
        if nic.path.startswith("/machine/peripheral/"):
            name = nic.name
        else:
            name = f"{nic.type}.{counts.get(nic.type, 0)}"
            counts[nic.type] = counts.get(nic.type, 0) + 1
        out.append(f"{name}: index=0,type=nic,model={nic.type},macaddr={nic.values.get('mac', '')}\n")
        netdev = nic.values.get("netdev")
        if isinstance(netdev, str) and netdev:
            out.append(f" \\ {netdev}\n")
    return "".join(out)
