"""``vmfront monitor NAME``: the monitor socket in a terminal, with GNU readline line editing, history kept
across sessions ($XDG_STATE_HOME/vmfront/monitor_history) and tab completion from the shared command table.

A plain blocking front-end: one socket, one terminal; the client's monitor service does the work.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from .commands import completions
from .service import PROMPT

_PROMPT_BYTES = PROMPT.encode()
HISTORY_LENGTH = 1000


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "vmfront" / "monitor_history"


class _Connection:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = b""

    def read_reply(self) -> bool:
        """Print output as it arrives until the next prompt; False when the monitor closed the connection."""
        while True:
            if self.buffer.endswith(_PROMPT_BYTES) and (self.buffer == _PROMPT_BYTES
                                                         or self.buffer.endswith(b"\n" + _PROMPT_BYTES)):
                self._emit(self.buffer[: -len(_PROMPT_BYTES)])
                self.buffer = b""
                return True
            head, sep, tail = self.buffer.rpartition(b"\n")
            if sep:
                self._emit(head + sep)
                self.buffer = tail
            chunk = self.sock.recv(65536)
            if not chunk:
                self._emit(self.buffer)
                return False
            self.buffer += chunk

    @staticmethod
    def _emit(data: bytes) -> None:
        if data:
            sys.stdout.write(data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
            sys.stdout.flush()

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")


def _setup_readline(history: Path) -> None:
    import readline

    def complete(text: str, state: int) -> str | None:
        line = readline.get_line_buffer()[: readline.get_endidx()]
        options = completions(line)
        # readline replaces the word it considers current; for sendkey that is the whole ``ctrl-alt-..``.
        return options[state] + (" " if len(options) == 1 else "") if state < len(options) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(FileNotFoundError, OSError):
        readline.read_history_file(history)
        if readline.get_current_history_length() > HISTORY_LENGTH:
            readline.write_history_file(history)  # keeps the last HISTORY_LENGTH lines


def run_interactive(socket_path: Path) -> int:
    try:
        conn = _Connection(socket_path)
    except OSError as exc:
        print(f"vmfront monitor: error: cannot connect to {socket_path}: {exc.strerror or exc} "
              "(is `vmfront client --monitor` running?)", file=sys.stderr)
        return 1
    history = history_path()
    interactive = sys.stdin.isatty()
    if interactive:
        _setup_readline(history)
        history.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not conn.read_reply():
            return 1
        while True:
            try:
                line = input(PROMPT if interactive else "")
            except EOFError:
                if interactive:
                    print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if interactive and line.strip():
                import readline

                with contextlib.suppress(OSError):
                    if not history.exists():
                        history.touch(mode=0o600)
                    readline.append_history_file(1, history)
            conn.send(line)
            if not conn.read_reply():
                return 0
    except (ConnectionError, OSError) as exc:
        print(f"vmfront monitor: connection lost: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.sock.close()
