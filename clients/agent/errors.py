"""The agent's errors: ``error_class`` is what scripts see (qemu-ga style), ``desc`` says what happened."""

from __future__ import annotations


class AgentError(Exception):
    """Root of the agent errors; ``error_class`` is what scripts see (qemu-ga style)."""

    error_class = "AgentError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class AgentUnavailable(AgentError):
    error_class = "AgentUnavailable"


class AgentBusy(AgentError):
    error_class = "AgentBusy"


class AgentTimeout(AgentError):
    error_class = "AgentTimeout"


class AgentGarbage(AgentError):
    """The agent answered with something that is not a reply (garbage, an oversized line)."""

    error_class = "AgentProtocolError"


class AgentCommandError(AgentError):
    """The guest agent answered with an error: its own class and description."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
