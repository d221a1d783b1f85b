"""Tell a supervisor the core is ready: systemd's ``NOTIFY_SOCKET`` protocol and a plain ready file descriptor.

Ready means QEMU answered QMP and the core's own sockets are listening, so a supervisor that waits for it can
use the VM at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one sd_notify datagram (e.g. ``READY=1``); a no-op without ``NOTIFY_SOCKET``."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def write_ready_fd(fd: int, line: str) -> None:
    """Write one line to the ready fd and close it, so a reader gets the line then EOF."""
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    except OSError as exc:
        log.warning("writing the ready line to fd %d failed: %s", fd, exc)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
