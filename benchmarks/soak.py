"""Soak: a running guest under churn for a bounded time, then a report. Minutes, not hours.

    python benchmarks/soak.py [--minutes 5] [--client-kills 100] [--core-restarts 5] [--viewers 5]

One real core (demo guest) with a host qemu-ga relayed through ``--agent-socket``, and one client with VNC and
the monitor. While it runs:

* ``--viewers`` VNC viewers (raw sockets) connect, handshake, ask for a full frame, read it and leave, in a loop;
* a monitor connection issues ``info status`` and checks the guest says ``running``, in a loop;
* ``vmfront agent NAME ping`` runs about once a second;
* a QMP peer on the core's management socket sends ``query-status`` every 0.2 s and counts the events it sees;
* the client is killed (SIGKILL) and restarted ``--client-kills`` times, and the core is killed (SIGKILL) and
  restarted ``--core-restarts`` times (the new core adopts the running QEMU: docs/operator.md, "reclaim and
  adopt"), spread over the run.

Reported: guest continuity (STOP events seen, any non-running status, same QEMU pid throughout, the screen still
changing at the end), errors seen by the QMP peer (outside the moments a core restart necessarily drops it), viewer,
monitor and agent success counts (failures while the client is being restarted are expected and counted apart),
and fd count, /dev/shm segments and RSS of core and client at the start and at the end. Exit status 1 if the
guest paused, QEMU changed, the QMP peer saw an error reply, or a resource grew past the allowance: in particular
the core's or the client's RSS growing by more than 2 MiB over the steady phase (after a warm-up).

Every process started here is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from corelib import CoreProcess, RawQmpPeer, kill_pid, pid_alive, short_tmpdir, spawn_core  # noqa: E402
from test_client import ClientProcess, client_pids  # noqa: E402
from vnclib import free_port  # noqa: E402

NAME = "soak"
#: After a (re)attach, failures of viewers, monitors and agent calls still count as "during restarts" this long.
GRACE = 1.0
#: Disruptions happen in this first part of the run; the rest is steady load, over which RSS must stay flat.
DISRUPTED_SHARE = 0.7
#: Over the steady phase (after a warm-up), the core's and the client's RSS may grow by at most this much.
RSS_GROWTH_KIB = 2048


# --- measurements ---------------------------------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def shm_entries() -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"vmfront.{NAME}."))


@dataclass
class Sample:
    core_pid: int
    client_pid: int
    core_fds: int
    client_fds: int
    core_rss: int
    client_rss: int
    shm: list[str]
    qemu_rss: int

    @classmethod
    def take(cls, core: CoreProcess, client: ClientProcess, qemu_pid: int) -> Sample:
        return cls(core.pid, client.pid, fd_count(core.pid), fd_count(client.pid), rss_kib(core.pid),
                   rss_kib(client.pid), shm_entries(), rss_kib(qemu_pid))


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    qmp_events: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    longest_qmp_gap: float = 0.0

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)
            self.counts["errors"] += 1


# --- the soak harness -----------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = short_tmpdir()
        self.run_dir = self.root / "run"
        self.agent_sock = self.root / "qga.sock"
        self.port = free_port()
        self.stats = Stats()
        self.stop = threading.Event()
        self.client_ok = threading.Event()  # cleared while the client is being replaced
        self.core_ok = threading.Event()  # cleared while the core is being replaced
        self.qga: subprocess.Popen[bytes] | None = None
        self.core: CoreProcess | None = None
        self.client: ClientProcess | None = None
        self.qemu_pid = 0
        self.qemu_pids: set[int] = set()
        self.threads: list[threading.Thread] = []
        self.core_baseline: Sample | None = None

    # -- processes

    def start_qga(self) -> None:
        qga = shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
        if not Path(qga).exists():
            print("qemu-ga not found: agent calls are skipped")
            return
        state = self.root / "qga-state"
        state.mkdir()
        self.qga = subprocess.Popen([qga, "-m", "unix-listen", "-p", str(self.agent_sock), "-t", str(state),
                                     "-f", str(self.root / "qga.pid")],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=(self.root / "qga.log").open("wb"))
        deadline = time.monotonic() + 10
        while not self.agent_sock.exists():
            if time.monotonic() > deadline or self.qga.poll() is not None:
                raise RuntimeError(f"qemu-ga did not start: {(self.root / 'qga.log').read_text()}")
            time.sleep(0.05)

    def core_args(self) -> list[str]:
        return ["--agent-socket", str(self.agent_sock)] if self.qga else []

    def start_core(self) -> None:
        self.core = spawn_core(NAME, self.run_dir, *self.core_args(), verbose=False)
        self.qemu_pid = self.core.qemu_pid
        self.qemu_pids.add(self.qemu_pid)

    def start_client(self) -> None:
        self.client = ClientProcess(self.run_dir, NAME, "--vnc", f"127.0.0.1:{self.port}", "--monitor",
                                    log=self.root / f"client-{time.monotonic_ns()}.log")
        self.wait_client_attached(self.client)
        time.sleep(GRACE)  # the core lists the client a moment before the client has taken its welcome
        self.client_ok.set()

    def wait_client_attached(self, client: ClientProcess, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.core is not None
            with contextlib.suppress(OSError, ValueError, KeyError):
                if client.pid in client_pids(self.core) and _port_open(self.port):
                    return
            if client.proc.poll() is not None:
                raise RuntimeError(f"client exited ({client.proc.returncode}):\n{client.text()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"client did not attach within {within} s")

    def kill_client(self) -> None:
        assert self.client is not None
        self.client_ok.clear()
        self.client.proc.send_signal(signal.SIGKILL)
        self.client.proc.wait(timeout=10)
        self.start_client()

    def restart_core(self) -> None:
        assert self.core is not None
        self.core_ok.clear()
        old_qemu = self.qemu_pid
        self.core.proc.send_signal(signal.SIGKILL)
        self.core.proc.wait(timeout=10)
        if not pid_alive(old_qemu):
            self.stats.error("QEMU died with its core")
        self.start_core()
        if self.qemu_pid != old_qemu:
            self.stats.error(f"new core runs QEMU pid {self.qemu_pid}, not the adopted {old_qemu}")
        assert self.client is not None
        self.wait_client_attached(self.client, within=30)  # the client follows the new core
        time.sleep(GRACE)
        self.core_ok.set()
        self.core_baseline = Sample.take(self.core, self.client, self.qemu_pid)

    # -- load

    def qmp_watch(self) -> None:
        """A management QMP peer: query-status every 0.2 s, counting events and error replies."""
        last_ok = time.monotonic()
        while not self.stop.is_set():
            self.core_ok.wait(timeout=30)
            assert self.core is not None
            try:
                peer = RawQmpPeer(self.core.qmp_socket, timeout=5).negotiate()
            except (OSError, EOFError, AssertionError) as exc:
                if self.core_ok.is_set():
                    self.stats.error(f"qmp: connect failed: {exc!r}")
                time.sleep(0.2)
                continue
            self.stats.add("qmp connects")
            try:
                while not self.stop.is_set():
                    peer.send({"execute": "query-status", "id": "soak"})
                    while True:
                        message = peer.recv()
                        if "event" in message:
                            with self.stats.lock:
                                self.stats.qmp_events[message["event"]] += 1
                            continue
                        break
                    if "error" in message:
                        self.stats.error(f"qmp: error reply {message}")
                    else:
                        status = message["return"]["status"]
                        with self.stats.lock:
                            self.stats.statuses[status] += 1
                        now = time.monotonic()
                        self.stats.longest_qmp_gap = max(self.stats.longest_qmp_gap, now - last_ok)
                        last_ok = now
                    self.stop.wait(0.2)
            except (OSError, EOFError, ValueError) as exc:
                if self.core_ok.is_set() and not self.stop.is_set():
                    self.stats.error(f"qmp: connection lost outside a core restart: {exc!r}")
                else:
                    self.stats.add("qmp drops at core restart")
            finally:
                peer.close()

    def failed(self, kind: str, detail: str, expected: bool) -> None:
        """Count a failure; it is an error only if no restart was under way when it started or when it ended."""
        if expected or not self.client_ok.is_set() or not self.core_ok.is_set():
            self.stats.add(f"{kind} failures during restarts")
        else:
            self.stats.add(f"{kind} failures")
            self.stats.error(detail)

    def viewer(self, index: int) -> None:
        while not self.stop.is_set():
            expected = not self.client_ok.is_set() or not self.core_ok.is_set()
            try:
                got = _view_once(self.port)
                self.stats.add("viewer sessions ok")
                self.stats.add("viewer bytes", got)
            except (OSError, ValueError) as exc:
                self.failed("viewer", f"viewer {index}: {exc!r}", expected)
            self.stop.wait(0.3 + 0.1 * index)

    def monitor(self) -> None:
        path = self.run_dir / "monitor.sock"
        while not self.stop.is_set():
            expected = not self.client_ok.is_set() or not self.core_ok.is_set()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(str(path))
                    _read_until(sock, b"(qemu) ")
                    for _ in range(5):
                        sock.sendall(b"info status\r\n")
                        text = _read_until(sock, b"(qemu) ").decode(errors="replace")
                        if "VM status: running" not in text:
                            raise ValueError(f"monitor said {text!r}")
                        self.stats.add("monitor commands ok")
                        if self.stop.wait(0.2):
                            break
            except (OSError, ValueError) as exc:
                self.failed("monitor", f"monitor: {exc!r}", expected)
            self.stop.wait(0.2)

    def agent(self) -> None:
        while not self.stop.is_set():
            expected = not self.client_ok.is_set() or not self.core_ok.is_set()
            try:
                out = subprocess.run([sys.executable, "-m", "vmfront", "agent", "--run-dir", str(self.run_dir),
                                      "--timeout", "5", NAME, "ping"], capture_output=True, timeout=20, check=False)
                ok = out.returncode == 0
                detail = (out.stdout + out.stderr).decode(errors="replace").strip()[-300:]
            except subprocess.TimeoutExpired:
                ok, detail = False, "timed out"
            if ok:
                self.stats.add("agent calls ok")
            else:
                self.failed("agent", f"agent: {detail}", expected)
            self.stop.wait(1.0)

    # -- the run

    def screendump(self, name: str) -> bytes:
        assert self.core is not None
        path = self.root / name
        peer = RawQmpPeer(self.core.qmp_socket, timeout=10).negotiate()
        try:
            reply = peer.execute("screendump", arguments={"filename": str(path)})
        finally:
            peer.close()
        if "error" in reply:
            raise RuntimeError(f"screendump failed: {reply}")
        return path.read_bytes()

    def run(self) -> int:
        args = self.args
        self.start_qga()
        self.start_core()
        self.start_client()
        self.core_ok.set()
        time.sleep(2)  # let the first viewer-independent state settle (capture, shm)
        assert self.core is not None and self.client is not None
        start = Sample.take(self.core, self.client, self.qemu_pid)
        self.core_baseline = start
        screen_start = self.screendump("start.ppm")
        workers = [self.qmp_watch, self.monitor, self.agent] + [
            (lambda i=i: self.viewer(i)) for i in range(args.viewers)]
        for work in workers:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            self.threads.append(thread)

        duration = args.minutes * 60
        t0 = time.monotonic()
        # Spread the disruptions evenly over the disrupted share: core restarts at fixed fractions, client kills
        # in between; the rest of the run is steady load with the last client and core.
        span = duration * DISRUPTED_SHARE if args.core_restarts or args.client_kills else 0.0
        events = [(span * (i + 1) / (args.core_restarts + 1), "core") for i in range(args.core_restarts)]
        events += [(span * (i + 0.5) / max(args.client_kills, 1), "client") for i in range(args.client_kills)]
        events.sort()
        done = Counter[str]()
        kill_times: list[float] = []
        for at, kind in events:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            began = time.monotonic()
            try:
                if kind == "core":
                    self.restart_core()
                else:
                    self.kill_client()
                    kill_times.append(time.monotonic() - began - GRACE)
                done[kind] += 1
            except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as exc:
                self.stats.error(f"{kind} restart failed: {exc}")
                break
        time.sleep(max(0.0, min(5.0, t0 + duration - time.monotonic())))  # warm-up of the steady phase
        assert self.core is not None and self.client is not None
        steady = Sample.take(self.core, self.client, self.qemu_pid)
        series: list[tuple[float, int, int]] = []  # (seconds into the run, core RSS, client RSS) in the steady phase
        while time.monotonic() < t0 + duration:
            series.append((time.monotonic() - t0, rss_kib(self.core.pid), rss_kib(self.client.pid)))
            time.sleep(max(0.0, min(5.0, t0 + duration - time.monotonic())))
        series.append((time.monotonic() - t0, rss_kib(self.core.pid), rss_kib(self.client.pid)))
        elapsed = time.monotonic() - t0
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        time.sleep(3)  # let the core notice the last viewer/monitor sessions ending
        assert self.core is not None and self.client is not None
        end = Sample.take(self.core, self.client, self.qemu_pid)
        screen_end = self.screendump("end.ppm")
        end_status = self.final_status()

        assert self.core_baseline is not None
        return self.report(start, self.core_baseline, steady, end, screen_start != screen_end, end_status, done,
                           kill_times, elapsed, series)

    def final_status(self) -> str:
        assert self.core is not None
        peer = RawQmpPeer(self.core.qmp_socket, timeout=10).negotiate()
        try:
            return str(peer.execute("query-status")["return"]["status"])
        finally:
            peer.close()

    def report(self, start: Sample, baseline: Sample, steady: Sample, end: Sample, screen_changed: bool,
               end_status: str, done: Counter[str], kill_times: list[float], elapsed: float,
               series: list[tuple[float, int, int]]) -> int:
        s = self.stats
        print(f"\nsoak: {elapsed:.0f} s, {done['client']} client kill -9/restart cycles "
              f"(mean {_mean(kill_times):.2f} s to reattach), {done['core']} core kill -9/adopt restarts, "
              f"{self.args.viewers} viewers\n")
        print("columns: start = first core and client; core since = the last core, just after it started (and")
        print("         its client reattached); steady = after the disruptions, with the last client; end = end of run")
        columns = (start, baseline, steady, end)
        print(f"{'':20}" + "".join(f"{h:>14}" for h in ("start", "core since", "steady", "end")))
        rows: list[tuple[str, str]] = [
            ("core pid", "core_pid"), ("core fds", "core_fds"), ("core RSS KiB", "core_rss"),
            ("client pid", "client_pid"), ("client fds", "client_fds"), ("client RSS KiB", "client_rss"),
            ("QEMU RSS KiB", "qemu_rss")]
        for label, attr in rows:
            print(f"{label:20}" + "".join(f"{getattr(c, attr):>14}" for c in columns))
        print(f"{'/dev/shm segments':20}" + "".join(f"{len(c.shm):>14}" for c in columns))
        print(f"{'shm names':20}{', '.join(start.shm)} -> {', '.join(end.shm)}")
        print("steady-phase RSS KiB (s: core/client): "
              + "  ".join(f"{t:.0f}: {core}/{client}" for t, core, client in series))
        print()
        print(f"guest: QEMU pids seen {sorted(self.qemu_pids)}, statuses {dict(s.statuses)}, final {end_status!r}, "
              f"screen changed start->end: {screen_changed}")
        print(f"QMP peer: events {dict(s.qmp_events) or '{}'}, longest gap between answers {s.longest_qmp_gap:.2f} s")
        for key in sorted(s.counts):
            print(f"  {key}: {s.counts[key]}")
        for text in s.errors[:20]:
            print(f"  ERROR {text}")
        if len(s.errors) > 20:
            print(f"  ... {len(s.errors) - 20} more errors")

        problems = []
        if s.qmp_events["STOP"]:
            problems.append(f"{s.qmp_events['STOP']} STOP events")
        if set(s.statuses) - {"running"} or end_status != "running":
            problems.append(f"guest not always running: {dict(s.statuses)}, final {end_status}")
        if len(self.qemu_pids) != 1:
            problems.append(f"QEMU changed: {sorted(self.qemu_pids)}")
        if not screen_changed:
            problems.append("the screen did not change between start and end (guest stuck?)")
        if any(e.startswith("qmp:") for e in s.errors):
            problems.append("the QMP peer saw errors")
        if len(end.shm) > len(start.shm):  # a restarted core's segments have new names: compare the counts
            problems.append(f"shm segments grew: {start.shm} -> {end.shm}")
        # Leaks: the same process compared with itself (the last core since it started, the last client over the
        # steady phase); small allowances for allocator noise.
        if end.core_pid == baseline.core_pid and end.core_fds > baseline.core_fds + 2:
            problems.append(f"core fds grew {baseline.core_fds} -> {end.core_fds}")
        if end.core_pid == baseline.core_pid and end.core_rss > baseline.core_rss * 1.25 + 4096:
            problems.append(f"core RSS grew {baseline.core_rss} -> {end.core_rss} KiB")
        if end.client_pid == steady.client_pid and end.client_fds > steady.client_fds + 4:
            problems.append(f"client fds grew {steady.client_fds} -> {end.client_fds}")
        # RSS flat: at most RSS_GROWTH_KIB over the steady phase, for the core and the client alike. Their RSS swings
        # by megabytes as viewers' full frames come and go, so compare the troughs (what stays allocated): the lowest
        # sample of the second half of the steady phase against the lowest of the first half.
        if len(series) >= 4 and end.client_pid == steady.client_pid and end.core_pid == steady.core_pid:
            half = len(series) // 2
            for index, who in ((1, "core"), (2, "client")):
                first, second = min(x[index] for x in series[:half]), min(x[index] for x in series[half:])
                if second - first > RSS_GROWTH_KIB:
                    problems.append(f"{who} RSS grew in the steady phase: lowest {first} KiB in the first half, "
                                    f"{second} KiB in the second (more than {RSS_GROWTH_KIB} KiB)")
        else:
            for who, before, after in (("core", steady.core_rss, end.core_rss),
                                       ("client", steady.client_rss, end.client_rss)):
                if after - before > RSS_GROWTH_KIB:
                    problems.append(f"{who} RSS grew {before} -> {after} KiB over the steady phase")
        print("\nverdict:", "OK" if not problems else "PROBLEMS: " + "; ".join(problems))
        return 1 if problems else 0

    def close(self) -> None:
        self.stop.set()
        if self.client is not None:
            self.client.stop()
        qemu_pids = set(self.qemu_pids)
        if self.core is not None:
            with contextlib.suppress(Exception):
                self.core.stop()
        for pid in qemu_pids:
            kill_pid(pid)
        if self.qga is not None and self.qga.poll() is None:
            self.qga.terminate()
            try:
                self.qga.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.qga.kill()
                self.qga.wait(timeout=10)
        if self.args.keep:
            print(f"logs kept in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


# --- small helpers --------------------------------------------------------------------------------------------------


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ValueError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError(f"connection closed before {marker!r}")
        buf += chunk
        if len(buf) > limit:
            raise ValueError("no prompt")
    return buf


def _view_once(port: int) -> int:
    """One viewer session: RFB 3.8, no auth, shared, raw encoding, one full FramebufferUpdate; returns its bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if not _recv_exact(sock, 12).startswith(b"RFB "):
            raise ValueError("not RFB")
        sock.sendall(b"RFB 003.008\n")
        count = _recv_exact(sock, 1)[0]
        if count == 0:
            raise ValueError("server refused the connection")
        if 1 not in _recv_exact(sock, count):
            raise ValueError("no security type None")
        sock.sendall(b"\x01")
        if _recv_exact(sock, 4) != b"\x00\x00\x00\x00":
            raise ValueError("security failed")
        sock.sendall(b"\x01")  # shared
        width, height = struct.unpack(">HH", _recv_exact(sock, 4))
        _recv_exact(sock, 16)
        (name_length,) = struct.unpack(">I", _recv_exact(sock, 4))
        _recv_exact(sock, name_length)
        sock.sendall(b"\x02\x00\x00\x01" + struct.pack(">i", 0)  # SetEncodings: Raw
                     + b"\x03\x00" + struct.pack(">HHHH", 0, 0, width, height))  # full FramebufferUpdateRequest
        total = 0
        while True:  # skip anything before the update (e.g. a bell, cut text: none expected)
            kind = _recv_exact(sock, 1)[0]
            if kind == 0:
                break
            raise ValueError(f"unexpected server message {kind}")
        (rects,) = struct.unpack(">xH", _recv_exact(sock, 3))
        for _ in range(rects):
            _x, _y, w, h, encoding = struct.unpack(">HHHHi", _recv_exact(sock, 12))
            if encoding != 0:
                raise ValueError(f"encoding {encoding} not asked for")
            total += len(_recv_exact(sock, w * h * 4))
        return total


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the load runs (default 5)")
    parser.add_argument("--client-kills", type=int, default=100, help="client kill -9/restart cycles (default 100)")
    parser.add_argument("--core-restarts", type=int, default=5, help="core kill -9/adopt restarts (default 5)")
    parser.add_argument("--viewers", type=int, default=5, help="VNC viewers connecting and leaving (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory and logs")
    args = parser.parse_args(argv)
    soak = Soak(args)
    try:
        return soak.run()
    finally:
        soak.close()


if __name__ == "__main__":
    sys.exit(main())
