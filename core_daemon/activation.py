"""Sockets handed in by a service manager (systemd's ``LISTEN_FDS`` protocol).

With socket activation the manager owns the listening sockets: they exist before the core starts and survive
its restarts, so QMP peers can connect (and wait) while a crashed core is being restarted.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def inherited_sockets(environ: dict[str, str] | None = None) -> dict[str, socket.socket]:
    """Listening sockets passed by the manager, by name (``LISTEN_FDNAMES``; unnamed ones are ``qmp``, ...).

    The variables are removed from the environment so that QEMU, our child, does not think they are its own.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    sockets: dict[str, socket.socket] = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] != "unknown" else ("qmp" if index == 0 else
                                                                                       f"fd{fd}")
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sockets[name] = sock
        log.info("using listening socket %r (fd %d) from the service manager", name, fd)
    return sockets
