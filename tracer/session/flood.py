"""Floods an agent cannot turn into a blind spot.

Two kernel-side parts (probes/common.h, proc.c, net.c): records a rule acts on — the exec
of a basename any rule names (`exec_watch`, written here), a connect a destination rule
matched — are admitted from a per-agent policy bucket of their own, so a flood of ordinary
events does not cost them; and every refused or unwritable record is counted per agent,
event type and cause (the rate limit, or a full ring buffer).

The userspace part, `FloodGuard`, turns new drops into one `agenttrace-events-dropped` alert
per agent and check, saying how many were lost to which cause. It acts only on the agent
that exceeded its own rate limit: a full ring buffer is shared by every agent, so the agents
whose records it refused may be the victims of another's flood, and freezing them would let
a flooder freeze its neighbours. `flood_action` "auto" (the default) freezes in enforce mode
and reports in monitor mode.
"""
from __future__ import annotations

import ctypes as C
import time
from typing import Iterable

from agenttrace.session.event import Event
from agenttrace.timefmt import format_ns

RATE_LIMITED = 0x8000   # AT_DROP_RATE_LIMITED in probes/common.h
COMM_LEN = 16


def drop_cause(drop_type: int) -> str:
    return "rate_limit" if drop_type & RATE_LIMITED else "ring_full"


def exec_watch_names(ruleset) -> set[bytes]:
    """The comm values (basename, first 15 bytes) of every exact exe basename or path a rule
    on exec names. Wildcard patterns cannot be looked up in a hash: they are not included."""
    out: set[bytes] = set()
    for r in getattr(ruleset, "rules", ()):
        m = getattr(r, "match", None)
        if m is None or "exec" not in r.on:
            continue
        names = list(m.basename_list) + [p.rsplit("/", 1)[-1] for p in m.exe_path_list]
        for n in names:
            if n and not any(c in n for c in "*?["):
                out.add(n.encode()[:COMM_LEN - 1])
    return out


def write_exec_watch(probes, names: Iterable[bytes]) -> None:
    """New entries first, stale ones after (no moment without the names of either set)."""
    try:
        t = probes["exec_watch"]
    except KeyError:
        return
    want = set()
    for n in names:
        k = t.Key()
        C.memmove(C.addressof(k), n, len(n))
        t[k] = t.Leaf(1)
        want.add(bytes(k))
    for k in list(t.keys()):
        if bytes(k) not in want:
            try:
                del t[k]
            except KeyError:
                pass


class FloodGuard:
    def __init__(self, action: str = "auto"):
        self.action = action
        self.seen: dict[tuple[int, str], int] = {}
        self.frozen: set[int] = set()

    def resolved_action(self, mode: str) -> str:
        if self.action == "auto":
            return "freeze-agent" if mode == "enforce" else "report"
        return self.action

    def check(self, drops: dict, agents, mode: str, node: str) -> list[tuple[Event, bool]]:
        """drops: {(agent cgroup id, type): count} from the kernel; agents: AgentResolver.
        Returns (alert, freeze) for each agent with new drops; an alert to freeze has outcome
        "pending" for the act stage to fill in."""
        totals: dict[int, dict[str, int]] = {}
        for (agent, t), n in drops.items():
            by = totals.setdefault(agent, {})
            c = drop_cause(t)
            by[c] = by.get(c, 0) + n
        out = []
        action = self.resolved_action(mode)
        for agent, by in totals.items():
            new = {c: n - self.seen.get((agent, c), 0) for c, n in by.items()}
            new = {c: n for c, n in new.items() if n > 0}
            if not new:
                continue
            for c, n in by.items():
                self.seen[(agent, c)] = n
            ident = agents.agent(agent)
            flooding = new.get("rate_limit", 0) > 0
            freeze = (action == "freeze-agent" and mode == "enforce" and flooding and bool(ident.get("cgroup"))
                      and agent not in self.frozen)
            if freeze:
                self.frozen.add(agent)
            total, fresh = sum(by.values()), sum(new.values())
            parts = ", ".join(f"{n} to the {'rate limit' if c == 'rate_limit' else 'full ring buffer'}"
                              for c, n in sorted(new.items()))
            msg = f"{fresh} events of agent {ident['id']} were dropped ({parts}; {total} in all): its activity is partly unseen"
            if freeze:
                msg += "; the agent exceeded its own rate limit: freezing it"
            elif agent in self.frozen:
                msg += "; its freeze was requested earlier"
            elif not flooding:
                msg += "; not acted on: a full ring buffer may be another agent's flood"
            t = time.time_ns()
            rec = {"ts": format_ns(t), "kind": "alert", "node": node, "agent": ident, "trigger": "lifecycle",
                   "rule": {"id": "agenttrace-events-dropped", "category": "evasion", "severity": "high",
                            "action": action, "outcome": "pending" if freeze else "reported",
                            "tags": ["T1562"], "message": msg},
                   "drops": {"new": fresh, "total": total, "new_by_cause": new, "total_by_cause": by}}
            out.append((Event("alert", t, rec, 0, agent), freeze))
        return out
