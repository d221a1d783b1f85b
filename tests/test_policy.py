"""The QMP policy file: defaults, patterns, precedence, and clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from core_daemon.policy import DEFAULT_POLICY, PolicyError, load_policy, parse_policy


def test_defaults_management_full_client_no_host_access() -> None:
    assert DEFAULT_POLICY.allows("qmp", "human-monitor-command")
    assert DEFAULT_POLICY.allows("client", "query-status")
    for command in ("human-monitor-command", "getfd", "add-fd", "object-add", "chardev-add", "screendump",
                    "x-exit-preconfig", "migrate"):
        assert not DEFAULT_POLICY.allows("client", command), command


def test_deny_wins_over_allow_and_patterns_match() -> None:
    policy = parse_policy("""
[sockets.qmp]
default = "deny"
allow = ["query-*", "stop"]
deny = ["query-qmp-schema"]
""")
    assert policy.allows("qmp", "query-status")
    assert policy.allows("qmp", "stop")
    assert not policy.allows("qmp", "query-qmp-schema")
    assert not policy.allows("qmp", "cont")
    assert policy.allows("qmp", "qmp_capabilities")
    # Sockets the file does not name keep their defaults.
    assert not policy.allows("client", "getfd")
    assert policy.allows("qmp-tcp", "getfd")


@pytest.mark.parametrize("text, message", [
    ("[sockets.nope]\n", "unknown socket 'nope'"),
    ("[sockets.qmp]\ndefault = 'maybe'\n", "default must be"),
    ("[sockets.qmp]\ndeny = 'stop'\n", "must be a list"),
    ("[sockets.qmp]\nallowed = []\n", "unknown key"),
    ("[other]\n", "unknown section"),
    ("[sockets.qmp\n", "not valid TOML"),
])
def test_bad_files_give_clear_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text, "test.toml")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
    assert load_policy(None) is DEFAULT_POLICY


def test_tables_replace_only_the_keys_they_give_and_the_host_access_macro() -> None:
    # Only allow given: the client's default deny list stays.
    policy = parse_policy('[sockets.client]\nallow = ["migrate"]\n')
    assert not policy.allows("client", "human-monitor-command")
    assert not policy.allows("client", "migrate")  # deny wins over allow
    assert policy.host_access_allowed("client") == []
    # deny given: replaces, and @host-access brings the defaults back explicitly.
    loose = parse_policy('[sockets.client]\ndeny = ["stop"]\n')
    assert loose.allows("client", "human-monitor-command")
    assert "human-monitor-command" in loose.host_access_allowed("client")
    strict = parse_policy('[sockets.client]\ndeny = ["@host-access", "stop"]\n')
    assert not strict.allows("client", "getfd") and not strict.allows("client", "stop")
    with pytest.raises(PolicyError, match="unknown group '@nope'"):
        parse_policy('[sockets.qmp]\ndeny = ["@nope"]\n')
