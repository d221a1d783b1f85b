"""The sans-IO qemu-ga protocol (clients/agent/protocol.py): framing, 0xFF resync, ids, limits, fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.agent.protocol import (
    AgentConnection,
    AgentProtocolError,
    ConnState,
    ErrorReply,
    Garbage,
    Oversize,
    Reply,
    SyncDone,
)


def synced(sync_id: int = 42, max_line: int = 1 << 20) -> AgentConnection:
    conn = AgentConnection(max_line)
    data = conn.sync(sync_id)
    assert data[0] == 0xFF and json.loads(data[1:]) == {"execute": "guest-sync-delimited", "arguments": {"id": 42}}
    assert conn.receive_data(b'\xff{"return": 42}\n') == [SyncDone(42)]
    assert conn.state is ConnState.IDLE
    return conn


def test_sync_discards_everything_before_the_sentinel() -> None:
    conn = AgentConnection()
    conn.sync(7)
    # Stale replies of an earlier peer, an error for our 0xFF, half a line: all before the sentinel.
    assert conn.receive_data(b'{"return": 7}\n{"error": {"class": "GenericError"}}\n{"retu') == []
    assert conn.receive_data(b'\xff{"return": 7}') == [SyncDone(7)]  # no newline needed for a complete object


def test_sync_ignores_wrong_ids_and_errors_after_the_sentinel() -> None:
    conn = AgentConnection()
    conn.sync(7)
    assert conn.receive_data(b'\xff{"return": 8}\n{"error": {"class": "X", "desc": ""}}\nnot json\n') == []
    assert conn.state is ConnState.SYNCING
    assert conn.receive_data(b'\xff{"return": 7}\n') == [SyncDone(7)]


def test_command_reply_and_error_split_anywhere() -> None:
    conn = synced()
    request = json.loads(conn.command("guest-exec", {"path": "/bin/true"}))
    assert request["execute"] == "guest-exec" and request["arguments"] == {"path": "/bin/true"}
    reply = json.dumps({"return": {"pid": 5}, "id": request["id"]}).encode() + b"\n"
    events = []
    for i in range(len(reply)):
        events += conn.receive_data(reply[i:i + 1])
    assert events == [Reply({"pid": 5})] and conn.state is ConnState.IDLE
    conn.command("guest-file-open", {"path": "/x"})
    assert conn.receive_data(b'{"error": {"class": "GenericError", "desc": "no"}}\n') == [
        ErrorReply("GenericError", "no")]


def test_reply_with_another_id_is_stale() -> None:
    conn = synced()
    request = json.loads(conn.command("guest-ping"))
    assert conn.receive_data(json.dumps({"return": {}, "id": request["id"] - 1}).encode() + b"\n") == []
    assert conn.stale == 1 and conn.state is ConnState.AWAITING
    assert conn.receive_data(b'{"return": {}}\n') == [Reply({})]


def test_garbage_and_unsolicited_data_unsync() -> None:
    conn = synced()
    conn.command("guest-ping")
    events = conn.receive_data(b"\x00\x01garbage\nmore\n")
    assert len(events) == 1 and isinstance(events[0], Garbage) and conn.state is ConnState.UNSYNCED
    with pytest.raises(AgentProtocolError):
        conn.command("guest-ping")
    conn = synced()
    assert isinstance(conn.receive_data(b'{"return": {}}\n')[0], Garbage)
    assert conn.state is ConnState.UNSYNCED


def test_sentinel_mid_line_resets_the_parser() -> None:
    conn = synced()
    conn.command("guest-ping")
    assert conn.receive_data(b'{"return": {"half\xff\xff\xff{"return": {}}\n') == [Reply({})]


def test_oversized_line_is_dropped_with_bounded_memory() -> None:
    conn = synced(max_line=1024)
    conn.command("guest-ping")
    events = []
    for _ in range(100):
        events += conn.receive_data(b"x" * 1000)
        assert len(conn._buf) <= 1024
    assert events == [Oversize(1024, b"x" * 256)] and conn.state is ConnState.UNSYNCED
    # After a resync the connection works again.
    conn.sync(9)
    assert conn.receive_data(b'xxx\n\xff{"return": 9}\n') == [SyncDone(9)]


def test_no_command_before_sync() -> None:
    with pytest.raises(AgentProtocolError):
        AgentConnection().command("guest-ping")


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300) | st.sampled_from([b"\xff", b"\n", b'{"return": 42}\n', b"{",
                                                                    b'{"error": {}}\n', b'{"return": {}, "id": 1}\n']),
                       max_size=40),
       command_at=st.integers(0, 40))
def test_fuzz_any_bytes_never_raise(chunks: list[bytes], command_at: int) -> None:
    conn = AgentConnection(max_line=256)
    conn.sync(42)
    for i, chunk in enumerate(chunks):
        if i == command_at and conn.state is ConnState.IDLE:
            conn.command("guest-ping")
        events = conn.receive_data(chunk)
        for event in events:
            assert isinstance(event, Reply | ErrorReply | SyncDone | Garbage | Oversize)
        assert len(conn._buf) <= 256
        if conn.state is ConnState.UNSYNCED:
            conn.sync(42)
