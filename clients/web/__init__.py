"""The client's web console (``vmfront client --web HOST:PORT``): an overview of the VMs it fronts with live
thumbnails, each VM's screen as PNG, and noVNC connected to the VM's WebSocket, all on one port. See docs/web.md.
"""
