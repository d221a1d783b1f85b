"""The core's check of what may reach QEMU (core_daemon/qmp_values.py), without QEMU: each limit, each literal."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_daemon.qmp_values import (
    INT_MIN,
    MAX_DEPTH,
    MAX_TOKENS,
    UINT_MAX,
    InvalidLiteral,
    arguments_problem,
    lenient_decoder,
    reserved_problem,
)


@pytest.mark.parametrize(("arguments", "expected"), [
    ({"a": float("nan")}, "'a': nan is not a JSON number"),
    ({"a": [1, float("inf")]}, "'a[1]': inf is not a JSON number"),
    ({"a": UINT_MAX + 1}, "'a': integer 18446744073709551616 is out of range"),
    ({"a": INT_MIN - 1}, "out of range"),
    ({"a": {"b": "\ud800"}}, "'a.b' is not valid Unicode (a lone surrogate)"),
    ({"\udfff": 1}, "a key of 'arguments' is not valid Unicode"),
    ({"a": "x\x00y"}, "'a' contains \\u0000"),
    ({"a": b"bytes"}, "'a': a bytes is not a JSON value"),
    ({"a": InvalidLiteral("NaN", "is not a JSON value")}, "'a': NaN is not a JSON value"),
    ({1: 2}, "has a key that is not a string"),
])
def test_each_value_qemu_rejects_is_named(arguments: dict[Any, Any], expected: str) -> None:
    problem = arguments_problem(arguments)
    assert problem is not None and expected in problem


def test_limits() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert arguments_problem({"a": deep}) is not None and "deeper" in str(arguments_problem({"a": deep}))
    assert arguments_problem({"a": deep[0]}) is None
    # The case: 700000 empty objects are 2.1 M tokens, over QEMU's 2 M.
    assert "too many JSON tokens" in str(arguments_problem({"a": [{}] * 700_000}))
    assert arguments_problem({"a": [{}] * (MAX_TOKENS // 5)}) is None
    assert arguments_problem(None) is None
    assert arguments_problem({"ok": [INT_MIN, UINT_MAX, 1.5, True, None, "ünïcode ✓", {"x": []}]}) is None


def test_lenient_decoder_marks_instead_of_failing() -> None:
    value = lenient_decoder.decode('{"a": [NaN, -Infinity, 1e999, ' + "1" * 30 + ", 12, 1.5]}")
    assert [type(v) for v in value["a"]] == [InvalidLiteral] * 4 + [int, float]


@pytest.mark.parametrize(("name", "arguments"), [
    ("yank", {"instances": [{"type": "chardev", "id": "vmfront-qmp"}]}),
    ("chardev-remove", {"id": "vmfront-qga"}),
    ("device_del", {"id": "vmfront-vserial"}),
    ("display-update", {"type": "vnc", "addresses": []}),
    ("display-reload", {"type": "vnc", "tls-certs": True}),
])
def test_the_cores_own_links_are_refused(name: str, arguments: dict[str, Any]) -> None:
    assert reserved_problem(name, arguments) is not None


def test_other_ids_pass() -> None:
    assert reserved_problem("yank", {"instances": [{"type": "chardev", "id": "serial0"}, {"type": "migration"}]}) \
        is None
    assert reserved_problem("device_del", {"id": "disk1"}) is None
    assert reserved_problem("set_password", {"protocol": "spice", "password": "x"}) is None


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4), max_leaves=20))
def test_accepted_values_are_strict_json(value: Any) -> None:
    """Whatever the check lets through serialises as strict UTF-8 JSON (what QEMU's parser takes)."""
    import json

    if arguments_problem({"v": value}) is None:
        json.dumps({"v": value}, allow_nan=False).encode("utf-8")
