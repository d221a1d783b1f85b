"""The privileged per-VM core daemon: supervises QEMU, re-exports QMP, owns guest state."""
