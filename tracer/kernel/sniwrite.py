"""The writer of probes/tls.c's `sni_deny` map: the TLS server names `block` rules forbid.

Key (agent group, backward FNV-1a of the name: match/policy.name_hash); value the policy ids of
the rule listing the name exactly and of the one listing `*.name` (one key serves both). Written
new-first, stale-after (kernel/mapwrite.py) like every policy map.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from agenttrace.kernel.mapwrite import delete_stale

SNI_ENTRIES = 4096       # AT_SNI_ENTRIES in probes/tls.c


class SniPlanError(ValueError):
    """More names than the map holds; `policy_id` names the rule that overflowed it."""

    def __init__(self, message: str, policy_id: int):
        super().__init__(message)
        self.policy_id = policy_id


def plan_sni(entries: Iterable) -> Dict[Tuple[int, int], List[int]]:
    """(group, hash) -> [exact policy id, subdomains policy id], 0 for none. Two rules on the
    same name and form: the first (lowest policy id) is the one the kernel reports."""
    plan: Dict[Tuple[int, int], List[int]] = {}
    for e in entries:
        slot = plan.get((e.group_id, e.hash))
        if slot is None:
            if len(plan) >= SNI_ENTRIES:
                raise SniPlanError(f"more than {SNI_ENTRIES} TLS server names (group, name) to block; "
                                   "the kernel's map holds no more: use wildcards", e.policy_id)
            slot = plan[(e.group_id, e.hash)] = [0, 0]
        i = 1 if e.subdomains else 0
        if not slot[i]:
            slot[i] = e.policy_id
    return plan


def write_sni_deny(table, entries: Iterable) -> int:
    """Install the compiled SniDeny entries; returns the number of keys written."""
    plan = plan_sni(entries)
    keep = set()
    for (gid, h), (exact, sub) in plan.items():
        k = table.Key()
        k.gid, k.pad, k.hash = gid, 0, h
        v = table.Leaf()
        v.exact, v.sub = exact, sub
        table[k] = v
        keep.add(bytes(k))
    delete_stale(table, keep)
    return len(plan)


def sni_stats(probes) -> dict:
    """probes/tls.c counters, summed over CPUs."""
    try:
        t = probes["sni_stats"]
    except KeyError:
        return {}
    names = ("hellos_parsed", "names_denied", "names_past_segment")
    return {n: sum(t[t.Key(i)]) for i, n in enumerate(names)}
