"""Console access tokens: which token opens which VM's console, as websockify's TokenFile and nova's console
tokens do (docs/fleet.md).

The file (``--websocket-tokens FILE``) holds one token a line::

    # TOKEN: VMNAME [EXPIRES]
    3q8Vd0m...: web1
    Zk1x7s...: db2 2026-12-01T18:00:00Z      # ISO 8601 (UTC if no zone), or seconds since the epoch
    Qw3rt9...: *                             # every VM (an operator's token, for the web overview)

It is read again whenever it changes (its inode, size or modification time), so tokens are issued and
withdrawn by rewriting it, with no restart. Tokens are compared in constant time against every entry, and are
never logged: log lines name the line number of a bad entry, or the VM a refused request asked for.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ipc.rundir import RunDirError, check_vm_name

log = logging.getLogger(__name__)

#: A larger file is refused (a token a line: a hundred thousand tokens fit).
MAX_FILE = 8 << 20
#: The VM name that grants every VM.
ANY_VM = "*"
#: Shortest token accepted: anything shorter is guessable.
MIN_TOKEN = 16
MAX_TOKEN = 256


class TokenFileError(ValueError):
    """The token file cannot be read at all (an unreadable or oversized file, at start)."""


@dataclass(frozen=True, slots=True)
class Grant:
    token: bytes
    vm: str
    expires: float | None  # seconds since the epoch; None: never


def parse_expiry(text: str) -> float:
    """Seconds since the epoch, or an ISO 8601 date and time (UTC when it names no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_tokens(text: str, source: str = "token file") -> list[Grant]:
    """Every valid line; a malformed one is logged by its number (never its token) and skipped."""
    grants: list[Grant] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        token, sep, rest = line.partition(":")
        fields = rest.split()
        token = token.strip()
        problem = None
        if not sep or not 1 <= len(fields) <= 2:
            problem = "expected TOKEN: VMNAME [EXPIRES]"
        elif not MIN_TOKEN <= len(token) <= MAX_TOKEN or not token.isascii() or not token.isprintable():
            problem = f"a token is {MIN_TOKEN} to {MAX_TOKEN} printable ASCII characters"
        else:
            try:
                vm = fields[0] if fields[0] == ANY_VM else check_vm_name(fields[0])
                expires = parse_expiry(fields[1]) if len(fields) == 2 else None
            except (RunDirError, ValueError) as exc:
                problem = str(exc)
            else:
                grants.append(Grant(token.encode(), vm, expires))
        if problem is not None:
            log.warning("%s line %d ignored: %s", source, number, problem)
    return grants


class TokenFile:
    """The grants in ``path``, re-read when the file changes (checked at most every ``recheck_s``)."""

    def __init__(self, path: Path, *, recheck_s: float = 0.5) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._grants: list[Grant] = []
        self._identity: tuple[int, int, int, int] | None = None
        self._checked = 0.0
        self._load(required=True)

    def _load(self, *, required: bool = False) -> None:
        try:
            info = os.stat(self.path)
            identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            if identity == self._identity:
                return
            if info.st_size > MAX_FILE:
                raise OSError(f"larger than {MAX_FILE} bytes")
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if required:
                raise TokenFileError(f"cannot read the token file {self.path}: {exc}") from exc
            if self._identity is not None:
                log.warning("token file %s unreadable (%s): no token is valid until it is back", self.path, exc)
            self._grants, self._identity = [], None
            return
        self._grants = parse_tokens(text, str(self.path))
        self._identity = identity
        log.info("token file %s: %d tokens", self.path, len(self._grants))

    def opens(self, token: str, *, now: float | None = None) -> frozenset[str]:
        """The VMs ``token`` opens now (``*``: every VM). Every entry is compared (in constant time), so the time
        taken says nothing about how close a guess came."""
        clock = time.monotonic()
        if clock - self._checked >= self.recheck_s:
            self._checked = clock
            self._load()
        wall = time.time() if now is None else now
        offered = token.encode("utf-8", "replace")
        opened = set()
        for grant in self._grants:
            if hmac.compare_digest(grant.token, offered) and (grant.expires is None or wall < grant.expires):
                opened.add(grant.vm)
        return frozenset(opened)

    def allows(self, token: str, vm: str, *, now: float | None = None) -> bool:
        """Whether ``token`` opens ``vm``'s console now."""
        opened = self.opens(token, now=now)
        return vm in opened or ANY_VM in opened


__all__ = ["ANY_VM", "Grant", "TokenFile", "TokenFileError", "parse_expiry", "parse_tokens"]
