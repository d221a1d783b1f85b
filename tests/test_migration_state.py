"""The core's migration state machine (core_daemon/migration.py) without QEMU: what each command, answer and
event does, and what a core adopting a QEMU concludes from state.json and QEMU's own view."""

from __future__ import annotations

import json
from pathlib import Path

from core_daemon.migration import Migration, find_destination_core, unix_socket_listening
from ipc.rundir import follow_migrations


def test_a_refused_migrate_changes_nothing() -> None:
    m = Migration()
    effects = m.before_migrate({"uri": "unix:/nonexistent/x", "resume": True})
    assert effects.persist and effects.state_fields["outgoing"]["uri"] == "unix:/nonexistent/x"
    effects = m.after_migrate(accepted=False)
    assert effects.state_fields == {"outgoing": None} and m.outgoing is None
    # savevm's MIGRATION events afterwards are not the guest leaving.
    for status in ("setup", "active", "completed"):
        assert m.on_status(status) == type(effects)()
    assert not m.left and m.check_command("cont", None) is None


def test_one_migration_at_a_time_and_its_destination_is_fixed() -> None:
    m = Migration()
    assert m.set_target({"control": "ipc:///run/vmfront/b/control.sock"}) == {"return": {}}
    m.before_migrate({"uri": "unix:/run/vmfront/b/private/migration.sock"})
    m.after_migrate(accepted=True)
    assert m.destination == "ipc:///run/vmfront/b/control.sock"
    assert "already in progress" in m.set_target({"control": "ipc:///run/vmfront/c/control.sock"})["error"]["desc"]
    assert "already in progress" in str(m.check_command("migrate", {"uri": "tcp:x:1"}))
    assert m.destination == "ipc:///run/vmfront/b/control.sock"
    assert m.on_status("active").migrating
    left = m.on_status("completed")
    assert left.left and left.migrated_to == "ipc:///run/vmfront/b/control.sock"
    for command in ("cont", "system_reset", "snapshot-load"):
        assert "has migrated to" in str(m.check_command(command, None))
    assert m.check_command("quit", None) is None and m.check_command("query-status", None) is None
    m.guest_is_here()
    assert m.check_command("cont", None) is None


def test_postcopy_active_means_the_guest_left() -> None:
    m = Migration()
    m.set_target({"control": "ipc:///b"})
    m.before_migrate({"uri": "tcp:127.0.0.1:4444"})
    m.after_migrate(accepted=True)
    assert m.on_status("active").migrating
    effects = m.on_status("postcopy-active")
    assert effects.left and effects.migrated_to == "ipc:///b"
    assert not m.on_status("completed").left  # said once


def test_a_failed_migration_ends_here_and_names_the_destination() -> None:
    m = Migration()
    m.set_target({"control": "ipc:///b"})
    m.before_migrate({"uri": "tcp:127.0.0.1:4444"})
    m.after_migrate(accepted=True)
    effects = m.on_status("failed")
    assert effects.ended_here == "failed" and effects.failed_destination == "ipc:///b" and m.outgoing is None


def test_adoption_from_what_qemu_says() -> None:
    record = {"uri": "unix:/run/vmfront/b/private/migration.sock", "control": "ipc:///b", "started_at": 1.0}
    # The guest left while no core watched: postmigrate and 'completed'.
    m = Migration()
    effects = m.adopt(record, None, {"status": "completed"}, "postmigrate")
    assert effects.left and effects.migrated_to == "ipc:///b"
    # Still migrating: followed from here on.
    m = Migration()
    assert m.adopt(record, None, {"status": "active"}, "running").migrating and m.in_progress
    # Recorded, but QEMU never took the migrate (the core died first): nothing happened.
    m = Migration()
    effects = m.adopt(record, None, {}, "running")
    assert effects.state_fields == {"outgoing": None} and m.outgoing is None
    # A destination's own incoming migration, during and after: not an outgoing one.
    for qmp_status, status in (({"status": "active"}, "inmigrate"), ({"status": "completed"}, "running")):
        m = Migration()
        assert not m.adopt(None, None, qmp_status, status).left and m.outgoing is None
    # Nothing recorded, but QEMU's guest left (an HMP migrate): left, destination unknown.
    m = Migration()
    assert m.adopt(None, None, {"status": "completed"}, "postmigrate").left


def test_destinations_are_found_from_the_uri_and_clients_follow_hops(tmp_path: Path) -> None:
    for name, state in (("a", {"state": "migrated", "migrated_to": f"ipc://{tmp_path / 'b' / 'control.sock'}"}),
                        ("b", {"state": "migrated", "migrated_to": f"ipc://{tmp_path / 'c' / 'control.sock'}"}),
                        ("c", {"state": "running"}),
                        ("d", {"state": "incoming", "incoming": "unix:/somewhere/migration.sock"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps(state))
        (tmp_path / name / "control.sock").touch()
    assert follow_migrations(f"ipc://{tmp_path / 'a' / 'control.sock'}", tmp_path / "a" / "state.json") \
        == f"ipc://{tmp_path / 'c' / 'control.sock'}"
    assert find_destination_core("unix:/somewhere/migration.sock", tmp_path) \
        == f"ipc://{tmp_path / 'd' / 'control.sock'}"
    assert find_destination_core("unix:/elsewhere", tmp_path) is None
    # A loop (a → b → a) ends instead of spinning.
    (tmp_path / "b" / "state.json").write_text(json.dumps({"migrated_to": f"ipc://{tmp_path / 'a' / 'control.sock'}"}))
    assert follow_migrations(f"ipc://{tmp_path / 'a' / 'control.sock'}", tmp_path / "a" / "state.json") \
        == f"ipc://{tmp_path / 'b' / 'control.sock'}"


def test_listening_unix_sockets_are_seen_without_connecting(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "l.sock"
    assert not unix_socket_listening(path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert not unix_socket_listening(path)
        sock.listen()
        assert unix_socket_listening(path)
