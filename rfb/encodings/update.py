"""FramebufferUpdate assembly: the message header and its rectangles."""

from __future__ import annotations

from collections.abc import Iterable

from rfb.encodings.pseudo import last_rect
from rfb.wire import MSG_FRAMEBUFFER_UPDATE, UPDATE_HEADER

MAX_COUNTED_RECTS = 0xFFFE  # 0xFFFF means "until LastRect" to viewers that asked for LastRect
UNKNOWN_COUNT = 0xFFFF


def update_header(count: int) -> bytes:
    """The 4-byte header; ``UNKNOWN_COUNT`` when rectangles will be streamed and ended by :func:`last_rect`."""
    if not 0 <= count <= UNKNOWN_COUNT:
        raise ValueError(f"{count} rectangles do not fit one FramebufferUpdate")
    return UPDATE_HEADER.pack(MSG_FRAMEBUFFER_UPDATE, count)


def framebuffer_update_message(rects: Iterable[bytes], *, last_rect_terminated: bool = False) -> bytes:
    """Header plus complete rectangles; counted, or with 65535 and a LastRect at the end."""
    body = list(rects)
    if last_rect_terminated:
        return update_header(UNKNOWN_COUNT) + b"".join(body) + last_rect()
    if len(body) > MAX_COUNTED_RECTS:
        raise ValueError(f"{len(body)} rectangles: more than {MAX_COUNTED_RECTS} need LastRect")
    return update_header(len(body)) + b"".join(body)


class FramebufferUpdate:
    """Collects rectangles for one update (from several encoders and pseudo-encodings)."""

    def __init__(self) -> None:
        self.rects: list[bytes] = []

    def add(self, *rects: bytes) -> None:
        self.rects.extend(rects)

    def extend(self, rects: Iterable[bytes]) -> None:
        self.rects.extend(rects)

    def __len__(self) -> int:
        return len(self.rects)

    def to_bytes(self, *, last_rect_terminated: bool = False) -> bytes:
        return framebuffer_update_message(self.rects, last_rect_terminated=last_rect_terminated)
