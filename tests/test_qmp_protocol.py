"""The sans-IO QMP server connection: framing, negotiation, QEMU's error replies, limits; fuzzed without sockets."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core_daemon.qmp_protocol import (
    Answer,
    Command,
    ConnectionState,
    Event,
    MessageTooLarge,
    Negotiated,
    QmpServerConnection,
)
from core_daemon.qmp_values import INT_MIN, UINT_MAX, InvalidLiteral, arguments_problem

GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "test"},
                    "capabilities": []}}


def answers(events: list[Event]) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events if isinstance(e, Answer | MessageTooLarge)]


def negotiated() -> QmpServerConnection:
    conn = QmpServerConnection(GREETING)
    events = conn.receive_data(b'{"execute": "qmp_capabilities"}\n')
    assert answers(events) == [{"return": {}}]
    assert any(isinstance(e, Negotiated) for e in events)
    return conn


def test_greeting_is_qemus_layout_with_crlf() -> None:
    conn = QmpServerConnection(GREETING)
    data = conn.greeting_bytes()
    assert data.endswith(b"\r\n")
    assert json.loads(data) == GREETING


def test_commands_before_negotiation_are_refused_like_qemu() -> None:
    conn = QmpServerConnection(GREETING)
    events = conn.receive_data(b'{"execute":"query-status","id":7}\n')
    assert answers(events) == [{"id": 7, "error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}]
    assert conn.state is ConnectionState.CAPABILITIES


def test_negotiation_then_commands_and_repeat_negotiation() -> None:
    conn = negotiated()
    events = conn.receive_data(b'{"execute":"qmp_capabilities","id":{"a":[1]}}')
    assert answers(events) == [{"id": {"a": [1]}, "error": {
        "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}]
    events = conn.receive_data(b'{"execute":"query-status","arguments":{"x":1},"id":"abc"}')
    assert events == [Command("query-status", {"x": 1}, "abc", True)]


def test_unoffered_capability_is_refused() -> None:
    conn = QmpServerConnection(GREETING)
    events = conn.receive_data(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert answers(events)[0]["error"]["desc"] == "Capability 'oob' not available"
    assert conn.state is ConnectionState.CAPABILITIES


def test_framing_without_newlines_and_split_anywhere() -> None:
    stream = b'{"execute":"a","id":1}{"execute":"b","arguments":{"s":"}{\\"]"},"id":2}  {"execute":"c"}'
    whole = negotiated().receive_data(stream)
    conn = negotiated()
    pieces: list[Event] = []
    for i in range(len(stream)):
        pieces += conn.receive_data(stream[i:i + 1])
    assert whole == pieces
    assert [e.name for e in whole if isinstance(e, Command)] == ["a", "b", "c"]
    assert whole[1] == Command("b", {"s": '}{"]'}, 2, True)


def test_malformed_inputs_get_qemus_errors() -> None:
    cases = {
        b'{"foo\n': "JSON parse error, stray '\"foo\n'",
        b"}\n": "JSON parse error, expecting value",
        b"[1,2]\n": "QMP input must be a JSON object",
        b"123\n": "QMP input must be a JSON object",
        b'"x"\n': "QMP input must be a JSON object",
        b'{"execute":1}\n': "QMP input member 'execute' must be a string",
        b'{"execute":"q","arguments":[]}\n': "QMP input member 'arguments' must be an object",
        b'{"execute":"q","extra":1}\n': "QMP input member 'extra' is unexpected",
        b"nul\n": "JSON parse error, invalid keyword 'nul'",
    }
    for data, desc in cases.items():
        conn = negotiated()
        got = answers(conn.receive_data(data))
        assert got == [{"error": {"class": "GenericError", "desc": desc}}], data
        # The connection goes on after every one of them.
        assert conn.receive_data(b'{"execute":"x"}') == [Command("x", None)]
    lacks = answers(negotiated().receive_data(b'{"id":3}'))
    assert lacks == [{"id": 3, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}]


def test_oversized_message_closes_the_connection() -> None:
    conn = QmpServerConnection(GREETING, max_message=1000)
    conn.receive_data(b'{"execute":"qmp_capabilities"}')
    events = conn.receive_data(b'{"execute":"x","arguments":{"a":"' + b"y" * 2000)
    assert len(events) == 1 and isinstance(events[0], MessageTooLarge)
    assert conn.closed
    assert conn.receive_data(b'"}}') == []


def test_oversized_complete_message_in_one_chunk() -> None:
    conn = QmpServerConnection(GREETING, max_message=100)
    events = conn.receive_data(b'{"execute":"' + b"x" * 200 + b'"}')
    assert isinstance(events[-1], MessageTooLarge)


def test_reply_bytes_echo_the_peers_id() -> None:
    conn = negotiated()
    cmd = Command("q", None, [1, {"x": None}], True)
    assert json.loads(conn.reply_bytes(cmd, {"return": {"a": 1}})) == {"return": {"a": 1}, "id": [1, {"x": None}]}
    err = json.loads(conn.reply_bytes(cmd, {"error": {"class": "GenericError", "desc": "no"}}))
    assert err == {"id": [1, {"x": None}], "error": {"class": "GenericError", "desc": "no"}}
    assert "id" not in json.loads(conn.reply_bytes(Command("q", None), {"return": {}}))


def test_literals_qemu_rejects_keep_the_request_and_its_id() -> None:
    """NaN, Infinity, 1e400 and integers beyond int64/uint64 are read as markers, not errors: the command (and its
    id) survives, so the core can refuse it with an ordinary error instead of losing track of the request."""
    conn = negotiated()
    big = "9" * 5000
    data = (b'{"execute": "x", "id": 7, "arguments": {"a": NaN, "b": [Infinity, -Infinity], "c": 1e400, "d": '
            + big.encode() + b', "e": 18446744073709551616, "f": -9223372036854775809, "ok": 18446744073709551615}}')
    [command] = conn.receive_data(data)
    assert isinstance(command, Command) and command.id == 7
    args = command.arguments
    assert args is not None and args["ok"] == UINT_MAX
    assert all(isinstance(v, InvalidLiteral) for v in (args["a"], *args["b"], args["c"], args["d"], args["e"],
                                                      args["f"]))
    assert arguments_problem(args) is not None
    [answer] = conn.receive_data(b'{"execute": "x", "id": NaN}\n')
    assert isinstance(answer, Answer)
    assert json.loads(answer.data) == {"error": {"class": "GenericError", "desc": (
        "QMP input member 'id' holds a number or constant that is not valid JSON")}}
    [answer] = conn.receive_data(b"NaN ")
    assert json.loads(answer.data)["error"]["desc"] == "JSON parse error, invalid keyword 'NaN'"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_fuzz_random_bytes_never_raise(chunks: list[bytes]) -> None:
    conn = QmpServerConnection(GREETING, max_message=512)
    for chunk in chunks:
        for event in conn.receive_data(chunk):
            assert isinstance(event, Answer | Command | Negotiated | MessageTooLarge)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(INT_MIN, UINT_MAX) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({"execute": st.text(min_size=1)},
                                      optional={"arguments": st.dictionaries(st.text(), _json_values, max_size=3),
                                                "id": _json_values}), max_size=5),
       st.data())
def test_fuzz_valid_commands_survive_any_split(messages: list[dict[str, Any]], data: st.DataObject) -> None:
    stream = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    conn = negotiated()
    events: list[Event] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += conn.receive_data(stream[start:end])
    commands = [e for e in events if isinstance(e, Command)]
    expected = [m for m in messages if m["execute"] != "qmp_capabilities"]
    assert [(c.name, c.arguments, c.id) for c in commands] == [
        (m["execute"], m.get("arguments"), m.get("id")) for m in expected]
