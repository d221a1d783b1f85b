"""VNC's contract, kept by the core: the VNC server viewers use lives in the client, QMP peers ask the core.

QEMU's VNC server is the core's private display capture, so nothing VNC-related a peer asks may reach it. The
core answers instead, in QEMU's shapes (qapi/ui.json): ``query-vnc`` and ``query-vnc-servers`` from what its
clients report about their listeners and viewers; ``set_password``, ``expire_password`` and
``change-vnc-password`` by changing the credentials it holds. It checks every viewer's VNC authentication
response itself, so the password never leaves the core and outlives any client; it enforces the expiry at
authentication time as QEMU does, and slows down guessing per source address. Each viewer's connect,
initialisation (after authentication) and disconnect becomes QEMU's ``VNC_CONNECTED`` / ``VNC_INITIALIZED`` /
``VNC_DISCONNECTED`` event.

No I/O here: the supervisor routes commands in, the control service reports, events leave through a callback.
A client that serves VNC with TLS says so per listener (its VeNCrypt sub-auth) and per viewer (the verified
certificate's subject), and the queries show them as QEMU would. What a later setup adds (SASL) extends the
reported viewers; the shapes below already carry them where QEMU does.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipc.messages import MAX_VNC_VIEWERS, VncAddress, VncViewer
from rfb import auth as rfb_auth

log = logging.getLogger(__name__)

AUTH_NONE = "none"
AUTH_VNC = "vnc"
#: The commands answered here (set_password and expire_password only with protocol vnc).
COMMANDS = frozenset({"query-vnc", "query-vnc-servers", "set_password", "expire_password", "change-vnc-password"})
#: QEMU's only display id unless -vnc id=... is given; here the client that attached first.
DEFAULT_DISPLAY = "default"
PASSWORD_ENV = "VMFRONT_VNC_PASSWORD"
#: Failed authentications per source address before each further attempt has to wait; the wait doubles from
#: FAILURE_BACKOFF_S with every failure, up to FAILURE_BACKOFF_MAX_S. Addresses remembered: FAILURE_HOSTS.
FREE_FAILURES = 3
FAILURE_BACKOFF_S = 1.0
FAILURE_BACKOFF_MAX_S = 60.0
FAILURE_HOSTS = 4096
#: What a viewer is told when refused (QEMU says "Authentication failed" whatever the reason).
AUTH_FAILED = "Authentication failed"
TOO_MANY_FAILURES = "Too many authentication failures, try again later"

Reply = dict[str, Any]
EventSink = Callable[[dict[str, Any]], None]


class VncStateError(Exception):
    """The credentials cannot be set up (unreadable or empty password file); the message is for the operator."""


def read_password(path: Path | None, env: dict[str, str] | None = None) -> str | None:
    """The VNC password: first line of ``path`` if given, else ``$VMFRONT_VNC_PASSWORD``, else None."""
    env = dict(os.environ) if env is None else env
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise VncStateError(f"cannot read the VNC password file {path}: {exc}") from exc
        password = text[0] if text else ""
    elif env.get(PASSWORD_ENV):
        password = env[PASSWORD_ENV]
    else:
        return None
    if not password:
        raise VncStateError("the VNC password is empty (that would let anyone in)")
    if len(password.encode()) > rfb_auth.KEY_SIZE:
        log.warning("VNC authentication uses only the first %d bytes of the password", rfb_auth.KEY_SIZE)
    return password


def _error(desc: str, error_class: str = "GenericError") -> Reply:
    return {"error": {"class": error_class, "desc": desc}}


def _timestamp(now: float) -> dict[str, int]:
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


@dataclass
class Credentials:
    """How viewers authenticate. ``auth`` is what clients offer (``none`` or ``vnc``); ``password`` None (or
    empty) with ``vnc`` lets nobody in, as QEMU's ``password=on`` before a password is set; ``expires`` is epoch
    seconds (infinity: never), compared at authentication time."""

    auth: str = AUTH_NONE
    password: str | None = None
    expires: float = math.inf

    def refusal(self, challenge: bytes, response: bytes, now: float) -> str | None:
        """Why this response does not authenticate (for the log), or None if it does."""
        if self.auth != AUTH_VNC:
            return "VNC authentication is not in use"
        if not self.password:
            return "password is not set"
        if self.expires < now:
            return "password is expired"
        if not rfb_auth.check_response(self.password, challenge, response):
            return "wrong password"
        return None


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0


class FailureLimiter:
    """Failed authentications per source address: FREE_FAILURES go unhindered, then each attempt must wait a
    doubling backoff after the last failure (a password cannot be guessed at network speed). Bounded: the
    addresses failed longest ago are forgotten first."""

    def __init__(self, max_hosts: int = FAILURE_HOSTS) -> None:
        self._hosts: OrderedDict[str, _Failures] = OrderedDict()
        self.max_hosts = max_hosts

    def locked(self, host: str, now: float) -> float:
        """Seconds until ``host`` may try again (0: now)."""
        entry = self._hosts.get(host)
        return max(0.0, entry.until - now) if entry is not None else 0.0

    def failed(self, host: str, now: float) -> None:
        entry = self._hosts.pop(host, None) or _Failures()
        entry.count += 1
        if entry.count >= FREE_FAILURES:
            backoff = FAILURE_BACKOFF_S * 2 ** (entry.count - FREE_FAILURES)
            entry.until = now + min(backoff, FAILURE_BACKOFF_MAX_S)
        self._hosts[host] = entry
        while len(self._hosts) > self.max_hosts:
            self._hosts.popitem(last=False)

    def succeeded(self, host: str) -> None:
        self._hosts.pop(host, None)


@dataclass
class ClientVnc:
    """What one client reported about its VNC server."""

    name: str
    servers: list[VncAddress] = field(default_factory=list)
    viewers: dict[int, VncViewer] = field(default_factory=dict)


class VncState:
    """The VM's VNC, as the core knows it: credentials, and each attached client's listeners and viewers.

    ``emit`` receives each QMP event (``VNC_*``) for every QMP peer; ``settings_changed`` runs when what clients
    must offer viewers changed (the auth scheme), so the control service can tell them."""

    def __init__(self, credentials: Credentials | None = None, *, emit: EventSink = lambda event: None,
                 settings_changed: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.credentials = credentials or Credentials()
        self.emit = emit
        self.settings_changed = settings_changed
        self.failures = FailureLimiter()
        self._clock = clock
        #: Clients in the order they attached (the first one's server is QEMU's "default" display).
        self._clients: dict[Hashable, ClientVnc] = {}

    # --- what clients report ------------------------------------------------------------------------------

    def report_state(self, client: Hashable, name: str, servers: tuple[VncAddress, ...],
                     viewers: tuple[VncViewer, ...]) -> None:
        """A client's whole VNC server (after it attached): replaces what was known, without events (QMP peers
        of this core never saw these viewers arrive, as after a QEMU restart)."""
        entry = self._clients.setdefault(client, ClientVnc(name))
        entry.name = name
        entry.servers = list(servers)
        entry.viewers = {viewer.id: viewer for viewer in viewers}

    def report_viewer(self, client: Hashable, name: str, event: str, viewer: VncViewer) -> str | None:
        """A viewer connected, was initialised or left; emits the QMP event. Returns why the report is refused
        (too many viewers), or None."""
        entry = self._clients.setdefault(client, ClientVnc(name))
        if event == "disconnected":
            known = entry.viewers.pop(viewer.id, None)
            self._emit_viewer("VNC_DISCONNECTED", entry, known or viewer)
            return None
        if viewer.id not in entry.viewers and len(entry.viewers) >= MAX_VNC_VIEWERS:
            return f"more than {MAX_VNC_VIEWERS} VNC viewers reported by one client"
        entry.viewers[viewer.id] = viewer
        self._emit_viewer("VNC_CONNECTED" if event == "connected" else "VNC_INITIALIZED", entry, viewer)
        return None

    def client_gone(self, client: Hashable) -> None:
        """A client vanished (killed, stopped): its viewers' connections went with it."""
        entry = self._clients.pop(client, None)
        if entry is None:
            return
        for viewer in entry.viewers.values():
            self._emit_viewer("VNC_DISCONNECTED", entry, viewer)

    def _emit_viewer(self, name: str, entry: ClientVnc, viewer: VncViewer) -> None:
        if not entry.servers:
            return  # QEMU emits nothing for a display without a listener either
        server = entry.servers[viewer.server] if viewer.server < len(entry.servers) else entry.servers[0]
        client = _basic(viewer.address) if name == "VNC_CONNECTED" else self._viewer_info(viewer)
        now = self._clock()
        self.emit({"event": name, "data": {"server": {**_basic(server), **self._auth(server)},
                                           "client": client}, "timestamp": _timestamp(now)})

    # --- authentication -----------------------------------------------------------------------------------

    def authenticate(self, host: str, challenge: bytes, response: bytes) -> tuple[bool, str]:
        """Check one viewer's VNC authentication response: (accepted, what to tell the viewer)."""
        now = self._clock()
        wait = self.failures.locked(host, now)
        if wait > 0:
            log.warning("VNC authentication from %s refused unchecked: too many failures (%.0f s to wait)",
                        host or "a unix socket", wait)
            return False, TOO_MANY_FAILURES
        why = self.credentials.refusal(challenge, response, now)
        if why is None:
            self.failures.succeeded(host)
            return True, ""
        self.failures.failed(host, now)
        log.warning("VNC authentication from %s failed: %s", host or "a unix socket", why)
        return False, AUTH_FAILED

    # --- QMP ----------------------------------------------------------------------------------------------

    @staticmethod
    def answers(name: str, arguments: dict[str, Any] | None) -> bool:
        """Whether the core answers this command itself (it never reaches QEMU)."""
        if name in ("set_password", "expire_password"):
            return isinstance(arguments, dict) and arguments.get("protocol") == "vnc"
        return name in COMMANDS

    def execute(self, name: str, arguments: dict[str, Any] | None) -> Reply:
        args = dict(arguments or {})
        if name == "query-vnc":
            return _checked(args, {}) or {"return": self.query_vnc()}
        if name == "query-vnc-servers":
            return _checked(args, {}) or {"return": self.query_vnc_servers()}
        if name == "change-vnc-password":
            return _checked(args, {"password": str}, required=("password",)) or self._set_password(
                args["password"], None)
        if name == "set_password":
            problem = _checked(args, {"protocol": str, "password": str, "connected": str, "display": str},
                               required=("protocol", "password"))
            if problem:
                return problem
            connected = args.get("connected", "keep")
            if connected not in ("keep", "fail", "disconnect"):
                return _error(f"Parameter 'connected' does not accept value '{connected}'")
            if connected != "keep":  # QEMU's VNC supports "keep" only
                return _error("Invalid parameter 'connected'")
            return self._set_password(args["password"], args.get("display"))
        if name == "expire_password":
            problem = _checked(args, {"protocol": str, "time": str, "display": str}, required=("protocol", "time"))
            return problem or self._expire_password(args["time"], args.get("display"))
        return _error(f"The command {name} has not been found", "CommandNotFound")

    def _display_problem(self, display: str | None) -> Reply | None:
        if display is None or display == DEFAULT_DISPLAY or display in self._display_ids().values():
            return None
        return _error(f"Display '{display}' not found (displays: {', '.join(self._display_ids().values()) or 'none'})")

    def _set_password(self, password: str, display: str | None) -> Reply:
        problem = self._display_problem(display)
        if problem:
            return problem
        creds = self.credentials
        turned_on = creds.auth != AUTH_VNC
        creds.password = password
        creds.auth = AUTH_VNC
        if turned_on:
            log.warning("VNC authentication turned on by a new password: viewers connected meanwhile stay "
                        "(connected=keep), new ones need the password")
            self.settings_changed()
        else:
            log.info("VNC password changed")
        if not password:
            log.warning("the VNC password is empty: no viewer can authenticate until one is set")
        return {"return": {}}

    def _expire_password(self, when: str, display: str | None) -> Reply:
        problem = self._display_problem(display)
        if problem:
            return problem
        expires = parse_expiry(when, self._clock())
        if expires is None:
            return _error(f"Parameter 'time' doesn't take value '{when}'")
        self.credentials.expires = expires
        log.info("VNC password %s", "never expires" if math.isinf(expires)
                 else f"expires at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))}")
        return {"return": {}}

    def _display_ids(self) -> dict[Hashable, str]:
        """The display id of each client serving VNC: the first attached is ``default``, as QEMU's only one."""
        ids: dict[Hashable, str] = {}
        for key, entry in self._clients.items():
            if entry.servers:
                ids[key] = DEFAULT_DISPLAY if not ids else f"{entry.name}-{len(ids)}"
        return ids

    def _viewer_info(self, viewer: VncViewer) -> dict[str, Any]:
        """A viewer as QAPI's VncClientInfo (with ``x509_dname`` when it showed a verified certificate)."""
        info = _basic(viewer.address)
        if viewer.x509_dname:
            info["x509_dname"] = viewer.x509_dname
        return info

    def _auth(self, server: VncAddress) -> dict[str, Any]:
        """A listener's ``auth`` (and ``vencrypt`` sub-auth) as QAPI's VncServerInfo2 has them: VeNCrypt where the
        client requires TLS, else the scheme the core's credentials set."""
        if server.vencrypt:
            return {"auth": "vencrypt", "vencrypt": server.vencrypt}
        return {"auth": self.credentials.auth}

    def query_vnc(self) -> dict[str, Any]:
        """``query-vnc``: the default display's first listener, and every viewer of the VM's VNC (each client
        shows the same display, so together they are one VNC display to the management)."""
        ids = self._display_ids()
        if not ids:
            return {"enabled": False}
        first = self._clients[next(iter(ids))].servers[0]
        clients = [self._viewer_info(v) for key in ids for v in self._clients[key].viewers.values()]
        return {"enabled": True, "host": first.host, "service": first.service, "family": first.family,
                "auth": self._auth(first)["auth"], "clients": clients}

    def query_vnc_servers(self) -> list[dict[str, Any]]:
        """``query-vnc-servers``: one entry per client serving VNC, with its listeners and viewers."""
        return [{"id": display_id,
                 "server": [{**_basic(server), **self._auth(server)} for server in self._clients[key].servers],
                 "clients": [self._viewer_info(v) for v in self._clients[key].viewers.values()],
                 **self._auth(self._clients[key].servers[0])}
                for key, display_id in self._display_ids().items()]


def _basic(address: VncAddress) -> dict[str, Any]:
    return {"host": address.host, "service": address.service, "family": address.family,
            "websocket": address.websocket}


_TYPE_NAMES = {str: "string", bool: "boolean", int: "int"}


def _checked(args: dict[str, Any], types: dict[str, type], required: tuple[str, ...] = ()) -> Reply | None:
    """QAPI's argument checks, with its error texts: unknown, missing and mistyped parameters."""
    for key in args:
        if key not in types:
            return _error(f"Parameter '{key}' is unexpected")
    for key in required:
        if key not in args:
            return _error(f"Parameter '{key}' is missing")
    for key, kind in types.items():
        if key in args and not isinstance(args[key], kind):
            return _error(f"Invalid parameter type for '{key}', expected: {_TYPE_NAMES[kind]}")
    return None


def parse_expiry(when: str, now: float) -> float | None:
    """``expire_password``'s time as QEMU reads it: ``now``, ``never``, ``+SECONDS`` (from now) or absolute epoch
    SECONDS; None if it is none of these. ``now`` is epoch 0 (long expired), ``never`` infinity."""
    if when == "now":
        return 0.0
    if when == "never":
        return math.inf
    base, digits = (float(int(now)), when[1:]) if when.startswith("+") else (0.0, when)
    if not digits.isascii() or not digits.isdigit() or int(digits) >= 1 << 64:
        return None
    return base + int(digits)
