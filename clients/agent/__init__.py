"""The client's guest-agent side: a qemu-ga protocol speaker (sans-IO), the service that owns the agent channel,
its qemu-ga-compatible proxy socket, and the ``vmfront agent`` command line. See docs/agent.md."""
