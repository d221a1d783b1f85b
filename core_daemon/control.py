"""The core's side of the control channel: what a client may ask, and what it is told.

Requests run through the same QMP executor as the management socket, but under the ``client`` policy; input
goes to the guest through the display's input API; broadcasts carry QEMU events and run-state changes. A client
that goes away has its held keys and buttons released, so a killed viewer cannot leave a key stuck down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ipc.channel import ClientInfo, CoreChannel, CoreStatus, RequestError, ipc_endpoint
from ipc.messages import (
    AGENT_WINDOW,
    MAX_CONSOLE_CHUNK,
    AgentAckOp,
    AgentData,
    AgentWriteOp,
    Capability,
    ClipboardChanged,
    ClipboardSetOp,
    ConsoleData,
    ConsoleWriteOp,
    EventBody,
    InputOp,
    KeyEvent,
    Migrated,
    Op,
    PointerEvent,
    QmpEvent,
    QmpOp,
    RefreshOp,
    ReleaseInputOp,
    RunStateChanged,
    Shutdown,
    VncAuthOp,
    VncSettings,
    VncStateOp,
    VncViewerOp,
    WheelEvent,
)

from .agent_relay import AgentRelay, ByteRelay, RelayBusy, RelayUnavailable, SerialRelay
from .display import ClipboardError
from .guest_display import GuestDisplay
from .guest_reads import COMMANDS as GUEST_READ_COMMANDS
from .input import InputError
from .policy import Policy
from .qmp_server import Executor
from .vnc_state import VncState

log = logging.getLogger(__name__)
#: Heartbeats both ways between the core and its clients. A dead peer is noticed at once anyway (its connection
#: closes); heartbeats find a stuck one, within 2.5 intervals. Every one costs both loops a wake-up, which for a
#: host of idle VMs is most of what they cost (docs/fleet.md), so 2 s rather than the channel's default 1 s.
HEARTBEAT_S = 2.0

#: The policy section that applies to requests from clients.
CLIENT_SOCKET = "client"


def _client_of(holder: object) -> object:
    """Input holders are (client, source) pairs: the client part."""
    return holder[0] if isinstance(holder, tuple) else holder


class ControlService:
    """Serves ``control.sock`` for one VM."""

    def __init__(self, vm_name: str, path: Path, execute: Executor, policy: Policy, *,
                 display: Callable[[], GuestDisplay | None], run_state: Callable[[], tuple[str, str | None]],
                 on_clients_changed: Callable[[list[dict[str, Any]]], None], vnc: VncState,
                 group: int | None = None, migrated_to: Callable[[], str | None] = lambda: None) -> None:
        self.path = path
        self._vnc = vnc
        #: Where the guest went, once it left (clients that attach later are sent there at once).
        self._migrated_to = migrated_to
        self._execute = execute
        self._policy = policy
        self._display = display
        self._run_state = run_state
        self._on_clients_changed = on_clients_changed
        self._agent: AgentRelay | None = None
        self._agent_owner: ClientInfo | None = None
        # Flow control of agent_data towards the owner, once it acknowledges frames (op agent_ack).
        self._agent_paced = False
        self._agent_unacked = 0
        self._agent_room = asyncio.Event()
        self._agent_room.set()
        self._console: SerialRelay | None = None
        self.channel = CoreChannel(ipc_endpoint(path), vm_name=vm_name, handler=self._handle, status=self._status,
                                   on_client_attached=self._clients_changed, on_client_gone=self._client_gone,
                                   socket_group=group, interval=HEARTBEAT_S)

    async def start(self) -> None:
        await self.channel.start()

    async def close(self, reason: str) -> None:
        self.broadcast(Shutdown(reason))
        await self.channel.close(reason)

    def broadcast(self, body: EventBody) -> int:
        """Send to every client granted the kind's capability; returns how many."""
        return self.channel.broadcast(body)

    def qmp_event(self, event: dict[str, Any]) -> None:
        self.broadcast(QmpEvent(event))

    def run_state_changed(self, state: str, qemu_status: str | None) -> None:
        self.broadcast(RunStateChanged(state, qemu_status))

    def _status(self) -> CoreStatus:
        """The welcome: what this core really offers (no display or input without capture, no agent without one)."""
        display = self._display()
        state, _ = self._run_state()
        offered = {Capability.QMP, Capability.QMP_EVENTS, Capability.VNC}
        if self._agent is not None:
            offered.add(Capability.AGENT)
        if self._console is not None:
            offered.add(Capability.CONSOLE)
        if display is None or display.shm is None:
            return CoreStatus(run_state=state, capabilities=frozenset(offered))
        offered |= {Capability.DISPLAY, Capability.INPUT, Capability.CLIPBOARD}
        return CoreStatus(run_state=state, shm=display.shm.name, shm_generation=display.shm.mode.generation,
                          display_socket=str(display.display_socket_path), capabilities=frozenset(offered))

    def vnc_settings_changed(self) -> None:
        """The credentials now ask clients to offer another auth scheme: tell every VNC-serving client."""
        self.broadcast(self._vnc_settings())

    def _vnc_settings(self) -> VncSettings:
        return VncSettings(auth=self._vnc.credentials.auth)

    def _clients_changed(self, client: ClientInfo) -> None:
        self._on_clients_changed(self.channel.describe_clients())
        if Capability.VNC in client.capabilities:  # before any viewer may be served: how they authenticate
            self.channel.send_event(client, self._vnc_settings())
        target = self._migrated_to()
        if target is not None:  # a client (re)attaching to a source whose guest left: send it after the guest
            self.channel.send_event(client, Migrated(target))
        display = self._display()
        if (Capability.CLIPBOARD in client.capabilities and display is not None and display.capture is not None
                and display.capture.clipboard is not None):
            self.channel.send_event(client, ClipboardChanged(display.capture.clipboard))  # a new client catches up
        if self._console is not None and Capability.CONSOLE in client.capabilities:
            backlog = self._console.take_backlog()  # what the guest printed while no client listened
            for start in range(0, len(backlog), MAX_CONSOLE_CHUNK):
                self.channel.send_event(client, ConsoleData(backlog[start:start + MAX_CONSOLE_CHUNK]))

    async def _client_gone(self, client: ClientInfo) -> None:
        if self._agent_owner is client:
            self._set_agent_owner(None)
        self._vnc.client_gone(client)
        display = self._display()
        if display is not None and display.input is not None:
            try:
                await display.input.release(lambda holder: _client_of(holder) is client, str(client))
            except InputError as exc:
                log.warning("releasing input held by %s failed: %s", client, exc)
        self._on_clients_changed(self.channel.describe_clients())  # already without the gone client

    async def _handle(self, client: ClientInfo, op_name: str, op: Op) -> Any:
        if isinstance(op, QmpOp):
            denied = self._policy.refusal(CLIENT_SOCKET, op.command, op.arguments)
            if denied is not None:
                log.info("%s: %s", client, denied)
                raise RequestError("GenericError", denied)
            reply = await self._execute(op.command, op.arguments)
            if "error" in reply:
                error = reply["error"]
                raise RequestError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
            if op.command == "query-commands" and isinstance(reply.get("return"), list):
                # A client is told only what it may run: QEMU's list less what the policy denies it, and the
                # core's own commands that read the guest for it (core_daemon/guest_reads.py).
                offered = [*reply["return"], *({"name": name} for name in GUEST_READ_COMMANDS)]
                return [c for c in offered
                        if isinstance(c, dict) and self._policy.allows(CLIENT_SOCKET, str(c.get("name")))]
            return reply.get("return")
        if isinstance(op, InputOp):
            await self._input(client, op)
            return None
        if isinstance(op, ReleaseInputOp):
            display = self._display()
            if display is not None and display.input is not None:
                holder = (client, op.source)
                try:
                    await display.input.release(lambda h: h == holder, f"{client}, {op.source or 'no source'}")
                except InputError as exc:
                    raise RequestError("GenericError", str(exc)) from exc
            return None
        if isinstance(op, RefreshOp):
            display = self._display()
            if display is None or display.capture is None:
                raise RequestError("DisplayUnavailable", "this core has no display capture")
            display.capture.request_refresh()
            return None
        if isinstance(op, AgentWriteOp):
            return await self._agent_write(client, op.data)
        if isinstance(op, AgentAckOp):
            self._agent_ack(client, op.frames)
            return None
        if isinstance(op, ConsoleWriteOp):
            return await self._console_write(op.data)
        if isinstance(op, ClipboardSetOp):
            self._set_clipboard(client, op)
            return None
        if isinstance(op, VncStateOp):
            self._vnc.report_state(client, client.name, op.servers, op.viewers)
            return None
        if isinstance(op, VncViewerOp):
            refused = self._vnc.report_viewer(client, client.name, op.event, op.viewer)
            if refused is not None:
                raise RequestError("GenericError", refused)
            return None
        if isinstance(op, VncAuthOp):
            ok, reason = self._vnc.authenticate(op.host, op.challenge, op.response)
            return {"ok": ok, "reason": reason}
        raise RequestError("CommandNotFound", f"unknown request {op_name!r}")

    def guest_clipboard(self, text: str) -> None:
        """The guest copied ``text``: every client granted ``clipboard`` hears of it."""
        self.broadcast(ClipboardChanged(text))

    def _set_clipboard(self, client: ClientInfo, op: ClipboardSetOp) -> None:
        """A paste into the guest. Never during a migration: QEMU's vdagent state does not travel, so what the
        source's vdagent offered the guest could be asked for on the destination, which never had it; the client
        waits for the destination and pastes there (``ClipboardBusy`` tells it to)."""
        target = self._migrated_to()
        if target is not None:
            raise RequestError("ClipboardBusy", f"the guest now runs under the core at {target}: paste there")
        state, _ = self._run_state()
        if state in ("migrating", "migrated", "incoming"):
            raise RequestError("ClipboardBusy", f"the guest is {state}: paste again once it is over")
        display = self._display()
        if display is None or display.capture is None:
            raise RequestError("ClipboardUnavailable", "this core has no display capture, so no clipboard either")
        try:
            display.capture.set_clipboard(op.text)
        except ClipboardError as exc:
            raise RequestError("ClipboardUnavailable", str(exc)) from exc
        log.info("%s set the guest clipboard (%d characters)", client, len(op.text))
        self.broadcast(ClipboardChanged(op.text, f"{client.instance}/{op.source}"))

    def attach_agent(self, relay: AgentRelay) -> None:
        self._agent = relay

    def attach_console(self, relay: SerialRelay) -> None:
        self._console = relay

    def deliver_console(self, data: bytes) -> bool:
        """Serial output goes to every client granted ``console``; False if none took it."""
        return self.channel.broadcast(ConsoleData(data)) > 0

    async def _console_write(self, data: bytes) -> None:
        await _relay_write(self._console, data, "Console", "this core has no serial console (start it with --serial)")

    def deliver_agent_data(self, data: bytes) -> bool:
        """Agent bytes go to the client that last wrote to the agent (one agent user at a time)."""
        owner = self._agent_owner
        if owner is None or not self.channel.send_event(owner, AgentData(data)):
            return False
        if self._agent_paced:
            self._agent_unacked += 1
            if self._agent_unacked >= AGENT_WINDOW:
                self._agent_room.clear()
        return True

    async def agent_room(self) -> None:
        """Returns once the agent's owner may be sent more (it acknowledged enough; or it changed, or left)."""
        await self._agent_room.wait()

    def _agent_ack(self, client: ClientInfo, frames: int) -> None:
        if client is not self._agent_owner:
            return  # (frames it got as an earlier owner: not counted any more)
        self._agent_paced = True
        self._agent_unacked = max(0, self._agent_unacked - frames)
        if self._agent_unacked < AGENT_WINDOW:
            self._agent_room.set()

    def _set_agent_owner(self, client: ClientInfo | None) -> None:
        self._agent_owner = client
        self._agent_paced = False
        self._agent_unacked = 0
        self._agent_room.set()

    async def _agent_write(self, client: ClientInfo, data: bytes) -> None:
        if self._agent is not None and self._agent_owner is not client:
            log.info("guest agent channel now used by %s", client)
            self._set_agent_owner(client)
        await _relay_write(self._agent, data, "Agent", "this core has no guest-agent channel (start it with --agent)")

    async def _input(self, client: ClientInfo, op: InputOp) -> None:
        target = self._migrated_to()
        if target is not None:  # never to a source whose guest left (postcopy: it runs on the destination)
            raise RequestError("GuestMigrated", f"the guest now runs under the core at {target}")
        display = self._display()
        if display is None or display.input is None:
            raise RequestError("DisplayUnavailable", "this core has no display, so no input either")
        guest = display.input
        holder = (client, op.source)  # keys are held per viewer (source) of a client
        try:
            batch = []  # the whole request in as few input-send-event commands as the key pacing allows
            for event in op.events:
                if isinstance(event, KeyEvent):
                    if event.qcode is not None:
                        batch += guest.key_events(event.qcode, event.down)
                    elif event.scancode is not None:
                        batch += guest.scancode_events(event.scancode, event.down)
                elif isinstance(event, PointerEvent):
                    batch += guest.pointer_events(event.x, event.y, event.buttons, holder)
                elif isinstance(event, WheelEvent):
                    batch += guest.wheel_events(event.steps)
            await guest.send(batch, holder)
        except InputError as exc:
            raise RequestError("GenericError", str(exc)) from exc


async def _relay_write(relay: ByteRelay | None, data: bytes, what: str, missing: str) -> None:
    """Bytes for a guest channel; its failures as the client sees them (``AgentBusy``, ``ConsoleUnavailable``...)."""
    if relay is None:
        raise RequestError(f"{what}Unavailable", missing)
    try:
        await relay.write(data)
    except RelayUnavailable as exc:
        raise RequestError(f"{what}Unavailable", str(exc)) from exc
    except RelayBusy as exc:
        raise RequestError(f"{what}Busy", str(exc)) from exc
