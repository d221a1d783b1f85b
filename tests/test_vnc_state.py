"""The core's VNC state (core_daemon/vnc_state.py) on its own: QEMU's answers and errors, events, credentials,
expiry and the failure backoff, driven with a fixed clock."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from core_daemon.vnc_state import (
    AUTH_FAILED,
    TOO_MANY_FAILURES,
    Credentials,
    VncState,
    VncStateError,
    parse_expiry,
    read_password,
)
from ipc.messages import VncAddress, VncViewer
from rfb.auth import response_for

LISTENER = VncAddress("127.0.0.1", "5900", "ipv4")
WS = VncAddress("127.0.0.1", "5700", "ipv4", websocket=True)
CHALLENGE = bytes(range(16))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.5

    def __call__(self) -> float:
        return self.now


def state(credentials: Credentials | None = None) -> tuple[VncState, list[dict[str, Any]], Clock, list[int]]:
    events: list[dict[str, Any]] = []
    changed: list[int] = []
    clock = Clock()
    vnc = VncState(credentials, emit=events.append, settings_changed=lambda: changed.append(1), clock=clock)
    return vnc, events, clock, changed


def viewer(number: int, port: int, server: int = 0, initialized: bool = False) -> VncViewer:
    return VncViewer(number, VncAddress("127.0.0.1", str(port), "ipv4", websocket=server == 1), server,
                     initialized)


def test_no_client_no_vnc() -> None:
    vnc, _, _, _ = state()
    assert vnc.execute("query-vnc", None) == {"return": {"enabled": False}}
    assert vnc.execute("query-vnc-servers", {}) == {"return": []}


def test_queries_and_events_in_qemus_shapes() -> None:
    vnc, events, clock, _ = state()
    vnc.report_state("a", "vmfront-client:vm", (LISTENER, WS), ())
    assert vnc.report_viewer("a", "c", "connected", viewer(1, 40000)) is None
    assert vnc.report_viewer("a", "c", "connected", viewer(2, 40001, server=1)) is None
    vnc.report_viewer("a", "c", "initialized", viewer(1, 40000, initialized=True))
    server = {"host": "127.0.0.1", "service": "5900", "family": "ipv4", "websocket": False, "auth": "none"}
    client = {"host": "127.0.0.1", "service": "40000", "family": "ipv4", "websocket": False}
    assert events[0] == {"event": "VNC_CONNECTED", "data": {"server": server, "client": client},
                         "timestamp": {"seconds": 1_800_000_000, "microseconds": 500000}}
    assert events[1]["data"]["server"]["websocket"] is True and events[1]["data"]["client"]["websocket"] is True
    assert events[2]["event"] == "VNC_INITIALIZED"
    assert vnc.execute("query-vnc", {})["return"] == {
        "enabled": True, "host": "127.0.0.1", "service": "5900", "family": "ipv4", "auth": "none",
        "clients": [client, {**client, "service": "40001", "websocket": True}]}
    # A second client: another display in query-vnc-servers, its viewers in query-vnc's list too.
    vnc.report_state("b", "other", (VncAddress("", "/run/v.sock", "unix"),), (viewer(7, 0),))
    servers = vnc.execute("query-vnc-servers", {})["return"]
    assert [s["id"] for s in servers] == ["default", "other-1"]
    assert servers[1]["server"] == [{"host": "", "service": "/run/v.sock", "family": "unix", "websocket": False,
                                     "auth": "none"}]
    assert len(vnc.execute("query-vnc", {})["return"]["clients"]) == 3
    # A client that vanishes takes its viewers with it: each one's disconnect is told.
    clock.now += 1
    vnc.client_gone("a")
    assert [e["event"] for e in events[3:]] == ["VNC_DISCONNECTED", "VNC_DISCONNECTED"]
    assert [s["id"] for s in vnc.execute("query-vnc-servers", {})["return"]] == ["default"]


def test_password_commands_as_qemu() -> None:
    vnc, _, _, changed = state()
    assert VncState.answers("set_password", {"protocol": "vnc", "password": "x"})
    assert not VncState.answers("set_password", {"protocol": "spice", "password": "x"})
    assert VncState.answers("change-vnc-password", {"password": "x"}) and VncState.answers("query-vnc", None)
    assert vnc.execute("set_password", {"protocol": "vnc", "password": "pw"}) == {"return": {}}
    assert vnc.credentials.auth == "vnc" and changed == [1], "auth turned on, clients told once"
    assert vnc.execute("change-vnc-password", {"password": "pw2"}) == {"return": {}}
    assert vnc.credentials.password == "pw2" and changed == [1]

    def error(name: str, args: dict[str, Any]) -> str:
        reply = vnc.execute(name, args)
        assert reply["error"]["class"] == "GenericError", reply
        return str(reply["error"]["desc"])

    assert error("set_password", {"protocol": "vnc", "password": "x", "connected": "fail"}) == \
        "Invalid parameter 'connected'"
    assert "does not accept" in error("set_password", {"protocol": "vnc", "password": "x", "connected": "maybe"})
    assert error("set_password", {"protocol": "vnc"}) == "Parameter 'password' is missing"
    assert error("set_password", {"protocol": "vnc", "password": 1}) == \
        "Invalid parameter type for 'password', expected: string"
    assert error("change-vnc-password", {"password": "x", "extra": 1}) == "Parameter 'extra' is unexpected"
    assert error("set_password", {"protocol": "vnc", "password": "x", "display": "nope"}).startswith(
        "Display 'nope' not found")
    assert error("expire_password", {"protocol": "vnc", "time": "-5"}) == "Parameter 'time' doesn't take value '-5'"
    assert vnc.execute("expire_password", {"protocol": "vnc", "time": "+60", "display": "default"}) == {"return": {}}
    assert vnc.credentials.expires == 1_800_000_060
    assert vnc.credentials.password == "pw2", "setting the expiry leaves the password"


def test_expiry_values() -> None:
    now = 1000.7
    assert parse_expiry("now", now) == 0.0
    assert parse_expiry("never", now) == math.inf
    assert parse_expiry("+10", now) == 1010.0
    assert parse_expiry("2000", now) == 2000.0
    for bad in ("", "+", "soon", "1e3", "+-1", "٣", str(1 << 64)):
        assert parse_expiry(bad, now) is None, bad


def test_authentication_checks_and_expiry() -> None:
    vnc, _, clock, _ = state(Credentials(auth="vnc"))
    good = response_for("pw", CHALLENGE)
    assert vnc.authenticate("h", CHALLENGE, good) == (False, AUTH_FAILED), "no password set: nobody gets in"
    vnc.execute("set_password", {"protocol": "vnc", "password": "pw"})
    assert vnc.authenticate("h", CHALLENGE, good) == (True, "")
    assert vnc.authenticate("h", CHALLENGE, response_for("pX", CHALLENGE)) == (False, AUTH_FAILED)
    vnc.execute("expire_password", {"protocol": "vnc", "time": "+5"})
    assert vnc.authenticate("h", CHALLENGE, good)[0]
    clock.now += 6
    assert vnc.authenticate("h", CHALLENGE, good) == (False, AUTH_FAILED), "expired"
    vnc.execute("set_password", {"protocol": "vnc", "password": "pw"})
    assert not vnc.authenticate("other", CHALLENGE, good)[0], "a new password keeps the expiry (as QEMU)"
    vnc.execute("expire_password", {"protocol": "vnc", "time": "never"})
    assert vnc.authenticate("other", CHALLENGE, good)[0]
    vnc.execute("set_password", {"protocol": "vnc", "password": ""})
    assert not vnc.authenticate("h2", CHALLENGE, response_for("", CHALLENGE))[0], "an empty password locks"


def test_failures_back_off_per_address() -> None:
    vnc, _, clock, _ = state(Credentials(auth="vnc", password="pw"))
    good, bad = response_for("pw", CHALLENGE), bytes(16)
    assert [vnc.authenticate("a", CHALLENGE, bad)[1] for _ in range(3)] == [AUTH_FAILED] * 3
    assert vnc.authenticate("a", CHALLENGE, good) == (False, TOO_MANY_FAILURES)
    assert vnc.authenticate("b", CHALLENGE, good) == (True, ""), "other addresses are not held up"
    clock.now += 1.01
    assert vnc.authenticate("a", CHALLENGE, bad) == (False, AUTH_FAILED)
    clock.now += 1.5
    assert vnc.authenticate("a", CHALLENGE, good) == (False, TOO_MANY_FAILURES), "the wait doubled"
    clock.now += 0.6
    assert vnc.authenticate("a", CHALLENGE, good) == (True, "")
    assert vnc.authenticate("a", CHALLENGE, bad) == (False, AUTH_FAILED), "a success forgot the failures"
    assert vnc.authenticate("a", CHALLENGE, good) == (True, "")
    # Bounded: the addresses that failed longest ago are forgotten first.
    vnc.failures.max_hosts = 8
    for n in range(20):
        vnc.failures.failed(f"h{n}", clock.now)
    assert len(vnc.failures._hosts) == 8


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    assert read_password(tmp_path / "pw", env={}) == "s3cret"
    assert read_password(None, env={"VMFRONT_VNC_PASSWORD": "x"}) == "x"
    assert read_password(None, env={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(VncStateError):
        read_password(tmp_path / "empty", env={})
    with pytest.raises(VncStateError):
        read_password(tmp_path / "missing", env={})


def test_viewer_reports_are_bounded() -> None:
    vnc, _, _, _ = state()
    vnc.report_state("a", "c", (LISTENER,), tuple(viewer(n, 1000 + n) for n in range(4096)))
    assert vnc.report_viewer("a", "c", "connected", viewer(9999, 1)) is not None
    assert vnc.report_viewer("a", "c", "disconnected", viewer(0, 1000)) is None
    assert vnc.report_viewer("a", "c", "connected", viewer(9999, 1)) is None
