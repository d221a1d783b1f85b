"""Our VNC server (the client process) against QEMU's built-in VNC server, on the same QEMU and demo guest.

    .venv/bin/python benchmarks/vnc.py [--seconds 5] [--samples 60]

One core runs QEMU with the demo guest plus ``-vnc 127.0.0.1:N`` (QEMU's own server); one ``vmfront client``
serves VNC from the shared framebuffer. The same minimal viewer (tests/vnclib.MiniViewer: 32-bit BGRX, one
outstanding request) talks to both, with the same encoding (Raw, ZRLE):

* full-frame updates/s: non-incremental whole-screen requests back to back for ``--seconds``;
* CPU seconds per 1000 of those updates, per process (ours: client and core; QEMU's: the QEMU process, minus
  its own rate over an equal idle spell, which is the guest running);
* damage → viewer latency: a key sent by QMP ``send-key`` makes the guest echo it on its KEYS row; both
  viewers wait with an incremental request outstanding, and the latency is from the QMP reply to the first
  update covering that row (median and p99 over ``--samples`` keys);
* typing in bulk: a viewer sends ``--burst`` lowercase letters (down and up each) in one write, as a script or
  a paste does; the guest's KEYS row (read from guest memory) says how many arrived and when the last did.
  The emulated PS/2 keyboard buffers 16 bytes, so a server that forwards a burst at once loses keys; both pace
  them (QEMU's key-delay-ms, our core's --key-delay-ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corelib import RawQmpPeer, kill_pid, short_tmpdir, spawn_core  # noqa: E402
from guestlib import text_row  # noqa: E402
from vnclib import RAW, ZRLE, MiniViewer, VncClientProcess, free_port, wait_for  # noqa: E402

from core_daemon.demo_guest import demo_image_path, demo_qemu_args  # noqa: E402

KEYS_ROW = (64, 80)  # pixel rows of the demo guest's KEYS line (text mode)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def full_frames(port: int, encoding: int, seconds: float, pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    viewer = await MiniViewer.connect(port, encoding)
    try:
        viewer.request(incremental=False)
        await viewer.read_update()  # warm-up (zlib streams, first frame)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.monotonic()
        count = 0
        while time.monotonic() - start < seconds:
            viewer.request(incremental=False)
            await asyncio.wait_for(viewer.read_update(), 10)
            count += 1
        elapsed = time.monotonic() - start
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        viewer.close()
    return count / elapsed, {name: value * 1000 / count for name, value in cpu.items()}


async def latencies(ports: dict[str, int], encoding: int, samples: int, qmp: RawQmpPeer) -> dict[str, list[float]]:
    viewers = {name: await MiniViewer.connect(port, encoding) for name, port in ports.items()}
    result: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for v in viewers.values():
            v.request(incremental=False)
            await asyncio.wait_for(v.read_update(), 10)

        async def wait_keys_row(v: MiniViewer, t0: float) -> float:
            while True:
                v.request(incremental=True)
                rects = await v.read_update()
                if v.updates[-1] > t0 and any(y < KEYS_ROW[1] and y + h > KEYS_ROW[0] for _, y, _, h in rects):
                    return v.updates[-1] - t0

        for i in range(samples):
            await asyncio.sleep(0.15)
            key = "abcdefghijklmnopqrstuvwxyz"[i % 26]
            tasks: dict[str, asyncio.Task[float]] = {}
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            await loop.run_in_executor(None, lambda k=key: qmp.execute(  # type: ignore[misc]
                "send-key", arguments={"keys": [{"type": "qcode", "data": k}]}))
            for name, v in viewers.items():
                tasks[name] = asyncio.create_task(wait_keys_row(v, t0))
            for name, task in tasks.items():
                result[name].append(await asyncio.wait_for(task, 10))
    finally:
        for v in viewers.values():
            v.close()
    return result


async def typing(ports: dict[str, int], qmp: RawQmpPeer, scratch: Path, burst: int,
                 rounds: int) -> dict[str, list[tuple[int, float]]]:
    """(keys that reached the guest, seconds until the last did) per round, per server, alternating."""
    loop = asyncio.get_running_loop()
    text = ("abcdefghijklmnopqrstuvwxyz" * 4)[:burst]

    def keys_typed() -> str:
        return text_row(qmp, 4, scratch)[len("KEYS: "):]

    result: dict[str, list[tuple[int, float]]] = {name: [] for name in ports}
    for _ in range(rounds):
        for name, port in ports.items():
            await loop.run_in_executor(None, lambda: qmp.execute(
                "send-key", arguments={"keys": [{"type": "qcode", "data": "esc"}]}))  # clears the KEYS row
            await asyncio.sleep(0.3)
            viewer = await MiniViewer.connect(port, RAW)
            try:
                start = time.monotonic()
                for ch in text:
                    viewer.key(ord(ch), True)
                    viewer.key(ord(ch), False)
                await viewer.writer.drain()
                seen, last_change = "", time.monotonic()
                while len(seen) < burst and time.monotonic() - last_change < 2.0:
                    now = await loop.run_in_executor(None, keys_typed)
                    if now != seen:
                        seen, last_change = now, time.monotonic()
                    await asyncio.sleep(0.01)
                result[name].append((len(seen), last_change - start))
            finally:
                viewer.close()
    return result


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--burst", type=int, default=40, help="keys per typing burst (at most 74)")
    parser.add_argument("--rounds", type=int, default=3, help="typing bursts per server")
    args = parser.parse_args()

    root = short_tmpdir()
    qemu_port = free_port()
    qemu_display = qemu_port - 5900
    if qemu_display < 0:
        raise SystemExit("free port below 5900; try again")
    qemu_args = [*demo_qemu_args(demo_image_path()), "-vnc", f"127.0.0.1:{qemu_display}"]
    core = spawn_core("bench", root / "run", qemu_args=qemu_args, verbose=False)
    qemu_pid = core.qemu_pid
    client = VncClientProcess(core.run_dir, "bench", free_port(), verbose=False)
    qmp = RawQmpPeer(core.qmp_socket).negotiate()
    try:
        wait_for(lambda: cpu_seconds(qemu_pid) > 0, 5, "QEMU")
        await asyncio.sleep(2.0)  # the guest boots
        c0, t0 = cpu_seconds(qemu_pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        qemu_idle = (cpu_seconds(qemu_pid) - c0) / (time.monotonic() - t0)
        ours_pids = {"client": client.pid, "core": core.pid}
        print(f"QEMU idle CPU (guest running, no viewers): {qemu_idle:.3f} s/s\n")
        print("| encoding | server | full frames/s | CPU s / 1000 updates | latency median ms | latency p99 ms |")
        print("| --- | --- | ---: | --- | ---: | ---: |")
        ratios = []
        for enc_name, enc in (("Raw", RAW), ("ZRLE", ZRLE)):
            ours_fps, ours_cpu = await full_frames(client.port, enc, args.seconds, ours_pids)
            t_start = time.monotonic()
            qemu_fps, qemu_cpu_raw = await full_frames(qemu_port, enc, args.seconds, {"qemu": qemu_pid})
            spent = time.monotonic() - t_start
            qemu_frames = qemu_fps * spent
            qemu_delta = qemu_cpu_raw["qemu"] - qemu_idle * spent * 1000 / max(qemu_frames, 1)
            lat = await latencies({"ours": client.port, "qemu": qemu_port}, enc, args.samples, qmp)
            med = {k: statistics.median(v) * 1000 for k, v in lat.items()}
            p = {k: p99(v) * 1000 for k, v in lat.items()}
            cpu_text = ", ".join(f"{k} {v:.2f}" for k, v in ours_cpu.items())
            print(f"| {enc_name} | vmfront | {ours_fps:.1f} | {cpu_text} | {med['ours']:.1f} | {p['ours']:.1f} |")
            print(f"| {enc_name} | QEMU | {qemu_fps:.1f} | qemu {qemu_cpu_raw['qemu']:.2f} "
                  f"({qemu_delta:+.2f} over its idle rate) "
                  f"| {med['qemu']:.1f} | {p['qemu']:.1f} |")
            ratios.append((enc_name, ours_fps / qemu_fps, med["ours"] / med["qemu"], p["ours"] / p["qemu"],
                           sum(ours_cpu.values()) / max(qemu_cpu_raw["qemu"], 1e-9)))
        print("\nratios (ours / QEMU): goal frames/s >= 0.8, latency <= 1.5")
        for name, fps, lat_med, lat_p99, cpu_ratio in ratios:
            print(f"  {name}: frames/s {fps:.2f}x, latency median {lat_med:.2f}x, p99 {lat_p99:.2f}x, "
                  f"CPU per update {cpu_ratio:.2f}x (vs QEMU's whole process)")
        typed = await typing({"vmfront": client.port, "QEMU": qemu_port}, qmp, root, args.burst, args.rounds)
        print(f"\ntyping {args.burst} keys in one write ({args.rounds} rounds each):")
        for name, runs in typed.items():
            arrived = ", ".join(f"{n}/{args.burst}" for n, _ in runs)
            print(f"  {name}: arrived {arrived}; last key after median "
                  f"{statistics.median(t for _, t in runs) * 1000:.0f} ms")
        ours, theirs = (statistics.median(t for _, t in typed[k]) for k in ("vmfront", "QEMU"))
        print(f"  time to type, ours / QEMU: {ours / theirs:.2f}x")
    finally:
        qmp.close()
        client.stop()
        core.stop()
        kill_pid(qemu_pid)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
