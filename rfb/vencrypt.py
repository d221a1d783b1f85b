"""VeNCrypt (RFB security type 19), version 0.2: the messages exchanged in the clear before TLS starts.

After the viewer picks type 19 (rfbproto, "VeNCrypt"; QEMU's ui/vnc-auth-vencrypt.c)::

    server: U8 major 0, U8 minor 2                      (server_version)
    viewer: U8 major, U8 minor                          (read_client_version): 0.2 or the server refuses
    server: U8 0 (ok) or nonzero (refused, then close)  (version_ack)
    server: U8 count, count x U32 subtypes              (version_ack, when ok)
    viewer: U32 subtype                                 (read_subtype)
    server: U8 1 (accepted) or 0 (refused, then close)  (subtype_ack)
    ... TLS handshake, then the subtype's own authentication inside TLS: none (SecurityResult ok) or VNC
    Authentication (challenge, response, SecurityResult) ...

Nothing here does TLS: rfb.server sequences these messages and hands the connection to its owner for the
handshake (``TlsRequested``). Only the subtypes QEMU offers without SASL are known here: the *Plain ones send a
username and password and vmfront has no user database.
"""

from __future__ import annotations

import struct

from rfb.wire import U8, U32, Buffer

VERSION = (0, 2)
VERSION_MSG = struct.Struct(">BB")

TLS_NONE = 257
TLS_VNC = 258
X509_NONE = 260
X509_VNC = 261

#: QEMU's names (QAPI VncVencryptSubAuth), as query-vnc-servers and ``info vnc`` show them.
NAMES = {TLS_NONE: "tls-none", TLS_VNC: "tls-vnc", X509_NONE: "x509-none", X509_VNC: "x509-vnc"}
#: Anonymous TLS: encryption, but no certificate, so no protection against a man in the middle.
ANONYMOUS = frozenset({TLS_NONE, TLS_VNC})
#: VNC Authentication runs inside the TLS session.
WITH_VNC_AUTH = frozenset({TLS_VNC, X509_VNC})
SUBTYPES = frozenset(NAMES)

_ACK_OK = 0
_ACK_REFUSED = 1
_SUBTYPE_ACCEPTED = 1
_SUBTYPE_REFUSED = 0


def server_version() -> bytes:
    return VERSION_MSG.pack(*VERSION)


def read_client_version(buf: Buffer, pos: int) -> tuple[int, int] | None:
    """The version the viewer chose, or None if its two bytes are not all there yet."""
    if len(buf) - pos < VERSION_MSG.size:
        return None
    major, minor = VERSION_MSG.unpack_from(buf, pos)
    return major, minor


def version_ack(subtypes: tuple[int, ...] | None) -> bytes:
    """Accept the viewer's version and list ``subtypes`` (preference order), or refuse it (``None``)."""
    if subtypes is None:
        return U8.pack(_ACK_REFUSED)
    if not 0 < len(subtypes) <= 255:
        raise ValueError("a VeNCrypt subtype list has 1 to 255 entries")
    return U8.pack(_ACK_OK) + U8.pack(len(subtypes)) + b"".join(U32.pack(s) for s in subtypes)


def read_subtype(buf: Buffer, pos: int) -> int | None:
    if len(buf) - pos < U32.size:
        return None
    subtype: int = U32.unpack_from(buf, pos)[0]
    return subtype


def subtype_ack(accepted: bool) -> bytes:
    return U8.pack(_SUBTYPE_ACCEPTED if accepted else _SUBTYPE_REFUSED)


def describe(subtype: int) -> str:
    return NAMES.get(subtype, f"subtype {subtype}")
