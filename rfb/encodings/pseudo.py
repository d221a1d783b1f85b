"""Pseudo-rectangles: rectangles that carry a message instead of pixels (RFC 6143 7.8, rfbproto)."""

from __future__ import annotations

from collections.abc import Sequence

from rfb.pixels import convert, cursor_mask
from rfb.wire import (
    EDS_HEADER,
    EDS_REASON_SERVER,
    EDS_STATUS_OK,
    ENCODING_CURSOR,
    ENCODING_DESKTOP_SIZE,
    ENCODING_EXTENDED_DESKTOP_SIZE,
    ENCODING_LAST_RECT,
    ENCODING_QEMU_EXTENDED_KEY_EVENT,
    ENCODING_QEMU_POINTER_MOTION_CHANGE,
    Buffer,
    PixelFormat,
    Screen,
    rect_header,
)


def desktop_size_rect(width: int, height: int) -> bytes:
    """DesktopSize (-223): the framebuffer is now width x height. Send it alone in its update (or last), and
    only on a real change; a viewer that also asked for ExtendedDesktopSize must get that one instead."""
    return rect_header(0, 0, width, height, ENCODING_DESKTOP_SIZE)


def extended_desktop_size_rect(width: int, height: int, screens: Sequence[Screen], *,
                               reason: int = EDS_REASON_SERVER, status: int = EDS_STATUS_OK) -> bytes:
    """ExtendedDesktopSize (-308): the size and screen layout. ``reason`` goes in x (0 server / answer to a
    non-incremental request, 1 answer to this viewer's SetDesktopSize, 2 another viewer's), ``status`` in y."""
    if not 0 < len(screens) <= 255:
        raise ValueError("an ExtendedDesktopSize layout has 1 to 255 screens")
    return (rect_header(reason, status, width, height, ENCODING_EXTENDED_DESKTOP_SIZE)
            + EDS_HEADER.pack(len(screens)) + b"".join(s.pack() for s in screens))


def cursor_rect(hot_x: int, hot_y: int, width: int, height: int, bgra: Buffer, fmt: PixelFormat) -> bytes:
    """Cursor (-239) from a B, G, R, A image (the shm cursor format): the pixels in the viewer's format and
    a mask of the pixels with alpha >= 128. A 0x0 cursor hides the pointer."""
    if len(bgra) != width * height * 4:
        raise ValueError(f"a {width}x{height} cursor needs {width * height * 4} bytes, got {len(bgra)}")
    if width == 0 or height == 0:
        return rect_header(hot_x, hot_y, 0, 0, ENCODING_CURSOR)
    return rect_header(hot_x, hot_y, width, height, ENCODING_CURSOR) + convert(bgra, fmt) + cursor_mask(
        bgra, width, height)


def last_rect() -> bytes:
    """LastRect (-224): ends an update whose header said 65535 rectangles."""
    return rect_header(0, 0, 0, 0, ENCODING_LAST_RECT)


def qemu_extended_key_event_rect() -> bytes:
    """QEMU Extended Key Event (-258): tells the viewer it may send keycodes (message 255, subtype 0)."""
    return rect_header(0, 0, 0, 0, ENCODING_QEMU_EXTENDED_KEY_EVENT)


def qemu_pointer_motion_change_rect(absolute: bool, width: int, height: int) -> bytes:
    """QEMU Pointer Motion Change (-257): x = 1 asks for absolute positions, 0 for relative deltas."""
    return rect_header(1 if absolute else 0, 0, width, height, ENCODING_QEMU_POINTER_MOTION_CHANGE)
