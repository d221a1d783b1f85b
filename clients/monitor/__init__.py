"""The human monitor hosted by the client: QEMU's HMP syntax and output, built only on QMP through the core.

``parser`` (argument syntax), ``format`` (QMP results as HMP text) and ``commands`` (the command table) are
sans-IO; ``service`` serves them on a unix or localhost TCP socket; ``interactive`` is ``vmfront monitor``.
"""
