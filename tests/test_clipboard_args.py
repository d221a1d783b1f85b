"""``vmfront core --clipboard`` on the QEMU command line, and ``vmfront migrate``'s check that both sides match.

The devices it adds are QEMU's own qemu-vdagent chardev on a virtio-serial port; a destination started without
them (or with them, against a source without) would fail the migration inside QEMU, so the machine check refuses
it first, naming the difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core_daemon.qemu_process import build_qemu_command
from vmfront.migrate import machine_arguments


def _argv(run_dir: Path, *, clipboard: bool, agent: bool) -> list[str]:
    command = build_qemu_command("qemu-system-x86_64", "vm", ["-m", "64"], run_dir / "private" / "qmp.sock", "tcg",
                                 run_dir / "private" / "vnc.sock",
                                 run_dir / "private" / "qga.sock" if agent else None, clipboard=clipboard)
    return command.argv


@pytest.mark.parametrize("agent", [False, True])
def test_clipboard_adds_the_vdagent_on_one_virtio_serial_bus(tmp_path: Path, agent: bool) -> None:
    argv = _argv(tmp_path, clipboard=True, agent=agent)
    assert "qemu-vdagent,id=vmfront-vdagent,clipboard=on,mouse=off" in argv
    assert "virtserialport,bus=vmfront-vserial.0,chardev=vmfront-vdagent,name=com.redhat.spice.0" in argv
    assert argv.count("virtio-serial,id=vmfront-vserial") == 1  # shared with the agent's port
    assert not any("vdagent" in a for a in _argv(tmp_path, clipboard=False, agent=agent))


def test_agent_alone_keeps_its_arguments(tmp_path: Path) -> None:
    """Cores of an earlier version (agent, no clipboard) and this one start the same machine: they migrate."""
    argv = _argv(tmp_path, clipboard=False, agent=True)
    chardev = argv.index("socket,id=vmfront-qga,path=" + str(tmp_path / "private" / "qga.sock")
                         + ",server=on,wait=off")
    assert argv[chardev + 1 : chardev + 5] == [
        "-device", "virtio-serial,id=vmfront-vserial",
        "-device", "virtserialport,bus=vmfront-vserial.0,chardev=vmfront-qga,name=org.qemu.guest_agent.0"]


def test_migrate_sees_a_clipboard_mismatch(tmp_path: Path) -> None:
    source, dest = tmp_path / "a", tmp_path / "b"
    with_clipboard = machine_arguments(_argv(source, clipboard=True, agent=True), source)
    without = machine_arguments(_argv(dest, clipboard=False, agent=True), dest)
    assert with_clipboard != without
    assert machine_arguments(_argv(dest, clipboard=True, agent=True), dest) == with_clipboard
