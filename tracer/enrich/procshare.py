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
reparenting, from paths other than the record stream): the same `Proc` object, fields equal
to those the part was built from (an exec gives a new exec id at least), the very ancestry
list the table returns now (it builds a new list whenever a chain may have changed) and the
very GPU summary. The
header's uid and comm are not part of it: with a table entry, `_proc_t` ignores them too, and
they are the fields the agent can change without an exec. Without an entry, a part is shared only
between records of a process found nowhere from before the look-up that found nothing (a storm
read after its process exited: ProcTable.get), with the same uid and comm.

Sharing is safe because nothing downstream mutates a connect or accept record's `proc` (the
renderer, the engine's alerts and `_connect_repeat` share it the same way); the one enricher
that adds to it, the ssh relay annotation, is given a fresh part (see `Enricher._connect_v`).
"""
from __future__ import annotations

from operator import attrgetter
from typing import Callable, Optional

_LIMIT = 1024      # processes remembered; a storm of distinct processes only rebuilds
# the fields of Proc.record() besides pid (fixed by the Proc object) that `part` compares
# (tests/test_procshare.py keeps this in step with record())
FIELDS = ("comm", "exe", "args", "exec_id", "parent_exec_id", "ppid", "uid")
_fields = attrgetter(*FIELDS)


class SharedProcs:
    def __init__(self, procs) -> None:
        self.procs = procs
        # tgid -> (Proc, the fields the part was built from, the part)
        self._by_pid: dict[int, tuple] = {}
        self.shared = 0     # records given a part built for an earlier record (stage counter)

    def part(self, tgid: int, uid: int, comm: bytes, build: Callable[[int, int, bytes, int], dict],
             gpu_summary: Optional[Callable[[int], Optional[dict]]], ktime: int = 0) -> dict:
        """`build(tgid, uid, comm, ktime)` (Enricher._proc_t), or the dict it built for an
        earlier record when the result would be equal to it."""
        procs = self.procs
        m = self._by_pid.get(tgid)
        if m is not None:
            p = m[0]
            r = m[2]
            if p is None:
                # a process found nowhere, for a record from before the look-up that found
                # nothing (ProcTable.get answers it without looking): the part is the header's
                # uid and comm and no more, so equal ones give an equal part. A later record
                # may be a new process's on the pid: it is built, and looked up
                if (ktime and ktime < procs._gone.get(tgid, 0) and procs._t.get(tgid) is None
                        and m[1] == (uid, comm)
                        and (gpu_summary is None or (gpu_summary(tgid) or None) is r.get("gpu"))):
                    self.shared += 1
                    return r
            # the ancestry test is ProcTable.ancestry's own: its cached list is what it returns
            elif (procs._t.get(tgid) is p and m[1] == _fields(p)
                    and p._anc is r["ancestry"] and p._anc_gen == procs._gen
                    and (gpu_summary is None or (gpu_summary(tgid) or None) is r.get("gpu"))):
                self.shared += 1
                return r
        r = build(tgid, uid, comm, ktime)
        p = procs.peek(tgid)
        d = self._by_pid
        if p is not None:
            memo = (p, _fields(p), r)
        elif ktime and ktime < procs._gone.get(tgid, 0):
            memo = (None, (uid, comm), r)
        else:       # no entry and no answer that stands for the next record: nothing shared
            return r
        if len(d) >= _LIMIT and tgid not in d:
            d.clear()
        d[tgid] = memo
        return r
