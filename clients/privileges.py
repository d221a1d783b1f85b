"""Dropping root for good once the client's listeners are bound.

The client parses bytes from viewers, operators and the guest; it must not keep root while doing so. It binds
its sockets first (a privileged port or a root-owned directory may need root), then switches to the target
user and group, clears supplementary groups, and checks that root cannot be regained.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

log = logging.getLogger(__name__)


class PrivilegeError(Exception):
    """The drop could not be done or verified; the client must not go on."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    name: str


def resolve_user(user: str, group: str | None = None) -> Identity:
    """A user name or numeric uid, and optionally a group; the group defaults to the user's primary group."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"no such user: {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"no such group: {group!r}") from None
    return Identity(entry.pw_uid, gid, entry.pw_name)


def drop_privileges(target: Identity) -> None:
    """Become ``target`` for good (real, effective and saved ids), with no supplementary groups."""
    if os.geteuid() != 0:
        if os.geteuid() == target.uid:
            return
        raise PrivilegeError(f"cannot switch to user {target.name}: not running as root")
    os.setgroups([])
    os.setresgid(target.gid, target.gid, target.gid)
    os.setresuid(target.uid, target.uid, target.uid)
    if target.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError("regained root after dropping privileges")
    if os.getresuid() != (target.uid,) * 3 or os.getresgid() != (target.gid,) * 3:
        raise PrivilegeError(f"privilege drop incomplete: uids {os.getresuid()}, gids {os.getresgid()}")
    log.info("dropped privileges to %s (uid %d, gid %d)", target.name, target.uid, target.gid)
