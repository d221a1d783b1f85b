"""What TLS (VeNCrypt X509None) costs the client's VNC server, side by side with the same server in the clear.

    .venv/bin/python benchmarks/vnc_tls.py [--seconds 5] [--json]

One core (the demo guest in its 1920x1080 animation, F3) and two clients on it: one plain, one with
``--vnc-tls-creds`` (a CA made here with openssl). One viewer on each (tests/vnclib.py MiniViewer, after the
VeNCrypt handshake and TLS 1.3 for the second), both pulling full non-incremental updates back to back at the same
time, Raw (slices of the shared memory handed to the socket, or to the SSL transport) then ZRLE (memfd slices from
the encoder workers). Reported per encoding: the client process's own CPU ms per update (the loop, where the
encryption happens; the encoder workers are other processes and do the same work either way), MB/s received by the
viewer, and the ratios TLS over plain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corelib import RawQmpPeer, short_tmpdir, spawn_core  # noqa: E402
from tlslib import make_ca, server_creds, vencrypt_to_tls  # noqa: E402
from vnclib import DESKTOP_SIZE, RAW, ZRLE, MiniViewer, VncClientProcess, free_port, wait_for  # noqa: E402

from core_daemon.demo_guest import demo_image_path, demo_qemu_args  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def tls_viewer(port: int, cafile: Path, encoding: int) -> MiniViewer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
    await vencrypt_to_tls(reader, writer)
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    await writer.start_tls(context)
    assert await reader.readexactly(4) == b"\0\0\0\0"
    writer.write(b"\x01")
    viewer = MiniViewer(reader, writer)
    viewer.width, viewer.height = struct.unpack(">HH", await reader.readexactly(4))
    await reader.readexactly(16)
    await reader.readexactly(struct.unpack(">I", await reader.readexactly(4))[0])
    writer.write(struct.pack(">BxH", 2, 2) + struct.pack(">ii", encoding, DESKTOP_SIZE))
    return viewer


async def pull(viewer: MiniViewer, seconds: float) -> tuple[int, int]:
    count, start_bytes = 0, viewer.bytes_read
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        viewer.request(incremental=False)
        await viewer.read_update()
        count += 1
    return count, viewer.bytes_read - start_bytes


async def measure(plain: VncClientProcess, tls: VncClientProcess, cafile: Path, encoding: int,
                  seconds: float) -> dict[str, dict[str, float]]:
    viewers = {"plain": await MiniViewer.connect(plain.port, encoding), "tls": await tls_viewer(tls.port, cafile,
                                                                                              encoding)}
    try:
        for viewer in viewers.values():  # the first, full update (and a resize to the animation's mode)
            viewer.request(incremental=False)
            await viewer.read_update()
        before = {"plain": cpu_seconds(plain.pid), "tls": cpu_seconds(tls.pid)}
        started = time.monotonic()
        results = await asyncio.gather(*(pull(v, seconds) for v in viewers.values()))
        elapsed = time.monotonic() - started
        after = {"plain": cpu_seconds(plain.pid), "tls": cpu_seconds(tls.pid)}
    finally:
        for viewer in viewers.values():
            viewer.close()
    out = {}
    for name, (count, received) in zip(viewers, results, strict=True):
        out[name] = {"updates": count, "cpu_ms_per_update": 1000 * (after[name] - before[name]) / max(count, 1),
                     "mb_per_s": received / elapsed / 1e6}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = short_tmpdir()
    ca = make_ca(root / "ca")
    creds = server_creds(ca, root / "creds")
    core = spawn_core("tlsb", root / "run", qemu_args=demo_qemu_args(demo_image_path()))
    clients: list[VncClientProcess] = []
    report: dict[str, dict[str, dict[str, float]]] = {}
    try:
        clients.append(VncClientProcess(core.run_dir, "tlsb", free_port(), verbose=False))
        clients.append(VncClientProcess(core.run_dir, "tlsb", free_port(), "--vnc-tls-creds", str(creds),
                                        verbose=False))
        peer = RawQmpPeer(core.qmp_socket).negotiate()
        time.sleep(3)  # the demo guest boots to its text screen
        peer.execute("send-key", arguments={"keys": [{"type": "qcode", "data": "f3"}]})
        wait_for(lambda: "1920x1080" in clients[0].text(), 30, "the 1920x1080 animation")
        for name, encoding in (("raw", RAW), ("zrle", ZRLE)):
            report[name] = asyncio.run(measure(clients[0], clients[1], ca.cert, encoding, args.seconds))
        peer.close()
    finally:
        for client in clients:
            client.stop()
        core.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("| encoding | plain CPU ms/update | TLS CPU ms/update | ratio | plain MB/s | TLS MB/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, sides in report.items():
        p, t = sides["plain"], sides["tls"]
        print(f"| {name} | {p['cpu_ms_per_update']:.1f} | {t['cpu_ms_per_update']:.1f} | "
              f"{t['cpu_ms_per_update'] / max(p['cpu_ms_per_update'], 1e-9):.2f} | {p['mb_per_s']:.0f} | "
              f"{t['mb_per_s']:.0f} | {t['mb_per_s'] / max(p['mb_per_s'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
