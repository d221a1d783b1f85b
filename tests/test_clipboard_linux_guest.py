"""Copy and paste between VNC viewers and a real Linux guest, and the guest's keyboard LEDs, end to end.

The graphical tier of the Linux test guest (tests/linux_guest/build_x11.sh): Debian's kernel, busybox, qemu-ga,
and an X server (Xvfb) with the real spice-vdagentd and spice-vdagent and xclip. ``vmfront core --clipboard``
gives it QEMU's ``qemu-vdagent``. The guest's clipboard is set and read by xclip inside the guest, through the guest
agent; the viewer is TigerVNC's vncviewer under Xvfb on the host, its clipboard set and read by xclip on that
display. The legacy cut text (Latin-1) and the LED State pseudo-encoding are read by a minimal RFB viewer that
announces them (tests/vnclib.py's handshake with rfb.client's parser for the replies), as no real viewer on this
machine shows either in a way a test can read.
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from corelib import CoreProcess, Fleet, RawQmpPeer, wait_for
from test_agent_linux_guest import BOOT_TIMEOUT, guest_sh, wait_agent_ready
from test_client import ClientProcess
from vnclib import ROOT, end_process, free_port, xvfb

from rfb import clipboard as extclip
from rfb.client import ENCODING_EXTENDED_CLIPBOARD, ENCODING_QEMU_LED_STATE, LedState, RfbClient, ServerCutText, State
from rfb.events import ClipboardCaps, ClipboardNotify, ClipboardProvide

pytestmark = [pytest.mark.linux_guest, pytest.mark.timeout(400)]

TIGERVNC = shutil.which("vncviewer") is not None and shutil.which("Xvfb") is not None \
    and shutil.which("xclip") is not None
#: Not Latin-1, not the Basic Multilingual Plane only, two lines: what survives here survives anything.
TEXT = "Grüße, 世界 ✓ 🙂\nzweite Zeile"


@dataclass(frozen=True)
class X11GuestImage:
    kernel: Path
    initrd: Path

    def qemu_args(self, console: Path) -> list[str]:
        return ["-accel", os.environ.get("VMFRONT_TEST_LINUX_ACCEL", "tcg"), "-m", "384", "-vga", "std",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", "console=ttyS0 panic=-1 rdinit=/init-x11", "-serial", f"file:{console}", "-no-reboot"]


def build_x11_image() -> X11GuestImage:
    built = subprocess.run([str(ROOT / "tests" / "linux_guest" / "build_x11.sh")], capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, f"building the graphical Linux test guest failed:\n{built.stderr}"
    out = Path(built.stdout.strip().splitlines()[-1])
    return X11GuestImage(out / "vmlinuz", out / "initrd.img")


@dataclass
class Guest:
    core: CoreProcess
    client: ClientProcess
    console: Path
    vnc_port: int

    @property
    def run_dir(self) -> Path:
        return self.core.run_dir


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    image = build_x11_image()
    with Fleet() as fleet:
        console = fleet.root / "console.log"
        core = fleet.core("cg", "--agent", "--clipboard", qemu_args=image.qemu_args(console))
        port = free_port()
        client = fleet.add(ClientProcess(core, "cg", "--vnc", f"127.0.0.1:{port}"))
        wait_agent_ready(core.run_dir, console)
        wait_for(lambda: "spice-vdagent up" in console.read_text(errors="replace"), BOOT_TIMEOUT,
                 "spice-vdagent in the guest")
        # The session agent connected to the daemon, and the daemon told QEMU it does the clipboard.
        wait_for(lambda: guest_sh(core.run_dir, "pidof spice-vdagent || true").strip(), 30, "spice-vdagent running")
        time.sleep(2)
        yield Guest(core, client, console, port)


def guest_clipboard_set(guest: Guest, text: str) -> None:
    """xclip in the guest takes the X CLIPBOARD selection with ``text`` (and stays, serving it)."""
    encoded = base64.b64encode(text.encode()).decode()
    guest_sh(guest.run_dir, f"echo {encoded} | base64 -d | DISPLAY=:0 xclip -selection clipboard -i >/dev/null 2>&1")


def guest_clipboard_get(guest: Guest) -> str:
    return guest_sh(guest.run_dir, "DISPLAY=:0 timeout 10 xclip -selection clipboard -o 2>&1; true")


def host_clipboard(display: str, text: str | None = None) -> str:
    """Read (or set, with ``text``) the CLIPBOARD selection of a host X display with xclip."""
    env = {**os.environ, "DISPLAY": display}
    if text is not None:
        subprocess.run(["xclip", "-selection", "clipboard", "-i"], input=text.encode(), env=env, check=True,
                       timeout=10, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return text
    out = subprocess.run(["xclip", "-selection", "clipboard", "-o"], capture_output=True, env=env, timeout=10)
    return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else ""


class RawViewer:
    """A minimal RFB viewer: the handshake by hand, the server's messages through rfb.client's parser (its
    ServerInit state is skipped: the handshake is done here)."""

    def __init__(self, port: int, encodings: tuple[int, ...]) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert self.sock.recv(12).startswith(b"RFB ")
        self.sock.sendall(b"RFB 003.008\n")
        count = self.sock.recv(1)[0]
        self.sock.recv(count)
        self.sock.sendall(b"\x01")
        assert self._exact(4) == b"\0\0\0\0"
        self.sock.sendall(b"\x01")
        width, height, _fmt, name_len = struct.unpack(">HH16sI", self._exact(24))
        self._exact(name_len)
        self.conn = RfbClient()
        self.conn.state, self.conn.width, self.conn.height = State.NORMAL, width, height
        from rfb.wire import BGRX8888

        self.conn.pixel_format = BGRX8888
        self.sock.sendall(self.conn.set_encodings((0, *encodings)))
        self.events: list[object] = []

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "server closed"
            data += chunk
        return data

    def read_until(self, predicate: object, within: float = 30.0) -> object:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for event in self.events:
                if predicate(event):  # type: ignore[operator]
                    self.events.remove(event)
                    return event
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            assert data, "server closed the connection"
            self.events += self.conn.receive_data(data)
        raise AssertionError(f"no matching event within {within} s; got {self.events}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TIGERVNC, reason="needs TigerVNC's vncviewer, Xvfb and xclip")
def test_copy_in_the_guest_paste_in_tigervnc_and_back(guest: Guest) -> None:
    """The guest's clipboard reaches TigerVNC (Extended Clipboard) and what is copied on the viewer's side reaches
    the guest; UTF-8 beyond Latin-1 and the BMP survives both ways."""
    with xvfb() as display:
        env = {**os.environ, "DISPLAY": display}
        viewer = subprocess.Popen(["vncviewer", "-AutoSelect=0", "-FullColour", "-Shared", "-FullScreen",
                                   f"127.0.0.1::{guest.vnc_port}"], env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # Full screen: TigerVNC grabs the keyboard, so it has the focus it waits for before it takes or
            # offers a clipboard (there is no window manager to give it one).
            wait_for(lambda: "Extended Clipboard caps" in guest.client.text() or viewer.poll() is not None, 30,
                     "TigerVNC connected")
            time.sleep(2)
            guest_clipboard_set(guest, TEXT)
            wait_for(lambda: host_clipboard(display) == TEXT, 40, "the guest's clipboard in TigerVNC's display")
            back = "vom Betrachter: Ärger ✓ 🙂"
            host_clipboard(display, back)
            wait_for(lambda: guest_clipboard_get(guest) == back, 40, "the viewer's clipboard in the guest")
        finally:
            end_process(viewer)


def test_legacy_and_extended_viewers_get_the_guest_clipboard(guest: Guest) -> None:
    legacy = RawViewer(guest.vnc_port, ())
    extended = RawViewer(guest.vnc_port, (ENCODING_EXTENDED_CLIPBOARD,))
    try:
        caps = extended.read_until(lambda e: isinstance(e, ClipboardCaps))
        assert isinstance(caps, ClipboardCaps) and extclip.caps_text_size(caps) == 1 << 20
        extended.send(extended.conn.clipboard(extclip.caps()))
        text = "only Latin-1 for the old viewer: café"
        guest_clipboard_set(guest, text)
        cut = legacy.read_until(lambda e: isinstance(e, ServerCutText))
        assert isinstance(cut, ServerCutText) and cut.text == text.encode("latin-1")
        extended.read_until(lambda e: isinstance(e, ClipboardNotify) and e.formats & extclip.FORMAT_TEXT)
        extended.send(extended.conn.clipboard(extclip.request()))
        provide = extended.read_until(lambda e: isinstance(e, ClipboardProvide))
        assert isinstance(provide, ClipboardProvide) and provide.text is not None
        assert provide.text == extclip.encode_text(text)  # the spec's CRLF and NUL
        # A paste from the old viewer (Latin-1) reaches the guest, and the other viewer hears of it.
        legacy.send(legacy.conn.client_cut_text("Grüße aus 1998".encode("latin-1")))
        wait_for(lambda: guest_clipboard_get(guest) == "Grüße aus 1998", 30, "the legacy paste in the guest")
        extended.read_until(lambda e: isinstance(e, ClipboardNotify))
    finally:
        legacy.close()
        extended.close()


def test_a_2_mib_paste_is_refused_and_nothing_breaks(guest: Guest) -> None:
    viewer = RawViewer(guest.vnc_port, (ENCODING_EXTENDED_CLIPBOARD,))
    try:
        viewer.read_until(lambda e: isinstance(e, ClipboardCaps))
        before = guest_clipboard_get(guest)
        huge = ("x" * 1023 + "\n") * 2048  # 2 MiB
        viewer.send(viewer.conn.client_cut_text(huge.encode("latin-1")))
        # Compressed it is small: as an Extended Clipboard provide it is refused by its inflated size.
        viewer.send(viewer.conn.clipboard(extclip.notify()))
        viewer.send(viewer.conn.clipboard(extclip.provide_text(huge.encode())))
        wait_for(lambda: guest.client.text().count("clipboard of 2097152 bytes refused") >= 1, 10,
                 "the refusal in the client's log")
        # The viewer is still served, and a paste of a sane size still works.
        viewer.send(viewer.conn.framebuffer_update_request(0, 0, 8, 8, incremental=False))
        viewer.read_until(lambda e: type(e).__name__ == "UpdateDone")
        assert guest_clipboard_get(guest) == before
        viewer.send(viewer.conn.clipboard(extclip.provide_text(extclip.encode_text("small again ✓"))))
        wait_for(lambda: guest_clipboard_get(guest) == "small again ✓", 30, "the next paste in the guest")
    finally:
        viewer.close()


def test_caps_lock_in_the_guest_reaches_a_viewer_as_led_state(guest: Guest) -> None:
    viewer = RawViewer(guest.vnc_port, (ENCODING_QEMU_LED_STATE,))
    try:
        first = viewer.read_until(lambda e: isinstance(e, LedState))
        assert isinstance(first, LedState)
        qmp = RawQmpPeer(guest.core.qmp_socket).negotiate()
        try:
            reply = qmp.execute("send-key", arguments={"keys": [{"type": "qcode", "data": "caps_lock"}]})
            assert "return" in reply, reply
            changed = viewer.read_until(lambda e: isinstance(e, LedState))
            assert isinstance(changed, LedState) and changed.leds == first.leds ^ 0x4, (first, changed)
            qmp.execute("send-key", arguments={"keys": [{"type": "qcode", "data": "caps_lock"}]})
            again = viewer.read_until(lambda e: isinstance(e, LedState))
            assert isinstance(again, LedState) and again.leds == first.leds
        finally:
            qmp.close()
    finally:
        viewer.close()
