"""Copy and paste between VNC viewers and the guest, through the core.

The core's capture connection is QEMU's VNC client; QEMU's ``qemu-vdagent`` joins QEMU's clipboard to the guest's
spice-vdagent (see core_daemon/display.py). The core tells every client what the guest copied (``clipboard``
broadcasts) and takes pastes (``clipboard_set``). Here:

- :class:`ClipboardHub`, one per VNC service: the guest's clipboard as last heard, handed to every viewer; pastes
  from viewers sent to the core one at a time, the newest replacing one still waiting. A paste waits while the
  guest migrates (the core answers ``ClipboardBusy`` then: QEMU's vdagent state does not travel with the guest) and
  goes to the destination's core once the client is there; after ``PASTE_WAIT_S`` it fails, and says so in the log.
- :class:`ViewerClipboard`, one per viewer: the RFB side. Viewers that announced the Extended Clipboard get
  notify / request / provide (text, UTF-8, zlib); the others legacy cut text (Latin-1). Text over the limit
  (1 MiB by default, as QEMU) is refused before it is inflated, with a log line; the viewer stays connected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ipc.channel import ChannelError, RemoteError
from ipc.messages import ClipboardChanged, ClipboardSetOp, EventBody, Migrated, Migrating, RunStateChanged, Welcome
from rfb import clipboard as extclip
from rfb import events as ev
from rfb.server import RfbServerConnection, State

if TYPE_CHECKING:
    from clients.main import ClientContext

log = logging.getLogger(__name__)

#: How long a paste waits for a migration to end (or for a core to attach) before it fails.
PASTE_WAIT_S = 30.0
#: How long the core may take to answer one paste.
PASTE_TIMEOUT_S = 10.0
#: Run states in which the core refuses pastes (the paste waits instead).
BUSY_STATES = frozenset({"migrating", "migrated", "incoming"})


class ClipboardHub:
    """The guest clipboard as this client's VNC service shares it (see the module docstring)."""

    def __init__(self) -> None:
        self.ctx: ClientContext | None = None
        #: The guest clipboard's text, as last heard from the core (None: nothing yet).
        self.text: str | None = None
        self.viewers: set[ViewerClipboard] = set()
        self.migrating = False
        self._moving = False  # told the guest runs under another core, not attached there yet
        self._attached = False
        self._changed = asyncio.Event()
        self._pending: tuple[str, str, str, float] | None = None  # text, source, peer, deadline
        self._task: asyncio.Task[None] | None = None
        #: Pastes that reached the guest's core, and those that failed (for tests and the log).
        self.pasted = 0
        self.failed = 0

    def start(self, ctx: ClientContext) -> None:
        self.ctx = ctx
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clipboard-paste")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # --- from the core ---------------------------------------------------------------------------------------

    def attached(self, welcome: Welcome) -> None:
        self._attached = True
        self._moving = False
        self._set_migrating(welcome.run_state in BUSY_STATES)

    def detached(self, reason: str) -> None:
        self._attached = False
        self._changed.set()

    def event(self, body: EventBody) -> None:
        if isinstance(body, ClipboardChanged):
            self._guest_changed(body)
        elif isinstance(body, Migrating):
            self._set_migrating(True)
        elif isinstance(body, Migrated):
            self._moving = True  # pastes wait until the client is attached to the destination's core
            self._set_migrating(True)
        elif isinstance(body, RunStateChanged) and not self._moving:
            self._set_migrating(body.state in BUSY_STATES)

    def _set_migrating(self, migrating: bool) -> None:
        if migrating != self.migrating:
            log.info("clipboard: %s", "guest migrating: pastes wait" if migrating else "pastes resume")
        self.migrating = migrating
        self._changed.set()

    def _guest_changed(self, body: ClipboardChanged) -> None:
        self.text = body.text
        own = self.ctx.channel.instance if self.ctx is not None and self.ctx.channel is not None else None
        instance, _, source = body.origin.partition("/")
        for viewer in list(self.viewers):
            if instance == own and source == viewer.source:
                continue  # it pasted this: its clipboard holds it already
            viewer.guest_changed(body.text)

    # --- to the core ----------------------------------------------------------------------------------------

    def paste(self, text: str, source: str, peer: str) -> None:
        """A viewer's clipboard for the guest; sent when the core takes it (the newest wins)."""
        if self._pending is not None:
            log.info("viewer %s: an earlier paste of %d characters was replaced before it reached the guest", peer,
                     len(self._pending[0]))
        self._pending = (text, source, peer, time.monotonic() + PASTE_WAIT_S)
        self._changed.set()

    def _usable(self) -> bool:
        return (self._attached and not self.migrating and self.ctx is not None and self.ctx.channel is not None
                and self.ctx.channel.attached)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._pending is None:
                continue
            text, source, peer, deadline = self._pending
            if not self._usable():
                if time.monotonic() < deadline:
                    loop.call_later(max(0.0, deadline - time.monotonic()), self._changed.set)
                else:
                    self._finish(text, peer, "the guest is still migrating" if self.migrating else "no core attached")
                continue
            assert self.ctx is not None and self.ctx.channel is not None
            try:
                await self.ctx.channel.request(ClipboardSetOp(text, source), timeout_s=PASTE_TIMEOUT_S)
            except RemoteError as exc:
                if exc.error_class == "ClipboardBusy":  # a migration began before we heard of it: wait it out
                    log.info("viewer %s: paste refused as busy (%s); waiting for the migration to end", peer, exc)
                    self._set_migrating(True)
                else:
                    self._finish(text, peer, str(exc))
            except ChannelError as exc:  # the core went away, or did not answer: again, until the deadline
                if time.monotonic() < deadline:
                    loop.call_later(0.5, self._changed.set)
                else:
                    self._finish(text, peer, str(exc))
            else:
                self._finish(text, peer)

    def _finish(self, text: str, peer: str, failure: str | None = None) -> None:
        """The paste of ``text`` is over: it reached the guest's core, or ``failure`` says why not."""
        if failure is None:
            self.pasted += 1
            log.info("viewer %s: pasted %d characters into the guest clipboard", peer, len(text))
        else:
            self.failed += 1
            log.warning("viewer %s: paste of %d characters did not reach the guest: %s", peer, len(text), failure)
        if self._pending is not None and self._pending[0] is text:
            self._pending = None
        else:
            self._changed.set()  # a newer paste came in meanwhile


class ViewerClipboard:
    """One viewer's side of the clipboard: RFB messages in, text to the hub; the guest's text out."""

    def __init__(self, hub: ClipboardHub, conn: RfbServerConnection, peer: str, source: str,
                 send: asyncio.Event, outbox: bytearray) -> None:
        self.hub = hub
        self.conn = conn
        self.peer = peer
        self.source = source
        self._wake = send
        self._outbox = outbox
        self._actions = 0  # the viewer's Extended Clipboard actions (its caps); 0 until it said
        self.sent_text: str | None = None

    def handle(self, event: ev.Event) -> None:
        """A clipboard event from the viewer's connection; replies go to the viewer's outbox."""
        if isinstance(event, ev.CutText):
            self.hub.paste(event.text, self.source, self.peer)
        elif isinstance(event, ev.ClipboardProvide):
            if event.text is not None:
                self.hub.paste(extclip.decode_text(event.text), self.source, self.peer)
        elif isinstance(event, ev.ClipboardNotify):
            if event.formats & extclip.FORMAT_TEXT:
                self._send(extclip.request())  # its clipboard changed: fetch the text now, as QEMU does
        elif isinstance(event, ev.ClipboardRequest):
            self._send(self._provide())
        elif isinstance(event, ev.ClipboardPeek):
            self._send(extclip.notify(extclip.FORMAT_TEXT if self.hub.text is not None else 0))
        elif isinstance(event, ev.ClipboardCaps):
            self._actions = event.actions
            log.debug("viewer %s: Extended Clipboard caps %#x, text up to %s bytes", self.peer, event.actions,
                      extclip.caps_text_size(event))
            if self.hub.text is not None:
                self.guest_changed(self.hub.text)  # what the guest holds now, for a viewer that just came
        elif isinstance(event, ev.CutTextTooLarge):
            log.warning("viewer %s: clipboard of %d bytes refused: over the limit of %d bytes", self.peer, event.size,
                        event.limit)

    def guest_changed(self, text: str) -> None:
        """The guest's clipboard changed: tell the viewer (an extended viewer fetches the text when it wants it)."""
        if not self.conn.extended_clipboard:
            if self.conn.state is State.NORMAL:
                self._outbox += self.conn.server_cut_text(text)
                self.sent_text = text
                self._wake.set()
        elif self._actions and not self._actions & extclip.ACTION_NOTIFY:
            self._send(self._provide())  # it takes no notify: the text itself
        else:
            self._send(extclip.notify(extclip.FORMAT_TEXT))

    def _provide(self) -> bytes:
        text = self.hub.text
        if text is None:
            return extclip.provide_text(None)
        self.sent_text = text
        return extclip.provide_text(extclip.encode_text(text))

    def _send(self, payload: bytes) -> None:
        if self.conn.extended_clipboard and self.conn.state is State.NORMAL:
            self._outbox += self.conn.clipboard(payload)
            self._wake.set()
