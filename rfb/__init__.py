"""RFB (VNC), sans-IO, for both roles, as h11 is for HTTP: the shared wire format (wire), pixel formats
(pixels), rectangle encoders (encodings), events and errors; ``server`` is the viewer-facing state machine the
client process runs, ``client`` the one the core uses to read QEMU's private VNC. No sockets or asyncio here;
each owner wires them to its event loop. See docs/rfb.md.

The names below are loaded on first use (PEP 562): the core imports ``rfb.client`` only, and must not pay for
the server role's encoders (numpy, Pillow) and DES.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rfb.errors import LocalProtocolError, ProtocolError, RfbError
    from rfb.server import RfbServerConnection, State
    from rfb.wire import BGRX8888, PixelFormat, Screen

_WHERE = {
    "LocalProtocolError": "rfb.errors", "ProtocolError": "rfb.errors", "RfbError": "rfb.errors",
    "RfbServerConnection": "rfb.server", "State": "rfb.server",
    "BGRX8888": "rfb.wire", "PixelFormat": "rfb.wire", "Screen": "rfb.wire",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rfb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BGRX8888", "LocalProtocolError", "PixelFormat", "ProtocolError", "RfbError", "RfbServerConnection", "Screen",
    "State",
]
