"""Text typed by a keysym-only viewer (vncdotool) lands in a real Linux shell as the text, through vmfront's VNC;
and twin guests, one behind vmfront and one behind QEMU's own VNC server, show the same screen row for the same
typing. What the shell on the guest's VGA console echoes is read from guest memory (the text-mode buffer).

QEMU's VNC gets capitals right from such a viewer (lock-key sync) but not shifted punctuation (it drops the
keymap's Shift: ``>`` types ``.``); vmfront adds the Shift. So the twins are compared on text QEMU gets right
(mixed case, unshifted punctuation) from the keysym-only viewer, and on everything with vncdotool's
``--force-caps`` (it then sends Shift as a keyboard would); the keysym-only viewer's shifted punctuation is
compared with the text itself on vmfront only.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from corelib import Fleet, RawQmpPeer, wait_for
from guestlib import text_screen
from test_agent_linux_guest import BOOT_TIMEOUT, LinuxGuestImage, build_image
from vnclib import VncClientProcess, free_port, vncdo, wait_port

pytestmark = [pytest.mark.linux_guest, pytest.mark.timeout(900)]  # two guests boot under TCG at once

PROMPT = "~ # "


def is_prompt(row: str) -> bool:
    return (row + " ").startswith(PROMPT)  # rows are read without trailing blanks
#: Mixed case and punctuation without Shift: QEMU's VNC types this right from a keysym-only viewer too.
PLAIN = "echo Hello, World. MiXeD cAsE 123 [x] = y/z a-b"
#: Shifted punctuation (inside single quotes, so the shell echoes it as it is).
SHIFTED = "echo 'Say \"Hi\" <x> & $y {z} (w) ~!@#%^*_+?:|'"


class Guest:
    def __init__(self, name: str, qmp: Path, vnc_port: int, scratch: Path) -> None:
        self.name, self.vnc_port, self.scratch = name, vnc_port, scratch
        wait_for(qmp.exists, 30, f"{name}'s QMP socket")
        self.peer = RawQmpPeer(qmp).negotiate()

    def rows(self) -> list[str]:
        return text_screen(self.peer, self.scratch)

    def wait_shell(self) -> None:
        wait_for(lambda: any(is_prompt(row) for row in self.rows()), 2 * BOOT_TIMEOUT, f"{self.name}'s shell")

    def type_line(self, text: str, *, force_caps: bool = False) -> tuple[str, str]:
        """Type ``text`` and Enter; returns (the command row as echoed, the row after it: the output)."""
        before = self.rows()
        vncdo(self.vnc_port, type_text=text + "\n", force_caps=force_caps, timeout=120)

        def ran() -> tuple[str, str] | None:
            rows = self.rows()
            if rows == before:
                return None
            last = max(i for i, row in enumerate(rows) if is_prompt(row))
            if rows[last] != PROMPT.rstrip():  # still typing (or running): no fresh prompt yet
                return None
            time.sleep(0.3)
            if self.rows() != rows:
                return None
            for i in range(last - 1, -1, -1):  # the command is the prompt row before the newest prompt
                if is_prompt(rows[i]):
                    return rows[i][len(PROMPT):], rows[i + 1] if i + 1 < last else ""
            return None

        found: list[tuple[str, str]] = []
        wait_for(lambda: (result := ran()) is not None and not found.append(result), 60,
                 f"{self.name} to run the typed line")
        return found[0]

    def close(self) -> None:
        self.peer.close()


def test_keysym_viewer_types_text_into_linux_as_qemus_vnc_does(tmp_path: Path) -> None:
    image: LinuxGuestImage = build_image()
    with Fleet() as fleet:
        # The twin behind QEMU's own VNC server (-k en-us, lock-key-sync on: QEMU's defaults).
        twin_port = free_port()
        twin_qmp = fleet.root / "twin-qmp.sock"
        twin = fleet.add(subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-vnc", f"127.0.0.1:{twin_port - 5900}",
             "-qmp", f"unix:{twin_qmp},server=on,wait=off", *image.qemu_args(fleet.root / "twin-console.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(fleet.root / "twin.log").open("wb")))
        # The guest behind vmfront.
        core = fleet.core("ty", qemu_args=image.qemu_args(fleet.root / "console.log"))
        port = free_port()
        fleet.add(VncClientProcess(core.run_dir, "ty", port))
        ours = fleet.add(Guest("the vmfront guest", core.qmp_socket, port, tmp_path))
        qemus = fleet.add(Guest("the QEMU-VNC twin", twin_qmp, twin_port, tmp_path))
        wait_port(twin_port)
        ours.wait_shell()
        qemus.wait_shell()
        assert twin.poll() is None

        # A keysym-only viewer: vmfront types exactly the text, and the same screen row as QEMU's VNC.
        typed, output = ours.type_line(PLAIN)
        assert (typed, output) == (PLAIN, PLAIN.removeprefix("echo "))
        assert qemus.type_line(PLAIN) == (typed, output)
        typed, output = ours.type_line(SHIFTED)
        assert (typed, output) == (SHIFTED, SHIFTED.removeprefix("echo ").strip("'"))

        # A viewer that sends Shift as a keyboard does: the same rows behind both, and the text.
        assert ours.type_line(SHIFTED, force_caps=True) == (typed, output)
        assert qemus.type_line(SHIFTED, force_caps=True) == (typed, output)
        assert ours.type_line(PLAIN, force_caps=True) == qemus.type_line(PLAIN, force_caps=True) \
            == (PLAIN, PLAIN.removeprefix("echo "))
