"""The VNC (RFB) server of the client process, as sans-IO pieces: the connection state machine (server),
its events, pixel conversion (pixels) and rectangle encoders (encodings). No sockets or asyncio here; the
owner wires them to the event loop and the shared framebuffer. See docs/rfb.md.
"""

from clients.rfb.errors import LocalProtocolError, ProtocolError, RfbError
from clients.rfb.server import RfbServerConnection, State
from clients.rfb.wire import BGRX8888, PixelFormat, Screen

__all__ = [
    "BGRX8888", "LocalProtocolError", "PixelFormat", "ProtocolError", "RfbError", "RfbServerConnection", "Screen",
    "State",
]
