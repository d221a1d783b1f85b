"""The agent proxy vs a qemu-ga socket, side by side in one run: round trips, and reading large input.

A real core relays the host's qemu-ga (``-m unix-listen``) to a real client; a second qemu-ga listens on its own
socket. The same bytes go to the proxy and to that qemu-ga, in alternating rounds so machine noise hits both
alike:

- round trip: ``guest-ping`` one at a time, without a newline (the proxy goes client -> core -> qemu-ga and
  back; the direct one is qemu-ga alone): median and p99;
- reading: input both answer without running a command (a top-level value, "QMP input must be a JSON object"),
  so the time is the reader's: one 6 MB string, 200 000 small tokens, 64 KiB of 0xFF (one error line each);
- big transfers (``--big-rounds``): a 40 MiB guest-file-read (a 53 MiB reply line) and an 8 MiB
  guest-file-write (an 11 MiB request), on the same host files. While each read goes on, another process sends
  ``guest-sync`` (which the proxy answers itself) on a connection of its own every 5 ms: during the proxy's read
  its slowest answers show how long the client's event loop was held up by the 53 MiB passing through; during
  qemu-ga's own read (the client idle, the machine as busy) they are the baseline. The client's peak RSS too.

    .venv/bin/python benchmarks/agent_proxy.py [--rounds N] [--big-rounds N]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_agent_framing import proxy_and_reference

PING = b'{"execute":"guest-ping"}'
PING_REPLY = b'{"return": {}}\n'
NOT_AN_OBJECT = b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\n'
READER_INPUTS = {
    "6 MB string": (b'"' + b"QUFB" * 1_500_000 + b'" ', NOT_AN_OBJECT),
    "200k tokens": (b"[" + b"1," * 100_000 + b"1] ", NOT_AN_OBJECT),
    "64 KiB of 0xFF": (b"\xff" * 65536 + b"\n", b"stray '\\uFFFD'\"}}\n"),
}


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(120)
    sock.connect(str(path))
    return sock


def send_and_wait(sock: socket.socket, data: bytes, reply_end: bytes, count: int = 1) -> float:
    """Seconds from sending ``data`` until ``count`` replies ending in ``reply_end`` arrived."""
    start = time.perf_counter()
    sock.sendall(data)
    seen, tail = 0, b""
    while seen < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"closed after {tail!r}")
        window = tail + chunk  # (a reply end may straddle two reads)
        seen += window.count(reply_end)
        tail = window[-(len(reply_end) - 1):]
    return time.perf_counter() - start


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=50, help="pings per round and side")
    parser.add_argument("--big-rounds", type=int, default=3)
    args = parser.parse_args()
    with proxy_and_reference("agb") as pair:
        run(pair.proxy, pair.reference, args.rounds, args.batch)
        if args.big_rounds:
            run_big(pair.proxy, pair.reference, pair.client_pid, args.big_rounds)


def call(sock: socket.socket, request: dict[str, object]) -> bytes:
    """One request, its reply line (read in linear time: replies here are up to 53 MB)."""
    sock.sendall(json.dumps(request).encode() + b"\n")
    buf = bytearray()
    while True:
        start = len(buf)
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError("closed")
        buf += chunk
        if buf.find(b"\n", start) >= 0:
            return bytes(buf)


def kib_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_big(proxy_path: Path, direct_path: Path, client_pid: int, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="vmf-bench-"))
    try:
        data = os.urandom(40 << 20)
        (work / "data.bin").write_bytes(data)
        write_arguments = {"buf-b64": base64.b64encode(data[:8 << 20]).decode()}
        sides = {"proxy": connect(proxy_path), "qemu-ga": connect(direct_path)}
        times: dict[tuple[str, str], list[float]] = {}
        stalls: dict[str, list[float]] = {}
        rss_before = kib_status(client_pid, "VmRSS")
        for _ in range(rounds):
            for name, sock in sides.items():
                handle = json.loads(call(sock, {"execute": "guest-file-open", "arguments": {
                    "path": str(work / "data.bin"), "mode": "r"}}))["return"]
                probe = Probe(proxy_path)  # (during qemu-ga's own read the client is idle: a baseline)
                start = time.perf_counter()
                reply = call(sock, {"execute": "guest-file-read", "arguments": {"handle": handle, "count": 40 << 20}})
                times.setdefault(("read", name), []).append(time.perf_counter() - start)
                stalls.setdefault(name, []).extend(probe.stop())
                assert len(reply) > 53_000_000, reply[:200]
                call(sock, {"execute": "guest-file-close", "arguments": {"handle": handle}})
                handle = json.loads(call(sock, {"execute": "guest-file-open", "arguments": {
                    "path": str(work / f"w-{name}.bin"), "mode": "w"}}))["return"]
                start = time.perf_counter()
                call(sock, {"execute": "guest-file-write", "arguments": {"handle": handle, **write_arguments}})
                times.setdefault(("write", name), []).append(time.perf_counter() - start)
                call(sock, {"execute": "guest-file-close", "arguments": {"handle": handle}})
        for sock in sides.values():
            sock.close()
        for what, size in (("40 MiB guest-file-read", 40 << 20), ("8 MiB guest-file-write", 8 << 20)):
            key = what.split()[-1].removeprefix("guest-file-")
            p, d = statistics.median(times[(key, "proxy")]), statistics.median(times[(key, "qemu-ga")])
            print(f"{what}: proxy {p:.2f} s ({size / p / 1e6:.0f} MB/s) | qemu-ga {d:.2f} s "
                  f"({size / d / 1e6:.0f} MB/s) | ratio {p / d:.1f}x")
        busy, idle = stalls["proxy"], stalls["qemu-ga"]
        print(f"guest-sync answered by the proxy while its 40 MiB reads pass ({len(busy)}): median "
              f"{statistics.median(busy) * 1e3:.1f} ms, p99 {summary(busy)[1] * 1e3:.1f} ms, slowest "
              f"{max(busy) * 1e3:.1f} ms | while qemu-ga's own go on, the client idle ({len(idle)}): median "
              f"{statistics.median(idle) * 1e3:.1f} ms, p99 {summary(idle)[1] * 1e3:.1f} ms, slowest "
              f"{max(idle) * 1e3:.1f} ms")
        print(f"client RSS: {rss_before // 1024} MiB before, peak {kib_status(client_pid, 'VmHWM') // 1024} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


_PROBE_LOOP = """
import select, socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
samples = []
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.005)[0]:
    start = time.perf_counter()
    sock.sendall(b'{"execute": "guest-sync", "arguments": {"id": 1}}')
    reply = b""
    while not reply.endswith(b"\\n"):
        reply += sock.recv(4096)
    samples.append(time.perf_counter() - start)
print("\\n".join(map(str, samples)))
"""


class Probe:
    """guest-sync on its own proxy connection every 5 ms, from a process of its own (a thread here would wait for
    this process's GIL, held while it takes in the big reply); stop() returns the round trips."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE_LOOP, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> list[float]:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        return [float(line) for line in out.split()]


def run(proxy_path: Path, direct_path: Path, rounds: int, batch: int) -> None:
    sides = {"proxy": connect(proxy_path), "qemu-ga": connect(direct_path)}
    send_and_wait(sides["proxy"], PING, PING_REPLY)  # the client synchronises with its agent once
    pings: dict[str, list[float]] = {name: [] for name in sides}
    reads: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, sock in sides.items():
            pings[name] += [send_and_wait(sock, PING, PING_REPLY) for _ in range(batch)]
        for what, (data, reply_end) in READER_INPUTS.items():
            count = data.count(b"\xff") or 1
            for name, sock in sides.items():
                reads.setdefault((what, name), []).append(send_and_wait(sock, data, reply_end, count))
    for sock in sides.values():
        sock.close()
    proxy, direct = summary(pings["proxy"]), summary(pings["qemu-ga"])
    print(f"guest-ping round trip ({rounds * batch} each): proxy median {proxy[0] * 1e3:.2f} ms p99 "
          f"{proxy[1] * 1e3:.2f} ms | qemu-ga median {direct[0] * 1e3:.2f} ms p99 {direct[1] * 1e3:.2f} ms | "
          f"ratio {proxy[0] / direct[0]:.1f}x")
    for what, (data, _) in READER_INPUTS.items():
        p, d = statistics.median(reads[(what, "proxy")]), statistics.median(reads[(what, "qemu-ga")])
        print(f"reading {what} ({len(data) / 1e6:.2f} MB): proxy {p * 1e3:.1f} ms ({len(data) / p / 1e6:.1f} MB/s)"
              f" | qemu-ga {d * 1e3:.1f} ms ({len(data) / d / 1e6:.1f} MB/s) | ratio {p / d:.1f}x")


if __name__ == "__main__":
    main()
