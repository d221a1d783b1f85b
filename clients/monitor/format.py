"""QMP results as QEMU 7.2's HMP text (ported from hmp-cmds.c and block-hmp-cmds.c), sans-IO.

Every function takes the decoded ``return`` value of one or more QMP queries and returns the text QEMU's own
monitor prints for the same state, with ``\\n`` line ends (the transport turns them into ``\\r\\n`` as QEMU does).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

Json = dict[str, Any]


def _onoff(value: object) -> str:
    return "on" if value else "off"


def _truefalse(value: object) -> str:
    return "true" if value else "false"


def info_status(status: Json) -> str:
    text = "VM status: " + ("running" if status.get("running") else "paused")
    if status.get("singlestep"):
        text += " (single step mode)"
    if not status.get("running") and status.get("status") != "paused":
        text += f" ({status.get('status')})"
    return text + "\n"


def info_version(version: Json) -> str:
    qemu = version["qemu"]
    return f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}{version.get('package', '')}\n"


def info_name(name: Json) -> str:
    return f"{name['name']}\n" if "name" in name else ""


def info_uuid(uuid: Json) -> str:
    return f"{uuid['UUID']}\n"


def info_kvm(kvm: Json) -> str:
    if not kvm.get("present"):
        return "kvm support: not compiled\n"
    return "kvm support: " + ("enabled" if kvm.get("enabled") else "disabled") + "\n"


def info_cpus(cpus: list[Json], current_index: int | None = None) -> str:
    if current_index is None and cpus:
        current_index = cpus[0]["cpu-index"]
    return "".join(f"{'*' if cpu['cpu-index'] == current_index else ' '} CPU #{cpu['cpu-index']}: "
                   f"thread_id={cpu['thread-id']}\n" for cpu in cpus)


def _block_info(info: Json | None, inserted: Json | None) -> str:
    out: list[str] = []
    if info is not None and info.get("device"):
        head = info["device"]
        if inserted is not None and "node-name" in inserted:
            head += f" ({inserted['node-name']})"
    elif inserted is not None and "node-name" in inserted:
        head = inserted["node-name"]
    else:
        head = (info or {}).get("qdev", "<anonymous>")
    if inserted is not None:
        flags = (", read-only" if inserted.get("ro") else "") + (", encrypted" if inserted.get("encrypted") else "")
        out.append(f"{head}: {inserted['file']} ({inserted['drv']}{flags})\n")
    else:
        out.append(f"{head}: [not inserted]\n")
    if info is not None:
        if "qdev" in info:
            out.append(f"    Attached to:      {info['qdev']}\n")
        if info.get("io-status", "ok") != "ok":
            out.append(f"    I/O status:       {info['io-status']}\n")
        if info.get("removable"):
            out.append(f"    Removable device: {'' if info.get('locked') else 'not '}locked, tray "
                       f"{'open' if info.get('tray_open') else 'closed'}\n")
    if inserted is None:
        return "".join(out)
    cache = inserted.get("cache", {})
    out.append("    Cache mode:       " + ("writeback" if cache.get("writeback") else "writethrough")
               + (", direct" if cache.get("direct") else "") + (", ignore flushes" if cache.get("no-flush") else "")
               + "\n")
    if "backing_file" in inserted:
        out.append(f"    Backing file:     {inserted['backing_file']} "
                   f"(chain depth: {inserted.get('backing_file_depth', 0)})\n")
    if inserted.get("detect_zeroes", "off") != "off":
        out.append(f"    Detect zeroes:    {inserted['detect_zeroes']}\n")
    if any(inserted.get(k) for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")):
        g = inserted.get
        out.append(
            f"    I/O throttling:   bps={g('bps')} bps_rd={g('bps_rd')} bps_wr={g('bps_wr')} "
            f"bps_max={g('bps_max', 0)} bps_rd_max={g('bps_rd_max', 0)} bps_wr_max={g('bps_wr_max', 0)} "
            f"iops={g('iops')} iops_rd={g('iops_rd')} iops_wr={g('iops_wr')} "
            f"iops_max={g('iops_max', 0)} iops_rd_max={g('iops_rd_max', 0)} iops_wr_max={g('iops_wr_max', 0)} "
            f"iops_size={g('iops_size', 0)} group={g('group', '')}\n")
    return "".join(out)


def info_block(blocks: list[Json], nodes: list[Json] | None = None, device: str | None = None) -> str:
    """``info block [-n] [device]`` from query-block (and query-named-block-nodes for ``-n``). As QEMU, a blank
    line goes before every entry but the first of the whole list, even when ``device`` picks one."""
    parts: list[str] = []
    if nodes is None:
        for index, info in enumerate(blocks):
            if device is None or info.get("device") == device:
                parts.append(("\n" if index else "") + _block_info(info, info.get("inserted")))
    for index, node in enumerate(nodes or []):
        if device is None or node.get("node-name") == device:
            parts.append(("\n" if index else "") + _block_info(None, node))
    return "".join(parts)


_BLOCKSTATS = ("rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations", "wr_total_time_ns",
               "rd_total_time_ns", "flush_total_time_ns", "rd_merged", "wr_merged", "idle_time_ns")


def info_blockstats(stats: list[Json]) -> str:
    out: list[str] = []
    for entry in stats:
        if "device" not in entry:
            continue
        values = entry["stats"]
        fields = " ".join(f"{key}={values.get(key, 0)}" for key in _BLOCKSTATS)
        out.append(f"{entry['device']}: {fields}\n")
    return "".join(out)


def info_chardev(chardevs: list[Json]) -> str:
    return "".join(f"{c['label']}: filename={c['filename']}\n" for c in chardevs)


def info_mice(mice: list[Json]) -> str:
    if not mice:
        return "No mouse devices connected\n"
    return "".join(f"{'*' if m.get('current') else ' '} Mouse #{m['index']}: {m['name']}"
                   f"{' (absolute)' if m.get('absolute') else ''}\n" for m in mice)


def _vnc_basic(info: Json, name: str) -> str:
    return (f"  {name}: {info.get('host', '')}:{info.get('service', '')} ({info.get('family', '')}"
            f"{' (Websocket)' if info.get('websocket') else ''})\n")


def _vnc_auth(indent: str, auth: str, vencrypt: str | None) -> str:
    return f"{indent}Auth: {auth} (Sub: {vencrypt or 'none'})\n"


def info_vnc(servers: list[Json]) -> str:
    """``info vnc`` from query-vnc-servers."""
    if not servers:
        return "None\n"
    out: list[str] = []
    for info in servers:
        out.append(f"{info['id']}:\n")
        for server in info.get("server", []):
            out.append(_vnc_basic(server, "Server"))
            out.append(_vnc_auth("    ", server.get("auth", "none"), server.get("vencrypt")))
        for client in info.get("clients", []):
            out.append(_vnc_basic(client, "Client"))
            out.append(f"    x509_dname: {client.get('x509_dname', 'none')}\n")
            out.append(f"    sasl_username: {client.get('sasl_username', 'none')}\n")
        if not info.get("server"):
            out.append(_vnc_auth("  ", info.get("auth", "none"), info.get("vencrypt")))
        if "display" in info:
            out.append(f"  Display: {info['display']}\n")
    return "".join(out)


#: QEMU 7.2's defaults for the migration globals ``info migrate`` prints first (they are not in any QMP query).
MIGRATION_GLOBALS: dict[str, object] = {
    "store-global-state": True, "only-migratable": False, "send-configuration": True,
    "send-section-footer": True, "decompress-error-check": True, "clear-bitmap-shift": 18,
}


def info_migrate(info: Json, globals_: dict[str, object] | None = None) -> str:
    out = ["globals:\n"]
    for key, value in (globals_ or MIGRATION_GLOBALS).items():
        out.append(f"{key}: {value if isinstance(value, int) and not isinstance(value, bool) else _onoff(value)}\n")
    if info.get("blocked-reasons"):
        out.append("Outgoing migration blocked:\n")
        out.extend(f"  {reason}\n" for reason in info["blocked-reasons"])
    if "status" in info:
        out.append(f"Migration status: {info['status']}")
        if info["status"] == "failed" and "error-desc" in info:
            out.append(f" ({info['error-desc']})\n")
        else:
            out.append("\n")
        out.append(f"total time: {info.get('total-time', 0)} ms\n")
        if "expected-downtime" in info:
            out.append(f"expected downtime: {info['expected-downtime']} ms\n")
        if "downtime" in info:
            out.append(f"downtime: {info['downtime']} ms\n")
        if "setup-time" in info:
            out.append(f"setup: {info['setup-time']} ms\n")
    ram = info.get("ram")
    if ram is not None:
        out += [f"transferred ram: {ram['transferred'] >> 10} kbytes\n", f"throughput: {ram['mbps']:0.2f} mbps\n",
                f"remaining ram: {ram['remaining'] >> 10} kbytes\n", f"total ram: {ram['total'] >> 10} kbytes\n",
                f"duplicate: {ram['duplicate']} pages\n", f"skipped: {ram.get('skipped', 0)} pages\n",
                f"normal: {ram['normal']} pages\n", f"normal bytes: {ram['normal-bytes'] >> 10} kbytes\n",
                f"dirty sync count: {ram['dirty-sync-count']}\n", f"page size: {ram['page-size'] >> 10} kbytes\n",
                f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes\n",
                f"pages-per-second: {ram['pages-per-second']}\n"]
        if ram.get("dirty-pages-rate"):
            out.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages\n")
        if ram.get("postcopy-requests"):
            out.append(f"postcopy request count: {ram['postcopy-requests']}\n")
        for key, label in (("precopy-bytes", "precopy ram"), ("downtime-bytes", "downtime ram"),
                           ("postcopy-bytes", "postcopy ram")):
            if ram.get(key):
                out.append(f"{label}: {ram[key] >> 10} kbytes\n")
    disk = info.get("disk")
    if disk is not None:
        out += [f"transferred disk: {disk['transferred'] >> 10} kbytes\n",
                f"remaining disk: {disk['remaining'] >> 10} kbytes\n", f"total disk: {disk['total'] >> 10} kbytes\n"]
    if "cpu-throttle-percentage" in info:
        out.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}\n")
    return "".join(out)


#: ``info migrate_parameters``: QEMU 7.2's order and unit for each parameter (``None``: no unit).
_MIGRATE_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("announce-initial", " ms"), ("announce-max", " ms"), ("announce-rounds", ""), ("announce-step", " ms"),
    ("compress-level", ""), ("compress-threads", ""), ("compress-wait-thread", "bool"),
    ("decompress-threads", ""), ("throttle-trigger-threshold", ""), ("cpu-throttle-initial", ""),
    ("cpu-throttle-increment", ""), ("cpu-throttle-tailslow", "bool"), ("max-cpu-throttle", ""),
    ("tls-creds", "quoted"), ("tls-hostname", "quoted"), ("max-bandwidth", " bytes/second"),
    ("downtime-limit", " ms"), ("x-checkpoint-delay", " ms"), ("block-incremental", "bool"),
    ("multifd-channels", ""), ("multifd-compression", ""), ("xbzrle-cache-size", " bytes"),
    ("max-postcopy-bandwidth", ""),
)


def info_migrate_parameters(params: Json) -> str:
    out: list[str] = []
    for key, unit in _MIGRATE_PARAMETERS:
        if key not in params:
            continue
        value = params[key]
        if unit == "bool":
            out.append(f"{key}: {_onoff(value)}\n")
        elif unit == "quoted":
            out.append(f"{key}: '{value}'\n")
        else:
            out.append(f"{key}: {value}{unit}\n")
    if "tls-authz" in params:
        out.append(f"tls-authz: '{params['tls-authz']}'\n")
    mapping = params.get("block-bitmap-mapping")
    if mapping:
        out.append("block-bitmap-mapping:\n")
        for node in mapping:
            out.append(f"  '{node['node-name']}' -> '{node['alias']}'\n")
            for bitmap in node.get("bitmaps", []):
                out.append(f"    '{bitmap['name']}' -> '{bitmap['alias']}'\n")
    return "".join(out)


def info_migrate_capabilities(caps: list[Json]) -> str:
    return "".join(f"{c['capability']}: {_onoff(c['state'])}\n" for c in caps)


_U64 = (1 << 64) - 1


def _pci_device(dev: Json) -> str:
    out = [f"  Bus {dev['bus']:2d}, device {dev['slot']:3d}, function {dev['function']}:\n", "    "]
    cls = dev["class_info"]
    out.append(cls["desc"] if "desc" in cls else f"Class {cls['class']:04d}")
    ident = dev["id"]
    out.append(f": PCI device {ident['vendor']:04x}:{ident['device']:04x}\n")
    if "subsystem-vendor" in ident and "subsystem" in ident:
        out.append(f"      PCI subsystem {ident['subsystem-vendor']:04x}:{ident['subsystem']:04x}\n")
    if "irq" in dev:
        out.append(f"      IRQ {dev['irq']}, pin {chr(ord('A') + dev.get('irq_pin', 1) - 1)}\n")
    bridge = dev.get("pci_bridge")
    if bridge is not None:
        bus = bridge["bus"]
        out += [f"      BUS {bus['number']}.\n", f"      secondary bus {bus['secondary']}.\n",
                f"      subordinate bus {bus['subordinate']}.\n",
                f"      IO range [0x{bus['io_range']['base']:04x}, 0x{bus['io_range']['limit']:04x}]\n",
                f"      memory range [0x{bus['memory_range']['base']:08x}, "
                f"0x{bus['memory_range']['limit']:08x}]\n",
                f"      prefetchable memory range [0x{bus['prefetchable_range']['base']:08x}, "
                f"0x{bus['prefetchable_range']['limit']:08x}]\n"]
    for region in dev.get("regions", []):
        addr = region["address"] & _U64  # QMP reports an unmapped BAR as -1 (int64)
        end = (addr + region["size"] - 1) & _U64
        out.append(f"      BAR{region['bar']}: ")
        if region["type"] == "io":
            out.append(f"I/O at 0x{addr:04x} [0x{end:04x}].\n")
        else:
            out.append(f"{64 if region.get('mem_type_64') else 32} bit"
                       f"{' prefetchable' if region.get('prefetch') else ''} memory at 0x{addr:08x} [0x{end:08x}].\n")
    out.append(f"      id \"{dev.get('qdev_id', '')}\"\n")
    if bridge is not None:
        out.extend(_pci_device(child) for child in bridge.get("devices", []))
    return "".join(out)


def info_pci(buses: list[Json]) -> str:
    return "".join(_pci_device(dev) for bus in buses for dev in bus.get("devices", []))


def info_balloon(balloon: Json) -> str:
    return f"balloon: actual={balloon['actual'] >> 20}\n"


_CPU_PROPS = ("node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id", "core-id", "thread-id")


def info_hotpluggable_cpus(cpus: list[Json]) -> str:
    out = ["Hotpluggable CPUs:\n"]
    for cpu in cpus:
        out.append(f"  type: \"{cpu['type']}\"\n")
        out.append(f"  vcpus_count: \"{cpu['vcpus-count']}\"\n")
        if "qom-path" in cpu:
            out.append(f"  qom_path: \"{cpu['qom-path']}\"\n")
        out.append("  CPUInstance Properties:\n")
        props = cpu.get("props", {})
        out.extend(f"    {key}: \"{props[key]}\"\n" for key in _CPU_PROPS if key in props)
    return "".join(out)


def _ranges(numbers: Iterable[int]) -> str:
    """A uint list the way QEMU's string output visitor prints it: ``0-3,5``."""
    values = sorted(set(numbers))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def info_memdev(memdevs: list[Json]) -> str:
    out: list[str] = []
    for m in memdevs:
        out += [f"memory backend: {m.get('id', '')}\n", f"  size:  {m['size']}\n",
                f"  merge: {_truefalse(m['merge'])}\n", f"  dump: {_truefalse(m['dump'])}\n",
                f"  prealloc: {_truefalse(m['prealloc'])}\n", f"  share: {_truefalse(m['share'])}\n"]
        if "reserve" in m:
            out.append(f"  reserve: {_truefalse(m['reserve'])}\n")
        out += [f"  policy: {m['policy']}\n", f"  host nodes: {_ranges(m.get('host-nodes', []))}\n"]
    return "".join(out) + "\n"


def info_iothreads(threads: list[Json]) -> str:
    return "".join(f"{t['id']}:\n  thread_id={t['thread-id']}\n  poll-max-ns={t['poll-max-ns']}\n"
                   f"  poll-grow={t['poll-grow']}\n  poll-shrink={t['poll-shrink']}\n"
                   f"  aio-max-batch={t['aio-max-batch']}\n" for t in threads)


def info_commands(commands: list[Json]) -> str:
    """Not an HMP command in QEMU: the QMP commands QEMU offers (what the core may pass on), one a line."""
    return "".join(f"{name}\n" for name in sorted(c["name"] for c in commands))


def info_block_jobs(jobs: list[Json]) -> str:
    if not jobs:
        return "No active jobs\n"
    out: list[str] = []
    for job in jobs:
        kind = "Streaming" if job["type"] == "stream" else job["type"]
        out.append(f"Type {kind}, device {job['device']}: Completed {job['offset']} of {job['len']} bytes, "
                   f"speed limit {job['speed']} bytes/s\n")
    return "".join(out)


def size_to_str(size: int) -> str:
    """QEMU's size_to_str: ``%0.3g`` of the value in the largest unit below 1000 of it (``813 KiB``, ``0 B``)."""
    _, exponent = math.frexp(size / (1000.0 / 1024.0))
    index = min(int((exponent - 1) / 10), 6)  # C division truncates toward zero
    value = size / (1 << (index * 10))
    return f"{value:.3g} {('', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei')[index]}B"


def _snapshot_row(snap: Json) -> str:
    """bdrv_snapshot_dump of one snapshot (``%-9s %-16s %8s%20s%13s%11s``)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.get("date-sec", 0)))
    clock_ns = snap.get("vm-clock-sec", 0) * 1_000_000_000 + snap.get("vm-clock-nsec", 0)
    secs = clock_ns // 1_000_000_000
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{clock_ns // 1_000_000 % 1000:03d}"
    icount = str(snap["icount"]) if "icount" in snap else ""
    return (f"{snap.get('id', ''):<9} {snap['name']:<16} {size_to_str(snap.get('vm-state-size', 0)):>8}{date:>20}"
            f"{clock:>13}{icount:>11}\n")


_SNAPSHOT_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}\n"


def info_snapshots(disks: list[tuple[str, list[Json]]]) -> str:
    """``info snapshots`` (hmp_info_snapshots): ``disks`` are the snapshot-capable disks (name, snapshots) in
    QEMU's order, the first being where VM state goes. Snapshots of that disk present on every disk are listed
    with ID ``--``; the others, per disk, as partial (non-loadable) snapshots."""
    if not disks:
        return "No block device can accept snapshots\n"
    if not any(snapshots for _, snapshots in disks):
        return "There is no snapshot available.\n"
    names = [{s["name"] for s in snapshots} for _, snapshots in disks]
    common = [s for s in disks[0][1] if all(s["name"] in other for other in names)]
    shared = {s["name"] for s in common}
    out = ["List of snapshots present on all disks:\n"]
    if common:
        out.append(_SNAPSHOT_HEADER)
        out.extend(_snapshot_row({**s, "id": "--"}) for s in common)
    else:
        out.append("None\n")
    for name, snapshots in disks:
        partial = [s for s in snapshots if s["name"] not in shared]
        if partial:
            out.append(f"\nList of partial (non-loadable) snapshots on '{name}':\n")
            out.append(_SNAPSHOT_HEADER)
            out.extend(_snapshot_row(s) for s in partial)
    return "".join(out)


def info_memory_size_summary(info: Json) -> str:
    out = f"base memory: {info['base-memory']}\n"
    if "plugged-memory" in info:
        out += f"plugged memory: {info['plugged-memory']}\n"
    return out


def info_dump(result: Json) -> str:
    out = f"Status: {result['status']}\n"
    if result["status"] == "active" and result.get("total"):
        out += f"Finished: {100.0 * result['completed'] / result['total']:.2f} %\n"
    return out


def info_tpm(tpms: list[Json]) -> str:
    out = ["TPM device:\n"] if tpms else []
    for index, tpm in enumerate(tpms):
        options = tpm.get("options", {})
        kind, data = options.get("type", ""), options.get("data", {})
        out.append(f" tpm{index}: model={tpm.get('model', '')}\n  \\ {tpm.get('id', '')}: type={kind}")
        if kind == "passthrough":
            out.append((f",path={data['path']}" if "path" in data else "")
                       + (f",cancel-path={data['cancel-path']}" if "cancel-path" in data else ""))
        elif kind == "emulator":
            out.append(f",chardev={data.get('chardev', '')}")
        out.append("\n")
    return "".join(out)


def info_vm_generation_id(info: Json) -> str:
    return f"{info['guid']}\n"


def info_memory_devices(devices: list[Json]) -> str:
    out: list[str] = []
    for device in devices:
        kind, data = device.get("type", ""), device.get("data", {})
        out.append(f"Memory device [{kind}]: \"{data.get('id', '')}\"\n")
        if kind in ("dimm", "nvdimm"):
            out += [f"  addr: 0x{data['addr']:x}\n", f"  slot: {data['slot']}\n", f"  node: {data['node']}\n",
                    f"  size: {data['size']}\n", f"  memdev: {data['memdev']}\n",
                    f"  hotplugged: {_truefalse(data['hotplugged'])}\n",
                    f"  hotpluggable: {_truefalse(data['hotpluggable'])}\n"]
        elif kind == "virtio-pmem":
            out += [f"  memaddr: 0x{data['memaddr']:x}\n", f"  size: {data['size']}\n",
                    f"  memdev: {data['memdev']}\n"]
        elif kind == "virtio-mem":
            out += [f"  memaddr: 0x{data['memaddr']:x}\n", f"  node: {data['node']}\n",
                    f"  requested-size: {data['requested-size']}\n", f"  size: {data['size']}\n",
                    f"  max-size: {data['max-size']}\n", f"  block-size: {data['block-size']}\n",
                    f"  memdev: {data['memdev']}\n"]
        elif kind == "sgx-epc":
            out += [f"  memaddr: 0x{data['memaddr']:x}\n", f"  size: {data['size']}\n", f"  node: {data['node']}\n",
                    f"  memdev: {data['memdev']}\n"]
    return "".join(out)


def human_readable_text(result: Json) -> str:
    """The ``x-query-*`` commands' HumanReadableText: exactly what QEMU's own ``info`` command prints."""
    text: str = result.get("human-readable-text", "")
    return text


# --- JSON the way QEMU's monitor pretty-prints it (qom-get) --------------------------------------------------------


def _json_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[char])
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
        elif code < 0x20 or code >= 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def qemu_json_pretty(value: object, depth: int = 0) -> str:
    """qobject_to_json_pretty: 4-space indents, ``"key": value``, empty containers as ``{\\n}``, QEMU's escapes."""
    pad = "\n" + " " * (4 * (depth + 1))
    end = "\n" + " " * (4 * depth)
    if isinstance(value, dict):
        return "{" + ",".join(f"{pad}{_json_string(str(k))}: {qemu_json_pretty(v, depth + 1)}"
                              for k, v in value.items()) + end + "}"
    if isinstance(value, list):
        return "[" + ",".join(f"{pad}{qemu_json_pretty(v, depth + 1)}" for v in value) + end + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, float):
        return f"{value:.17g}"
    return str(value)


def qom_list(properties: list[Json]) -> str:
    return "".join(f"{p['name']} ({p['type']})\n" for p in properties)


# --- guest memory, registers and expressions (x, xp, print, info registers) --------------------------------------


def printc(value: int) -> str:
    """monitor_printc: a character constant as C would write it (``'a'``, ``'\\n'``, ``'\\x1f'``)."""
    code = value & 0xFFFFFFFF
    code = code - (1 << 32) if code >= 1 << 31 else code  # passed as a C int
    special = {39: "\\'", 92: "\\\\", 10: "\\n", 13: "\\r"}
    if code in special:
        return f"'{special[code]}'"
    if 32 <= code <= 126:
        return f"'{chr(code)}'"
    return f"'\\x{code & 0xFFFFFFFF if code < 0 else code:02x}'"


def _c_octal(value: int, width: int = 0) -> str:
    """C's ``%#*o``: a leading 0 unless the value is 0."""
    text = f"0{value:o}" if value else "0"
    return f"{text:>{width}}"


def print_value(value: int, fmt: str) -> str:
    """do_print: ``print /fmt expr`` (the value is a 64-bit hwaddr; ``d`` shows it signed)."""
    unsigned = value & 0xFFFFFFFFFFFFFFFF
    if fmt == "o":
        return _c_octal(unsigned) + "\n"
    if fmt == "x":
        return (f"0x{unsigned:x}" if unsigned else "0") + "\n"
    if fmt == "u":
        return f"{unsigned}\n"
    if fmt == "c":
        return printc(unsigned) + "\n"
    signed = unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned
    return f"{signed}\n"


def memory_dump(address: int, data: bytes, count: int, fmt: str, size: int) -> str:
    """memory_dump for ``x``/``xp`` (every format but ``i``): 8 bytes a line for bytes, 16 otherwise; ``data`` is
    what could be read from ``address`` on: a line it does not cover prints `` Cannot access memory`` and ends
    the dump, as QEMU does when a line cannot be read."""
    length = size * count
    line_size = 8 if size == 1 else 16
    digits = {"o": -(-size * 8 // 3), "x": size * 8 // 4, "u": -(-size * 80 // 33), "d": -(-size * 80 // 33)}
    max_digits = digits.get(fmt, size * 8 // 4)
    if fmt == "c":
        size = 1
    out: list[str] = []
    offset = 0
    while length > 0:
        out.append(f"{(address + offset) & 0xFFFFFFFFFFFFFFFF:016x}:")
        chunk = min(length, line_size)
        if offset + chunk > len(data):
            out.append(" Cannot access memory\n")
            break
        for i in range(0, chunk, size):
            value = int.from_bytes(data[offset + i:offset + i + size].ljust(size, b"\0"), "little")
            if fmt == "o":
                out.append(" " + _c_octal(value, max_digits))
            elif fmt in ("u", "d"):
                out.append(f" {value:>{max_digits}}")
            elif fmt == "c":
                out.append(" " + printc(value))
            else:
                out.append(f" 0x{value:0{max_digits}x}")
        out.append("\n")
        offset += chunk
        length -= chunk
    return "".join(out)


def disassembly(address: int, data: bytes, count: int, mode_bits: int) -> str:
    """``x /Ni``: QEMU's capstone output (AT&T syntax, unknown bytes as ``.byte``), one instruction a line:
    address, up to 8 code bytes, mnemonic and operands; longer instructions continue on lines of their own."""
    import capstone

    modes = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
    engine = capstone.Cs(capstone.CS_ARCH_X86, modes[mode_bits])
    engine.syntax = capstone.CS_OPT_SYNTAX_ATT
    engine.skipdata = True
    out: list[str] = []
    for index, (insn_address, insn_size, mnemonic, operands) in enumerate(engine.disasm_lite(data, address)):
        if index >= count:
            break
        code = data[insn_address - address:insn_address - address + insn_size]
        padding = " " * (3 * max(0, 8 - len(code)))
        out.append(f"0x{insn_address:08x}: " + "".join(f" {b:02x}" for b in code[:8]) + padding
                   + f"  {mnemonic:<8} {operands}\n")
        for start in range(8, len(code), 8):
            out.append(f"0x{insn_address + start:08x}: " + "".join(f" {b:02x}" for b in code[start:start + 8]) + "\n")
    return "".join(out)


#: Segment descriptor bits of QEMU's SegmentCache flags (target/i386/cpu.h).
_DESC_P, _DESC_S, _DESC_CS, _DESC_C, _DESC_R, _DESC_A = 1 << 15, 1 << 12, 1 << 11, 1 << 10, 1 << 9, 1 << 8
_DESC_L, _DESC_B = 1 << 21, 1 << 22
_SYS_TYPES = (
    ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16", "TrapGate16",
     "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved", "IntGate32", "TrapGate32"),
    ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
     "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64", "TrapGate64"),
)


def cpu_mode_bits(cpu: Json, long_mode: bool) -> int:
    """16, 32 or 64: how the CPU's current code segment executes (QEMU's HF_CS64/HF_CS32)."""
    flags = cpu["cs"]["flags"]
    if long_mode and flags & _DESC_L:
        return 64
    return 32 if flags & _DESC_B else 16


def _segment_line(name: str, seg: Json, cs64: bool, protected: bool, long_mode: bool) -> str:
    flags = seg["flags"]
    if cs64:
        line = f"{name:<3}={seg['selector']:04x} {seg['base']:016x} {seg['limit']:08x} {flags & 0x00FFFF00:08x}"
    else:
        line = (f"{name:<3}={seg['selector']:04x} {seg['base'] & 0xFFFFFFFF:08x} {seg['limit']:08x} "
                f"{flags & 0x00FFFF00:08x}")
    if not protected or not flags & _DESC_P:
        return line + "\n"
    line += f" DPL={(flags >> 13) & 3} "
    if flags & _DESC_S:
        if flags & _DESC_CS:
            line += "CS64" if flags & _DESC_L else "CS32" if flags & _DESC_B else "CS16"
            line += f" [{'C' if flags & _DESC_C else '-'}{'R' if flags & _DESC_R else '-'}"
        else:
            line += "DS  " if flags & _DESC_B or long_mode else "DS16"
            line += f" [{'E' if flags & _DESC_C else '-'}{'W' if flags & _DESC_R else '-'}"
        line += f"{'A' if flags & _DESC_A else '-'}]"
    else:
        line += _SYS_TYPES[1 if long_mode else 0][(flags >> 8) & 15]
    return line + "\n"


_EFLAGS = ((0x400, "D"), (0x800, "O"), (0x80, "S"), (0x40, "Z"), (0x10, "A"), (0x4, "P"), (0x1, "C"))


def info_registers(cpu: Json, long_mode: bool) -> str:
    """x86_cpu_dump_state for what QEMU's guest-memory dump carries (docs/monitor.md lists what it lacks: II,
    A20, SMM, HLT, the debug registers, EFER, FPU and SSE state)."""
    cs64 = cpu_mode_bits(cpu, long_mode) == 64
    protected = bool(cpu["cr0"] & 1)
    eflags = cpu["rflags"]
    flag_text = "".join(letter if eflags & bit else "-" for bit, letter in _EFLAGS)
    cpl = (cpu["ss"]["flags"] >> 13) & 3
    out = [f"\nCPU#{cpu['cpu-index']}\n"]
    regs: tuple[tuple[str, str], ...]
    if cs64:
        regs = ("RAX", "rax"), ("RBX", "rbx"), ("RCX", "rcx"), ("RDX", "rdx"), ("RSI", "rsi"), ("RDI", "rdi"), \
            ("RBP", "rbp"), ("RSP", "rsp"), ("R8 ", "r8"), ("R9 ", "r9"), ("R10", "r10"), ("R11", "r11"), \
            ("R12", "r12"), ("R13", "r13"), ("R14", "r14"), ("R15", "r15")
        for row in range(0, 16, 4):
            out.append(" ".join(f"{label}={cpu[key]:016x}" for label, key in regs[row:row + 4]) + "\n")
        out.append(f"RIP={cpu['rip']:016x} RFL={eflags & 0xFFFFFFFF:08x} [{flag_text}] CPL={cpl}\n")
    else:
        regs = ("EAX", "rax"), ("EBX", "rbx"), ("ECX", "rcx"), ("EDX", "rdx"), ("ESI", "rsi"), ("EDI", "rdi"), \
            ("EBP", "rbp"), ("ESP", "rsp")
        for row in range(0, 8, 4):
            out.append(" ".join(f"{label}={cpu[key] & 0xFFFFFFFF:08x}" for label, key in regs[row:row + 4]) + "\n")
        out.append(f"EIP={cpu['rip'] & 0xFFFFFFFF:08x} EFL={eflags & 0xFFFFFFFF:08x} [{flag_text}] CPL={cpl}\n")
    for name in ("ES", "CS", "SS", "DS", "FS", "GS", "LDT", "TR"):
        out.append(_segment_line(name, cpu[name.lower()], cs64, protected, long_mode))
    if long_mode:
        out += [f"GDT=     {cpu['gdt']['base']:016x} {cpu['gdt']['limit']:08x}\n",
                f"IDT=     {cpu['idt']['base']:016x} {cpu['idt']['limit']:08x}\n",
                f"CR0={cpu['cr0'] & 0xFFFFFFFF:08x} CR2={cpu['cr2']:016x} CR3={cpu['cr3']:016x} "
                f"CR4={cpu['cr4'] & 0xFFFFFFFF:08x}\n"]
    else:
        out += [f"GDT=     {cpu['gdt']['base'] & 0xFFFFFFFF:08x} {cpu['gdt']['limit']:08x}\n",
                f"IDT=     {cpu['idt']['base'] & 0xFFFFFFFF:08x} {cpu['idt']['limit']:08x}\n",
                f"CR0={cpu['cr0'] & 0xFFFFFFFF:08x} CR2={cpu['cr2'] & 0xFFFFFFFF:08x} "
                f"CR3={cpu['cr3'] & 0xFFFFFFFF:08x} CR4={cpu['cr4'] & 0xFFFFFFFF:08x}\n"]
    return "".join(out)


def register_value(cpu: Json, name: str) -> int | None:
    """An HMP ``$name`` (target/i386/monitor.c's monitor_defs) from a CPU state, or None if unknown."""
    aliases = {"esp": "rsp", "sp": "rsp", "ebp": "rbp", "fp": "rbp", "eax": "rax", "ecx": "rcx", "edx": "rdx",
               "ebx": "rbx", "esi": "rsi", "edi": "rdi", "eip": "rip", "eflags": "rflags"}
    key = aliases.get(name, name)
    if key in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags") and key != name:
        return int(cpu[key])
    if name in (f"r{i}" for i in range(8, 16)):
        return int(cpu[name])
    if name == "pc":
        return (int(cpu["rip"]) + int(cpu["cs"]["base"])) & 0xFFFFFFFFFFFFFFFF
    segment, _, field = name.partition(".")
    if segment in ("cs", "ds", "es", "ss", "fs", "gs") and field in ("", "base", "limit"):
        value = int(cpu[segment][field or "selector"])
        if field != "base":  # MD_I32: read as a signed 32-bit value
            value &= 0xFFFFFFFF
            value = value - (1 << 32) if value >= 1 << 31 else value
        return value
    return None
