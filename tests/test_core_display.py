"""The display as `vmfront core` serves it: shm segment, display.sock, `vmfront screendump`, reclaim, input."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from corelib import RawQmpPeer, kill_pid, running_core, short_tmpdir, spawn_core
from guestlib import TEXT_BOXES, crop, is_demo_text_screen
from PIL import Image, ImageChops
from qemu.qmp import QMPClient

from core_daemon.input import GuestInput
from shm.notify import DisplaySubscription


def vmfront(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmfront", *args], capture_output=True, text=True, timeout=30)


def shm_segments(vm: str) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(f"vmfront.{vm}."))


def shm_image(sub: DisplaySubscription) -> Image.Image:
    mode = sub.reader.mode()
    return Image.frombytes("RGB", (mode.width, mode.height), sub.reader.copy_frame(mode), "raw", "BGRX")


async def wait_for_demo_screen(display_socket: Path) -> DisplaySubscription:
    """A subscription, once the demo guest has drawn its screen (SeaBIOS's own screen comes first)."""
    sub = await DisplaySubscription.connect(display_socket)
    deadline = time.monotonic() + 30
    while not is_demo_text_screen(shm_image(sub)):
        assert time.monotonic() < deadline, "the demo guest never drew its screen"
        await sub.wait(timeout_s=1.0)
        await sub.read()
    return sub


def test_screendump_from_shm_equals_qemus_own(tmp_path: Path) -> None:
    with running_core("dump") as core:
        state = core.state()
        assert state["endpoints"]["display"] == str(core.run_dir / "display.sock")
        assert shm_segments("dump") == [state["display"]["shm"].lstrip("/")]
        asyncio.run(wait_for_demo_screen(core.run_dir / "display.sock")).close()
        peer = RawQmpPeer(core.qmp_socket).negotiate()
        try:
            # Pause the guest so both dumps see the same moment, then let the capture catch up.
            assert peer.execute("stop") == {"return": {}}
            time.sleep(1.0)
            qemu_png = tmp_path / "qemu.ppm"
            assert peer.execute("screendump", arguments={"filename": str(qemu_png)}) == {"return": {}}
            ours = tmp_path / "ours.png"
            result = vmfront("screendump", "dump", str(ours), "--run-dir", str(core.run_dir))
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == f"{ours}: 720x400"
            a, b = Image.open(ours).convert("RGB"), Image.open(qemu_png).convert("RGB")
            assert a.size == b.size == (720, 400)
            assert ImageChops.difference(a, b).getbbox() is None, "frames differ"
            assert peer.execute("cont") == {"return": {}}
        finally:
            peer.close()


def test_screendump_without_a_core_is_a_clear_error(tmp_path: Path) -> None:
    result = vmfront("screendump", "nothing", str(tmp_path / "x.png"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "no display socket at" in result.stderr and "is the core running" in result.stderr


async def test_keys_through_the_input_api_reach_the_screen() -> None:
    """Input API (core side) → QEMU → guest echo → VNC capture → shm → a reader on display.sock."""
    with running_core("keys") as core:
        sub = await wait_for_demo_screen(core.run_dir / "display.sock")
        qmp = QMPClient("keys-test")
        await qmp.connect(str(core.qmp_socket))
        try:
            def keys_row() -> Image.Image:
                return crop(shm_image(sub), TEXT_BOXES["keys"])

            before = keys_row()
            guest_input = GuestInput(qmp.execute, lambda: (sub.reader.mode().width, sub.reader.mode().height))
            for qcode in ("h", "i"):
                await guest_input.press(qcode)
            deadline = time.monotonic() + 15
            while keys_row() == before:
                assert time.monotonic() < deadline, "typed keys never showed up in shared memory"
                await sub.wait(timeout_s=1.0)
                await sub.read()
        finally:
            await qmp.disconnect()
            sub.close()


def test_killed_reader_and_restarted_core(tmp_path: Path) -> None:
    root = short_tmpdir()
    run = root / "run"
    core = spawn_core("rc", run)
    qemu_pid = core.qemu_pid
    try:
        old_segment = core.state()["display"]["shm"]
        reader = subprocess.Popen([sys.executable, "-c", (
            "import asyncio,sys\n"
            "from shm.notify import DisplaySubscription\n"
            "async def main():\n"
            "    sub = await DisplaySubscription.connect(sys.argv[1])\n"
            "    print('attached', flush=True)\n"
            "    while True:\n"
            "        await sub.wait()\n"
            "        await sub.read()\n"
            "asyncio.run(main())\n"), str(run / "display.sock")], stdout=subprocess.PIPE, text=True)
        try:
            assert reader.stdout is not None and reader.stdout.readline().strip() == "attached"
            reader.send_signal(signal.SIGKILL)
            reader.wait(timeout=10)
        finally:
            reader.kill()
            reader.wait(timeout=10)
        # The writer does not care.
        assert RawQmpPeer(core.qmp_socket).negotiate().execute("query-status")["return"]["status"] == "running"
        assert vmfront("screendump", "rc", str(tmp_path / "a.png"), "--run-dir", str(run)).returncode == 0

        # A core that dies leaves its segment; the next core (adopting the same QEMU) reclaims it.
        core.proc.send_signal(signal.SIGKILL)
        core.wait(timeout=10)
        assert old_segment.lstrip("/") in shm_segments("rc")
        core = spawn_core("rc", run)
        new_segment = core.state()["display"]["shm"]
        assert shm_segments("rc") == [new_segment.lstrip("/")] and new_segment != old_segment
        assert vmfront("screendump", "rc", str(tmp_path / "b.png"), "--run-dir", str(run)).returncode == 0
        assert core.stop() == 0
        assert shm_segments("rc") == []
    finally:
        core.stop()
        kill_pid(qemu_pid)
        subprocess.run(["rm", "-rf", str(root)], check=False)
