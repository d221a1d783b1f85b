"""RFB (VNC), sans-IO, for both roles, as h11 is for HTTP: the shared wire format (wire), pixel formats
(pixels), rectangle encoders (encodings), events and errors; ``server`` is the viewer-facing state machine the
client process runs, ``client`` the one the core uses to read QEMU's private VNC. No sockets or asyncio here;
each owner wires them to its event loop. See docs/rfb.md.
"""

from rfb.errors import LocalProtocolError, ProtocolError, RfbError
from rfb.server import RfbServerConnection, State
from rfb.wire import BGRX8888, PixelFormat, Screen

__all__ = [
    "BGRX8888", "LocalProtocolError", "PixelFormat", "ProtocolError", "RfbError", "RfbServerConnection", "Screen",
    "State",
]
