"""The QMP policy file: defaults, patterns, precedence, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core_daemon.policy import (
    CLIENT_ALLOWED,
    CLIENT_ARGUMENTS,
    DEFAULT_POLICY,
    HOST_ACCESS_COMMANDS,
    PolicyError,
    load_policy,
    parse_policy,
)


def test_defaults_management_full_client_an_allow_list() -> None:
    assert DEFAULT_POLICY.allows("qmp", "human-monitor-command")
    assert DEFAULT_POLICY.allows("client", "query-status")
    for command in ("human-monitor-command", "getfd", "add-fd", "object-add", "chardev-add", "screendump",
                    "x-exit-preconfig", "yank", "migrate-set-capabilities", "migrate-set-parameters",
                    "migrate_cancel", "migrate-start-postcopy", "blockdev-snapshot-internal-sync", "job-cancel",
                    "block-job-complete", "nbd-server-stop", "block-export-del", "trace-event-set-state",
                    "query-sev-launch-measure", "some-command-qemu-adds-next-year"):
        assert not DEFAULT_POLICY.allows("client", command), command
    # Only with their argument rules (and x-query-* only by name: the x-* pattern is for deny lists).
    guarded = {"migrate", "device_add", "set_password", "expire_password", "change-vnc-password"}
    assert set(HOST_ACCESS_COMMANDS) & set(CLIENT_ALLOWED) == guarded
    assert all(name in CLIENT_ARGUMENTS for name in guarded)
    assert DEFAULT_POLICY.host_access_allowed("client") == []


def test_client_argument_rules() -> None:
    policy = dataclasses.replace(DEFAULT_POLICY, run_root="/run/vmfront")
    ok = [("qom-get", {"path": "/machine/peripheral/dev0", "property": "type"}),
          ("qom-list", {"path": "/machine"}),
          ("migrate", {"uri": "unix:/run/vmfront/dst/migration.sock", "detach": True}),
          ("snapshot-save", {"job-id": "vmfront-savevm-1", "tag": "t", "vmstate": "d", "devices": ["d"]}),
          ("job-dismiss", {"id": "vmfront-savevm-1"}),
          ("set_password", {"protocol": "vnc", "password": "x", "connected": "keep"}),
          ("expire_password", {"protocol": "vnc", "time": "+60"}),
          ("change-vnc-password", {"password": "x"}),
          ("query-status", None)]
    for command, arguments in ok:
        assert policy.refusal("client", command, arguments) is None, (command, arguments)
    denied = [("qom-get", {"path": "/objects/sec0", "property": "data"}, "path \"/objects/sec0\""),
              ("qom-get", {"path": "sec0", "property": "data"}, "path"),  # a partial path resolves anywhere
              ("qom-get", {"path": "/machine/../objects/sec0", "property": "data"}, "path"),
              ("migrate", {"uri": "exec:touch /tmp/x"}, "uri"),
              ("migrate", {"uri": "unix:/var/run/docker.sock"}, "uri"),
              ("migrate", {"uri": "unix:/run/vmfront/x/../../../tmp/migration.sock"}, "uri"),
              ("migrate", {"uri": "tcp:10.0.0.1:4444"}, "uri"),
              ("migrate", {"uri": "unix:/run/vmfront/dst/migration.sock", "blk": True}, "argument 'blk'"),
              ("snapshot-save", {"job-id": "mgmt-job", "tag": "t"}, "job-id"),
              ("job-dismiss", {"id": 1}, "id 1"),
              # SPICE's password is QEMU's SPICE server's, not the client's VNC.
              ("set_password", {"protocol": "spice", "password": "x"}, "protocol \"spice\""),
              ("expire_password", {"protocol": "spice", "time": "now"}, "protocol"),
              ("yank", {"instances": []}, "")]
    for command, arguments, why in denied:
        refusal = policy.refusal("client", command, arguments)
        assert refusal is not None and f"command '{command}'" in refusal and why in refusal, refusal
    assert policy.refusal("qmp", "qom-get", {"path": "/objects/sec0", "property": "data"}) is None


def test_argument_rules_from_a_file() -> None:
    policy = parse_policy("""
[sockets.client]
allow = ["@client", "migrate_cancel"]
[sockets.client.arguments.migrate]
uri = ["tcp:10.1.*"]
""")
    assert policy.refusal("client", "migrate_cancel", None) is None
    assert policy.refusal("client", "migrate", {"uri": "tcp:10.1.2.3:4000"}) is None
    assert policy.refusal("client", "migrate", {"uri": "unix:/run/vmfront/x/migration.sock"}) is not None
    # Rules the file does not give stay: qom-get is still confined to /machine.
    assert policy.refusal("client", "qom-get", {"path": "/objects/x"}) is not None
    with pytest.raises(PolicyError, match="must be a list of patterns"):
        parse_policy('[sockets.client.arguments.migrate]\nuri = "x"\n')


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
    # Only allow given: the client's default (deny) and argument rules stay.
    policy = parse_policy('[sockets.client]\nallow = ["stop"]\n')
    assert policy.allows("client", "stop") and not policy.allows("client", "cont")
    assert policy.host_access_allowed("client") == []
    # A loose table is reported: the core warns about it at start.
    loose = parse_policy('[sockets.client]\ndefault = "allow"\n')
    assert loose.allows("client", "human-monitor-command")
    assert "human-monitor-command" in loose.host_access_allowed("client")
    strict = parse_policy('[sockets.client]\ndefault = "allow"\ndeny = ["@host-access", "stop"]\n')
    assert not strict.allows("client", "getfd") and not strict.allows("client", "stop")
    with pytest.raises(PolicyError, match="unknown group '@nope'"):
        parse_policy('[sockets.qmp]\ndeny = ["@nope"]\n')
