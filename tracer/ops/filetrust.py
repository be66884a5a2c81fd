"""Who besides root could change a file the daemon takes its policy from.

The daemon runs as root and enforces on agents that may run as ordinary users. Its config,
rule files and allow files *are* the policy: an agent that can write any of them, or replace
one through a folder or a link on its path, widens its own policy at the next reload (SIGHUP,
or the next restart). So the daemon refuses them unless nobody but root (or the daemon's own
user) could have changed them, as sshd's StrictModes does for authorized_keys.

Checked, for every component of the path as given and of every link target on the way:
- owner root or the daemon's user;
- no write for "others", and no write for a group other than root's, on files and folders,
  except folders with the sticky bit (/tmp): there only an entry's owner may rename or remove
  it, and the entry's own owner is checked in turn;
- a link is followed (its target checked the same way); the link itself must be owned by root,
  since in a sticky folder its owner could point it elsewhere.

A path that passes cannot be changed by anyone else afterwards, so checking before the read
leaves no window: what an attacker could swap, the check has already refused.
"""
from __future__ import annotations

import os
import stat
from typing import Optional

_MAX_LINKS = 40      # as the kernel's own bound on links followed in one lookup


def _component_problem(path: str, st: os.stat_result, trusted_uids: tuple) -> Optional[str]:
    if st.st_uid not in trusted_uids:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if stat.S_ISLNK(st.st_mode):
        return None
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if sticky_dir:
        return None
    if st.st_mode & stat.S_IWOTH:
        return f"{path} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"{path} is writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def untrusted_reason(path: str, trusted_uids: Optional[tuple] = None) -> Optional[str]:
    """Why a user other than root could change what `path` says, or None when nobody can.
    A path that does not exist is not judged here (the reader reports it)."""
    uids = trusted_uids if trusted_uids is not None else tuple({0, os.geteuid()})
    links = [0]

    def walk(p: str) -> Optional[str]:
        # components one by one, as the kernel resolves them: ".." after a link leaves the
        # link's target, not the link's folder
        p = os.path.join(os.getcwd(), p)
        cur = "/"
        for name in p.split("/"):
            if name in ("", "."):
                continue
            if name == "..":
                cur = os.path.dirname(cur)
                continue
            nxt = os.path.join(cur, name)
            try:
                st = os.lstat(nxt)
            except OSError:
                return None
            why = _component_problem(nxt, st, uids)
            if why:
                return why
            if stat.S_ISLNK(st.st_mode):
                links[0] += 1
                if links[0] > _MAX_LINKS:
                    return f"{path}: more than {_MAX_LINKS} links on the way"
                try:
                    target = os.readlink(nxt)
                except OSError:
                    return None
                why = walk(os.path.join(cur, target))
                if why:
                    return why
                cur = os.path.realpath(nxt)
            else:
                cur = nxt
        return None

    # every walk starts at the root folder: judged once
    return _component_problem("/", os.lstat("/"), uids) or walk(path)
