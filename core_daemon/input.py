"""Keyboard and pointer input for the guest: the one API every client-facing service goes through.

Input is sent with QMP ``input-send-event`` (not over the private VNC connection): QMP keys are QEMU qcodes or
XT scancodes, the pointer is absolute on QEMU's 0..0x7FFF axes, and QEMU routes the events to the guest's
keyboard and its absolute pointing device. The guest needs one: with ``-nodefaults`` the pc machine's PS/2
mouse is relative only, so add a tablet (``-usb -device usb-tablet``); without one QEMU drops pointer events.

Key events are paced: one ``input-send-event`` per key event, ``key_delay`` apart (10 ms by default, as QEMU's
own VNC server's ``key-delay-ms``). QEMU queues them in the emulated keyboard, whose buffer holds 16 bytes: a
burst in one command (a script typing, a paste) overflows it before the guest can read, and the keys are lost.
Pointer events are not paced: a batch of them is one command.

The QMP call goes through a callable, ``execute(command, arguments)`` that raises on an error reply (the
core's ``QMPClient.execute``), so this module has no connection of its own and tests can record the calls.
Keys held down are tracked per holder (a client, or one viewer of a client) as QEMU accepts them, so
``release(belongs)`` can let go of what a viewer or client that vanished was holding, instead of leaving a key
stuck in the guest, and without releasing what another holder still holds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from qemu.qmp import ExecuteError

log = logging.getLogger(__name__)

QmpExecute = Callable[[str, dict[str, Any]], Awaitable[object]]

#: QEMU's absolute axis range (INPUT_EVENT_ABS_MAX).
ABS_MAX = 0x7FFF
#: Buttons of QEMU 7.2's InputButton, in RFB button-mask bit order (bit 0 = left ... bit 4 = wheel down).
MASK_BUTTONS = ("left", "middle", "right", "wheel-up", "wheel-down")
BUTTONS = frozenset({*MASK_BUTTONS, "side", "extra"})
_QCODE_RE = re.compile(r"[a-z0-9_]{1,32}")
#: Pause after each key event, as QEMU's VNC server's key-delay-ms default: lets the guest drain its keyboard.
KEY_DELAY_S = 0.010

Event = dict[str, Any]


class InputError(Exception):
    """QEMU refused the input (unknown qcode, no display yet...); the message says why."""


def key_event(key: str | int, down: bool) -> Event:
    """One ``input-send-event`` key event; ``key`` is a qcode name or a QEMU key number (XT scancode)."""
    value = {"type": "qcode", "data": key} if isinstance(key, str) else {"type": "number", "data": key}
    return {"type": "key", "data": {"down": down, "key": value}}


def button_event(button: str, down: bool) -> Event:
    return {"type": "btn", "data": {"down": down, "button": button}}


def abs_event(axis: str, value: int) -> Event:
    return {"type": "abs", "data": {"axis": axis, "value": value}}


def scale_axis(position: int, size: int) -> int:
    """A framebuffer coordinate on QEMU's 0..0x7FFF axis, scaled the way QEMU's own VNC server does."""
    position = max(0, min(position, size - 1))
    return position * ABS_MAX // size


def buttons_from_mask(mask: int) -> frozenset[str]:
    """An RFB button mask as QMP button names (bits 5 and up have no QEMU 7.2 button and are ignored)."""
    return frozenset(name for bit, name in enumerate(MASK_BUTTONS) if mask & (1 << bit))


def check_qcode(qcode: str) -> str:
    if not isinstance(qcode, str) or not _QCODE_RE.fullmatch(qcode):
        raise InputError(f"not a QEMU qcode: {qcode!r}")
    return qcode


def scancode_number(code: int) -> int:
    """An XT scancode as QEMU's key number: ``0xE0 nn`` (extended) becomes ``0x80 | nn``, as in the RFB
    QEMU extended key event; plain codes 1..0x7F and already-folded codes 0x81..0xFF pass through."""
    if 0xE001 <= code <= 0xE07F:
        return 0x80 | (code & 0x7F)
    if 0 < code <= 0xFF and code != 0x80:
        return code
    raise InputError(f"not an XT scancode: {code:#x}")


class GuestInput:
    """Sends keys and pointer events to the guest.

    ``screen_size`` returns the current framebuffer size (``DisplayCapture.screen_size``), which maps pointer
    coordinates in framebuffer pixels onto QEMU's absolute axes. ``on_input`` runs after every event QEMU
    accepted (``DisplayCapture.input_hint``, so the guest's reaction shows up at once).
    """

    def __init__(self, execute: QmpExecute, screen_size: Callable[[], tuple[int, int] | None],
                 on_input: Callable[[], None] | None = None, key_delay: float = KEY_DELAY_S) -> None:
        self._execute = execute
        self._key_delay = key_delay
        self._sending = asyncio.Lock()  # one batch at a time, in arrival order: pacing must not reorder keys
        self._next_key_at = 0.0  # loop time before which nothing follows the last key event sent
        self._screen_size = screen_size
        self._on_input = on_input
        self._keys_down: dict[str | int, set[object]] = {}  # key -> the holders that pressed it
        self._buttons: frozenset[str] = frozenset()  # the pointer's buttons now (one pointer for all clients)
        self._buttons_holder: object = None  # who set them

    async def send(self, events: Sequence[Event], holder: object = None) -> None:
        """Send a batch built with the ``*_events`` methods: one ``input-send-event`` up to and including each
        key event; the next command starts no sooner than the key delay after that one started (the round trip
        counts towards the delay). With a zero delay, the whole batch is one command. Keys count as held by
        ``holder`` once QEMU has accepted them."""
        if not events:
            return
        loop = asyncio.get_running_loop()
        async with self._sending:
            chunk: list[Event] = []
            for index, event in enumerate(events):
                chunk.append(event)
                ends_chunk = event["type"] == "key" and self._key_delay > 0
                if not ends_chunk and index < len(events) - 1:
                    continue
                wait = self._next_key_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                started = loop.time()
                await self._send_now(chunk)
                self._track(chunk, holder)
                chunk = []
                if ends_chunk:
                    self._next_key_at = started + self._key_delay

    async def _send_now(self, events: list[Event]) -> None:
        try:
            await self._execute("input-send-event", {"events": events})
        except ExecuteError as exc:
            raise InputError(f"QEMU refused the input: {exc}") from exc
        if self._on_input is not None:
            self._on_input()

    # --- keyboard ----------------------------------------------------------------------------------------

    def key_events(self, qcode: str, down: bool) -> list[Event]:
        """Press or release one key by QEMU qcode ("a", "shift", "f2", "ret", ...)."""
        return [key_event(check_qcode(qcode), down)]

    def scancode_events(self, code: int, down: bool) -> list[Event]:
        """Press or release one key by XT scancode (as the RFB QEMU extended key event carries it)."""
        return [key_event(scancode_number(code), down)]

    def _track(self, delivered: list[Event], holder: object) -> None:
        for event in delivered:
            if event["type"] != "key":
                continue
            key: str | int = event["data"]["key"]["data"]
            if event["data"]["down"]:
                self._keys_down.setdefault(key, set()).add(holder)
            else:
                # The guest has one keyboard: a release lets go of the key whoever pressed it.
                self._keys_down.pop(key, None)

    async def key(self, qcode: str, down: bool) -> None:
        await self.send(self.key_events(qcode, down))

    async def scancode(self, code: int, down: bool) -> None:
        await self.send(self.scancode_events(code, down))

    async def press(self, qcode: str, modifiers: Sequence[str] = ()) -> None:
        """Modifiers down, key down, key up, modifiers up: one keystroke in one QMP command."""
        codes = [check_qcode(c) for c in (*modifiers, qcode)]
        events = [key_event(c, True) for c in codes] + [key_event(c, False) for c in reversed(codes)]
        await self.send(events)

    # --- pointer -----------------------------------------------------------------------------------------

    def pointer_events(self, x: int, y: int, buttons: Iterable[str] | int = 0,
                       holder: object = None) -> list[Event]:
        """Move the pointer to (x, y) in framebuffer pixels with exactly ``buttons`` held (names, or an RFB
        button mask). Buttons whose state changed are pressed/released with the move."""
        size = self._screen_size()
        if size is None or size[0] <= 0 or size[1] <= 0:
            raise InputError("no display mode yet: cannot place the pointer")
        held = buttons_from_mask(buttons) if isinstance(buttons, int) else frozenset(buttons)
        unknown = held - BUTTONS
        if unknown:
            raise InputError(f"unknown buttons {sorted(unknown)} (known: {sorted(BUTTONS)})")
        events = [abs_event("x", scale_axis(x, size[0])), abs_event("y", scale_axis(y, size[1]))]
        events += [button_event(b, True) for b in sorted(held - self._buttons)]
        events += [button_event(b, False) for b in sorted(self._buttons - held)]
        self._buttons = held
        self._buttons_holder = holder
        return events

    def wheel_events(self, steps: int) -> list[Event]:
        """Scroll by ``steps`` wheel clicks at the current position: positive up, negative down."""
        button = "wheel-up" if steps > 0 else "wheel-down"
        events: list[Event] = []
        for _ in range(min(abs(steps), 64)):
            events += [button_event(button, True), button_event(button, False)]
        return events

    async def pointer(self, x: int, y: int, buttons: Iterable[str] | int = 0) -> None:
        await self.send(self.pointer_events(x, y, buttons))

    async def wheel(self, steps: int) -> None:
        await self.send(self.wheel_events(steps))

    # --- cleanup -----------------------------------------------------------------------------------------

    async def release(self, belongs: Callable[[object], bool] | None = None, who: str = "anyone") -> None:
        """Release the keys and buttons pressed by holders that ``belongs`` picks (e.g. a viewer or a client that
        went away) and not released since; a key another holder also pressed stays down. With no ``belongs``:
        everything pressed through this API."""
        def picked(holder: object) -> bool:
            return belongs is None or belongs(holder)

        keys = [k for k, holders in self._keys_down.items() if all(picked(h) for h in holders)]
        for holders in self._keys_down.values():
            for holder in [h for h in holders if picked(h)]:
                holders.discard(holder)
        for key in keys:
            del self._keys_down[key]
        events = [key_event(k, False) for k in keys]
        if self._buttons and picked(self._buttons_holder):
            events += [button_event(b, False) for b in sorted(self._buttons)]
            self._buttons = frozenset()
        if events:
            log.info("releasing %d keys/buttons still held by %s", len(events), who)
        await self.send(events)
