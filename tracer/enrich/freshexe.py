"""Download-then-exec: an executable written moments ago, by a process that talked to the outside.

At an exec, the file the kernel ran (the script for a shebang, else the program) is stat'ed once
(an exec of a system path is skipped before that). It is *fresh* when its inode changed
(`ctime`: the write, or the `chmod +x` that follows it; `ctime` cannot be set from userspace,
unlike `mtime` with `curl -R` or `touch`) less than `LOOKBACK_S` ago. For a fresh file the
writer is looked for among the agent's processes (tracer/enrich/activity.py), by behaviour:

- the *downloader*: a process of the same agent, other than the one exec'ing, alive when the
  file was last written (`mtime`, or the whole span up to `ctime` when `mtime` was set back)
  and with an external contact (connect or flow) made before then. Among several, the one that
  started last (the narrowest lifetime around the write): a long-lived agent process that
  talks to its model API loses to the `curl` it started.
- the *builder*: a local build tool or package installer (identified by content, categories
  `build`/`installer` in tracer/enrich/identities.yaml, inherited by what they start: gcc's
  ld, make's cc, pip's build steps) alive at the write and started after the downloader's
  first external contact. Its output is ordinary development work; the rule
  (rules/exec.yaml `download-then-exec`) does not alert when there is one.

`proc.fresh_exe` on the exec record: {path, changed_age_s, modified_age_s, and when found
downloader {pid, comm, exe, exec_id, identity, runtime, dst {addr, port, scope, name},
protocol, host}, builder {pid, comm, exe, exec_id, identity, tool, tool_by (the identity, its own or an
ancestor's, that made it a build tool or installer: pip for the `rustc --version` pip runs)}}.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from agenttrace.enrich.activity import Activity

LOOKBACK_S = 3600          # the longest window a rule may ask for (the default rule asks for 600)
SLACK_NS = 2_000_000_000   # timestamps from two clocks (inode times, record times) and coarse mtime
# package-managed system trees: a fresh file there is an upgrade, not a download. /usr/local
# and /opt are where downloads land, so they are not in this list.
SYSTEM_PREFIXES = ("/usr/bin/", "/usr/sbin/", "/usr/lib/", "/usr/lib64/", "/usr/libexec/",
                   "/usr/share/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/lib32/", "/usr/lib32/",
                   "/snap/", "/nix/store/")


def _targets(pid: int, ppid: int, filename: str) -> tuple:
    """Where to stat the file an exec ran: its path; for `./x` (the kernel keeps the name as
    given) the exec'ing process's cwd, or its parent's once it is gone (a dropper that exits in
    a millisecond); for fexecve/memfd the mapped program."""
    if filename.startswith("/") and not filename.startswith(("/dev/fd/", "/proc/")):
        return (filename,)
    if filename and not filename.startswith("/"):
        return (f"/proc/{pid}/cwd/{filename}",) + ((f"/proc/{ppid}/cwd/{filename}",) if ppid else ())
    return (f"/proc/{pid}/exe",)


def _stat(paths: tuple):
    for path in paths:
        try:
            st = os.stat(path)
            # /proc/PID/exe names a memfd or deleted file as such; realpath resolves cwd links
            return st, (os.readlink(path) if path.endswith("/exe") else os.path.realpath(path))
        except OSError:
            continue
    return None, None


class FreshExe:
    def __init__(self, activity: Activity, lookback_s: float = LOOKBACK_S, now_ns=time.time_ns):
        self.activity = activity
        self.lookback_ns = int(lookback_s * 1e9)
        self.now_ns = now_ns
        self.stats = {"checked": 0, "fresh": 0, "downloads": 0, "built": 0, "errors": 0}

    def check(self, pid: int, agent: int, filename: str, t_ns: int, ppid: int = 0) -> Optional[dict]:
        """The `proc.fresh_exe` body for an exec, or None when the file is not fresh."""
        if filename.startswith(SYSTEM_PREFIXES):
            return None
        self.stats["checked"] += 1
        st, real = _stat(_targets(pid, ppid, filename))
        if st is None or real.startswith(SYSTEM_PREFIXES):
            return None
        now = self.now_ns()
        changed, modified = st.st_ctime_ns, min(st.st_mtime_ns, st.st_ctime_ns)
        if now - changed > self.lookback_ns:
            return None
        self.stats["fresh"] += 1
        body = {"path": real, "changed_age_s": round(max(0, now - changed) / 1e9, 3),
                "modified_age_s": round(max(0, now - st.st_mtime_ns) / 1e9, 3)}
        # when the file was written: at mtime, unless mtime was set back (curl -R, touch, tar),
        # then somewhere before the inode change
        lo = modified if changed - modified <= self.lookback_ns else changed - self.lookback_ns
        hi = modified if lo == modified else changed
        lo, hi = lo - SLACK_NS, hi + SLACK_NS
        down, first = None, None
        for a in self.activity.with_contacts(agent):
            if a.pid == pid or a.tool or not a.alive_during(lo, hi):
                continue
            before = [c for c in a.contacts if c.ts_ns <= hi]
            if not before:
                continue
            # the narrowest lifetime around the write: started last, then contacted last
            if down is None or (a.start_ns, before[0].ts_ns) > (down.start_ns, first[0].ts_ns):
                down, first = a, before
        builder = None
        for a in self.activity.tools_of(agent):
            if a.pid == pid or not a.alive_during(lo, hi):
                continue
            if first is not None and a.start_ns < first[0].ts_ns:
                continue        # already running when the download began: not what wrote it
            if builder is None or a.start_ns > builder.start_ns:
                builder = a
        if down is not None:
            c = first[-1]
            d = down.summary()
            d.update(dst={"addr": c.addr, "port": c.port, "scope": c.scope, "name": c.name},
                     protocol=c.protocol, host=c.host)
            body["downloader"] = d
            self.stats["downloads"] += 1
        if builder is not None:
            b = builder.summary()
            b.update(tool=builder.tool, tool_by=builder.tool_by)
            body["builder"] = b
            self.stats["built"] += 1
        return body
