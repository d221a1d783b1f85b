"""X11 keysyms (what RFB KeyEvent carries) to QEMU qcodes (what QMP ``input-send-event`` takes).

The mapping is positional for a US layout, like QEMU's own VNC server with ``-k en-us``: a keysym names the
key that produces it, and the viewer sends the modifiers it needs (Shift for ``!``) as separate events, so
``!`` and ``1`` are both the ``1`` key. Keysyms with no key on a US keyboard map to None and are dropped.
Viewers that know the physical key (the QEMU Extended Key Event) send an XT scancode instead; see
:func:`scancode_for`.
"""

from __future__ import annotations

_SPECIAL: dict[int, str] = {
    0xFF08: "backspace", 0xFF09: "tab", 0xFE20: "tab",  # ISO_Left_Tab (Shift+Tab)
    0xFF0D: "ret", 0xFF13: "pause", 0xFF14: "scroll_lock", 0xFF15: "sysrq", 0xFF1B: "esc",
    0xFF50: "home", 0xFF51: "left", 0xFF52: "up", 0xFF53: "right", 0xFF54: "down",
    0xFF55: "pgup", 0xFF56: "pgdn", 0xFF57: "end", 0xFF61: "print", 0xFF63: "insert", 0xFF67: "menu",
    0xFF7F: "num_lock", 0xFFFF: "delete",
    # modifiers
    0xFFE1: "shift", 0xFFE2: "shift_r", 0xFFE3: "ctrl", 0xFFE4: "ctrl_r", 0xFFE5: "caps_lock",
    0xFFE7: "meta_l", 0xFFE8: "meta_r", 0xFFE9: "alt", 0xFFEA: "alt_r", 0xFFEB: "meta_l", 0xFFEC: "meta_r",
    0xFE03: "alt_r",  # ISO_Level3_Shift (AltGr)
    # keypad
    0xFF8D: "kp_enter", 0xFFAA: "kp_multiply", 0xFFAB: "kp_add", 0xFFAC: "kp_decimal", 0xFFAD: "kp_subtract",
    0xFFAE: "kp_decimal", 0xFFAF: "kp_divide", 0xFFBD: "kp_equals",
    0xFF95: "kp_7", 0xFF96: "kp_4", 0xFF97: "kp_8", 0xFF98: "kp_6", 0xFF99: "kp_2", 0xFF9A: "kp_9",
    0xFF9B: "kp_3", 0xFF9C: "kp_1", 0xFF9D: "kp_5", 0xFF9E: "kp_0", 0xFF9F: "kp_decimal",
}
_SPECIAL.update({0xFFB0 + n: f"kp_{n}" for n in range(10)})  # KP_0 .. KP_9
_SPECIAL.update({0xFFBE + n: f"f{n + 1}" for n in range(12)})  # F1 .. F12

_PUNCTUATION = {
    " ": "spc", "!": "1", '"': "apostrophe", "#": "3", "$": "4", "%": "5", "&": "7", "'": "apostrophe",
    "(": "9", ")": "0", "*": "8", "+": "equal", ",": "comma", "-": "minus", ".": "dot", "/": "slash",
    ":": "semicolon", ";": "semicolon", "<": "comma", "=": "equal", ">": "dot", "?": "slash", "@": "2",
    "[": "bracket_left", "\\": "backslash", "]": "bracket_right", "^": "6", "_": "minus", "`": "grave_accent",
    "{": "bracket_left", "|": "backslash", "}": "bracket_right", "~": "grave_accent",
}

KEYSYM_TO_QCODE: dict[int, str] = dict(_SPECIAL)
KEYSYM_TO_QCODE.update({ord(c): q for c, q in _PUNCTUATION.items()})
KEYSYM_TO_QCODE.update({ord(str(d)): str(d) for d in range(10)})
KEYSYM_TO_QCODE.update({ord(c): c for c in "abcdefghijklmnopqrstuvwxyz"})
KEYSYM_TO_QCODE.update({ord(c.upper()): c for c in "abcdefghijklmnopqrstuvwxyz"})
KEYSYM_TO_QCODE[0xFF7E] = "alt_r"  # Mode_switch


def qcode_for(keysym: int) -> str | None:
    """The qcode of the key that produces ``keysym`` on a US keyboard, or None."""
    return KEYSYM_TO_QCODE.get(keysym)


def scancode_for(keycode: int) -> int | None:
    """The XT scancode a QEMU Extended Key Event carries, in the form the control channel takes, or None.

    RFB encodes ``0xE0 nn`` as ``0x80 | nn`` (one byte); the core accepts that folded form (1..0xFF, not 0x80)
    as well as ``0xE0nn``. Zero (the viewer does not know the key) and anything else give None: fall back to
    the keysym.
    """
    if 0 < keycode <= 0xFF and keycode != 0x80:
        return keycode
    if 0xE001 <= keycode <= 0xE07F:
        return keycode
    return None
