"""The control channel's wire format (ipc/messages.py): round trips, strict validation, fuzzing, and the docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc import messages
from ipc.messages import (
    EVENT_KINDS,
    MAX_CLIPBOARD,
    MAX_DEPTH,
    MAX_FRAME,
    MESSAGE_TYPES,
    OPS,
    AgentAckOp,
    AgentData,
    AgentWriteOp,
    Broadcast,
    Bye,
    ClipboardChanged,
    ClipboardSetOp,
    ConsoleData,
    ConsoleWriteOp,
    DisplayChanged,
    EncodeError,
    ErrorCode,
    ErrorFrame,
    ErrorInfo,
    EventBody,
    Heartbeat,
    Hello,
    InputOp,
    KeyEvent,
    Message,
    Migrated,
    Migrating,
    Op,
    PointerEvent,
    ProtocolError,
    QmpEvent,
    QmpOp,
    RefreshOp,
    ReleaseInputOp,
    Reply,
    Request,
    RunStateChanged,
    Shutdown,
    VncAddress,
    VncAuthOp,
    VncReload,
    VncSettings,
    VncStateOp,
    VncViewer,
    VncViewerOp,
    Welcome,
    WheelEvent,
    choose_version,
    decode,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "control.md"

# --- strategies (also used by test_ipc_channel.py) ----------------------------------------------------------

ids = st.integers(0, messages.MAX_ID)
names = st.text(max_size=24)
nonempty = st.text(min_size=1, max_size=24)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
any_values = st.recursive(
    scalars | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
qmp_arguments = st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
capabilities = st.lists(st.text(max_size=16), max_size=6).map(tuple)

key_events = st.builds(KeyEvent, down=st.booleans(), qcode=st.text(min_size=1, max_size=32)) | st.builds(
    KeyEvent, down=st.booleans(), scancode=st.integers(1, 0xE07F))
pointer_events = st.builds(PointerEvent, x=st.integers(0, 0xFFFF), y=st.integers(0, 0xFFFF),
                           buttons=st.integers(0, 0xFF))
wheel_events = st.builds(WheelEvent, steps=st.integers(-64, 64))
ops = st.one_of(
    st.builds(QmpOp, command=nonempty, arguments=qmp_arguments),
    st.builds(InputOp, events=st.lists(key_events | pointer_events | wheel_events, max_size=8).map(tuple)),
    st.just(RefreshOp()),
    st.builds(AgentWriteOp, data=st.binary(max_size=64)),
    st.builds(AgentAckOp, frames=st.integers(1, (1 << 63) - 1)),
    st.builds(ConsoleWriteOp, data=st.binary(max_size=64)),
    st.builds(ClipboardSetOp, text=st.text(max_size=64), source=st.text(max_size=8)),
    st.builds(VncStateOp, servers=st.lists(st.builds(
        VncAddress, host=names, service=names, family=st.sampled_from(messages.VNC_FAMILIES),
        websocket=st.booleans(), vencrypt=st.sampled_from(("", "x509-vnc", "tls-none"))), max_size=3).map(tuple)),
    st.builds(VncViewerOp, event=st.sampled_from(messages.VNC_VIEWER_EVENTS), viewer=st.builds(
        VncViewer, id=st.integers(0, 2**63 - 1), address=st.builds(
            VncAddress, host=names, service=names, family=st.sampled_from(messages.VNC_FAMILIES)),
        server=st.integers(0, 15), initialized=st.booleans(), x509_dname=names)),
    st.builds(VncAuthOp, viewer=st.integers(0, 2**63 - 1), host=names, challenge=st.binary(min_size=16, max_size=16),
              response=st.binary(min_size=16, max_size=16)),
)
qmp_events = st.builds(
    lambda name, data: {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}},
    st.text(max_size=16), st.dictionaries(st.text(max_size=8), json_values, max_size=3))
event_bodies = st.one_of(
    st.builds(QmpEvent, event=qmp_events),
    st.builds(RunStateChanged, state=st.text(min_size=1, max_size=32),
              qemu_status=st.none() | st.text(max_size=32)),
    st.just(Migrating()),
    st.builds(Migrated, endpoint=nonempty),
    st.builds(AgentData, data=st.binary(max_size=64)),
    st.builds(DisplayChanged, shm=st.none() | names, shm_generation=st.none() | st.integers(0, 2**32 - 1),
              display_socket=st.none() | names),
    st.builds(Shutdown, reason=names),
    st.builds(ConsoleData, data=st.binary(max_size=64)),
    st.builds(ClipboardChanged, text=st.text(max_size=64), origin=st.text(max_size=8)),
    st.builds(VncSettings, auth=nonempty),
)
all_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, id=ids, versions=st.lists(st.integers(1, 0xFFFF), min_size=1, max_size=16).map(tuple),
              instance=nonempty, pid=st.integers(0, 2**31 - 1), uid=st.integers(0, 2**32 - 1), client_name=names,
              client_version=names, capabilities=capabilities,
              endpoints=st.dictionaries(nonempty, names, max_size=4).map(lambda d: tuple(d.items())),
              warnings=st.lists(names, max_size=3).map(tuple)),
    st.builds(Welcome, id=ids, version=st.just(1), vm=nonempty, instance=nonempty,
              core_pid=st.integers(0, 2**31 - 1), run_state=st.text(min_size=1, max_size=32),
              heartbeat_interval=st.floats(0.01, 60.0), shm=st.none() | names,
              shm_generation=st.none() | st.integers(0, 2**32 - 1), display_socket=st.none() | names,
              capabilities=capabilities),
    st.builds(Heartbeat, instance=nonempty),
    st.builds(Request, id=ids, body=ops),
    st.builds(Reply, id=ids, result=any_values),
    st.builds(Reply, id=ids, error=st.builds(ErrorInfo, error_class=nonempty, desc=names)),
    st.builds(Broadcast, body=event_bodies),
    st.builds(ErrorFrame, code=nonempty, detail=names, id=st.none() | ids),
    st.builds(Bye, reason=names),
)
valid_frames = all_messages.map(lambda m: m.encode())


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes flipped, inserted, removed, or cut short."""
    frame = bytearray(draw(valid_frames))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(frame) - 1)))
        if action == "flip" and frame:
            frame[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            frame[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and frame:
            del frame[position]
        else:
            del frame[position:]
    return bytes(frame)


_FIELD_NAMES = ["v", "t", "id", "op", "args", "kind", "data", "ok", "result", "error", "code", "detail",
                "versions", "instance", "pid", "uid", "client_name", "events", "command", "arguments", "type",
                "down", "qcode", "scancode", "x", "y", "buttons", "steps", "class", "desc", "event", "state"]


@st.composite
def field_mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame re-packed with one key dropped or given a random value: reaches the field checks."""
    message = msgpack.unpackb(draw(valid_frames), raw=False)

    def mutate(obj: dict[str, Any]) -> None:
        key = draw(st.sampled_from(sorted(obj) + _FIELD_NAMES))
        nested = [k for k, v in obj.items() if isinstance(v, dict)]
        descend: bool = draw(st.booleans())
        if nested and descend:
            mutate(obj[draw(st.sampled_from(nested))])
        elif draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(any_values)

    mutate(message)
    return bytes(msgpack.packb(message, use_bin_type=True))


random_maps = st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=4), any_values, max_size=6).map(
    lambda d: bytes(msgpack.packb(d, use_bin_type=True)))
any_frame = st.one_of(st.binary(max_size=256), mutated_frames(), field_mutated_frames(), random_maps,
                      valid_frames)


# --- round trips --------------------------------------------------------------------------------------------


@given(all_messages)
def test_every_message_round_trips(message: Message) -> None:
    frame = message.encode()
    assert len(frame) <= MAX_FRAME
    assert decode(frame) == message


def test_one_of_every_type_op_and_kind_round_trips() -> None:
    samples = [*SAMPLES, *(Request(1, op) for op in OP_SAMPLES), *(Broadcast(kind) for kind in KIND_SAMPLES)]
    covered = {m.TYPE for m in samples} | {f"op {m.op}" for m in samples if isinstance(m, Request)} | {
        f"kind {m.kind}" for m in samples if isinstance(m, Broadcast)}
    wanted = {m.TYPE for m in MESSAGE_TYPES} | {f"op {o.OP}" for o in OPS} | {f"kind {k.KIND}" for k in EVENT_KINDS}
    assert covered == wanted
    for message in samples:
        assert decode(message.encode()) == message


def test_wire_layout_of_a_request() -> None:
    frame = Request(7, QmpOp("query-status")).encode()
    assert msgpack.unpackb(frame) == {"v": 1, "t": "request", "id": 7, "op": "qmp",
                                      "args": {"command": "query-status"}}
    frame = Request(8, InputOp((KeyEvent(True, qcode="a"), PointerEvent(1, 2, 1), WheelEvent(-1)))).encode()
    assert msgpack.unpackb(frame)["args"]["events"] == [
        {"type": "key", "down": True, "qcode": "a"}, {"type": "pointer", "x": 1, "y": 2, "buttons": 1},
        {"type": "wheel", "steps": -1}]


# --- fuzzing: nothing but ProtocolError ---------------------------------------------------------------------


def decode_or_protocol_error(frame: bytes) -> Message | ProtocolError:
    try:
        return decode(frame)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.msg_id is None or 0 <= exc.msg_id <= messages.MAX_ID
        return exc


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_give_only_protocol_errors(frame: bytes) -> None:
    decode_or_protocol_error(frame)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_frames(), field_mutated_frames(), random_maps))
def test_mutated_frames_give_a_message_or_a_protocol_error(frame: bytes) -> None:
    result = decode_or_protocol_error(frame)
    if not isinstance(result, ProtocolError):
        assert decode(result.encode()) == result  # whatever is accepted is a well-formed message


@pytest.mark.parametrize(("frame", "code"), [
    (b"", ErrorCode.MALFORMED),
    (b"\xc1", ErrorCode.MALFORMED),  # never used in msgpack
    (msgpack.packb([1, 2]), ErrorCode.MALFORMED),
    (msgpack.packb({1: 2}), ErrorCode.MALFORMED),  # strict_map_key
    (msgpack.packb({"v": 1, "t": "heartbeat", "instance": "a"}) + b"\x00", ErrorCode.MALFORMED),  # trailing
    (msgpack.packb(msgpack.ExtType(1, b"xyz")), ErrorCode.MALFORMED),
    (b"\x91" * 5000 + b"\x00", ErrorCode.MALFORMED),  # nested deeper than msgpack's own stack
    (b"\x00" * (MAX_FRAME + 1), ErrorCode.TOO_LARGE),
    (msgpack.packb({"t": "heartbeat", "instance": "a"}), ErrorCode.INVALID),
    (msgpack.packb({"v": True, "t": "heartbeat", "instance": "a"}), ErrorCode.INVALID),  # a bool is not an int
    (msgpack.packb({"v": 1, "t": "teleport"}), ErrorCode.UNKNOWN_TYPE),
    (msgpack.packb({"v": 2, "t": "heartbeat", "instance": "a"}), ErrorCode.UNSUPPORTED_VERSION),
    (msgpack.packb({"v": 1, "t": "request", "id": 3, "op": "teleport"}), ErrorCode.UNKNOWN_OP),
    (msgpack.packb({"v": 1, "t": "event", "kind": "teleport"}), ErrorCode.UNKNOWN_KIND),
    (msgpack.packb({"v": 1, "t": "request", "id": -1, "op": "refresh"}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "qmp", "args": {"command": ""}}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "qmp",
                    "args": {"command": "x", "arguments": {"a": b"bin"}}}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "qmp",
                    "args": {"command": "x", "arguments": {"a": float("nan")}}}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "input",
                    "args": {"events": [{"type": "key", "down": True}]}}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "input",
                    "args": {"events": [{"type": "key", "down": 1, "qcode": "a"}]}}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "input",
                    "args": {"events": [{"type": "pointer", "x": -1, "y": 0, "buttons": 0}]}}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "agent_write", "args": {"data": "text"}}),
     ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "hello", "id": 1, "versions": [], "instance": "i", "pid": 1, "uid": 0,
                    "client_name": "c", "client_version": ""}), ErrorCode.INVALID),
    (msgpack.packb({"v": 1, "t": "reply", "id": 1, "ok": False}), ErrorCode.INVALID),
])
def test_specific_bad_frames(frame: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(frame)
    assert caught.value.code is code


def test_protocol_error_carries_the_id_and_type_when_readable() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(msgpack.packb({"v": 1, "t": "request", "id": 42, "op": "teleport"}))
    assert (caught.value.msg_id, caught.value.msg_type) == (42, "request")


def test_free_form_values_are_limited_in_depth() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    too_deep = Request(1, QmpOp("x", {"a": deep}))  # the arguments map is one more level
    with pytest.raises(ProtocolError, match="deeper"):
        decode(too_deep.encode())
    shallow = Request(1, QmpOp("x", {"a": [[["leaf"]]]}))
    assert decode(shallow.encode()) == shallow


def test_hello_and_error_are_readable_in_any_version() -> None:
    hello = {"v": 9, "t": "hello", "id": 1, "versions": [9, 1], "instance": "i", "pid": 1, "uid": 0,
             "client_name": "c", "client_version": "", "future_field": [1, 2]}
    decoded = decode(msgpack.packb(hello))
    assert isinstance(decoded, Hello) and decoded.versions == (9, 1)
    error = decode(msgpack.packb({"v": 9, "t": "error", "code": "unsupported-version", "detail": "x", "id": 1}))
    assert error == ErrorFrame("unsupported-version", "x", 1)


def test_unknown_keys_are_ignored() -> None:
    frame = msgpack.packb({"v": 1, "t": "heartbeat", "instance": "a", "load": 0.5})
    assert decode(frame) == Heartbeat("a")


def test_version_choice() -> None:
    assert choose_version([1]) == 1
    assert choose_version([3, 2, 1], supported=[1, 2]) == 2
    assert choose_version([2, 3]) is None


def test_encoding_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(EncodeError):
        Reply(1, result=object()).encode()
    with pytest.raises(EncodeError):
        Reply(1, result=b"x" * MAX_FRAME).encode()
    long_text = Reply(1, error=ErrorInfo("GenericError", "x" * (messages.MAX_TEXT * 2)))
    decoded = decode(long_text.encode())  # free text is cut so the peer accepts it
    assert isinstance(decoded, Reply) and decoded.error is not None
    assert len(decoded.error.desc) == messages.MAX_TEXT


# --- docs/control.md mirrors the code -----------------------------------------------------------------------


def doc_sections() -> dict[str, list[list[str]]]:
    """Rows (cells without backticks) of the tables under each ``### heading`` of docs/control.md."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            current = line[4:].replace("`", "").strip()
            sections[current] = []
        elif line.startswith("## "):
            current = None
        elif current and line.startswith("| ") and not line.startswith("| ---"):
            sections[current].append([cell.strip().replace("`", "") for cell in line.strip("|").split("|")])
    return sections


def field_rows(section: list[list[str]]) -> set[str]:
    """Field names of a section's (field | type | meaning) table."""
    return {row[0] for row in section[1:] if len(row) == 3}


def encoded_keys(frame: bytes, *path: str) -> set[str]:
    data = msgpack.unpackb(frame, raw=False)
    for key in path:
        data = data[key]
    return set(data)


SAMPLES: list[Message] = [
    Hello(1, (1,), "i", 1, 0, "c", "", ("qmp",), (("vnc", "127.0.0.1:5900"),), ("VNC listens on ...",)),
    Welcome(1, 1, "vm", "i", 1, "running", 1.0),
    Heartbeat("i"),
    Request(1, QmpOp("x", {})),
    Reply(1, None),
    Broadcast(Migrating()),
    ErrorFrame("malformed", "x", 1),
    Bye("x"),
]
VNC_VIEWER = VncViewer(3, VncAddress("127.0.0.1", "50112", "ipv4"), 0, True)
OP_SAMPLES: list[Op] = [QmpOp("x", {}), InputOp((KeyEvent(True, qcode="a"),), "vnc#1"), ReleaseInputOp("vnc#1"),
                        RefreshOp(), AgentWriteOp(b""), AgentAckOp(16), ConsoleWriteOp(b""),
                        ClipboardSetOp("héllo", "vnc#1"),
                        VncStateOp((VncAddress("127.0.0.1", "5900", "ipv4"),), (VNC_VIEWER,)),
                        VncViewerOp("connected", VNC_VIEWER), VncAuthOp(3, "127.0.0.1", bytes(16), bytes(16))]
KIND_SAMPLES: list[EventBody] = [
    QmpEvent({"event": "X"}), RunStateChanged("running"), Migrating(), Migrated("e"), AgentData(b""),
    DisplayChanged(None, None, None), Shutdown("x"), ConsoleData(b""), VncReload(tls_certs=True),
    ClipboardChanged("héllo", "abc/vnc#1"), VncSettings("vnc")]


def test_docs_list_every_message_type_and_field() -> None:
    sections = doc_sections()
    assert [s.TYPE for s in SAMPLES] == [m.TYPE for m in MESSAGE_TYPES]
    for sample in SAMPLES:
        documented = field_rows(sections[sample.TYPE])
        wire = encoded_keys(sample.encode()) - {"v", "t"}
        if isinstance(sample, Reply):
            wire |= {"error"}
        assert documented == wire, sample.TYPE


def test_docs_list_every_op_and_kind_with_their_fields() -> None:
    sections = doc_sections()
    assert [o.OP for o in OP_SAMPLES] == [o.OP for o in OPS]
    for op in OP_SAMPLES:
        documented = field_rows(sections[f"op {op.OP}"])
        assert documented == encoded_keys(Request(1, op).encode(), "args"), op.OP
    assert [k.KIND for k in KIND_SAMPLES] == [k.KIND for k in EVENT_KINDS]
    for kind in KIND_SAMPLES:
        documented = field_rows(sections[f"kind {kind.KIND}"])
        assert documented == encoded_keys(Broadcast(kind).encode(), "data"), kind.KIND
    input_rows = {(row[0], row[1]) for row in sections["op input"] if len(row) == 4}
    wire = set()
    for event in (KeyEvent(True, qcode="a"), KeyEvent(True, scancode=1), PointerEvent(0, 0), WheelEvent(1)):
        element = msgpack.unpackb(Request(1, InputOp((event,))).encode(), raw=False)["args"]["events"][0]
        wire |= {(element["type"], key) for key in element if key != "type"}
    assert input_rows - {("type", "field")} == wire


def test_docs_list_every_error_code_and_capability() -> None:
    text = DOC.read_text()
    table = re.search(r"^\| code \| when \|\n(.*?)\n\n", text, re.S | re.M)
    assert table is not None
    codes = set(re.findall(r"^\| `([a-z-]+)` \|", table.group(1), re.M))
    assert codes == {code.value for code in ErrorCode}
    capability_rows = set(re.findall(r"^\| `([a-z-]+)` \| (?:op|kind) ", text, re.M))
    assert capability_rows == {c.value for c in messages.Capability}
    assert f"{MAX_FRAME >> 20} MiB" in text


input_event_maps = st.fixed_dictionaries(
    {"type": st.sampled_from(["key", "pointer", "wheel", "mouse"])},
    optional={key: st.none() | st.booleans() | st.integers(-70000, 70000) | st.text(max_size=40)
              for key in ("down", "qcode", "scancode", "x", "y", "buttons", "steps")})


@settings(max_examples=500)
@given(input_event_maps)
def test_the_input_fast_path_agrees_with_the_checked_parser(event: dict[str, Any]) -> None:
    frame = msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "input", "args": {"events": [event]}})
    fast = messages._fast_input_event(msgpack.unpackb(frame)["args"]["events"][0])
    try:
        checked = decode(frame)
    except ProtocolError:
        assert fast is None
    else:
        assert isinstance(checked, Request) and isinstance(checked.body, InputOp)
        assert fast is None or checked.body.events == (fast,)


def test_clipboard_text_is_bounded_in_bytes_not_characters() -> None:
    """1 MiB of UTF-8 passes; a string of fewer characters but more bytes, or a lone surrogate, does not."""
    ok = Request(1, ClipboardSetOp("é" * (MAX_CLIPBOARD // 2))).encode()
    assert decode(ok) == Request(1, ClipboardSetOp("é" * (MAX_CLIPBOARD // 2)))
    for text, code in (("é" * (MAX_CLIPBOARD // 2 + 1), ErrorCode.INVALID), ("\ud800", ErrorCode.MALFORMED)):
        frame = msgpack.packb({"v": 1, "t": "request", "id": 1, "op": "clipboard_set", "args": {"text": text}},
                              use_bin_type=True, unicode_errors="surrogatepass")
        with pytest.raises(ProtocolError) as info:
            decode(frame)
        assert info.value.code == code
