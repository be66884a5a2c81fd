"""SSH-related file events (probe feature `files`): classification and path resolution.

`classify()` is the same rule the kernel applies in probes/files.c (at_file_classify), so
what a rule selects by class is what the kernel policy can enforce:

- `authorized_keys`: basename `authorized_keys` or `authorized_keys2`
- `host_key`: basename `ssh_host_*_key` (the `.pub` halves are not secret and not watched)
- `private_key`: any file in a `.ssh` directory that is not a well-known public name
  (`known_hosts*`, `config`, `*.pub`, `environment`, `rc`, `authorized_keys*`), or basename
  `identity` or `id_*` without a dot (`id_ed25519`, not `id_utils.py`) anywhere
- `ssh_other`: the public names in a `.ssh` directory
- `unknown`: the kernel could not read the path (reported, never hidden)
Anything else is None (the kernel does not send it).
"""
from __future__ import annotations

import os
import re

CLASSES = ("authorized_keys", "private_key", "host_key", "ssh_other", "unknown")
OPS = ("read", "write")
SYSCALLS = ("openat", "openat2", "open", "creat", "renameat2", "renameat", "rename", "linkat", "link")
_RENAMES = {"renameat2", "renameat", "rename", "linkat", "link"}

_O_FLAGS = ((0o1, "O_WRONLY"), (0o2, "O_RDWR"), (0o100, "O_CREAT"), (0o200, "O_EXCL"),
            (0o1000, "O_TRUNC"), (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"),
            (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"), (0o2000000, "O_CLOEXEC"),
            (0o10000000, "O_PATH"))
_HOST_KEY = re.compile(r"ssh_host_.*_key\Z", re.S)


def classify(path: str) -> str | None:
    parts = path.split("/")
    base = parts[-1]
    if base in ("authorized_keys", "authorized_keys2"):
        return "authorized_keys"
    if len(base) >= 13 and _HOST_KEY.match(base):
        return "host_key"
    if not base:
        return None
    if ".ssh" in parts[:-1]:
        if (base.endswith(".pub") or base.startswith("known_hosts") or base.startswith("authorized_keys")
                or base in ("config", "environment", "rc")):
            return "ssh_other"
        return "private_key"
    if base == "identity" or (base.startswith("id_") and "." not in base):
        return "private_key"
    return None


def flag_names(flags: int) -> list[str]:
    out = [] if flags & 0o3 else ["O_RDONLY"]
    out += [n for bit, n in _O_FLAGS if flags & bit]
    return out


def _readlink(p: str) -> str | None:
    try:
        return os.readlink(p)
    except OSError:
        return None


def resolve(raw: str, pid: int, dfd: int, proc_root: str = "/proc") -> tuple[str, bool]:
    """(absolute path, resolved) for a path a process passed to a syscall.

    Relative paths start at the process's cwd (dfd AT_FDCWD) or at the directory open on
    dfd, read from /proc/<pid>/cwd or /proc/<pid>/fd/<dfd>. Best effort: the process may
    have exited or moved on (cwd changed, fd closed) by the time the record is read; then
    the raw path is returned with resolved False. `..` and symlinks are not folded (a
    lexical fold would be wrong across symlinks)."""
    if raw.startswith("/"):
        return raw, True
    if not raw:
        return raw, False
    link = f"{proc_root}/{pid}/cwd" if dfd == -100 else f"{proc_root}/{pid}/fd/{dfd}"
    base = _readlink(link)
    if not base or not base.startswith("/") or base.endswith(" (deleted)"):
        return raw, False
    rel = raw[2:] if raw.startswith("./") else raw
    return base.rstrip("/") + "/" + rel, True


def file_body(raw: str, op: int, syscall: str, flags: int, fclass: str | None, killed: bool,
              policy_id: int, pid: int, dfd: int, read_failed: bool, truncated: bool,
              late: bool = False) -> dict:
    """The `file` section of a record (contract in docs/FEATURES.md)."""
    path, resolved = resolve(raw, pid, dfd) if not read_failed else (None, False)
    cls = fclass or "unknown"
    if path is not None and not read_failed:
        # the absolute path may add a .ssh directory the raw one lacked; the class of the
        # raw path is what the kernel enforced, so it wins when the two differ
        cls = fclass or classify(path) or "unknown"
    body = {"path": path, "raw_path": raw if not read_failed else None, "op": "write" if op == 2 else "read",
            "syscall": syscall, "flags": flag_names(flags) if syscall not in _RENAMES else [],
            "class": cls, "verdict": "killed" if killed else "allowed"}
    if not resolved and not read_failed and not raw.startswith("/"):
        body["path_unresolved"] = True
    if killed:
        # what the kill at syscall entry could not stop, stated rather than implied
        body["kill_effect"] = "name_in_place" if syscall in _RENAMES else "no_io"
    if policy_id:
        body["policy_id"] = policy_id
    if read_failed:
        body["path_read_failed"] = True
    if truncated:
        body["path_truncated"] = True
    if late:
        # read at syscall exit (the page was not faulted in at entry); any kill happened there
        body["path_read_late"] = True
    return body
