"""The agent proxy vs a qemu-ga socket, side by side in one run: round trips, and reading large input.

A real core relays the host's qemu-ga (``-m unix-listen``) to a real client; a second qemu-ga listens on its own
socket. The same bytes go to the proxy and to that qemu-ga, in alternating rounds so machine noise hits both
alike:

- round trip: ``guest-ping`` one at a time, without a newline (the proxy goes client -> core -> qemu-ga and
  back; the direct one is qemu-ga alone): median and p99;
- reading: input both answer without running a command (a top-level value, "QMP input must be a JSON object"),
  so the time is the reader's: one 6 MB string, 200 000 small tokens, 64 KiB of 0xFF (one error line each).

    .venv/bin/python benchmarks/agent_proxy.py [--rounds N]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
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
    args = parser.parse_args()
    with proxy_and_reference("agb") as pair:
        run(pair.proxy, pair.reference, args.rounds, args.batch)


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
