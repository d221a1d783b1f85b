"""What fronting many VMs costs: a client per VM against one ``vmfront client --all``, side by side.

    python benchmarks/fleet.py [--vms 1 10 50] [--seconds 30] [--settle 10] [--isolation]

For each N, N idle demo VMs (real cores and QEMUs, nobody looking) are served first by (a) one client process
per VM (``vmfront client --name NAME --vnc ... --monitor``, as ``vmfront run`` starts them), then by (b) one
fleet client (``vmfront client --all --vnc-ports ... --monitor``). Printed per phase: PSS per VM of the cores and
of the clients (a client's encoder workers count as the client's), and the CPU of all cores and of all clients as
a percentage of the host (every CPU), measured over ``--seconds`` after ``--settle``; then (b)/(a). The goals
(issue 18): core PSS <= 15 MiB, fleet client PSS <= 20 MiB + 2 MiB per VM, 50 idle VMs' vmfront CPU <= 2 % of
the host. Then, for (b): how long a core started later takes to be served (goal: 2 s) and, after a SIGKILL of
the fleet client, how long a new one takes to serve every VM again (goal: 3 s).

``--isolation``: three VMs under one fleet client; VM A switches to its full-HD animation (F3) with one viewer
pulling frames as fast as it can and one that never reads; on VM B a viewer's full-frame update and a monitor
command are timed (median and 95th percentile), first with A idle, then with A busy.

Every process started here is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from corelib import CoreProcess, Fleet, RawQmpPeer, client_command, wait_for  # noqa: E402
from fleetlib import FleetClientProcess, fleet_client_of, start_cores, vnc_port  # noqa: E402
from vnclib import ZRLE, MiniViewer, free_port  # noqa: E402

CPUS = os.cpu_count() or 1
MIB = 1024


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (a client's encoder workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for kid in parents.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def cpu_s(pids: list[int]) -> float:
    """CPU seconds of the live threads of ``pids`` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def measure(cores: list[int], clients: list[int], seconds: float) -> dict[str, float]:
    """PSS per VM (MiB) and CPU (% of the host) of the cores and of the clients (with their descendants)."""
    client_pids = clients + [kid for pid in clients for kid in children(pid)]
    before = (cpu_s(cores), cpu_s(client_pids), time.monotonic())
    time.sleep(seconds)
    client_pids = clients + [kid for pid in clients for kid in children(pid)]
    after = (cpu_s(cores), cpu_s(client_pids), time.monotonic())
    wall = after[2] - before[2]
    n = len(cores)
    return {"core_pss": pss_kib(cores) / n / MIB, "client_pss": pss_kib(client_pids) / n / MIB,
            "client_pss_total": pss_kib(client_pids) / MIB,
            "core_cpu": 100 * (after[0] - before[0]) / wall / CPUS,
            "client_cpu": 100 * (after[1] - before[1]) / wall / CPUS}


def per_vm_clients(fleet: Fleet, cores: list[CoreProcess]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for core in cores:
        procs.append(fleet.add(subprocess.Popen(
            client_command(core.name, core.run_dir, "--vnc", f"127.0.0.1:{free_port()}", "--monitor",
                           verbose=False), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=ROOT)))
    wait_for(lambda: all(core.state().get("clients") for core in cores), 60 + 10 * len(cores),
             "every per-VM client to attach")
    return procs


def end(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def row(label: str, m: dict[str, float], timings: str = "- | - |") -> str:
    return (f"| {label} | {m['core_pss']:.1f} | {m['client_pss']:.1f} | {m['client_pss_total']:.1f} | "
            f"{m['core_cpu']:.2f} | {m['client_cpu']:.2f} | {m['core_cpu'] + m['client_cpu']:.2f} | {timings}")


def footprint(counts: list[int], seconds: float, settle: float) -> None:
    print(f"Idle demo VMs; CPU over {seconds:.0f} s after {settle:.0f} s, % of the host ({CPUS} CPUs); PSS in MiB.")
    print()
    print("| VMs, clients | core PSS / VM | client PSS / VM | client PSS total | cores CPU % | clients CPU % | "
          "vmfront CPU % | new core served after s | after SIGKILL all served after s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    loads: list[str] = []
    for n in counts:
        with Fleet() as fleet:
            cores = start_cores(fleet, [f"f{i:02d}" for i in range(n)], within=120 + 6 * n)
            core_pids = [core.pid for core in cores]
            procs = per_vm_clients(fleet, cores)
            time.sleep(settle)
            a = measure(core_pids, [p.pid for p in procs], seconds)
            end(procs)
            base = free_port()
            fleet_client = fleet.add(FleetClientProcess(fleet.root, "--vnc-ports", f"{base}-{base + n}", "--monitor",
                                                        verbose=False))
            fleet_client.wait_serving(cores, within=120)
            time.sleep(settle)
            b = measure(core_pids, [fleet_client.pid], seconds)
            late = start_cores(fleet, ["late"])[0]
            pickup = fleet_client.wait_serving([late], within=60)
            fleet_client.kill()
            started = time.monotonic()
            again = fleet.add(FleetClientProcess(fleet.root, "--vnc-ports", f"{base}-{base + n}", "--monitor",
                                                 verbose=False))
            again.wait_serving(cores, within=120)
            restart = time.monotonic() - started
            again.stop()
        print(row(f"{n}, one per VM", a))
        print(row(f"{n}, one --all", b, f"{pickup:.2f} | {restart:.2f} |"))
        ratio = {k: b[k] / a[k] if a[k] else float("nan") for k in a}
        print(f"| {n}, (b)/(a) | {ratio['core_pss']:.2f} | {ratio['client_pss']:.2f} | "
              f"{ratio['client_pss_total']:.2f} | {ratio['core_cpu']:.2f} | {ratio['client_cpu']:.2f} | "
              f"{(b['core_cpu'] + b['client_cpu']) / max(a['core_cpu'] + a['client_cpu'], 1e-9):.2f} | | |")
        loads.append(f"{n} VMs: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        sys.stdout.flush()
    print(f"\nLoad average (1, 5, 15 min) after each: {'; '.join(loads)} (the machine is shared).")


# --- isolation ----------------------------------------------------------------------------------------------------


async def frame_latency(port: int, rounds: int) -> list[float]:
    """Seconds from a full-frame request to the whole update, ``rounds`` times (ZRLE: encoded by a worker)."""
    viewer = await MiniViewer.connect(port, ZRLE)
    times = []
    try:
        for _ in range(rounds):
            start = time.monotonic()
            viewer.request(False)
            await asyncio.wait_for(viewer.read_update(), 30)
            times.append(time.monotonic() - start)
            await asyncio.sleep(0.05)
    finally:
        viewer.close()
    return times


def monitor_latency(path: str, rounds: int) -> list[float]:
    times = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        seen = b""
        while b"(qemu) " not in seen:
            seen += sock.recv(4096)
        for _ in range(rounds):
            start = time.monotonic()
            sock.sendall(b"info status\n")
            seen = b""
            while b"(qemu) " not in seen:
                seen += sock.recv(4096)
            times.append(time.monotonic() - start)
            time.sleep(0.05)
    return times


async def busy_viewers(port: int, stop: asyncio.Event) -> int:
    """One viewer pulling every frame it can, one that never reads (a tiny receive buffer); frames pulled."""
    fast = await MiniViewer.connect(port, ZRLE)
    slow = await MiniViewer.connect(port, ZRLE, rcvbuf=4096)
    slow.request(False)
    frames = 0
    try:
        fast.request(False)
        while not stop.is_set():
            await asyncio.wait_for(fast.read_update(), 30)
            frames += 1
            fast.request(True)
    finally:
        fast.close()
        slow.close()
    return frames


def spread(times: list[float]) -> str:
    ordered = sorted(times)
    return f"{statistics.median(ordered) * 1000:.1f} / {ordered[int(len(ordered) * 0.95)] * 1000:.1f}"


def isolation(rounds: int) -> None:
    with Fleet() as fleet:
        cores = start_cores(fleet, ["a", "b", "c"])
        base = free_port()
        client = fleet.add(FleetClientProcess(fleet.root, "--vnc-ports", f"{base}-{base + 3}", "--monitor",
                                              verbose=False))
        client.wait_serving(cores, within=60)
        busy, quiet = cores[0], cores[1]
        entry = fleet_client_of(quiet)
        assert entry is not None
        monitor = entry["endpoints"]["monitor"].removeprefix("unix:")
        wait_for(lambda: quiet.state().get("state") == "running", 30, "the guests")
        time.sleep(5)  # the guests boot

        def sample() -> tuple[list[float], list[float]]:
            frames = asyncio.run(frame_latency(vnc_port(quiet), rounds))
            return frames, monitor_latency(monitor, rounds)

        idle = sample()
        peer = RawQmpPeer(busy.qmp_socket).negotiate()
        peer.execute("send-key", arguments={"keys": [{"type": "qcode", "data": "f3"}]})
        time.sleep(2)

        async def loaded() -> tuple[list[float], list[float], int]:
            stop = asyncio.Event()
            pulling = asyncio.create_task(busy_viewers(vnc_port(busy), stop))
            await asyncio.sleep(2)
            frames = await frame_latency(vnc_port(quiet), rounds)
            commands = await asyncio.to_thread(monitor_latency, monitor, rounds)
            stop.set()
            return frames, commands, await pulling

        frames, commands, pulled = asyncio.run(loaded())
        peer.close()
    print()
    print(f"Isolation: VM B's latency (ms, median / p95, {rounds} rounds) with VM A idle, then with A in its "
          f"1920x1080 animation, one viewer pulling frames ({pulled} pulled) and one never reading.")
    print()
    print("| VM A | B: full frame (ZRLE) | B: monitor `info status` |")
    print("| --- | ---: | ---: |")
    print(f"| idle | {spread(idle[0])} | {spread(idle[1])} |")
    print(f"| busy | {spread(frames)} | {spread(commands)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--isolation", action="store_true", help="also measure one busy VM's effect on another")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    footprint(args.vms, args.seconds, args.settle)
    if args.isolation:
        isolation(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
