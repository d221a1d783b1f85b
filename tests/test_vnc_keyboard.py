"""Keysyms to keys as QEMU's VNC server does it (clients/vnc/keymap.py, keyboard.py): QEMU's own keymap files,
lock-key sync, and the Shift/AltGr a keysym-only viewer did not send. The guest side (what a Linux shell shows)
is tested in test_vnc_typing.py."""

from __future__ import annotations

import logging

import pytest

from clients.vnc.keyboard import CAPS_LOCK, NUM_LOCK, SHIFT_L, Keyboard
from clients.vnc.keymap import DEFAULT_LAYOUT, Keymap, KeymapError, find_keymap, keysym_of, scancode_for
from ipc.messages import KeyEvent

ALT_R = 0xB8


def keys(events: list[KeyEvent]) -> list[tuple[int | None, bool]]:
    return [(e.scancode, e.down) for e in events]


def tap(keyboard: Keyboard, keysym: int, viewer: str = "v") -> list[tuple[int | None, bool]]:
    return keys(keyboard.key(keysym, True, viewer) + keyboard.key(keysym, False, viewer))


@pytest.fixture
def us() -> Keyboard:
    return Keyboard(Keymap.load(DEFAULT_LAYOUT))


def test_keymap_files_read_as_qemu_reads_them() -> None:
    text = "\n".join([
        "# a comment", "map 0x409", "a 0x1e", "exclam 0x02 shift", "b 0x30 addupper", "adiaeresis 0x28 addupper",
        "at 0x10 altgr", "at 0x03 shift", "U20AC 0x12 altgr", "nosuchkeysym 0x31", "Control_R 0x9d",
        "slash 010", "KP_7 71 numlock"])
    keymap = Keymap.parse(text, "test")
    assert keymap.codes(ord("a"))[0].number == 0x1E
    assert keymap.codes(ord("!"))[0].shift and keymap.codes(ord("B"))[0].shift, "addupper adds the capital"
    assert keymap.codes(0xC4) == (), "QEMU upper-cases the whole name: ADIAERESIS is no keysym"
    assert [(c.number, c.altgr, c.shift) for c in keymap.codes(ord("@"))] == [(0x10, True, False), (3, False, True)]
    assert keymap.codes(0x20AC)[0].altgr and keymap.codes(0x010020AC), "Uxxxx, and Unicode keysyms by 16 bits"
    assert keymap.codes(0xFFE4)[0].number == 0x9D and keymap.codes(ord("/"))[0].number == 8
    assert keymap.codes(0xFFB7)[0].number == 71 and keymap.codes(0x31) == ()
    with pytest.raises(KeymapError):
        Keymap.parse("include common\n")
    assert keysym_of("EuroSign") == 0x20AC and keysym_of("Cyrillic_a") == 0x6C1 and keysym_of("U0000") == 0


def test_qemus_installed_keymaps_load() -> None:
    us = Keymap.load("en-us")
    assert {c.number for c in us.codes(ord(">"))} == {0x34, 0x56}
    german = Keymap.load("de")
    assert [(c.number, c.altgr) for c in german.codes(ord("@"))] == [(0x10, True)]
    assert german.codes(ord("y"))[0].number == 0x2C, "QWERTZ"
    assert find_keymap(str(find_keymap("fr"))) == find_keymap("fr")
    with pytest.raises(KeymapError, match=r"known: .*en-us"):
        Keymap.load("xx-nope")
    with pytest.raises(KeymapError):
        Keymap.load("../etc/passwd")


def test_capitals_from_a_keysym_only_viewer_use_caps_lock_as_qemu(us: Keyboard) -> None:
    h, e = 0x23, 0x12
    assert tap(us, ord("H")) == [(CAPS_LOCK, True), (CAPS_LOCK, False), (h, True), (h, False)]
    assert us.caps_lock
    assert tap(us, ord("I")) == [(0x17, True), (0x17, False)], "Caps Lock is already on"
    assert tap(us, ord("e")) == [(CAPS_LOCK, True), (CAPS_LOCK, False), (e, True), (e, False)]
    assert not us.caps_lock
    # A viewer that sends Shift itself (a real keyboard): no sync needed.
    us.key(0xFFE1, True)
    assert tap(us, ord("H")) == [(h, True), (h, False)]
    us.key(0xFFE1, False)
    # The guest's own LED state, when known, is what counts.
    us.guest_leds(caps_lock=True, num_lock=False)
    assert tap(us, ord("h")) == [(CAPS_LOCK, True), (CAPS_LOCK, False), (0x23, True), (0x23, False)]
    assert tap(Keyboard(us.keymap, lock_key_sync=False), ord("H")) == [(h, True), (h, False)]


def test_shifted_punctuation_gets_shift(us: Keyboard) -> None:
    dot = 0x34
    assert tap(us, ord(">")) == [(SHIFT_L, True), (dot, True), (SHIFT_L, False), (dot, False)]
    assert tap(us, ord(".")) == [(dot, True), (dot, False)]
    us.key(0xFFE1, True)  # the viewer holds Shift: QEMU's choice of key, nothing added
    assert tap(us, ord(">")) == [(dot, True), (dot, False)]
    us.key(0xFFE1, False)
    assert tap(us, ord("<")) == [(0x56, True), (0x56, False)], "the 102nd key: <, unshifted (as QEMU)"
    german = Keyboard(Keymap.load("de"))
    assert tap(german, ord("@")) == [(ALT_R, True), (0x10, True), (ALT_R, False), (0x10, False)]


def test_keypad_num_lock_sync(us: Keyboard) -> None:
    kp7, kp_home = 0xFFB7, 0xFF95
    assert tap(us, kp7) == [(NUM_LOCK, True), (NUM_LOCK, False), (0x47, True), (0x47, False)]
    assert us.num_lock
    assert tap(us, kp7) == [(0x47, True), (0x47, False)]
    assert tap(us, kp_home) == [(NUM_LOCK, True), (NUM_LOCK, False), (0x47, True), (0x47, False)]
    assert not us.num_lock


def test_extended_key_events_are_the_key_itself(us: Keyboard) -> None:
    assert scancode_for(0x1E) == 0x1E and scancode_for(0xC8) == 0xC8 and scancode_for(0) is None
    assert keys(us.scancode(ord("a"), 0x1E, True)) == [(0x1E, True)]
    assert keys(us.scancode(0xFF52, 0xE048, True)) == [(0xC8, True)], "0xE0 nn folded"
    assert keys(us.scancode(ord("A"), 0x1E, True)) == [(CAPS_LOCK, True), (CAPS_LOCK, False), (0x1E, True)]


def test_unmapped_keysyms_are_logged_once(us: Keyboard, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="clients.vnc.keyboard"):
        assert us.key(0x6C1, True) == [] and us.key(0x6C1, False) == []
    assert caplog.text.count("no key for keysym 0x6c1") == 1


def test_keys_a_viewer_held_are_forgotten_when_it_leaves(us: Keyboard) -> None:
    us.key(0xFFE1, True, "one")
    us.key(0xFFE3, True, "two")
    assert us.shift and us.ctrl
    us.viewer_gone("one")
    assert not us.shift and us.ctrl
