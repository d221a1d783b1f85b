"""How long a connected VNC viewer waits for the picture after a live migration switches the guest over.

    .venv/bin/python benchmarks/migration.py [--runs 5] [--path both|vmfront|qmp]

Each run: a source core running the demo guest, a destination core waiting with ``--incoming auto`` (same QEMU
arguments), one ``vmfront client --vnc`` attached to the source, a minimal viewer (tests/vnclib.MiniViewer,
Raw, always one incremental request outstanding) connected to it, and a raw QMP peer on the source's management
socket. The guest is moved either by ``vmfront migrate src --to dst`` or, as a management tool would, with plain
QMP (``migrate`` to the destination's URI on the source's socket, then ``query-migrate`` until ``completed``: the
source core finds the destination core from the URI); both are measured by default. The time measured is from
the moment the QMP peer
receives QEMU's ``MIGRATION`` event with status ``completed`` to the moment the viewer has received the first
FramebufferUpdate after it that is a full frame (one rectangle covering the guest's whole screen, at the size it
had before the switch): the client re-maps the destination's display and repaints every viewer. Median over the
runs; the goal is under 1 s. A viewer resized during the switch (it should not be: the guest's mode did not
change) is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corelib import kill_pid, short_tmpdir, spawn_core  # noqa: E402
from qemu.qmp import QMPClient  # noqa: E402
from vnclib import RAW, MiniViewer, VncClientProcess, free_port  # noqa: E402

GOAL_S = 1.0
TEXT_MODE = (720, 400)


class QmpWatcher:
    """A QMP peer on the source that notes when it receives MIGRATION/completed."""

    def __init__(self) -> None:
        self.completed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    async def start(self, path: Path) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 10)
        await asyncio.wait_for(reader.readline(), 10)  # greeting
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        assert json.loads(await asyncio.wait_for(reader.readline(), 10)) == {"return": {}}
        self.task = asyncio.create_task(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                now = time.monotonic()
                message = json.loads(line)
                if (message.get("event") == "MIGRATION" and message["data"].get("status") == "completed"
                        and not self.completed.done()):
                    self.completed.set_result(now)
        finally:
            writer.close()


Trace = list[tuple[float, float, tuple[int, int], object]]
"""Per update: monotonic and wall-clock arrival, the viewer's size after it, its rectangles."""


async def follow(viewer: MiniViewer, trace: Trace) -> None:
    """Keep an incremental request outstanding; note every update."""
    while True:
        viewer.request(incremental=True)
        rects = await viewer.read_update()
        trace.append((viewer.updates[-1], time.time(), (viewer.width, viewer.height), rects))


def mapped_at(log: str, shm_prefix: str) -> float | None:
    """Wall-clock time (ms precision, rounded up) of the client's 'display: mapped SHM' log line."""
    for line in log.splitlines():
        if f"display: mapped /{shm_prefix}" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp() + 0.001
    return None


async def migrate_with_vmfront(src: Path, dst: Path) -> None:
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmfront", "migrate", "src", "--run-dir", str(src), "--to", "dst",
        "--dest-run-dir", str(dst), "-q", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT)
    try:
        _, err = await asyncio.wait_for(migrate.communicate(), 60)
    except TimeoutError:
        migrate.kill()
        await migrate.wait()
        raise
    if migrate.returncode != 0:
        raise RuntimeError(f"vmfront migrate failed: {err.decode(errors='replace')}")


async def migrate_with_plain_qmp(src_qmp: Path, uri: str) -> None:
    """What a libvirt-style tool does: migrate, poll query-migrate until completed (no EOF), then quit the source."""
    client = QMPClient("benchmark")
    await asyncio.wait_for(client.connect(str(src_qmp)), 10)
    try:
        await client.execute("migrate", {"uri": uri})
        for _ in range(1200):
            info = await client.execute("query-migrate")
            if info.get("status") == "completed":
                await client.execute("quit")
                return
            if info.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"migration {info.get('status')}: {info.get('error-desc')}")
            await asyncio.sleep(0.05)
        raise RuntimeError("migration did not complete within 60 s")
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def one_run(index: int, path: str, show_trace: bool = False) -> float:
    root = short_tmpdir()
    src = spawn_core("src", root / "src", verbose=False)
    dst = spawn_core("dst", root / "dst", "--incoming", "auto", verbose=False)
    qemu_pids = [src.qemu_pid, dst.qemu_pid]
    client = VncClientProcess(src.run_dir, "src", free_port(), verbose=show_trace)
    viewer: MiniViewer | None = None
    follower: asyncio.Task[None] | None = None
    watcher = QmpWatcher()
    try:
        viewer = await MiniViewer.connect(client.port, RAW)
        viewer.request(incremental=False)
        await asyncio.wait_for(viewer.read_update(), 10)

        async def booted() -> None:  # the demo guest in text mode (before that: QEMU's placeholder surface)
            assert viewer is not None
            while (viewer.width, viewer.height) != TEXT_MODE:
                viewer.request(incremental=True)
                await viewer.read_update()

        await asyncio.wait_for(booted(), 30)
        size_before = (viewer.width, viewer.height)
        trace: Trace = []
        follower = asyncio.create_task(follow(viewer, trace))
        await watcher.start(src.qmp_socket)
        if path == "vmfront":
            await migrate_with_vmfront(src.run_dir, dst.run_dir)
        else:
            await migrate_with_plain_qmp(src.qmp_socket, dst.state()["incoming"])
        completed = await asyncio.wait_for(watcher.completed, 10)

        def first_full_frame() -> float | None:
            """The first update from the destination (after the client mapped its display: the demo guest's
            running counter makes the source's updates full frames too) that covers the guest's whole screen."""
            since = mapped_at(client.text(), "vmfront.dst.")
            if since is None:
                return None
            for mono, wall, _, rects in list(trace):
                if mono > completed and wall >= since and (0, 0, *size_before) in rects:
                    return mono
            return None

        deadline = time.monotonic() + 10
        while (frame := first_full_frame()) is None:
            if follower.done():
                follower.result()  # raises what ended it
            if time.monotonic() > deadline:
                raise RuntimeError("no full frame from the destination within 10 s of the switch")
            await asyncio.sleep(0.005)
        latency = frame - completed
        sizes = sorted({size for mono, _, size, _ in trace if mono > completed})
        if sizes != [size_before]:
            print(f"  the viewer was resized after the switch: sizes {sizes}, before {size_before}")
        if show_trace:
            wall = time.time() - (time.monotonic() - completed)
            print(f"  completed seen at {time.strftime('%H:%M:%S', time.localtime(wall))}{wall % 1:.3f}")
            for mono, _, _, rects in trace:
                if -0.2 < mono - completed < latency + 0.2:
                    print(f"  update {(mono - completed) * 1000:+.0f} ms: {rects}")
            for line in client.text().splitlines():
                if any(w in line for w in ("migrat", "attached", "mapped", "core gone", "display mode", "repainting",
                                          "keep their picture")):
                    print("  client:", line)
        print(f"{path} run {index + 1}: completed -> first full frame {latency * 1000:.0f} ms", flush=True)
        return latency
    finally:
        if follower is not None:
            follower.cancel()
        if watcher.task is not None:
            watcher.task.cancel()
        if viewer is not None:
            viewer.close()
        client.stop()
        src.stop()
        dst.stop()
        for pid in qemu_pids:
            kill_pid(pid)
        shutil.rmtree(root, ignore_errors=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--path", choices=("both", "vmfront", "qmp"), default="both",
                        help="how the guest is moved: `vmfront migrate`, plain QMP from a management peer, or both")
    parser.add_argument("--trace", action="store_true",
                        help="show the viewer's updates around the switch and the client's log about it")
    args = parser.parse_args()
    met = True
    for path in (("vmfront", "qmp") if args.path == "both" else (args.path,)):
        latencies = [await one_run(i, path, args.trace) for i in range(args.runs)]
        median = statistics.median(latencies)
        met = met and median < GOAL_S
        print(f"{path}: MIGRATION completed -> first full frame to a connected viewer: median "
              f"{median * 1000:.0f} ms over {len(latencies)} runs (min {min(latencies) * 1000:.0f}, max "
              f"{max(latencies) * 1000:.0f}); goal < {GOAL_S * 1000:.0f} ms: {'met' if median < GOAL_S else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
