"""Helpers for VNC tests and benchmarks: a client process serving VNC, vncdotool in a subprocess, a minimal
asyncio RFB viewer (Raw and ZRLE: it needs message boundaries, not pixels, for ZRLE), Xvfb + TigerVNC.

Every process started here is ended by its pid; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from corelib import LoggedProcess, client_command, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, within: float = 15.0) -> None:
    def ok() -> bool:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.2)
            s.connect(("127.0.0.1", port))
            return True
        return False

    wait_for(ok, within, f"port {port} to listen")


class VncClientProcess(LoggedProcess):
    """``vmfront client --vnc 127.0.0.1:PORT`` for a core's run directory."""

    def __init__(self, run_dir: Path, name: str, port: int, *extra: str, env: dict[str, str] | None = None,
                 verbose: bool = True) -> None:
        self.port = port
        self.log = run_dir.parent / f"vnc-client-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                client_command(name, run_dir, "--vnc", f"127.0.0.1:{port}", *extra, verbose=verbose),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT, env={**os.environ, **(env or {})})
        try:  # generous: a loaded 2-core machine takes seconds just to start Python with numpy
            wait_port(port, 60)
            wait_for(lambda: "VNC: display mode" in self.text(), 60, "the client to see the display")
        except BaseException:
            self.stop()
            raise



# --- vncdotool, in a subprocess (its twisted reactor cannot be restarted within one process) ----------------

_VNCDO_SCRIPT = r"""
import sys
from vncdotool import api, rfb
from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

server, password, encoding, out, text, force_caps = sys.argv[1:7]

class Client(VNCDoToolClient):
    encoding = getattr(rfb.Encoding, encoding.upper())

class Factory(VNCDoToolFactory):
    protocol = Client

Factory.force_caps = force_caps == "1"  # vncdotool --force-caps: Shift sent for capitals and shifted punctuation

c = api.connect(server, password=password or None, factory_class=Factory, timeout=20)
try:
    if text:
        for ch in text:
            c.keyPress("enter" if ch == "\n" else ch)
        c.pause(0.5)
    if out:
        c.captureScreen(out)
finally:
    c.disconnect()
    api.shutdown()
"""


def vncdo(port: int, *, capture: Path | None = None, type_text: str = "", encoding: str = "raw",
          password: str = "", timeout: float = 40.0, force_caps: bool = False) -> None:
    """vncdotool, which sends keysyms only (no QEMU extended key event): ``type_text`` as its ``type`` does, one
    keyPress per character (a newline is Enter)."""
    subprocess.run([sys.executable, "-c", _VNCDO_SCRIPT, f"127.0.0.1::{port}", password, encoding,
                    str(capture or ""), type_text, "1" if force_caps else "0"], check=True, timeout=timeout,
                   cwd=ROOT)


def vncdo_refused(port: int, password: str = "", within: float = 10.0) -> bool:
    """Whether vncdotool fails to get in (it does not exit when refused: it fails or times out)."""
    try:
        vncdo(port, password=password, timeout=within)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return True
    return False


def vnc_login(port: int, password: str | None = None, *, shared: bool = True,
              timeout: float = 10.0) -> tuple[str, socket.socket | None]:
    """A scripted RFB 3.8 handshake (a hostile or impatient viewer: what no real viewer can be made to do on cue):
    ("ok", the open socket after ServerInit) or (the server's failure reason, None). VNC authentication uses
    the password, or an empty response without one."""
    from rfb.auth import response_for

    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def take(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def failure() -> str:
        (length,) = struct.unpack(">I", take(4))
        return take(length).decode(errors="replace")

    try:
        assert take(12).startswith(b"RFB ")
        sock.sendall(b"RFB 003.008\n")
        types = take(take(1)[0])
        if 2 in types:
            sock.sendall(b"\x02")
            challenge = take(16)
            sock.sendall(response_for(password, challenge) if password is not None else bytes(16))
        else:
            sock.sendall(b"\x01")
        if struct.unpack(">I", take(4))[0] != 0:
            reason = failure()
            sock.close()
            return reason, None
        sock.sendall(b"\x01" if shared else b"\x00")
        take(20)
        take(struct.unpack(">I", take(4))[0])
    except (OSError, ConnectionError) as exc:
        sock.close()
        return f"closed: {exc}", None
    return "ok", sock


def closed_by_server(sock: socket.socket, within: float = 10.0) -> bool:
    """Whether the server closes ``sock`` within the time (reading and dropping whatever it sends)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


# --- a minimal viewer ------------------------------------------------------------------------------------------

RAW, COPYRECT, HEXTILE, ZLIB, TIGHT, ZRLE, DESKTOP_SIZE = 0, 1, 5, 6, 7, 16, -223


class MiniViewer:
    """RFB 3.8, security None, 32-bit BGRX (the server's default, depth 24); counts FramebufferUpdates, their bytes
    and the time each one completed. Rectangles are skimmed, not decoded (Raw, CopyRect, Hextile, Zlib, Tight,
    ZRLE), except that ``probe`` (x, y) records the pixel there whenever a Raw rectangle covers it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.width = self.height = 0
        self.updates: list[float] = []
        self.rects: list[tuple[int, int, int, int]] = []  # of the last update
        self.encodings_seen: list[int] = []  # of the last update
        self.bytes_read = 0
        self.probe: tuple[int, int] | None = None
        self.probed: bytes | None = None
        self.recording: bytearray | None = None  # when set, every byte read is appended (for a real decoder)

    @classmethod
    async def connect(cls, port: int, encoding: int = RAW, *, rcvbuf: int | None = None,
                      extra: tuple[int, ...] = (), shared: bool = True) -> MiniViewer:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        viewer = cls(reader, writer)
        await asyncio.wait_for(viewer._handshake(encoding, extra, shared), 10)
        return viewer

    async def _handshake(self, encoding: int, extra: tuple[int, ...], shared: bool = True) -> None:
        r, w = self.reader, self.writer
        assert (await r.readexactly(12)).startswith(b"RFB ")
        w.write(b"RFB 003.008\n")
        count = (await r.readexactly(1))[0]
        types = await r.readexactly(count)
        assert 1 in types, types
        w.write(b"\x01")
        assert await r.readexactly(4) == b"\0\0\0\0"
        w.write(b"\x01" if shared else b"\x00")  # the shared flag
        self.width, self.height = struct.unpack(">HH", await r.readexactly(4))
        await r.readexactly(16)
        (name_len,) = struct.unpack(">I", await r.readexactly(4))
        await r.readexactly(name_len)
        encodings = [encoding, *extra, DESKTOP_SIZE]
        w.write(struct.pack(">BxH", 2, len(encodings)) + b"".join(struct.pack(">i", e) for e in encodings))

    def request(self, incremental: bool, area: tuple[int, int, int, int] | None = None) -> None:
        x, y, w, h = area or (0, 0, self.width, self.height)
        self.writer.write(struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h))

    async def _take(self, n: int) -> bytes:
        self.bytes_read += n
        data = await self.reader.readexactly(n)
        if self.recording is not None:
            self.recording += data
        return data

    async def read_update(self) -> list[tuple[int, int, int, int]]:
        while True:
            kind = (await self._take(1))[0]
            if kind == 0:
                break
            if kind == 2:  # bell
                continue
            raise AssertionError(f"unexpected server message {kind}")
        (count,) = struct.unpack(">xH", await self._take(3))
        rects = []
        self.encodings_seen = []
        for _ in range(count):
            x, y, w, h, enc = struct.unpack(">HHHHi", await self._take(12))
            self.encodings_seen.append(enc)
            if enc == RAW:
                data = await self._take(w * h * 4)
                if self.probe is not None and x <= self.probe[0] < x + w and y <= self.probe[1] < y + h:
                    at = ((self.probe[1] - y) * w + self.probe[0] - x) * 4
                    self.probed = data[at : at + 4]
            elif enc == COPYRECT:
                await self._take(4)
            elif enc in (ZRLE, ZLIB):
                (length,) = struct.unpack(">I", await self._take(4))
                await self._take(length)
            elif enc == HEXTILE:
                await self._skim_hextile(w, h)
            elif enc == TIGHT:
                await self._skim_tight(w, h)
            elif enc == DESKTOP_SIZE:
                self.width, self.height = w, h
            else:
                raise AssertionError(f"unexpected encoding {enc}")
            rects.append((x, y, w, h))
        self.updates.append(time.monotonic())
        self.rects = rects
        return rects

    async def _skim_hextile(self, w: int, h: int) -> None:
        for ty in range(0, h, 16):
            for tx in range(0, w, 16):
                tw, th = min(16, w - tx), min(16, h - ty)
                mask = (await self._take(1))[0]
                if mask & 1:
                    await self._take(tw * th * 4)
                    continue
                size = (4 if mask & 2 else 0) + (4 if mask & 4 else 0)
                if size:
                    await self._take(size)
                if mask & 8:
                    n = (await self._take(1))[0]
                    await self._take(n * (6 if mask & 16 else 2))

    async def _compact(self) -> int:
        value, shift = 0, 0
        for i in range(3):
            b = (await self._take(1))[0]
            value |= (b & (0xFF if i == 2 else 0x7F)) << shift
            shift += 7
            if i < 2 and not b & 0x80:
                break
        return value

    async def _skim_tight(self, w: int, h: int) -> None:
        kind = (await self._take(1))[0] >> 4
        if kind == 8:  # fill: one TPIXEL (3 bytes for a depth-24 format)
            await self._take(3)
            return
        if kind == 9:  # JPEG
            await self._take(await self._compact())
            return
        filt = (await self._take(1))[0] if kind & 4 else 0
        size = w * h * 3
        if filt == 1:
            colours = (await self._take(1))[0] + 1
            await self._take(colours * 3)
            size = (w + 7) // 8 * h if colours == 2 else w * h
        if size < 12:
            await self._take(size)
        else:
            await self._take(await self._compact())

    def key(self, keysym: int, down: bool) -> None:
        self.writer.write(struct.pack(">BBxxI", 4, int(down), keysym))

    def close(self) -> None:
        self.writer.transport.abort()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- Xvfb and TigerVNC ----------------------------------------------------------------------------------------


def free_display() -> int:
    for n in range(40, 100):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number")


@contextlib.contextmanager
def xvfb(width: int = 1024, height: int = 768) -> Iterator[str]:
    number = free_display()
    proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists() or proc.poll() is not None, 10, "Xvfb")
        assert proc.poll() is None, "Xvfb exited"
        yield f":{number}"
    finally:
        end_process(proc)


def end_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def screenshot(display: str, path: Path) -> None:
    subprocess.run(["import", "-display", display, "-window", "root", str(path)], check=True, timeout=20,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def vnc_password_file(password: str, path: Path) -> Path:
    """The obfuscated password file TigerVNC's ``-passwd`` reads (``vncpasswd -f``)."""
    out = subprocess.run(["vncpasswd", "-f"], input=f"{password}\n{password}\n".encode(), check=True,
                         capture_output=True, timeout=10).stdout
    path.write_bytes(out)
    return path
