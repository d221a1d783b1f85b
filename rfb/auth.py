"""VNC Authentication (RFC 6143 section 7.2.2): DES of a 16-byte challenge keyed by the password.

The VNC convention differs from textbook DES in one way: each key byte is bit-reversed before use (RFB takes
the lowest bit of each byte as the first key bit). The password is truncated or NUL-padded to 8 bytes, and
the two 8-byte halves of the challenge are encrypted independently (ECB). This is weak by modern standards
and exists for compatibility only; use it behind a TLS tunnel or on a trusted network.
"""

from __future__ import annotations

import hmac
import secrets

from rfb.wire import VNC_AUTH_CHALLENGE_SIZE

KEY_SIZE = 8

# Bit-reversal of every byte value, for the key schedule convention.
_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def password_bytes(password: str | bytes) -> bytes:
    """The password as the DES key material: UTF-8 for text, truncated/NUL-padded to 8 bytes."""
    raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    return raw[:KEY_SIZE].ljust(KEY_SIZE, b"\x00")


def des_key(password: str | bytes) -> bytes:
    """The DES key VNC derives from a password: 8 bytes, each bit-reversed."""
    return password_bytes(password).translate(_REVERSED)


def new_challenge() -> bytes:
    return secrets.token_bytes(VNC_AUTH_CHALLENGE_SIZE)


def response_for(password: str | bytes, challenge: bytes) -> bytes:
    """What a viewer that knows ``password`` answers to ``challenge``."""
    if len(challenge) != VNC_AUTH_CHALLENGE_SIZE:
        raise ValueError(f"VNC challenge must be {VNC_AUTH_CHALLENGE_SIZE} bytes, not {len(challenge)}")
    # Imported when first needed: pycryptodome brings cffi and pycparser (a few MiB), which a core whose viewers
    # need no password never uses (docs/fleet.md: the core's memory per VM).
    from Crypto.Cipher import DES

    return DES.new(des_key(password), DES.MODE_ECB).encrypt(challenge)


def check_response(password: str | bytes, challenge: bytes, response: bytes) -> bool:
    """True if ``response`` proves knowledge of ``password``; compared in constant time."""
    return hmac.compare_digest(response_for(password, challenge), response)
