"""The sans-IO qemu-ga protocol (clients/agent/protocol.py): framing, 0xFF resync, ids, limits, fuzzing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.agent.protocol import (
    STREAM_FROM,
    AgentConnection,
    AgentProtocolError,
    ConnState,
    ErrorReply,
    Garbage,
    Oversize,
    Reply,
    SyncDone,
)
from clients.agent.qemu_json import RawJson, plain, to_json


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


def test_a_long_reply_is_read_as_it_arrives_and_its_data_kept_raw() -> None:
    """A 3 MiB guest-file-read reply in 64 KiB pieces: parsed piece by piece, its base64 kept as it came."""
    conn = synced(max_line=8 << 20)
    command_id = json.loads(conn.command("guest-file-read", {"handle": 1, "count": 3 << 20}))["id"]
    data = b"QUFB" * (1 << 20)
    line = b'{"return": {"count": 3145728, "buf-b64": "' + data + b'", "eof": false}, "id": %d}\n' % command_id
    events = []
    for start in range(0, len(line), 65536):
        events += conn.receive_data(line[start:start + 65536])
        assert len(conn._buf) <= STREAM_FROM  # not kept whole: the reader has it
        if start + 65536 < len(line):
            assert conn.line_bytes == start + 65536  # progress, for the caller's deadline
    (reply,) = events
    assert isinstance(reply, Reply) and isinstance(reply.value["buf-b64"], RawJson)
    assert to_json(reply.value).endswith(data + b'", "eof": false}')
    assert plain(reply.value)["buf-b64"] == data.decode() and conn.state is ConnState.IDLE and conn.line_bytes == 0


def test_a_long_reply_without_its_newline_is_taken_once_complete() -> None:
    conn = synced()
    conn.command("guest-file-read", {"handle": 1})
    events = conn.receive_data(b'{"return": {"buf-b64": "' + b"QUFB" * 50_000 + b'", "eof": true}}')
    assert len(events) == 1 and isinstance(events[0], Reply) and events[0].value["eof"] is True
    assert conn.receive_data(b"\n") == [] and conn.state is ConnState.IDLE


def test_a_long_line_that_is_not_json_fails_the_command_at_once() -> None:
    conn = synced(max_line=64 << 20)
    conn.command("guest-file-read", {"handle": 1})
    events = []
    for _ in range(40):  # 40 MiB of it, never a newline: known to be garbage after the first MiB or so
        events += conn.receive_data(b"x" * (1 << 20))
    assert len(events) == 1 and isinstance(events[0], Garbage) and conn.state is ConnState.UNSYNCED
    assert conn.dropped >= 38 << 20 and len(conn._buf) == 0
    conn.sync(5)
    assert conn.receive_data(b'x\n\xff{"return": 5}\n') == [SyncDone(5)]


def test_a_long_stale_line_while_syncing_is_dropped_unread() -> None:
    """The rest of a big reply to a command that timed out: it cannot be the sync reply, so it is not kept."""
    conn = AgentConnection(max_line=64 << 20)
    conn.sync(9)
    assert conn.receive_data(b'\xff{"return": {"buf-b64": "' + b"A" * (3 << 20)) == []
    assert len(conn._buf) == 0 and conn.state is ConnState.SYNCING
    assert conn.receive_data(b'"}}\n\xff{"return": 9}\n') == [SyncDone(9)]


def test_oversize_reply_keeps_its_head() -> None:
    """What an over-long guest-file-read reply said first (its count) is kept, to say how far the guest read."""
    conn = synced(max_line=4 << 20)
    conn.command("guest-file-read", {"handle": 1, "count": 48 << 20})
    line = b'{"return": {"count": 50331648, "buf-b64": "' + b"A" * (5 << 20)
    assert conn.receive_data(line) == [Oversize(4 << 20, line[:256])]


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
