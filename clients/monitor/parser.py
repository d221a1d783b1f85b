"""QEMU's HMP argument syntax, sans-IO, ported from monitor_parse_arguments() (monitor/hmp.c, QEMU 7.2).

Argument specs follow QEMU's ``args_type`` strings from hmp-commands.hx, e.g. ``"keys:s,hold-time:i?"``:
``s`` a word (or quoted string), ``F`` a file name, ``B`` a block device name, ``S`` the rest of the line, ``O``
an option string (``device_add``), ``i`` a 32-bit and ``l`` a 64-bit integer expression, ``M`` an expression in
MiB, ``o`` a size (``1G``), ``b`` ``on``/``off``, ``/`` a ``/fmt`` (count, format letter, unit size), ``-d`` a flag
(``detach:-d``), ``-fs`` a flag with a value; ``?`` makes an argument optional.

Expressions are QEMU's (``expr_sum``): numbers as strtoull reads them (``0x`` hex, a leading ``0`` octal), ``+ - *
/ % & | ^ ~``, parentheses, character constants (``'a'``) and CPU registers (``$eax``, ``$pc``) through a lookup
the caller gives; they stop at the first character that cannot continue them, not at a space.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ArgError(Exception):
    """Bad arguments; the message is QEMU's (the caller adds ``Try "help CMD" ...``)."""


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str  # s, F, B, S, O, i, l, M, o, b, /, flag, flagval (``-fs``: ``-f VALUE``)
    optional: bool = False
    flag: str = ""  # for kinds flag/flagval: the letter


_KINDS = frozenset("sFBSOilMob/")


def parse_spec(args_type: str) -> tuple[ArgSpec, ...]:
    specs: list[ArgSpec] = []
    for item in filter(None, args_type.split(",")):
        name, _, kind = item.partition(":")
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if kind.startswith("-") and kind.endswith("s") and len(kind) == 3:
            specs.append(ArgSpec(name, "flagval", True, kind[1]))
        elif kind.startswith("-") and len(kind) == 2:
            specs.append(ArgSpec(name, "flag", True, kind[1]))
        elif kind in _KINDS:
            specs.append(ArgSpec(name, kind, optional))
        else:
            raise ValueError(f"unknown argument type {kind!r} in {args_type!r}")
    return tuple(specs)


_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def next_word(text: str, pos: int) -> tuple[str, int] | None:
    """The next word or quoted string from ``pos`` (QEMU's get_str); None at the end of the line or when a quoted
    string is malformed (QEMU reports that on its own stderr, not to the monitor)."""
    pos = _skip_spaces(text, pos)
    if pos >= len(text):
        return None
    if text[pos] == '"':
        out: list[str] = []
        pos += 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\":
                char = text[pos + 1] if pos + 1 < len(text) else ""
                if char not in _ESCAPES:
                    return None
                out.append(_ESCAPES[char])
                pos += 2
            else:
                out.append(text[pos])
                pos += 1
        if pos >= len(text):
            return None
        return "".join(out), pos + 1
    start = pos
    while pos < len(text) and not text[pos].isspace():
        pos += 1
    return text[start:pos], pos


def command_name(text: str) -> tuple[str, int] | None:
    """QEMU's get_command_name: after leading spaces, up to a space or ``/`` (so ``x/4x 0`` works)."""
    pos = _skip_spaces(text, 0)
    if pos >= len(text):
        return None
    end = pos
    while end < len(text) and text[end] != "/" and not text[end].isspace():
        end += 1
    return text[pos:end], end


# --- expressions --------------------------------------------------------------------------------------------------

#: A register's value by name (``eax``, ``pc``...), or None if there is no such register.
Registers = Callable[[str], int | None]

_INT64 = 1 << 64
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_REGISTER_CHARS = re.compile(r"[A-Za-z0-9_.]*")


def _int64(value: int) -> int:
    value %= _INT64
    return value - _INT64 if value >= 1 << 63 else value


class _Expr:
    """QEMU's recursive-descent expression reader over ``text`` from ``pos`` (int64 arithmetic, C division)."""

    def __init__(self, text: str, pos: int, registers: Registers | None) -> None:
        self.text, self.pos, self.registers = text, pos, registers

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> None:
        if self.pos < len(self.text):
            self.pos = _skip_spaces(self.text, self.pos + 1)

    def unary(self) -> int:
        char = self.peek()
        if char == "+":
            self.next()
            return self.unary()
        if char == "-":
            self.next()
            return _int64(-self.unary())
        if char == "~":
            self.next()
            return _int64(~self.unary())
        if char == "(":
            self.next()
            value = self.sum()
            if self.peek() != ")":
                raise ArgError("')' expected")
            self.next()
            return value
        if char == "'":
            self.pos += 1
            if self.pos >= len(self.text):
                raise ArgError("character constant expected")
            value = ord(self.text[self.pos])
            self.pos += 1
            if self.peek() != "'" or value > 0x7F:  # QEMU reads one byte: a UTF-8 sequence has more
                raise ArgError("missing terminating ' character")
            self.next()
            return value
        if char == "$":
            match = _REGISTER_CHARS.match(self.text, self.pos + 1)
            assert match is not None
            self.pos = _skip_spaces(self.text, match.end())
            register = self.registers(match.group()[:127]) if self.registers is not None else None
            if register is None:
                raise ArgError("unknown register")
            return _int64(register)
        if not char:
            raise ArgError("unexpected end of expression")
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise ArgError(f"invalid char '{char}' in expression")
        digits = match.group()
        value = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 8) if digits[0] == "0" else int(digits)
        if value >= _INT64:
            raise ArgError("number too large")
        self.pos = _skip_spaces(self.text, match.end())
        return _int64(value)

    def product(self) -> int:
        value = self.unary()
        while self.peek() and self.peek() in "*/%":
            op = self.peek()
            self.next()
            right = self.unary()
            if op == "*":
                value = _int64(value * right)
            elif right == 0:
                raise ArgError("division by zero")
            else:  # C truncates toward zero
                quotient = abs(value) // abs(right) * (1 if (value < 0) == (right < 0) else -1)
                value = _int64(quotient) if op == "/" else _int64(value - quotient * right)
        return value

    def logic(self) -> int:
        value = self.product()
        while self.peek() and self.peek() in "&|^":
            op = self.peek()
            self.next()
            right = self.product()
            value = value & right if op == "&" else value | right if op == "|" else value ^ right
        return value

    def sum(self) -> int:
        value = self.logic()
        while self.peek() and self.peek() in "+-":
            op = self.peek()
            self.next()
            right = self.logic()
            value = _int64(value + right if op == "+" else value - right)
        return value


def evaluate(text: str, pos: int = 0, registers: Registers | None = None) -> tuple[int, int]:
    """An HMP expression starting at ``pos``: its int64 value and where it stopped."""
    reader = _Expr(text, _skip_spaces(text, pos), registers)
    return reader.sum(), reader.pos


def parse_int(expr: str, registers: Registers | None = None) -> int:
    """A whole string as one HMP expression (what follows it is an error)."""
    value, pos = evaluate(expr, 0, registers)
    if pos < len(expr):
        raise ArgError(f"invalid char '{expr[pos]}' in expression")
    return value


_SIZE = re.compile(r"\+?(?:(0[xX][0-9a-fA-F]+)|(\d+)(\.\d*)?)")
_SIZE_SHIFT = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size_prefix(text: str, pos: int, default_shift: int = 20) -> tuple[int, int]:
    """qemu_strtosz at ``pos``: a decimal number with an optional fraction and suffix (``1.5G``), or a hex number
    without either; a bare number is in ``default_shift`` units (MiB for HMP's ``o``). The value and where it
    ended; ArgError("invalid size") for what QEMU refuses or what does not fit in an int64."""
    match = _SIZE.match(text, pos)
    if match is None:
        raise ArgError("invalid size")
    hex_digits, whole, fraction = match.groups()
    end = match.end()
    suffix = text[end].lower() if end < len(text) and text[end].lower() in _SIZE_SHIFT else ""
    if hex_digits is not None:
        if suffix or (end < len(text) and text[end] == "."):
            raise ArgError("invalid size")
        value, fixed = int(hex_digits, 16), 0
    else:
        value = int(whole)
        fixed = int(float("0" + fraction) * 2.0**64) if fraction and len(fraction) > 1 else 0
    shift = _SIZE_SHIFT[suffix] if suffix else default_shift
    if shift == 0 and fixed:
        raise ArgError("invalid size")  # a fraction of a byte
    # QEMU's 64.64 fixed point: whole * unit + fraction * unit, rounding half up.
    scaled = fixed << shift
    value = (value << shift) + (scaled >> 64) + ((scaled >> 63) & 1)
    if value > (1 << 63) - 1:
        raise ArgError("invalid size")
    return value, end + (1 if suffix else 0)


def parse_size(text: str, default_shift: int = 20) -> int:
    """A whole string as a size (``1G``, ``512k``); a bare number is ``default_shift`` (MiB for HMP's ``o``)."""
    value, end = parse_size_prefix(text, 0, default_shift)
    if end != len(text):
        raise ArgError("invalid size")
    return value


@dataclass
class Format:
    """The state HMP keeps for ``/fmt`` (QEMU's default_fmt_format/default_fmt_size: ``x`` and 4 at start)."""

    format: str = "x"
    size: int = 4


def _parse_format(text: str, pos: int, last: Format) -> tuple[dict[str, int | str], int]:
    pos = _skip_spaces(text, pos)
    if pos < len(text) and text[pos] == "/":
        pos += 1
        count = 1
        digits = re.match(r"\d*", text[pos:])
        assert digits is not None
        if digits.group():
            count = int(digits.group()) & 0xFFFFFFFF
            count = count - (1 << 32) if count >= 1 << 31 else count  # C int overflow, as QEMU's loop does
            pos += len(digits.group())
        size = -1
        fmt = ""
        while pos < len(text):
            char = text[pos]
            if char in "oduxic":
                fmt = char
            elif char in "bhwgL":
                size = {"b": 1, "h": 2, "w": 4, "g": 8, "L": 8}[char]
            else:
                break
            pos += 1
        if pos < len(text) and not text[pos].isspace():
            raise ArgError(f"invalid char in format: '{text[pos]}'")
        fmt = fmt or last.format
        if fmt != "i":
            if size < 0:
                size = last.size
            last.size = size
        last.format = fmt
        return {"count": count, "format": fmt, "size": size}, pos
    fmt = last.format
    return {"count": 1, "format": fmt, "size": last.size if fmt != "i" else -1}, pos


def parse_args(specs: tuple[ArgSpec, ...], text: str, cmd: str, *, formats: Format | None = None,
               registers: Registers | None = None) -> dict[str, Any]:
    """Parse the text after the command name against its specs; raise ArgError with QEMU's message."""
    args: dict[str, Any] = {}
    pos = 0
    for index, spec in enumerate(specs):
        kind = spec.kind
        if kind in ("flag", "flagval"):
            if kind == "flag":
                args[spec.name] = False
            start = pos
            pos = _skip_spaces(text, pos)
            if pos < len(text) and text[pos] == "-":
                letter = text[pos + 1] if pos + 1 < len(text) else ""
                later = "".join(f"-{s.flag}" for s in specs[index + 1:] if s.kind in ("flag", "flagval"))
                if letter != spec.flag:
                    if not letter or f"-{letter}" not in later:
                        raise ArgError(f"{cmd}: unsupported option -{letter}")
                    pos = start  # a later flag's: leave it for that one
                elif kind == "flagval":
                    word = next_word(text, pos + 2)
                    if word is None:
                        raise ArgError(f"{cmd}: value expected for -{spec.flag}")
                    args[spec.name], pos = word
                else:
                    args[spec.name] = True
                    pos += 2
            continue
        pos = _skip_spaces(text, pos)
        at_end = pos >= len(text)
        if spec.optional and at_end:
            continue
        if kind in ("s", "F", "B"):
            word = next_word(text, pos)
            if word is None:
                what = {"F": "filename", "B": "block device name"}.get(kind, "string")
                raise ArgError(f"{cmd}: {what} expected")
            args[spec.name], pos = word
        elif kind == "S":
            if at_end:
                raise ArgError(f"{cmd}: string expected")
            args[spec.name], pos = text[pos:], len(text)
        elif kind == "O":
            if at_end:
                continue
            word = next_word(text, pos)
            if word is None:
                raise ArgError(f"{cmd}: string expected")
            args[spec.name], pos = word
        elif kind in ("i", "l", "M"):
            value, pos = evaluate(text, pos, registers)
            if kind == "i" and (value >> 32) & 0xFFFFFFFF:
                raise ArgError(f"'{cmd}' has failed: integer is for 32-bit values")
            if kind == "M":
                if value < 0:
                    raise ArgError("enter a positive value")
                value = _int64(value << 20)
            args[spec.name] = value
        elif kind == "o":
            args[spec.name], pos = parse_size_prefix(text, pos)
        elif kind == "b":
            end = pos
            while end < len(text) and text[end].isprintable() and not text[end].isspace():
                end += 1
            state = text[pos:end]
            if state not in ("on", "off"):
                raise ArgError("Expected 'on' or 'off'")
            args[spec.name], pos = state == "on", end
        elif kind == "/":
            parsed, pos = _parse_format(text, pos, formats if formats is not None else Format())
            args.update(parsed)
    if _skip_spaces(text, pos) < len(text):
        raise ArgError(f"{cmd}: extraneous characters at the end of line")
    return args


#: QEMU 7.2's QKeyCode names (qapi/ui.json): what ``sendkey`` accepts, besides raw numbers.
_QKEYCODE_TEXT = """
unmapped shift shift_r alt alt_r ctrl ctrl_r menu esc 1 2 3 4 5 6 7 8 9 0 minus equal backspace tab q w e r t y u i o
p bracket_left bracket_right ret a s d f g h j k l semicolon apostrophe grave_accent backslash z x c v b n m comma dot
slash asterisk spc caps_lock f1 f2 f3 f4 f5 f6 f7 f8 f9 f10 num_lock scroll_lock kp_divide kp_multiply kp_subtract
kp_add kp_enter kp_decimal sysrq kp_0 kp_1 kp_2 kp_3 kp_4 kp_5 kp_6 kp_7 kp_8 kp_9 less f11 f12 print home pgup pgdn
end left up down right insert delete stop again props undo front copy open paste find cut lf help meta_l meta_r compose
pause ro hiragana henkan yen muhenkan katakanahiragana kp_comma kp_equals power sleep wake audionext audioprev
audiostop audioplay audiomute volumeup volumedown mediaselect mail calculator computer ac_home ac_back ac_forward
ac_refresh ac_bookmarks lang1 lang2
"""
QKEYCODES: tuple[str, ...] = tuple(_QKEYCODE_TEXT.split())
_QKEYCODE_SET = frozenset(QKEYCODES)
_ULONG_MAX = (1 << 64) - 1


def parse_keys(text: str) -> list[dict[str, Any]]:
    """``sendkey``'s key list (``ctrl-alt-f1``, ``0x1d-0x38``, ``<``) as QMP ``KeyValue`` objects, in order.

    QEMU's hmp_sendkey: names are split at every ``-`` (so ``ctrl-`` and ``ctrl--`` name an empty key, an
    error), a lone ``<`` is ``less``, ``0x..`` is a raw number (strtoul, all of the name), anything else a QKeyCode
    name."""
    keys: list[dict[str, Any]] = []
    for name in text.split("-"):
        if name == "<":
            name = "less"
        if name.startswith("0x"):
            digits = re.match(r"0x[0-9a-fA-F]*", name)
            assert digits is not None
            if digits.end() != len(name) or len(name) == 2:
                raise ArgError(f"invalid parameter: {name}")
            value = min(int(name, 16), _ULONG_MAX) & 0xFFFFFFFF  # strtoul, stored in an int
            keys.append({"type": "number", "data": value - (1 << 32) if value >= 1 << 31 else value})
            continue
        if name not in _QKEYCODE_SET:
            raise ArgError(f"invalid parameter: {name}")
        keys.append({"type": "qcode", "data": name})
    return keys
