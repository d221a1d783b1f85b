"""The unprivileged client process: VNC server, human monitor and guest-agent handling on one event loop."""
