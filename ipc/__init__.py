"""The control channel between the core and its clients (pyzmq + msgpack)."""
