"""Guest programs shipped with vmfront (package data: ``demo.asm``, the built-in demo guest)."""
