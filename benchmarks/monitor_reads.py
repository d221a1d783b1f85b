"""The monitor's commands that QMP cannot answer directly, vmfront's monitor vs QEMU's own HMP, on one VM.

The VM of tests/test_monitor_table.py (demo guest, two CPUs, a NIC, a DIMM...) with QEMU's HMP on a socket: each
command line runs on both in alternating rounds and the medians are printed with their ratio. ``info registers``
and ``x /Ni`` go through a one-byte guest-memory dump (the guest pauses for it): the pause is measured from the
STOP/RESUME events' QEMU timestamps.

    .venv/bin/python benchmarks/monitor_reads.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from corelib import Fleet  # noqa: E402
from test_monitor_table import RICH_ARGS, start_table  # noqa: E402

from core_daemon.demo_guest import demo_image_path, demo_qemu_args  # noqa: E402

LINES = ["info status", "x /16xw 0xb8000", "x /4096xb 0xb8000", "info registers", "x /8i $pc", "info network",
         "info qtree"]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with Fleet() as fleet:
        table = start_table(fleet, "bench", [*demo_qemu_args(demo_image_path()), *RICH_ARGS])
        times: dict[str, dict[str, list[float]]] = {line: {"qemu": [], "ours": []} for line in LINES}
        for _ in range(args.rounds):
            for line in LINES:
                for side, run in (("qemu", table.qemu.cmd), ("ours", table.ours.cmd)):
                    start = time.perf_counter()
                    run(line)
                    times[line][side].append(time.perf_counter() - start)
        print(f"median wall time of a command line, {args.rounds} rounds (milliseconds)")
        print(f"  {'command':<22} {'QEMU HMP':>10} {'vmfront':>10} {'ratio':>8}")
        for line in LINES:
            qemu, ours = median_ms(times[line]["qemu"]), median_ms(times[line]["ours"])
            print(f"  {line:<22} {qemu:10.2f} {ours:10.2f} {ours / qemu:7.1f}x")
        pauses = []
        for _ in range(args.rounds):
            table.peer.send({"execute": "__org.vmfront_cpu-state"})
            stamps: dict[str, float] = {}
            while True:
                message = table.peer.recv()
                if message.get("event") in ("STOP", "RESUME"):
                    stamp = message["timestamp"]
                    stamps[message["event"]] = stamp["seconds"] + stamp["microseconds"] / 1e6
                elif "return" in message or "error" in message:
                    break
            if "STOP" in stamps and "RESUME" in stamps:
                pauses.append(stamps["RESUME"] - stamps["STOP"])
        if pauses:
            print(f"guest pause for the CPU-state dump: median {median_ms(pauses):.3f} ms, "
                  f"max {max(pauses) * 1000:.3f} ms ({len(pauses)} dumps)")


if __name__ == "__main__":
    main()
