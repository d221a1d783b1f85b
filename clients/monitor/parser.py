"""QEMU's HMP argument syntax, sans-IO: words and quoted strings, integer expressions, sizes, ``-x`` flags, and
``sendkey``'s key syntax (``ctrl-alt-f1``, ``0x1d``).

Argument specs follow QEMU's ``args_type`` strings from hmp-commands.hx, e.g. ``"keys:s,hold-time:i?"``:
``s`` a word (or quoted string), ``F`` a file name, ``S`` the rest of the line, ``i`` an integer expression,
``o`` a size (``1G``), ``-d`` a flag (``detach:-d``); ``?`` makes an argument optional.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class ArgError(Exception):
    """Bad arguments; the message is QEMU's (the caller adds ``Try "help CMD" ...``)."""


@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str  # s, F, S, i, o, flag, flagval (``-fs``: ``-f VALUE``)
    optional: bool = False
    flag: str = ""  # for kind "flag": the letter


def parse_spec(args_type: str) -> tuple[ArgSpec, ...]:
    specs: list[ArgSpec] = []
    for item in filter(None, args_type.split(",")):
        name, _, kind = item.partition(":")
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if kind.startswith("-") and kind.endswith("s") and len(kind) == 3:
            specs.append(ArgSpec(name, "flagval", True, kind[1]))
        elif kind.startswith("-"):
            specs.append(ArgSpec(name, "flag", True, kind[1:]))
        elif kind in ("s", "F", "S", "i", "o"):
            specs.append(ArgSpec(name, kind, optional))
        else:
            raise ValueError(f"unknown argument type {kind!r} in {args_type!r}")
    return tuple(specs)


_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def next_word(text: str, pos: int) -> tuple[str, int] | None:
    """The next word or quoted string from ``pos`` (QEMU's get_str); None at the end of the line."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] == '"':
        out: list[str] = []
        pos += 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\" and pos + 1 < len(text):
                char = text[pos + 1]
                if char not in _ESCAPES:
                    raise ArgError(f"unsupported escape code: '\\{char}'")
                out.append(_ESCAPES[char])
                pos += 2
            else:
                out.append(text[pos])
                pos += 1
        if pos >= len(text):
            raise ArgError("unterminated string")
        return "".join(out), pos + 1
    start = pos
    while pos < len(text) and not text[pos].isspace():
        pos += 1
    return text[start:pos], pos


_INT_TOKEN = re.compile(r"\s*(0[xX][0-9a-fA-F]+|\d+|[-+*/()])")


def parse_int(expr: str) -> int:
    """An integer expression as HMP takes it: decimal or 0x hex, with + - * / and parentheses."""
    tokens: list[str] = []
    pos = 0
    expr = expr.strip()
    if not expr:
        raise ArgError("unexpected end of expression")
    while pos < len(expr):
        match = _INT_TOKEN.match(expr, pos)
        if match is None:
            raise ArgError(f"invalid char '{expr[pos:].strip()[0]}' in expression")
        tokens.append(match.group(1))
        pos = match.end()
    items = iter([*tokens, ""])
    current = [next(items)]

    def take() -> str:
        token = current[0]
        current[0] = next(items, "")  # past the end: keep answering the end marker
        return token

    def unary() -> int:
        token = take()
        if token == "-":
            return -unary()
        if token == "+":
            return unary()
        if token == "(":
            value = additive()
            if take() != ")":
                raise ArgError("')' expected")
            return value
        if not token:
            raise ArgError("unexpected end of expression")
        if token in "*/)":
            raise ArgError(f"invalid char '{token}' in expression")
        # QEMU reads numbers with strtoull base 0: a leading 0 means octal ("010" is 8).
        base = 8 if len(token) > 1 and token[0] == "0" and token[1].isdigit() else 0
        try:
            return int(token, base)
        except ValueError:
            raise ArgError(f"invalid number '{token}' in expression") from None

    def term() -> int:
        value = unary()
        while current[0] in ("*", "/"):
            op = take()
            right = unary()
            if op == "/" and right == 0:
                raise ArgError("division by zero")
            value = value * right if op == "*" else value // right
        return value

    def additive() -> int:
        value = term()
        while current[0] in ("+", "-"):
            op = take()
            value = value + term() if op == "+" else value - term()
        return value

    value = additive()
    if current[0]:
        raise ArgError(f"invalid char '{current[0]}' in expression")
    return value


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([bBkKmMgGtTpPeE]?)$")
_SIZE_SHIFT = {"": 20, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str, default_shift: int = 20) -> int:
    """A size (``o`` type): a number with an optional suffix; a bare number is MiB for balloon-like commands."""
    match = _SIZE.match(text)
    if match is None:
        raise ArgError("invalid size")
    number, suffix = match.groups()
    shift = default_shift if not suffix else _SIZE_SHIFT[suffix.lower()]
    return int(float(number) * (1 << shift))


def parse_args(specs: tuple[ArgSpec, ...], text: str, cmd: str) -> dict[str, Any]:
    """Parse the text after the command name against its specs; raise ArgError with QEMU's message."""
    args: dict[str, Any] = {}
    pos = 0
    for spec in specs:
        if spec.kind == "flag":
            args[spec.name] = False
            save = pos
            word = next_word(text, pos)
            if word is not None and word[0] == f"-{spec.flag}":
                args[spec.name] = True
                pos = word[1]
            else:
                pos = save
            continue
        if spec.kind == "flagval":
            word = next_word(text, pos)
            if word is not None and word[0] == f"-{spec.flag}":
                flag_value = next_word(text, word[1])
                if flag_value is None:
                    raise ArgError(f"{cmd}: missing value for -{spec.flag}")
                args[spec.name], pos = flag_value
            continue
        if spec.kind == "S":
            rest = text[pos:].strip()
            if not rest and not spec.optional:
                raise ArgError(f"{cmd}: string expected")
            if rest:
                args[spec.name] = rest
            pos = len(text)
            continue
        word = next_word(text, pos)
        if word is None:
            if spec.optional:
                continue
            if spec.kind == "i":
                raise ArgError("unexpected end of expression")
            if spec.kind == "o":
                raise ArgError(f"{cmd}: missing size")
            raise ArgError(f"{cmd}: {'filename' if spec.kind == 'F' else 'string'} expected")
        value, pos = word
        if spec.kind == "i":
            args[spec.name] = parse_int(value)
        elif spec.kind == "o":
            args[spec.name] = parse_size(value)
        else:
            args[spec.name] = value
    if text[pos:].strip():
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


def parse_keys(text: str) -> list[dict[str, Any]]:
    """``sendkey``'s key list (``ctrl-alt-f1``, ``0x1d-0x38``) as QMP ``KeyValue`` objects, in order.

    Like QEMU, a ``-`` right after a separator is the minus key itself (``ctrl--``)."""
    keys: list[dict[str, Any]] = []
    names: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        char = text[i]
        if char == "-" and current:
            names.append(current)
            current = ""
        else:
            current += char
        i += 1
    if current or text.endswith("-"):
        names.append(current or "-")
    for name in names:
        if name == "-":
            name = "minus"
        if name.startswith(("0x", "0X")):
            try:
                keys.append({"type": "number", "data": int(name, 16)})
            except ValueError:
                raise ArgError(f"invalid parameter: {name}") from None
            continue
        if name not in _QKEYCODE_SET:
            raise ArgError(f"invalid parameter: {name}")
        keys.append({"type": "qcode", "data": name})
    if not keys:
        raise ArgError("invalid parameter: ")
    return keys
