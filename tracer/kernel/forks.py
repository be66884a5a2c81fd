"""The kernel's creator chain (probes/common.h `proc_forks`) and process counts (`proc_counts`).

Fork records are off by default (docs/MIGRATION.md): the kernel keeps, per process forked in
scope, who forked it and when. The exec record carries the creator; a process met in another
record without an exec (a forked worker that connects) is built from its entry here, with the
same creator and fork time a fork record would have given, so its exec_id is the same. Exits of
processes no record ever named stay in the kernel, counted per agent, so summaries stay exact.
"""
from __future__ import annotations

from typing import Optional

from agenttrace.kernel import wire as E

# The map's size (AT_FORK_ENTRIES in probes/common.h): past it the oldest entries age out.
FORK_ENTRIES = 65536
_FIELDS = ("forks", "forks_quiet", "exits_quiet", "released")


class KernelForks:
    def __init__(self, probes):
        self._forks = probes["proc_forks"]
        self._counts = probes["proc_counts"]
        self.lookups = self.hits = 0

    def lookup(self, pid: int) -> Optional[tuple[int, int, int]]:
        """(creator tgid, fork ktime, AT_FORKF_* flags) of a process forked in scope, or None."""
        self.lookups += 1
        try:
            v = self._forks.get(self._forks.Key(pid))
        except OSError:
            return None
        if v is None:
            return None
        self.hits += 1
        return v.creator, v.ktime, v.flags

    def forked_after(self, pid: int, ktime: int) -> bool:
        """Whether the process holding `pid` now was forked in scope after `ktime`: a later
        process than the one of an event at `ktime` (whose exit released or marked the entry)."""
        ent = self.lookup(pid)
        return ent is not None and not ent[2] & E.FORKF_EXITED and ent[1] > ktime

    def live(self) -> list[tuple[int, int, int]]:
        """(pid, creator, fork ktime) of every process the kernel saw forked that has not
        exited: a kill's whole tree, fork-only orphans included (act/worker.py)."""
        out = []
        try:
            for k, v in self._forks.items():
                if not v.flags & E.FORKF_EXITED:
                    out.append((k.value if hasattr(k, "value") else int(k), v.creator, v.ktime))
        except OSError:
            pass
        return out

    def counts(self, agent: int) -> dict[str, int]:
        """The agent's process counts (agent 0: the totals of every agent), summed over CPUs."""
        try:
            v = self._counts.get(self._counts.Key(agent))
        except OSError:
            v = None
        out = dict.fromkeys(_FIELDS, 0)
        for cpu in v or ():
            for f in _FIELDS:
                out[f] += getattr(cpu, f)
        return out

    def stats(self) -> dict:
        """Totals for counters(): forks, fork records kept in the kernel, exits not sent, and
        how hard the LRU is pressed. Entries written and not released at exit bound the map's
        size from above (a reused pid overwrites its old entry), so while they fit in the
        capacity no entry was evicted; past it some may have been (the least recently used:
        exited ones first, in practice)."""
        t = self.counts(0)
        held = t["forks"] - t["released"]
        return {**t, "entries_capacity": FORK_ENTRIES, "entries_not_released": held,
                "evictions_possible": held > FORK_ENTRIES,
                "userspace_lookups": self.lookups, "userspace_hits": self.hits}


def wants_fork_records(opts, ruleset) -> bool:
    """Fork records go out when asked for, or when a loaded rule matches kind `fork`."""
    if getattr(opts, "fork_records", False):
        return True
    by_kind = getattr(ruleset, "by_kind", None) or {}
    return bool(by_kind.get("fork"))


def write_switch(probes, on: bool) -> None:
    probes.set_flag("at_config", E.CFG_FORK_RECORDS, 1 if on else 0)
