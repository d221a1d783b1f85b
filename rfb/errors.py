"""The two ways an RFB connection goes wrong, in either role: the peer broke the protocol, or the owner misused
the API."""

from __future__ import annotations

from rfb.events import Event


class RfbError(Exception):
    """Root of this package's errors."""


class ProtocolError(RfbError):
    """The peer sent something RFB does not allow (or over a limit); the connection is dead.

    Bytes that tell the viewer why (a handshake failure reason) may still be waiting in ``data_to_send()``:
    send them, then close. ``events`` holds what the same ``receive_data`` call completed before the error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events: tuple[Event, ...] = ()


class LocalProtocolError(RfbError):
    """The owner called a method in a state where it makes no sense (e.g. a FramebufferUpdate mid-handshake)."""


class AuthenticationFailed(ProtocolError):
    """The server refused the handshake (client role); ``reason`` is its own text when it gave one."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"VNC server refused the connection: {reason}")
        self.reason = reason
