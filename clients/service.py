"""What a service hosted by the client (VNC server, monitor, guest agent) plugs into.

The client owns the event loop, the control channel and the display subscription; a service binds its
listeners in ``bind`` (while the client may still be root), then runs with whatever the client tells it:
the core it is attached to, display records, broadcasts. Services never talk to the core on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ipc.messages import EventBody, Welcome
from shm import Overrun, Record

if TYPE_CHECKING:
    from .main import ClientContext


class Service(Protocol):
    name: str

    async def bind(self, ctx: ClientContext) -> None:
        """Open listening sockets. Runs before privileges are dropped."""

    async def start(self) -> None:
        """Start serving (after the privilege drop)."""

    def attached(self, welcome: Welcome) -> None:
        """The client is attached to a core (first time, or again after a restart or migration)."""

    def detached(self, reason: str) -> None:
        """The core went away; requests fail until ``attached`` again. Peers stay connected."""

    def display_records(self, records: list[Record] | Overrun) -> None:
        """New display records (``Overrun``: the reader fell behind, repaint everything)."""

    def event(self, body: EventBody) -> None:
        """A broadcast from the core."""

    async def close(self) -> None:
        """Close listeners and peers."""


class QuietService:
    """No-op defaults for a service that does not care about the core's comings and goings or the display (a
    web console, a list of endpoints): subclasses fill in what they serve."""

    name = "quiet"

    async def bind(self, ctx: ClientContext) -> None:
        pass

    async def start(self) -> None:
        pass

    def attached(self, welcome: Welcome) -> None:
        pass

    def detached(self, reason: str) -> None:
        pass

    def display_records(self, records: list[Record] | Overrun) -> None:
        pass

    def event(self, body: EventBody) -> None:
        pass

    async def close(self) -> None:
        pass
