"""QEMU's JSON reader and printer (clients/agent/qemu_json.py) and qemu-ga's side of the protocol
(protocol.AgentServerConnection), sans-IO. The expected texts are what the host's qemu-ga 7.2 answers (recorded
with it; tests/test_agent_framing.py compares the proxy with a live qemu-ga)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.agent.protocol import AgentServerConnection, Answer, Request
from clients.agent.qemu_json import (
    JsonStreamer,
    ParseError,
    RawJson,
    Value,
    plain,
    qdict_ordered,
    to_json,
    to_json_pieces,
)

STRAY_FF = ParseError("JSON parse error, stray '\ufffd'")


def feed_all(data: bytes, streamer: JsonStreamer | None = None) -> list[Value | ParseError]:
    return (streamer or JsonStreamer()).feed(data)


@pytest.mark.parametrize(("data", "events"), [
    # Framing: no newline, several values per read, a value on its own when it balances.
    (b'{"execute":"guest-ping"}', [Value({"execute": "guest-ping"})]),
    (b'{"a":1}{"b":2} [3]\n', [Value({"a": 1}), Value({"b": 2}), Value([3])]),
    (b'1 "x" true null ', [Value(1), Value("x"), Value(True), Value(None)]),
    (b"1", []),  # a number ends only when the next byte comes
    # 0xFF: an error of its own wherever it is, and the value so far is dropped.
    (b'\xff{"a":1}\xff', [STRAY_FF, Value({"a": 1}), STRAY_FF]),
    (b'{"a":\xff{"b":1}', [STRAY_FF, Value({"b": 1})]),
    (b'{"a":"x\xffy"}{"b":1}', [ParseError("JSON parse error, stray '\"x\ufffd'"),
                                ParseError("JSON parse error, expecting value"), Value({"b": 1})]),
    (b"\xff\xff", [STRAY_FF, STRAY_FF]),
    # Lexical errors skip to the next structural character, control character or 0xFF.
    (b"hello world\n", [ParseError("JSON parse error, invalid keyword 'hello'"),
                        ParseError("JSON parse error, invalid keyword 'world'")]),
    (b"\x00\x01{}", [ParseError("JSON parse error, stray ''"), ParseError("JSON parse error, stray '\x01'"),
                     Value({})]),
    (b"01 -x 1.x {}", [ParseError("JSON parse error, stray '01'"), Value({})]),
    (b"0e5 ", [Value(0), ParseError("JSON parse error, invalid keyword 'e'"), Value(5)]),
    (b"Abc,1 ", [ParseError("JSON parse error, stray 'A'"), ParseError("JSON parse error, expecting value"),
                 Value(1)]),
    # The parser: QEMU's grammar and first error.
    (b"{'a':'b\\'c\"'}", [Value({"a": "b'c\""})]),
    (b'{"a" 1}', [ParseError("JSON parse error, missing : in object pair")]),
    (b'{"a":1,}', [ParseError("JSON parse error, expecting value")]),
    (b"{1:2}", [ParseError("JSON parse error, key is not a string in object")]),
    (b'{"a":1 "b":2}', [ParseError("JSON parse error, expected separator in dict")]),
    (b"[1 2]", [ParseError("JSON parse error, expected separator in list")]),
    (b'{"a":1,"a":2}', [ParseError("JSON parse error, duplicate key")]),
    (b"[}]", [ParseError("JSON parse error, expecting value"), ParseError("JSON parse error, expecting value")]),
    (b'"\\x"', [ParseError("JSON parse error, invalid escape sequence in string")]),
    (b'"\\u12"', [ParseError("JSON parse error, \\u12\" is not a valid Unicode character")]),
    (b'"\\uFFFE" "\\ud800x" "\\ud83f\\udffe"', [
        ParseError("JSON parse error, \\uFFFE is not a valid Unicode character"),
        ParseError("JSON parse error, \\ud800 is not a valid Unicode character"),
        ParseError("JSON parse error, \\ud83f\\udffe is not a valid Unicode character")]),
    (b'"\xef\xbf\xbe" "\xc1\x81"', [ParseError("JSON parse error, invalid UTF-8 sequence in string")] * 2),
    (b'"a\xc0\x80b" "\\u0000" "\\ud83d\\ude00"', [Value("a\0b"), Value("\0"), Value("\U0001f600")]),
    (b"[18446744073709551615,18446744073709551616,-9223372036854775809,-0,1.0]",
     [Value([18446744073709551615, 1.8446744073709552e19, -9.2233720368547758e18, 0, 1.0])]),
    (b"nul ", [ParseError("JSON parse error, invalid keyword 'nul'")]),
])
def test_reads_as_qemu_does(data: bytes, events: list[Value | ParseError]) -> None:
    assert feed_all(data) == events
    streamer = JsonStreamer()  # a byte at a time: the same
    assert [event for byte in data for event in streamer.feed(bytes([byte]))] == events


def test_objects_come_in_qdict_order() -> None:
    """QEMU iterates a QDict by hash bucket: echoed ids and the member an error names follow that order."""
    assert list(feed_all(b'{"b":1,"a":2,"zz":3,"aa":4,"execute":5}')[0].value) == ["aa", "a", "execute", "zz", "b"]
    assert list(qdict_ordered({"return": 1, "id": 2})) == ["return", "id"]
    assert list(qdict_ordered({"error": 1, "id": 2})) == ["id", "error"]
    long_key = "k" * 100  # the hash's long-key path agrees with its byte-by-byte definition
    assert list(qdict_ordered({long_key: 1, "a": 2})) == list(qdict_ordered({"a": 2, long_key: 1}))


def test_printed_as_qemu_prints() -> None:
    value = feed_all(b'{"b":1,"a":[1.5,0.1,1e400,-0,"\\u00e9\\ud83d\\ude00x\\u007f\\\\u00e9",null,true,{}]}')[0].value
    assert to_json(value) == (b'{"a": [1.5, 0.10000000000000001, inf, 0, "\\u00E9\\uD83D\\uDE00x\\u007F\\\\u00e9", '
                              b'null, true, {}], "b": 1}')
    deep: object = []
    for _ in range(100_000):  # far deeper than Python's recursion
        deep = [deep]
    assert to_json(deep) == b"[" * 100_001 + b"]" * 100_001
    with pytest.raises(TypeError):
        to_json({"x": object()})


def test_limits_refuse_with_qemu_texts_and_reading_goes_on() -> None:
    # A token growing past the size limit is cut there; what follows is read afresh.
    assert feed_all(b'{"a":"' + b"A" * 70 + b'"}{}', JsonStreamer(max_token_size=64)) == [
        ParseError("JSON token size limit exceeded"), ParseError("JSON parse error, stray 'A'"),
        ParseError("JSON parse error, expecting value"), Value({})]
    assert feed_all(b"[" + b"1," * 40 + b"1]", JsonStreamer(max_token_size=64))[0] == ParseError(
        "JSON token size limit exceeded")
    assert feed_all(b"[1,2,3,4,5]", JsonStreamer(max_token_count=8)) == [
        ParseError("JSON token count limit exceeded"), Value(5), ParseError("JSON parse error, expecting value")]
    assert feed_all(b"[[[[1]]]]", JsonStreamer(max_nesting=3)) == [
        ParseError("JSON nesting depth limit exceeded"), Value(1)] + [ParseError(
            "JSON parse error, expecting value")] * 4
    # QEMU's own nesting limit (1024) and a value nested right up to it.
    (deepest,) = feed_all(b"[" * 1024 + b"]" * 1024)  # (compared as printed: == on it would recurse too deep)
    assert isinstance(deepest, Value) and to_json(deepest.value) == b"[" * 1024 + b"]" * 1024
    assert feed_all(b"[" * 1025 + b"]" * 1025)[0] == ParseError("JSON nesting depth limit exceeded")


_PIECES = st.sampled_from([b"{", b"}", b"[", b"]", b":", b",", b'"a"', b"'b'", b"1", b"-2.5e3", b"0", b"true",
                           b"nul", b" ", b"\n", b"\xff", b"\x00", b'"\\u00e9', b"\\", b'"', b"\xc3", b"e", b"."])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_PIECES | st.binary(max_size=8), max_size=60), seed=st.integers(0, 1 << 30),
       small=st.booleans(), raw=st.booleans())
def test_split_anywhere_same_events_bounded_memory(parts: list[bytes], seed: int, small: bool, raw: bool) -> None:
    data = b"".join(parts)
    limits: dict[str, int] = {"max_token_size": 32, "max_token_count": 12, "max_nesting": 4} if small else {}
    if raw:
        limits["raw_strings_from"] = 4
    whole = JsonStreamer(**limits).feed(data)
    streamer = JsonStreamer(**limits)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(8)))) if len(data) > 1 else []
    split: list[Value | ParseError] = []
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        split += streamer.feed(data[start:end])
        if small:
            assert streamer.buffered <= 2 * 32 + 1
    assert split == whole


def test_server_side_answers_and_requests() -> None:
    conn = AgentServerConnection(max_token_size=1 << 20, max_token_count=1 << 16)
    events = conn.receive_data(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":1732998000123}}'
                               b'{"execute":"guest-info","id":{"b":1,"a":2}}[1]{"id":7}'
                               b'{"execute":"guest-exec","arguments":{"path":"/bin/true"}}')
    assert events[:2] == [Answer(b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray '
                                 b'\'\\uFFFD\'"}}\n'), Answer(b'\xff{"return": 1732998000123}\n')]
    info = events[2]
    assert info == Request("guest-info", None, {"a": 2, "b": 1}, True)
    assert isinstance(info, Request)
    assert conn.return_bytes(info, {"version": "7.2"}) == b'{"return": {"version": "7.2"}, "id": {"a": 2, "b": 1}}\n'
    assert conn.error_bytes(info, "CommandNotFound", "no") == (
        b'{"id": {"a": 2, "b": 1}, "error": {"class": "CommandNotFound", "desc": "no"}}\n')
    assert events[3:] == [
        Answer(b'{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}\n'),
        Answer(b'{"id": 7, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\n'),
        Request("guest-exec", {"path": "/bin/true"})]
    assert conn.buffered == 0


@pytest.mark.parametrize(("arguments", "answer"), [
    (b'{"id":-5}', b'{"return": -5}'),
    (b"{}", b'{"error": {"class": "GenericError", "desc": "Parameter \'id\' is missing"}}'),
    (b'{"id":"1"}', b'{"error": {"class": "GenericError", "desc": "Invalid parameter type for \'id\', expected: '
                    b'integer"}}'),
    (b'{"id":1.0}', b'{"error": {"class": "GenericError", "desc": "Invalid parameter type for \'id\', expected: '
                    b'integer"}}'),
    (b'{"id":9223372036854775808}', b'{"error": {"class": "GenericError", "desc": "Invalid parameter type for '
                                    b'\'id\', expected: integer"}}'),
    (b'{"id":1,"x":2}', b'{"error": {"class": "GenericError", "desc": "Parameter \'x\' is unexpected"}}'),
])
def test_guest_sync_checks_its_argument_as_qemu_ga(arguments: bytes, answer: bytes) -> None:
    conn = AgentServerConnection(max_token_size=1 << 20, max_token_count=1 << 16)
    assert conn.receive_data(b'{"execute":"guest-sync","arguments":' + arguments + b"}") == [Answer(answer + b"\n")]


def test_big_strings_stay_raw_and_print_as_they_came() -> None:
    """A long string that needs no decoding (base64 data) is kept as read, whether it came whole or in pieces,
    and printed back unchanged; one that needs decoding, and every key, is decoded as usual."""
    data = b"QUFB" * 50_000
    reply = b'{"return": {"count": 150000, "buf-b64": "' + data + b'", "eof": false}}'
    for pieces in ([reply], [reply[i:i + 4096] for i in range(0, len(reply), 4096)]):
        streamer = JsonStreamer(raw_strings_from=1024)
        events = [event for piece in pieces for event in streamer.feed(piece)]
        assert len(events) == 1 and isinstance(events[0], Value)
        value = events[0].value
        assert isinstance(value["return"]["buf-b64"], RawJson) and len(value["return"]["buf-b64"]) == len(data)
        assert to_json(value) == reply
        assert any(piece is value["return"]["buf-b64"].text for piece in to_json_pieces(value))  # not copied
        assert plain(value) == {"return": {"count": 150000, "buf-b64": data.decode(), "eof": False}}
    escaped = b'"' + b"a" * 2000 + b'\\n"'
    for text, expected in ((escaped, "a" * 2000 + "\n"), (b'"' + b"\xc3\xa9" * 1000 + b'"', "\u00e9" * 1000),
                           (b'"' + b"\x7f" * 2000 + b'"', "\x7f" * 2000), (b"'" + b"a" * 2000 + b"'", "a" * 2000)):
        (event,) = JsonStreamer(raw_strings_from=1024).feed(b"[" + text + b"]")
        assert event == Value([expected]), text[:20]
    long_key = "k" * 2000
    (event,) = JsonStreamer(raw_strings_from=1024).feed(b'{"' + long_key.encode() + b'": 1}')
    assert event == Value({long_key: 1})
    deep = [[[RawJson(b'"' + b"A" * 10 + b'"')]]] * 2
    assert plain(deep) == [[[("A" * 10)]]] * 2 and isinstance(deep[0][0][0], RawJson)  # (copied, not changed)
