"""QMP ``display-reload`` of ``vnc``, answered by the core itself.

QEMU's own VNC server is the core's private display capture; the VNC server viewers use is each client's. So
``display-reload {"type": "vnc", "tls-certs": true}`` never reaches QEMU: the core tells every client that serves
VNC to re-read its TLS certificates (control-channel kind ``vnc_reload``), and each one keeps its viewers.
Arguments are checked as QEMU's QAPI would (``DisplayReloadOptionsVNC``).
"""

from __future__ import annotations

import logging
from typing import Any

from ipc.messages import VncReload

from .control import ControlService
from .qmp_values import arguments_problem

log = logging.getLogger(__name__)

COMMAND = "display-reload"
_MEMBERS = frozenset({"type", "tls-certs"})


def _error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


def display_reload(name: str, arguments: dict[str, Any] | None,
                   control: ControlService | None) -> dict[str, Any] | None:
    """The reply to ``display-reload`` of ``vnc``, or None for any other command (which goes on its way)."""
    if name != COMMAND or not isinstance(arguments, dict) or arguments.get("type") != "vnc" \
            or arguments_problem(arguments):
        return None
    unexpected = sorted(set(arguments) - _MEMBERS)
    if unexpected:
        return _error(f"Parameter '{unexpected[0]}' is unexpected")
    tls_certs = arguments.get("tls-certs", False)
    if not isinstance(tls_certs, bool):
        return _error("Invalid parameter type for 'tls-certs', expected: boolean")
    if not tls_certs:
        return {"return": {}}  # nothing asked for, as in QEMU
    told = control.broadcast(VncReload(tls_certs=True)) if control is not None else 0
    if not told:
        return _error("no client serves VNC for this VM: there are no VNC certificates to reload")
    log.info("display-reload: told %d client(s) to reload their VNC TLS certificates", told)
    return {"return": {}}
