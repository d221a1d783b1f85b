"""QMP results as QEMU 7.2's HMP text (ported from hmp-cmds.c and block-hmp-cmds.c), sans-IO.

Every function takes the decoded ``return`` value of one or more QMP queries and returns the text QEMU's own
monitor prints for the same state, with ``\\n`` line ends (the transport turns them into ``\\r\\n`` as QEMU does).
"""

from __future__ import annotations

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
    """``info block [-n] [device]`` from query-block (and query-named-block-nodes for ``-n``)."""
    parts: list[str] = []
    if nodes is None:
        for info in blocks:
            if device is not None and info.get("device") != device:
                continue
            parts.append(_block_info(info, info.get("inserted")))
    for node in nodes or []:
        if device is not None and node.get("node-name") != device:
            continue
        parts.append(_block_info(None, node))
    return "\n".join(parts)


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
        out += [f"  policy: {m['policy']}\n", f"  host nodes: {_ranges(m.get('host-nodes', []))}\n", "\n"]
    return "".join(out)


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


def _snapshot_size(size: int) -> str:
    """QEMU's size_to_str: 1023 B, 1 KiB, 2.6 MiB ..."""
    if size < 1024:
        return f"{size} B"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(size) / 1024
    index = 0
    while value >= 1024 and index < len(units) - 1:
        value /= 1024
        index += 1
    return f"{value:.3g} {units[index]}"


def info_snapshots(snapshots: list[Json]) -> str:
    """``info snapshots`` from the VM-state snapshots of the disks (query-named-block-nodes ``image.snapshots``);
    the column layout is QEMU's (bdrv_snapshot_dump)."""
    if not snapshots:
        return "There is no snapshot available.\n"
    import time

    out = ["List of snapshots present on all disks:\n",
           f"{'ID':<9} {'TAG':<17} {'VM SIZE':>7}{'':>8} {'DATE':<19} {'VM CLOCK':>15} {'ICOUNT':>9}\n"]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.get("date-sec", 0)))
        clock_ns = snap.get("vm-clock-sec", 0) * 1_000_000_000 + snap.get("vm-clock-nsec", 0)
        secs = clock_ns // 1_000_000_000
        clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{clock_ns // 1_000_000 % 1000:03d}"
        icount = str(snap["icount"]) if "icount" in snap else ""
        out.append(f"{'--':<9} {snap['name']:<17} {_snapshot_size(snap.get('vm-state-size', 0)):>15} {date:<19} "
                   f"{clock:>15} {icount:>9}\n")
    return "".join(out)
