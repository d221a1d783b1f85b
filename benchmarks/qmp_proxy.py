"""QMP round trip through the core vs straight to QEMU, on the same QEMU in the same run.

The core is started with the demo guest and an extra QMP monitor straight on QEMU (``-qmp unix:...``). The same
client library (qemu.qmp) times ``query-status`` on both, in alternating batches so machine noise hits both
alike, and prints median and p99 for each and their ratio. Goal: median ratio <= 1.5.

    .venv/bin/python benchmarks/qmp_proxy.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path

from qemu.qmp import QMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from corelib import kill_pid, short_tmpdir, spawn_core


async def time_batch(client: QMPClient, count: int, into: list[float]) -> None:
    for _ in range(count):
        start = time.perf_counter()
        await client.execute("query-status")
        into.append(time.perf_counter() - start)


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def measure(core_socket: Path, direct_socket: Path, rounds: int, batch: int) -> None:
    via_core, direct = QMPClient("via-core"), QMPClient("direct")
    await asyncio.wait_for(via_core.connect(str(core_socket)), 10)
    await asyncio.wait_for(direct.connect(str(direct_socket)), 10)
    samples: dict[str, list[float]] = {"core": [], "direct": []}
    try:
        await time_batch(via_core, 200, [])  # warm-up, not counted
        await time_batch(direct, 200, [])
        for _ in range(rounds):
            await time_batch(direct, batch, samples["direct"])
            await time_batch(via_core, batch, samples["core"])
    finally:
        await via_core.disconnect()
        await direct.disconnect()
    core_med, core_p99 = summary(samples["core"])
    direct_med, direct_p99 = summary(samples["direct"])
    n = len(samples["core"])
    print(f"query-status round trip, {n} samples each (microseconds)")
    print(f"  direct on QEMU's socket: median {direct_med * 1e6:8.1f}   p99 {direct_p99 * 1e6:8.1f}")
    print(f"  through the core:        median {core_med * 1e6:8.1f}   p99 {core_p99 * 1e6:8.1f}")
    print(f"  ratio core/direct:       median {core_med / direct_med:8.2f}x  p99 {core_p99 / direct_p99:8.2f}x"
          "   (goal: median <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()
    root = short_tmpdir()
    direct = root / "direct.sock"
    core = spawn_core("bench", root / "run", qemu_args=["-machine", "pc", "-m", "16",
                                                        "-qmp", f"unix:{direct},server=on,wait=off"],
                      verbose=False)
    qemu_pid = core.qemu_pid
    try:
        asyncio.run(measure(core.qmp_socket, direct, args.rounds, args.batch))
    finally:
        core.stop()
        kill_pid(qemu_pid)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
