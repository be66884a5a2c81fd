"""Which records an output takes: one matcher for per-sink filters (the daemon config), the
`tail` view's filters, and anything else that selects records (socket subscriptions).

Every criterion is optional and the given ones are ANDed:
- `kinds`: record kinds (`exec`, `alert`, `lifecycle`, ...);
- `min_severity`: `info` < `low` < `medium` < `high` < `critical`; an alert has its rule's
  severity. Other records count as `info` (so anything above `info` keeps alerts only) —
  unless `severity_alerts_only`, the socket subscription's contract, where `min_severity`
  ranks alerts and leaves other kinds to `kinds`;
- `agents`: agent ids, shell-style patterns allowed (`ep-*`); records without an agent
  (lifecycle) do not match once this is given;
- `labels`: {label: value} on the agent object, values may be patterns too.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping, Optional

SEVERITIES = ("info", "low", "medium", "high", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
_GLOB = set("*?[")


def _matcher(pattern: str):
    if _GLOB & set(pattern):
        return lambda v: isinstance(v, str) and fnmatch.fnmatchcase(v, pattern)
    return lambda v: v == pattern


class RecordFilter:
    __slots__ = ("kinds", "min_rank", "min_severity", "agents", "labels", "alerts_only",
                 "_agent_m", "_label_m")

    def __init__(self, kinds: Optional[Iterable[str]] = None, min_severity: Optional[str] = None,
                 agents: Optional[Iterable[str]] = None, labels: Optional[Mapping[str, str]] = None,
                 severity_alerts_only: bool = False):
        self.kinds = frozenset(kinds) if kinds else None
        if min_severity is not None and min_severity not in SEVERITY_RANK:
            raise ValueError(f"unknown severity {min_severity!r}; one of {', '.join(SEVERITIES)}")
        self.min_severity = min_severity
        self.min_rank = SEVERITY_RANK[min_severity] if min_severity else 0
        self.agents = tuple(agents) if agents else ()
        self.labels = dict(labels or {})
        self.alerts_only = severity_alerts_only
        self._agent_m = [_matcher(p) for p in self.agents]
        self._label_m = [(k, _matcher(v)) for k, v in self.labels.items()]

    @classmethod
    def from_config(cls, cfg) -> Optional["RecordFilter"]:
        """From a config model with the same four fields (None: no filter)."""
        if cfg is None:
            return None
        return cls(cfg.kinds, cfg.min_severity, cfg.agents, cfg.labels)

    @property
    def empty(self) -> bool:
        return self.kinds is None and not self.min_rank and not self.agents and not self.labels

    def __call__(self, record: dict) -> bool:
        kind = record.get("kind")
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.min_rank and (kind == "alert" or not self.alerts_only):
            rule = record.get("rule") if kind == "alert" else None
            sev = rule.get("severity") if isinstance(rule, dict) else "info"
            if SEVERITY_RANK.get(str(sev), 0) < self.min_rank:
                return False
        if self._agent_m or self._label_m:
            agent = record.get("agent")
            if not isinstance(agent, dict):
                return False
            if self._agent_m and not any(m(agent.get("id")) for m in self._agent_m):
                return False
            for key, m in self._label_m:
                if not m(agent.get(key)):
                    return False
        return True

    matches = __call__

    def describe(self) -> dict:
        out: dict = {}
        if self.kinds is not None:
            out["kinds"] = sorted(self.kinds)
        if self.min_severity:
            out["min_severity"] = self.min_severity
        if self.agents:
            out["agents"] = list(self.agents)
        if self.labels:
            out["labels"] = dict(self.labels)
        return out
