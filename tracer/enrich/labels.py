"""Agent labels: from the daemon config, `run --label K=V`, and extended attributes
`user.agenttrace.<key>` that the training stack sets on the agent's cgroup directory.

Labels land on every record's `agent` object, so they are bounded and checked here: an
agent able to write its own cgroup's xattrs must not be able to inflate records, inject
control characters into a terminal or a SIEM, or overwrite the agent's identity fields.
A rejected label is never emitted; the reason is (counted and) reported without the value.
"""
from __future__ import annotations

import os
import re

XATTR_PREFIX = "user.agenttrace."
KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")
MAX_VALUE_BYTES = 128
MAX_LABELS = 16
# fields of the agent object that a label may never replace
RESERVED = frozenset({"id", "cgroup", "cgroup_id", "container", "pod", "group", "labels_rejected"})


class LabelError(ValueError):
    pass


def check_key(key: str) -> None:
    if not KEY_RE.match(key):
        raise LabelError(f"label name {key!r} must be a letter then up to 31 of [A-Za-z0-9_.-]")
    if key in RESERVED:
        raise LabelError(f"label name {key!r} would overwrite the agent's own field")


def check_value(value: bytes | str) -> str:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > MAX_VALUE_BYTES:
        raise LabelError(f"value is {len(raw)} bytes, over the {MAX_VALUE_BYTES}-byte bound")
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LabelError("value is not UTF-8") from None
    if any(not ch.isprintable() for ch in s):
        raise LabelError("value holds control or non-printable characters")
    return s


def parse_kv(spec: str) -> tuple[str, str]:
    """`KEY=VALUE` from the command line."""
    key, sep, value = spec.partition("=")
    if not sep:
        raise LabelError(f"{spec!r} is not KEY=VALUE")
    check_key(key)
    return key, check_value(value)


def read_xattrs(path: str | os.PathLike) -> tuple[dict, list[tuple[str, str]]]:
    """({key: value} accepted, [(key, reason)] rejected) for `user.agenttrace.*` on `path`.
    A missing directory or a filesystem without user xattrs reads as no labels."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}, []
    ok: dict = {}
    bad: list = []
    for name in sorted(names):
        if not name.startswith(XATTR_PREFIX):
            continue
        key = name[len(XATTR_PREFIX):]
        try:
            check_key(key)
            if len(ok) >= MAX_LABELS:
                raise LabelError(f"more than {MAX_LABELS} labels")
            ok[key] = check_value(os.getxattr(path, name))
        except LabelError as e:
            # the key itself may be hostile: report a bounded, escaped form only
            bad.append((ascii(key[:40]), str(e)))
        except OSError:
            continue   # removed between listxattr and getxattr
    return ok, bad
