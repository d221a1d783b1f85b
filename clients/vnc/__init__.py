"""The client's VNC server (RFB over TCP, unix sockets and WebSocket); see docs/vnc.md."""
