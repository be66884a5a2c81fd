"""Candidates by the value of the fields their rules' conditions first compare (issue 15).

A rule with no `match` whose condition starts `path == "lit" && ...` cannot hold on a record
where `path` is a string other than "lit" (match/celgate.py decides exactly that without CEL).
The pack's one listen rule is such a rule (`net.what == "listen" && ...`): every accept record
of a TCP storm ran it, its gate and the rule loop to learn "no". Here the rules left for one
tuple of those fields' values (and the candidates the engine's other indexes left) are computed
once and kept, so an accept meets no candidate.

Nothing is dropped that the gate would not have answered False for: a field that is missing or
not a string keeps the rule (CEL then answers, and counts its error, as before), and rules with
a `match` are never dropped (the match runs first and may count an error of its own). The values
come from the record, which the agent may shape (a comm, an address): they only choose among
answers the gate gives, and the kept tuples are bounded. Only fields under `net` and `proc`:
the engine's shortcut for a record holding the previous record's very parts (Engine.process,
`_no_cand`) takes the candidates to be a function of those two.
"""
from __future__ import annotations

from typing import Dict, Optional

from agenttrace.match.celgate import eq_field

_CACHE = 4096


def _getter(path: tuple):
    """rec -> the string at path, or None (missing, or not a string: not decided here)."""
    if len(path) == 2:
        a, b = path

        def get2(rec):
            d = rec.get(a)
            if type(d) is dict:
                v = d.get(b)
                if type(v) is str:
                    return v
            return None
        return get2

    def get(rec):
        cur = rec
        for p in path:
            cur = cur.get(p) if isinstance(cur, dict) else None
        return cur if type(cur) is str else None
    return get


class EqIndex:
    def __init__(self, need: Dict[str, tuple]) -> None:
        self.paths = tuple(sorted({p for p, _ in need.values()}))
        pos = {p: i for i, p in enumerate(self.paths)}
        self.need = {rid: (pos[p], lit) for rid, (p, lit) in need.items()}   # rule id -> (value index, literal)
        self._get = tuple(_getter(p) for p in self.paths)
        self._one = self._get[0] if len(self._get) == 1 else None
        self._kept: Dict[tuple, tuple] = {}

    @classmethod
    def for_rules(cls, rules) -> Optional["EqIndex"]:
        need = {}
        for r in rules:
            if r.match is None and r.condition is not None and r.gate is None and r.exe_prefixes is None:
                f = eq_field(r.condition.source)
                # net and proc only: the engine's no-candidate shortcut keys on those parts
                if f is not None and f[0][0] in ("net", "proc"):
                    need[r.id] = f
        return cls(need) if need else None

    def candidates(self, rules: tuple, rec: dict) -> tuple:
        one = self._one
        # the rules given (per scope, port, program) are kept alive by the entry: their id
        # cannot name another tuple while it is there
        key = (id(rules), one(rec)) if one is not None else (id(rules), *[g(rec) for g in self._get])
        got = self._kept.get(key)
        if got is not None and got[0] is rules:
            return got[1]
        vals = key[1:]
        need = self.need
        kept = tuple(r for r in rules if (n := need.get(r.id)) is None or vals[n[0]] is None or vals[n[0]] == n[1])
        if len(self._kept) >= _CACHE:
            self._kept.clear()
        self._kept[key] = (rules, kept)
        return kept
