"""The fleet client's pieces that need no QEMU: the token file, the WebSocket router's path parsing, the port range
and the port record."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from clients.fleet import FleetError, PortBook, parse_port_range
from clients.tokens import TokenFile, TokenFileError, parse_expiry, parse_tokens
from clients.vnc.service import parse_listen
from clients.vnc.websocket_router import RouterError, WebSocketRouter, route

TOKEN = "k" * 20


def test_token_lines(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-" + "x" * 20
    grants = parse_tokens(f"""
        # comment
        {TOKEN}: vm1
        {TOKEN}2: vm2 2030-01-01T00:00:00Z   # with an expiry
        {TOKEN}3: * 1900000000
        short: vm1
        {secret}: not/a/name
        {secret}
        {secret}: vm1 tomorrow
    """)
    assert [(g.token.decode(), g.vm) for g in grants] == [(TOKEN, "vm1"), (TOKEN + "2", "vm2"), (TOKEN + "3", "*")]
    assert grants[1].expires == parse_expiry("2030-01-01T00:00:00+00:00") == 1893456000.0
    assert grants[2].expires == 1900000000.0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 4 and all("line" in m for m in warned)
    assert not any(secret in m or "short" in m for m in warned), warned


def test_token_file_reloads_and_expires(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}: vm1\n{TOKEN}x: vm2 {time.time() + 3600:.0f}\n{TOKEN}y: vm3 1000\n")
    tokens = TokenFile(path, recheck_s=0)
    assert tokens.allows(TOKEN, "vm1") and not tokens.allows(TOKEN, "vm2")
    assert tokens.allows(TOKEN + "x", "vm2")
    assert not tokens.allows(TOKEN + "x", "vm2", now=time.time() + 7200)  # expired by then
    assert not tokens.allows(TOKEN + "y", "vm3")  # expired long ago
    assert not tokens.allows(TOKEN[:-1], "vm1") and not tokens.allows(TOKEN + "z", "vm1")
    path.write_text(f"{TOKEN}: *\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a rewrite within the same tick counts too
    assert tokens.allows(TOKEN, "anything") and tokens.opens(TOKEN) == frozenset({"*"})
    path.unlink()
    assert not tokens.allows(TOKEN, "vm1")  # a file that is gone opens nothing
    with pytest.raises(TokenFileError):
        TokenFile(tmp_path / "missing")


def test_router_paths() -> None:
    assert route(f"/vnc/vm1?token={TOKEN}") == ("vm1", TOKEN)
    assert route("/vnc/vm1") == ("vm1", None)
    assert route("/vnc/../etc?token=a&token=b") == (None, None)  # not a VM name; two tokens: none
    assert route("/websockify?token=x") == (None, "x")
    assert route("/vnc/vm1/extra") == (None, None)


def test_router_refuses_open_non_loopback() -> None:
    with pytest.raises(RouterError, match="--websocket-tokens"):
        WebSocketRouter(parse_listen("0.0.0.0:6080"), lambda name: None, None)
    WebSocketRouter(parse_listen("127.0.0.1:6080"), lambda name: None, None)


def test_port_range_and_book(tmp_path: Path) -> None:
    assert parse_port_range("5900-5910") == range(5900, 5911)
    for bad in ("5900", "5910-5900", "0-10", "a-b", "65535-65536"):
        with pytest.raises(FleetError):
            parse_port_range(bad)
    book = PortBook(tmp_path / "ports.json")
    book.remember("a", 5901)
    book.remember("b", 5900)
    book.save()
    assert PortBook(tmp_path / "ports.json").ports == {"a": 5901, "b": 5900}
    unwritable = PortBook(tmp_path / "no" / "ports.json")
    unwritable.remember("a", 1)
    unwritable.save()  # logged, not raised: ports then last only while the client runs
    assert unwritable.path is None
