"""Type stubs for the Hextile encoder's C part (rfb/encodings/_hextile.c)."""

from typing import Any

import numpy.typing as npt

from rfb.wire import Buffer

def max_size(width: int, height: int, bytes_per_pixel: int, /) -> int:
    """The most bytes the Hextile payload of a ``width`` x ``height`` rectangle can take."""

def encode_into(pixels: npt.NDArray[Any] | Buffer, out: Buffer, /) -> int:
    """Writes the payload of the rectangle ``pixels`` (2-D, 1/2/4-byte items) at the start of ``out``;
    returns how many bytes it wrote."""
