"""``vmfront agent NAME ...``: a thin client of the agent proxy socket (qemu-ga's wire protocol), plus the
conveniences built on it: ``exec`` (guest-exec and status polling, ``--input FILE`` for its stdin),
``copy-to``/``copy-from`` (guest-file-* in chunks, with progress) and the ``ping``/``info``/``osinfo``/``time``
shorthands. Arguments may come from standard input (``-``).

Blocking sockets on purpose: it is a one-shot command, with a deadline on every read.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TextIO

from .protocol import DEFAULT_MAX_LINE, NO_REPLY_COMMANDS
from .proxy import SESSION_COMMAND
from .service import COMMAND_TIMEOUTS, DEFAULT_TIMEOUT, NO_REPLY_GRACE

SHORTHANDS = {"ping": "guest-ping", "info": "guest-info", "osinfo": "guest-get-osinfo", "time": "guest-get-time"}
#: File data per guest-file-read/-write in copies (base64 makes it 4/3 larger on the wire).
CHUNK = 512 << 10
#: The longest reply line taken from the proxy: the longest the client takes from the agent, and some.
MAX_REPLY = DEFAULT_MAX_LINE + (64 << 10)
#: Bytes read from the proxy at a time.
_RECV = 1 << 20


class AgentCliError(Exception):
    """A call failed: ``error_class`` is the agent's (or vmfront's) error class."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class ProxyClosed(AgentCliError):
    """The agent proxy closed the connection without answering."""


class ProxyClient:
    """One connection to the agent proxy; ``call`` sends a command and returns its ``return`` value."""

    def __init__(self, path: Path, *, wait: bool = True, timeout: float | None = None,
                 stateful: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        try:
            self.sock.settimeout(5.0)
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise AgentCliError("AgentUnavailable", f"cannot reach the agent proxy at {path} ({exc}); is "
                                "`vmfront client` running for this VM?") from exc
        self._buf = bytearray()
        options: dict[str, Any] = {"wait": wait, "stateful": stateful}
        if timeout is not None:
            options["timeout"] = timeout
        self.call(SESSION_COMMAND, options)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ProxyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        default = NO_REPLY_GRACE if command in NO_REPLY_COMMANDS else COMMAND_TIMEOUTS.get(command, DEFAULT_TIMEOUT)
        limit = (self.timeout or default) + 5.0
        data = json.dumps(request).encode() + b"\n"
        if command in NO_REPLY_COMMANDS:
            # qemu-ga answers these only when they fail: a guest-sync behind it is answered once the proxy has
            # seen it done (the guest shut down or suspended, or no error within the grace period).
            marker = int.from_bytes(os.urandom(4), "big")
            self.sock.sendall(data + json.dumps({"execute": "guest-sync", "arguments": {"id": marker}}).encode()
                              + b"\n")
            try:
                reply = self._read_line(limit)
            except ProxyClosed:
                return None  # the VM ended, and the client serving the proxy with it (vmfront run)
            if reply.get("return") == marker:
                return None
        else:
            self.sock.sendall(data)
            try:
                reply = self._read_line(limit)
            except AgentCliError as exc:
                if command == "guest-file-read":
                    raise AgentCliError(exc.error_class, f"{exc.desc}; the guest may have read up to "
                                        f"{(arguments or {}).get('count', 4096)} bytes, and its file position "
                                        "moved past them") from exc
                raise
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AgentCliError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
        if "return" not in reply:
            raise AgentCliError("AgentProtocolError", f"unexpected answer from the proxy: {reply!r}"[:300])
        return reply["return"]

    def _read_line(self, limit: float) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        searched = 0
        while (end := self._buf.find(b"\n", searched)) < 0:
            searched = len(self._buf)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentCliError("AgentTimeout", f"no answer from the agent proxy within {limit:g} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(_RECV)
            except TimeoutError:
                continue
            if not chunk:
                raise ProxyClosed("AgentUnavailable", "the agent proxy closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_REPLY:
                raise AgentCliError("AgentProtocolError", f"reply over {MAX_REPLY} bytes")
        line = self._buf[:end]
        del self._buf[:end + 1]
        try:
            message = json.loads(line.lstrip(b"\xff"))
        except ValueError as exc:
            raise AgentCliError("AgentProtocolError", f"bad JSON from the agent proxy: {exc}") from exc
        if not isinstance(message, dict):
            raise AgentCliError("AgentProtocolError", "the agent proxy sent a non-object")
        return message


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal), and a summary at the end."""

    def __init__(self, what: str, total: int | None, out: TextIO = sys.stderr) -> None:
        self.what, self.total, self.out = what, total, out
        self.tty = out.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.tty or (now - self._last < 0.1 and done != self.total):
            return
        self._last = now
        if self.total:
            filled = int(30 * done / self.total)
            bar = "#" * filled + "-" * (30 - filled)
            self.out.write(f"\r{self.what} [{bar}] {done * 100 // self.total:3d}% {done >> 10} KiB")
        else:
            self.out.write(f"\r{self.what} {done >> 10} KiB")
        self.out.flush()

    def finish(self, done: int) -> None:
        if self.tty:
            self.out.write("\n")
        elapsed = max(time.monotonic() - self.start, 1e-6)
        self.out.write(f"{self.what}: {done} bytes in {elapsed:.1f} s\n")


def run_exec(client: ProxyClient, argv: list[str], *, timeout: float, stdin: bytes | None = None,
             out: BinaryIO | None = None, err: BinaryIO | None = None) -> int:
    """guest-exec ARGV, poll guest-exec-status until it exits; writes its output; returns its exit code."""
    if not argv:
        raise AgentCliError("GenericError", "exec needs a command: vmfront agent NAME exec -- CMD ARGS...")
    arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin is not None:
        arguments["input-data"] = base64.b64encode(stdin).decode()
    pid = client.call("guest-exec", arguments)["pid"]
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        status = client.call("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise AgentCliError("AgentTimeout", f"{argv[0]} (guest pid {pid}) still running after {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    stdout = out if out is not None else sys.stdout.buffer
    stderr = err if err is not None else sys.stderr.buffer
    stdout.write(base64.b64decode(status.get("out-data", "")))
    stderr.write(base64.b64decode(status.get("err-data", "")))
    stdout.flush()
    stderr.flush()
    if status.get("out-truncated") or status.get("err-truncated"):
        print("vmfront agent exec: warning: the guest agent truncated the command's output", file=sys.stderr)
    if "signal" in status:
        return 128 + int(status["signal"])
    return int(status.get("exitcode", 0))


def into_directory(src: str, dst: str, *, host: bool = False) -> str:
    """As cp does: a DST ending in ``/`` (or, on the host, naming a directory) gets SRC's file name."""
    if dst.endswith("/") or (host and Path(dst).is_dir()):
        return f"{dst.rstrip('/')}/{PurePosixPath(src).name}"
    return dst


def copy_to(client: ProxyClient, src: Path, dst: str) -> int:
    """Host file SRC → guest file DST; returns the byte count. Fails (never truncates silently) if interrupted."""
    total = src.stat().st_size
    progress = Progress(f"copy-to {dst}", total)
    handle = client.call("guest-file-open", {"path": dst, "mode": "wb"})
    done = 0
    try:
        with src.open("rb") as f:
            while chunk := f.read(CHUNK):
                reply = client.call("guest-file-write", {"handle": handle,
                                                         "buf-b64": base64.b64encode(chunk).decode()})
                if reply.get("count") != len(chunk):
                    raise AgentCliError("GenericError", f"short write in the guest ({reply.get('count')} of "
                                        f"{len(chunk)} bytes)")
                done += len(chunk)
                progress.update(done)
        client.call("guest-file-close", {"handle": handle})
    except AgentCliError as exc:
        _close_quietly(client, handle)
        raise AgentCliError(exc.error_class, f"copy to the guest's {dst} interrupted after {done} of {total} "
                            f"bytes: {exc.desc}. The guest file is incomplete; retry the copy") from exc
    progress.finish(done)
    return done


def copy_from(client: ProxyClient, src: str, dst: Path) -> int:
    """Guest file SRC → host file DST (written as DST.part, renamed when complete); returns the byte count."""
    handle = client.call("guest-file-open", {"path": src, "mode": "rb"})
    part = dst.with_name(dst.name + ".part")
    done = 0
    total: int | None = None
    try:
        total = int(client.call("guest-file-seek", {"handle": handle, "offset": 0, "whence": "end"})["position"])
        client.call("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"})
        progress = Progress(f"copy-from {src}", total)
        with part.open("wb") as f:
            while True:
                reply = client.call("guest-file-read", {"handle": handle, "count": CHUNK})
                data = base64.b64decode(reply.get("buf-b64", ""))
                if len(data) != reply.get("count"):
                    raise AgentCliError("AgentProtocolError", "guest-file-read: count and data disagree")
                f.write(data)
                done += len(data)
                progress.update(done)
                if reply.get("eof") or not data:
                    break
        client.call("guest-file-close", {"handle": handle})
        if done != total:
            raise AgentCliError("GenericError", f"the guest file changed size during the copy ({total} bytes "
                                f"at the start, {done} read)")
        os.replace(part, dst)
    except (AgentCliError, OSError) as exc:
        _close_quietly(client, handle)
        part.unlink(missing_ok=True)
        cls = exc.error_class if isinstance(exc, AgentCliError) else "HostError"
        desc = exc.desc if isinstance(exc, AgentCliError) else str(exc)
        raise AgentCliError(cls, f"copy from the guest's {src} interrupted after {done} of "
                            f"{total if total is not None else '?'} bytes: {desc}. Nothing was written to {dst}; "
                            "retry the copy") from exc
    progress.finish(done)
    return done


def _close_quietly(client: ProxyClient, handle: int) -> None:
    with contextlib.suppress(AgentCliError, OSError):
        client.call("guest-file-close", {"handle": handle})


def main(socket_path: Path, command: str, args: list[str], *, wait: bool, timeout: float | None) -> int:
    """What ``vmfront agent`` runs; prints results (JSON) or ``vmfront agent: CLASS: desc`` and returns 1."""
    try:
        if command == "exec":
            stdin = None
            if args[:1] == ["--input"] and len(args) > 1:  # the command's standard input, from a file or "-"
                stdin = sys.stdin.buffer.read() if args[1] == "-" else Path(args[1]).read_bytes()
                args = args[2:]
            argv = args[1:] if args[:1] == ["--"] else args
            with ProxyClient(socket_path, wait=wait) as client:
                return run_exec(client, argv, timeout=timeout or 60.0, stdin=stdin)
        if command in ("copy-to", "copy-from"):
            if len(args) != 2:
                raise AgentCliError("GenericError", f"usage: vmfront agent NAME {command} SRC DST")
            with ProxyClient(socket_path, wait=wait, timeout=timeout, stateful=True) as client:
                if command == "copy-to":
                    copy_to(client, Path(args[0]), into_directory(args[0], args[1]))
                else:
                    copy_from(client, args[0], Path(into_directory(args[0], args[1], host=True)))
            return 0
        name = SHORTHANDS.get(command, command)
        arguments = None
        if args:
            if len(args) > 1:
                raise AgentCliError("GenericError", "give the arguments as one JSON object")
            try:  # "-": from standard input (an argument holds at most 128 KiB; a guest-file-write, 64 MiB)
                arguments = json.loads(sys.stdin.buffer.read() if args[0] == "-" else args[0])
            except ValueError as exc:
                raise AgentCliError("GenericError", f"arguments are not JSON: {exc}") from exc
            if not isinstance(arguments, dict):
                raise AgentCliError("GenericError", "arguments must be a JSON object")
        with ProxyClient(socket_path, wait=wait, timeout=timeout) as client:
            result = client.call(name, arguments)
        if name not in NO_REPLY_COMMANDS:
            print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    except AgentCliError as exc:
        print(f"vmfront agent: {exc.error_class}: {exc.desc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vmfront agent: HostError: {exc}", file=sys.stderr)
        return 1
