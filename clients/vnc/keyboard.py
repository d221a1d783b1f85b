"""Viewers' key events as QEMU's VNC server turns them into keys for the guest (ui/vnc.c, ui/kbd-state.c).

One :class:`Keyboard` per VNC service, shared by its viewers as QEMU shares one per display: it knows which keys
are down (hence Shift, Ctrl, AltGr) and the Caps Lock and Num Lock states, and turns each RFB key event into
key presses and releases by QEMU key number (XT scancode, ``0x80 | nn`` for ``0xE0 nn``):

- a keysym (RFB KeyEvent) is looked up in the keymap (keymap.py); letters as their lower-case key, as QEMU does;
- a QEMU Extended Key Event carries the key itself and is used as it is;
- **lock-key sync** (QEMU's ``lock-key-sync``, on by default): before a letter whose case disagrees with Shift
  and Caps Lock, Caps Lock is pressed; before a keypad key whose meaning disagrees with Num Lock (a digit with
  Num Lock off, an arrow with it on), Num Lock is pressed. So a viewer that sends ``H`` without Shift types
  ``H``, whatever the guest's Caps Lock was;
- a keysym whose key needs Shift or AltGr the viewer does not hold (``>`` from a keysym-only viewer such as
  vncdotool) gets it for that key press: QEMU's VNC drops the keymap's modifiers there and types ``.``, the
  character the viewer asked for is better.

The lock states are those this keyboard set (Caps Lock and Num Lock presses it sent, the guest starting with both
off) until the guest's LED state is known: :meth:`Keyboard.guest_leds` takes it (from the core's capture, when it
carries QEMU's LED state) and it wins from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

from ipc.messages import KeyEvent

from .keymap import KeyCode, Keymap

log = logging.getLogger(__name__)

SHIFT_L, SHIFT_R, CTRL_L, CTRL_R, ALT_L, ALT_R = 0x2A, 0x36, 0x1D, 0x9D, 0x38, 0xB8
CAPS_LOCK, NUM_LOCK = 0x3A, 0x45
#: Keypad keys (QEMU's keycode_is_keypad): 7 8 9 - 4 5 6 + 1 2 3 0 . on the keypad.
KEYPAD = range(0x47, 0x54)
#: Keysyms a keypad key sends with Num Lock on (QEMU's keysym_is_numlock): KP_0..KP_9, KP_Separator, KP_Decimal.
NUMLOCK_KEYSYMS = frozenset({*range(0xFFB0, 0xFFBA), 0xFFAC, 0xFFAE})
#: Unmapped keysyms are logged once each; this many are remembered.
MAX_UNMAPPED_LOGGED = 1024


def _is_letter(keysym: int) -> bool:
    return ord("A") <= keysym <= ord("Z") or ord("a") <= keysym <= ord("z")


class Keyboard:
    """See the module docstring. ``viewer`` arguments name who pressed a key, so that the keys a viewer still
    holds when it leaves (the core releases them) are forgotten here too."""

    def __init__(self, keymap: Keymap, *, lock_key_sync: bool = True) -> None:
        self.keymap = keymap
        self.lock_key_sync = lock_key_sync
        self.caps_lock = False
        self.num_lock = False
        self._down: dict[int, set[Hashable]] = {}
        self._unmapped: set[int] = set()

    # --- state --------------------------------------------------------------------------------------------

    def _held(self, *numbers: int) -> bool:
        return any(number in self._down for number in numbers)

    @property
    def shift(self) -> bool:
        return self._held(SHIFT_L, SHIFT_R)

    @property
    def altgr(self) -> bool:
        return self._held(ALT_R)

    @property
    def ctrl(self) -> bool:
        return self._held(CTRL_L, CTRL_R)

    def guest_leds(self, caps_lock: bool, num_lock: bool) -> None:
        """The guest's own Caps Lock and Num Lock state (its keyboard LEDs): what lock-key sync compares with."""
        self.caps_lock, self.num_lock = caps_lock, num_lock

    def viewer_gone(self, viewer: Hashable) -> None:
        """The core released what ``viewer`` held: forget those keys (another viewer's stay down)."""
        for number in [n for n, holders in self._down.items() if holders == {viewer}]:
            del self._down[number]
        for holders in self._down.values():
            holders.discard(viewer)

    def _event(self, number: int, down: bool, viewer: Hashable) -> KeyEvent:
        if down:
            if number not in self._down:  # a lock key toggles when pressed, not while auto-repeating
                if number == CAPS_LOCK:
                    self.caps_lock = not self.caps_lock
                elif number == NUM_LOCK:
                    self.num_lock = not self.num_lock
            self._down.setdefault(number, set()).add(viewer)
        else:
            self._down.pop(number, None)  # the guest has one keyboard: a release lets go whoever pressed it
        return KeyEvent(down=down, scancode=number)

    def _tap(self, number: int, viewer: Hashable) -> list[KeyEvent]:
        return [self._event(number, True, viewer), self._event(number, False, viewer)]

    # --- events -------------------------------------------------------------------------------------------

    def key(self, keysym: int, down: bool, viewer: Hashable = None, *, sync: bool = True) -> list[KeyEvent]:
        """An RFB KeyEvent: the keys to press and release for it (none if no key produces the keysym)."""
        lookup = keysym + 0x20 if ord("A") <= keysym <= ord("Z") else keysym  # letters by their key, as QEMU
        code = self._choose(self.keymap.codes(lookup), down)
        if code is None:
            if keysym not in self._unmapped and len(self._unmapped) < MAX_UNMAPPED_LOGGED:
                self._unmapped.add(keysym)
                log.warning("keymap %s: no key for keysym %#x; ignoring it (logged once)", self.keymap.name, keysym)
            return []
        events = self._lock_sync(code.number, keysym, down, viewer) if sync else []
        wrap: list[int] = []
        if down and not _is_letter(keysym):
            if code.shift and not self.shift:
                wrap.append(SHIFT_L)
            if code.altgr and not self.altgr:
                wrap.append(ALT_R)
        events += [self._event(number, True, viewer) for number in wrap]
        events.append(self._event(code.number, down, viewer))
        events += [self._event(number, False, viewer) for number in reversed(wrap)]
        return events

    def scancode(self, keysym: int, number: int, down: bool, viewer: Hashable = None, *,
                 sync: bool = True) -> list[KeyEvent]:
        """A QEMU Extended Key Event: the key itself (``number`` as keymap.scancode_for gives it)."""
        if number >= 0xE000:
            number = 0x80 | (number & 0x7F)
        events = self._lock_sync(number, keysym, down, viewer) if sync else []
        events.append(self._event(number, down, viewer))
        return events

    def _choose(self, codes: tuple[KeyCode, ...], down: bool) -> KeyCode | None:
        """QEMU's choice among several keys for one keysym: pressed, the one whose modifiers are held now;
        released, one that is down; else the first."""
        if len(codes) <= 1:
            return codes[0] if codes else None
        if down:
            mods = (self.shift, self.altgr, self.ctrl)
            for code in codes:
                if (code.shift, code.altgr, code.ctrl) == mods:
                    return code
        else:
            for code in codes:
                if code.number in self._down:
                    return code
        return codes[0]

    def _lock_sync(self, number: int, keysym: int, down: bool, viewer: Hashable) -> list[KeyEvent]:
        """QEMU's lock-key sync (do_key_event): Num Lock or Caps Lock pressed first where the guest's state
        would give the key another meaning than the viewer's keysym says."""
        if not (down and self.lock_key_sync):
            return []
        events: list[KeyEvent] = []
        if number in KEYPAD and (keysym & 0xFFFF in NUMLOCK_KEYSYMS) != self.num_lock:
            events += self._tap(NUM_LOCK, viewer)
        if _is_letter(keysym):
            uppercase = ord("A") <= keysym <= ord("Z")
            if (uppercase == self.shift) == self.caps_lock:
                events += self._tap(CAPS_LOCK, viewer)
        return events
