"""Where VNC encoding should run: on the event loop, in a thread, or in a worker process (what the client does).

    .venv/bin/python benchmarks/vnc_offload.py [--updates 10]

One 1920x1080 high-colour frame (the demo guest's animation, computed here) is encoded as full ZRLE and Hextile
updates, back to back, in each of three ways while a ticker task on the same asyncio loop measures how late it
wakes up (every 1 ms): the loop's worst stall is what every other viewer, the monitor and the agent would wait.
Reported per way: CPU seconds per update (this process, its threads and children) and the ticker's worst and
99th-percentile lateness. The process way is clients/vnc/encoder_pool.py with the frame in its frame copy.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients.vnc.encoder_pool import EncodeRequest, EncoderPool
from clients.vnc.framecopy import FrameCopy
from rfb.encodings import EncoderSettings, encode_frame_rects
from rfb.wire import BGRX8888, ENCODING_HEXTILE, ENCODING_ZRLE
from shm import Mode

WIDTH, HEIGHT = 1920, 1080
MODE = Mode(1, WIDTH, HEIGHT, WIDTH * 4, 1)


def animation_frame(t: int = 37) -> np.ndarray:
    """The demo guest's F3 picture: blue = x + t, green = y + 2t, red = ((x ^ y) >> 2) + t."""
    x = np.arange(WIDTH, dtype=np.uint32)[None, :]
    y = np.arange(HEIGHT, dtype=np.uint32)[:, None]
    return (((x + t) & 0xFF) | (((y + 2 * t) & 0xFF) << 8) | (((((x ^ y) >> 2) + t) & 0xFF) << 16)).astype(np.uint32)


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def live_children_cpu() -> float:
    """CPU of live child processes (RUSAGE_CHILDREN counts only reaped ones)."""
    total = 0.0
    tck = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
    return total


async def measure(encode: Callable[[], Awaitable[None]], updates: int) -> tuple[float, float, float]:
    """(CPU s per update, worst ticker lateness s, p99 lateness s)."""
    late: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append(time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    c0 = cpu_seconds() + live_children_cpu()
    for _ in range(updates):
        await encode()
    cpu = cpu_seconds() + live_children_cpu() - c0
    stop.set()
    await task
    ordered = sorted(late)
    return cpu / updates, ordered[-1], ordered[int(len(ordered) * 0.99)]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    copy = FrameCopy()
    frame = copy.array(MODE)
    frame[...] = animation_frame()
    copy.mode = MODE
    pool = EncoderPool(1)
    pool.add_copy(copy.key, copy.fd)
    pool.start()
    await pool.wait_ready(30)  # the worker imports numpy etc.
    threads = concurrent.futures.ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()
    rects = ((0, 0, WIDTH, HEIGHT),)
    print("| encoding | where | CPU ms / update | loop stall worst ms | loop stall p99 ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    try:
        for name, encoding in (("ZRLE", ENCODING_ZRLE), ("Hextile", ENCODING_HEXTILE)):
            settings = EncoderSettings(encoding)

            async def in_loop(settings: EncoderSettings = settings) -> None:
                encode_frame_rects(settings, BGRX8888, frame, rects)

            async def in_thread(settings: EncoderSettings = settings) -> None:
                await loop.run_in_executor(threads, encode_frame_rects, settings, BGRX8888, frame, rects)

            async def in_process(settings: EncoderSettings = settings) -> None:
                await pool.encode(EncodeRequest("copy", str(copy.key), WIDTH, HEIGHT, WIDTH * 4, BGRX8888, settings,
                                                rects))

            await in_process()  # the worker is up and warm
            for where, encode in (("loop", in_loop), ("thread", in_thread), ("process", in_process)):
                cpu, worst, p99 = await measure(encode, args.updates)
                print(f"| {name} | {where} | {cpu * 1000:.1f} | {worst * 1000:.1f} | {p99 * 1000:.1f} |")
    finally:
        threads.shutdown()
        await pool.close()
        copy.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
