"""Rectangle encoders (Raw, CopyRect, Hextile, Zlib, ZRLE, Tight), pseudo-rectangles and update assembly.

Everything takes pixels already converted to the viewer's format (rfb.pixels) and returns bytes; the
stateful encoders (Zlib, ZRLE, Tight: zlib streams) must be kept one set per connection, e.g. in a
:class:`NegotiatedEncoders`.
"""

from rfb.encodings.base import Encoder, compact_length
from rfb.encodings.hextile import HextileEncoder
from rfb.encodings.negotiated import (
    ENCODER_TYPES,
    EncoderSettings,
    NegotiatedEncoders,
    encode_frame_rects,
    make_encoder,
)
from rfb.encodings.pseudo import (
    cursor_rect,
    desktop_size_rect,
    extended_desktop_size_rect,
    last_rect,
    qemu_extended_key_event_rect,
    qemu_pointer_motion_change_rect,
)
from rfb.encodings.raw import RawEncoder, copyrect_rect
from rfb.encodings.tight import TightEncoder
from rfb.encodings.update import (
    UNKNOWN_COUNT,
    FramebufferUpdate,
    framebuffer_update_message,
    update_header,
)
from rfb.encodings.zlibraw import ZlibEncoder, ZlibStream
from rfb.encodings.zrle import ZrleEncoder

__all__ = [
    "ENCODER_TYPES", "UNKNOWN_COUNT", "Encoder", "EncoderSettings", "FramebufferUpdate", "HextileEncoder",
    "NegotiatedEncoders", "RawEncoder", "TightEncoder", "ZlibEncoder", "ZlibStream", "ZrleEncoder",
    "compact_length", "copyrect_rect", "cursor_rect", "desktop_size_rect", "encode_frame_rects",
    "extended_desktop_size_rect", "framebuffer_update_message", "last_rect", "make_encoder",
    "qemu_extended_key_event_rect", "qemu_pointer_motion_change_rect", "update_header",
]
