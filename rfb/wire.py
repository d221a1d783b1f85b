"""RFB wire constants and layouts: the one place that says what the numbers and structs on the wire mean.

Everything here is data or pure pack/unpack: message types, encoding numbers, security types, the
PIXEL_FORMAT struct and the SCREEN struct of ExtendedDesktopSize. All multi-byte integers are big-endian
(RFC 6143 section 7), pixel values excepted (their byte order is the pixel format's).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview

# --- protocol versions ---------------------------------------------------------------------------------------
RFB_3_3 = (3, 3)
RFB_3_7 = (3, 7)
RFB_3_8 = (3, 8)
#: What the server offers in its ProtocolVersion message.
SERVER_VERSION = RFB_3_8
VERSION_LENGTH = 12

# --- security types (RFC 6143 section 7.2) -------------------------------------------------------------------
SECURITY_INVALID = 0
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
VNC_AUTH_CHALLENGE_SIZE = 16
SECURITY_RESULT_OK = 0
SECURITY_RESULT_FAILED = 1

# --- client -> server message types --------------------------------------------------------------------------
MSG_SET_PIXEL_FORMAT = 0
MSG_SET_ENCODINGS = 2
MSG_FRAMEBUFFER_UPDATE_REQUEST = 3
MSG_KEY_EVENT = 4
MSG_POINTER_EVENT = 5
MSG_CLIENT_CUT_TEXT = 6
MSG_ENABLE_CONTINUOUS_UPDATES = 150
MSG_CLIENT_FENCE = 248
MSG_SET_DESKTOP_SIZE = 251
MSG_QEMU = 255
QEMU_EXTENDED_KEY_EVENT = 0  # submessage type of MSG_QEMU

# --- server -> client message types --------------------------------------------------------------------------
MSG_FRAMEBUFFER_UPDATE = 0
MSG_SET_COLOUR_MAP_ENTRIES = 1
MSG_BELL = 2
MSG_SERVER_CUT_TEXT = 3
MSG_END_OF_CONTINUOUS_UPDATES = 150
MSG_SERVER_FENCE = 248

# --- encodings ----------------------------------------------------------------------------------------------
ENCODING_RAW = 0
ENCODING_COPYRECT = 1
ENCODING_RRE = 2
ENCODING_HEXTILE = 5
ENCODING_ZLIB = 6
ENCODING_TIGHT = 7
ENCODING_ZRLE = 16

# --- pseudo-encodings ---------------------------------------------------------------------------------------
ENCODING_QUALITY_LEVEL_0 = -32  # -32 (lowest) .. -23 (highest) JPEG quality
ENCODING_QUALITY_LEVEL_9 = -23
ENCODING_DESKTOP_SIZE = -223
ENCODING_LAST_RECT = -224
ENCODING_CURSOR = -239
ENCODING_COMPRESS_LEVEL_0 = -256  # -256 (fastest) .. -247 (best) compression
ENCODING_COMPRESS_LEVEL_9 = -247
ENCODING_QEMU_POINTER_MOTION_CHANGE = -257
ENCODING_QEMU_EXTENDED_KEY_EVENT = -258
ENCODING_EXTENDED_DESKTOP_SIZE = -308
ENCODING_FENCE = -312
ENCODING_CONTINUOUS_UPDATES = -313

#: Genuine (pixel-carrying) encodings this package can produce.
PIXEL_ENCODINGS = frozenset({
    ENCODING_RAW, ENCODING_COPYRECT, ENCODING_HEXTILE, ENCODING_ZLIB, ENCODING_TIGHT, ENCODING_ZRLE,
})

# --- ExtendedDesktopSize codes ------------------------------------------------------------------------------
EDS_REASON_SERVER = 0  # changed by the server, or the answer to a non-incremental update request
EDS_REASON_CLIENT = 1  # answer to this client's SetDesktopSize
EDS_REASON_OTHER_CLIENT = 2  # another client's SetDesktopSize was approved
EDS_STATUS_OK = 0
EDS_STATUS_PROHIBITED = 1
EDS_STATUS_OUT_OF_RESOURCES = 2
EDS_STATUS_INVALID_LAYOUT = 3
EDS_STATUS_FORWARDED = 4

# --- fence flags --------------------------------------------------------------------------------------------
FENCE_BLOCK_BEFORE = 1 << 0
FENCE_BLOCK_AFTER = 1 << 1
FENCE_SYNC_NEXT = 1 << 2
FENCE_REQUEST = 1 << 31
FENCE_MAX_PAYLOAD = 64

# --- structs (after the message-type byte where a message has one) ------------------------------------------
U8 = struct.Struct(">B")
U32 = struct.Struct(">I")
PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
SERVER_INIT = struct.Struct(">HH16sI")  # width, height, pixel format, name length
RECT_HEADER = struct.Struct(">HHHHi")  # x, y, width, height, encoding
UPDATE_HEADER = struct.Struct(">BxH")  # message type 0, padding, number of rectangles
COLOUR_MAP_HEADER = struct.Struct(">BxHH")  # message type 1, padding, first colour, number of colours
CUT_TEXT_HEADER = struct.Struct(">B3xI")  # message type 3, padding, length
FENCE_HEADER = struct.Struct(">B3xIB")  # message type 248, padding, flags, payload length
SCREEN = struct.Struct(">IHHHHI")  # id, x, y, width, height, flags
EDS_HEADER = struct.Struct(">B3x")  # number of screens, padding

# Client message bodies, counted from the message-type byte.
SET_PIXEL_FORMAT_MSG = struct.Struct(">B3x16s")
SET_ENCODINGS_HEADER = struct.Struct(">BxH")
UPDATE_REQUEST_MSG = struct.Struct(">BBHHHH")
KEY_EVENT_MSG = struct.Struct(">BB2xI")
POINTER_EVENT_MSG = struct.Struct(">BBHH")
CLIENT_CUT_TEXT_HEADER = struct.Struct(">B3xI")
CONTINUOUS_UPDATES_MSG = struct.Struct(">BBHHHH")
CLIENT_FENCE_HEADER = struct.Struct(">B3xIB")
SET_DESKTOP_SIZE_HEADER = struct.Struct(">BxHHBx")
QEMU_HEADER = struct.Struct(">BB")
QEMU_EXTENDED_KEY_MSG = struct.Struct(">BBHII")


@dataclass(frozen=True, slots=True)
class PixelFormat:
    """RFB PIXEL_FORMAT (RFC 6143 section 7.4)."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def pack(self) -> bytes:
        return PIXEL_FORMAT.pack(
            self.bits_per_pixel, self.depth, self.big_endian, self.true_colour, self.red_max, self.green_max,
            self.blue_max, self.red_shift, self.green_shift, self.blue_shift,
        )

    @classmethod
    def unpack(cls, data: Buffer) -> PixelFormat:
        bpp, depth, big, true, rmax, gmax, bmax, rshift, gshift, bshift = PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, big != 0, true != 0, rmax, gmax, bmax, rshift, gshift, bshift)

    def check(self) -> None:
        """Only formats whose pixel size can be stepped over are usable (8, 16, 32 bits)."""
        if self.bits_per_pixel not in (8, 16, 32) or not 0 < self.depth <= self.bits_per_pixel:
            raise ValueError(f"unusable pixel format {self}")

    def problem(self) -> str | None:
        """Why this format cannot be served, or None. Colour-map formats are fine (see pixels.py)."""
        if self.bits_per_pixel not in (8, 16, 32):
            return f"bits-per-pixel {self.bits_per_pixel} is not 8, 16 or 32"
        if not self.true_colour:
            return None
        for name, top, shift in (("red", self.red_max, self.red_shift), ("green", self.green_max, self.green_shift),
                                 ("blue", self.blue_max, self.blue_shift)):
            if top & (top + 1):
                return f"{name}-max {top} is not 2^N-1"
            if top.bit_length() + shift > self.bits_per_pixel:
                return f"{name} bits (max {top} << {shift}) do not fit in {self.bits_per_pixel} bits"
        return None


@dataclass(frozen=True, slots=True)
class Screen:
    """One head of an ExtendedDesktopSize layout (rfbproto "SCREEN")."""

    id: int
    x: int
    y: int
    width: int
    height: int
    flags: int = 0

    def pack(self) -> bytes:
        return SCREEN.pack(self.id, self.x, self.y, self.width, self.height, self.flags)


#: The framebuffer's own format (shm pixel format 1): 32-bit little-endian xRGB, bytes B, G, R, X in memory.
#: Sent in ServerInit; a viewer that keeps it gets the framebuffer bytes unchanged.
BGRX8888 = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


def version_bytes(version: tuple[int, int]) -> bytes:
    return b"RFB %03d.%03d\n" % version


def rect_header(x: int, y: int, width: int, height: int, encoding: int) -> bytes:
    return RECT_HEADER.pack(x, y, width, height, encoding)
