"""``vmfront console NAME``: the terminal attached to the guest's serial console, as ``virsh console``.

The terminal is put in raw mode (keys go to the guest as typed, Ctrl-C included); ``Ctrl-]`` leaves. A plain
blocking front-end on one socket: the client's console service keeps the scrollback and decides who may type.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import tty
from pathlib import Path

ESCAPE = 0x1D  # Ctrl-]
CHUNK = 4096


class ConsoleError(Exception):
    """The console cannot be reached; the message says why."""


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise ConsoleError(f"no console socket at {path}: is the VM's client serving one (vmfront run --serial, "
                           "vmfront client --console)?") from None
    except OSError as exc:
        sock.close()
        raise ConsoleError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def run_console(path: Path, name: str, *, read_only: bool = False) -> int:
    sock = _connect(path)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if interactive else None
    print(f"Connected to VM '{name}'{' (read-only)' if read_only else ''}\r\n"
          "Escape character is ^] (Ctrl + ])", file=sys.stderr, flush=True)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(stdin, selectors.EVENT_READ)
    try:
        if interactive:
            tty.setraw(stdin)
        while True:
            for key, _ in selector.select():
                if key.fileobj is sock:
                    data = sock.recv(CHUNK)
                    if not data:
                        print("\r\n[the console closed]", file=sys.stderr, flush=True)
                        return 0
                    _write_all(stdout, data)
                    continue
                typed = os.read(stdin, CHUNK)
                if not typed:  # end of input (not a terminal): stop typing, keep watching
                    selector.unregister(stdin)
                    continue
                leave = typed.find(bytes([ESCAPE]))
                if leave >= 0:
                    typed = typed[:leave]
                if typed and not read_only:
                    sock.sendall(typed)
                if leave >= 0:
                    return 0
    except (ConnectionError, KeyboardInterrupt):
        return 0
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        selector.close()
        sock.close()
        if interactive:
            with contextlib.suppress(OSError):
                sys.stderr.write("\n")
