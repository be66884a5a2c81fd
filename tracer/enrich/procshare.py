"""One `proc` part for the records of a process whose table entry did not change (issue 15).

A TCP storm writes, per connection, a connect record and the listener's accept record, both of
the same process in the usual agent (a client and its server thread, a test harness), each
with the same ~800-byte `proc` part (its ancestry is most of it) and a different `net` part.
Building that part again per record, and then serialising it again per record, was a fifth of
the storm's userspace cost; `_connect_repeat` (enricher.py) only helps when the `net` part
repeats too. Here the part is built once and handed to every later connect or accept record of
the process for as long as it is what `Enricher._proc_t` would build now.

What that takes is checked against the table on every record, not inferred from the records
in between (a process table entry is edited in place by an exec, by `/proc` reads and by
reparenting, from paths other than the record stream): the same `Proc` object, the very
objects its fields hold now (an exec gives new comm, exe, args and exec_id objects; a changed
ppid, uid or parent exec id compares unequal), the very ancestry list the table returns now
(the table builds a new list whenever a chain may have changed) and the very GPU summary. The
header's uid and comm are not part of it: with a table entry, `_proc_t` ignores them too, and
they are the fields the agent can change without an exec. Without an entry nothing is shared.

Sharing is safe because nothing downstream mutates a connect or accept record's `proc` (the
renderer, the engine's alerts and `_connect_repeat` share it the same way); the one enricher
that adds to it, the ssh relay annotation, is given a fresh part (see `Enricher._connect_v`).
"""
from __future__ import annotations

from typing import Callable, Optional

_LIMIT = 1024      # processes remembered; a storm of distinct processes only rebuilds
# the fields of Proc.record() besides pid (fixed by the Proc object) that `part` compares: held
# by the very object / equal (tests/test_procshare.py keeps this in step with record())
SAME = ("comm", "exe", "args", "exec_id", "parent_exec_id")
EQUAL = ("ppid", "uid")


class SharedProcs:
    def __init__(self, procs) -> None:
        self.procs = procs
        self._by_pid: dict[int, tuple] = {}
        self.shared = 0     # records given a part built for an earlier record (stage counter)

    def part(self, tgid: int, uid: int, comm: bytes, build: Callable[[int, int, bytes], dict],
             gpu_summary: Optional[Callable[[int], Optional[dict]]]) -> dict:
        """`build(tgid, uid, comm)` (Enricher._proc_t), or the dict it built for an earlier
        record when the result would be equal to it."""
        procs = self.procs
        p = procs.get(tgid)
        if p is None:
            return build(tgid, uid, comm)
        m = self._by_pid.get(tgid)
        if m is not None and m[0] is p:
            r = m[1]
            if (r["comm"] is p.comm and r["exe"] is p.exe and r["args"] is p.args
                    and r["exec_id"] is p.exec_id and r["parent_exec_id"] is p.parent_exec_id
                    and r["ppid"] == p.ppid and r["uid"] == p.uid
                    and r["ancestry"] is procs.ancestry(tgid)):
                g = gpu_summary(tgid) if gpu_summary is not None else None
                if (g or None) is r.get("gpu"):
                    self.shared += 1
                    return r
        r = build(tgid, uid, comm)
        d = self._by_pid
        if len(d) >= _LIMIT and tgid not in d:
            d.clear()
        d[tgid] = (p, r)
        return r
