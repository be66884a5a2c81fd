"""What a client of the daemon's event socket asks for, checked on both ends.

The client sends one JSON line after connecting::

    {"subscribe": {"agents": ["a1"], "labels": {"episode": "ep-7"},
                   "kinds": ["alert", "summary"], "min_severity": "high"},
     "resume": {"instance": "3f0c...", "seq": 1041}}

and the server answers with `{"hello": {"instance", "seq", "replayed"}}` followed by
envelopes `{"seq": N, "record": {...}}` of the matching records only. `seq` numbers the
records of one daemon run (`instance`); a client that comes back to the same instance gets
what followed its last seq from the daemon's replay buffer, and one that comes back to a new
instance (the daemon restarted) gets the new run's buffer from the start. Clients that send
nothing (`agenttrace tail`, `socat`) keep the plain stream of bare records.

Every field is optional; given fields are ANDed. `min_severity` drops alerts below it and
leaves other kinds alone (restrict those with `kinds`). Agent ids and label values may be
shell-style patterns (`ep-*`), as in per-sink filters: both are matched by one
`sinks.filter.RecordFilter`, which is the only place record selection is implemented.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from agenttrace.sinks.filter import SEVERITIES, SEVERITY_RANK as _RANK, RecordFilter

MAX_LINE = 65536
MAX_ITEMS = 256


class SubscriptionError(ValueError):
    pass


def _strs(v, name: str) -> Optional[frozenset]:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or len(v) > MAX_ITEMS:
        raise SubscriptionError(f"subscribe.{name}: expected a list of at most {MAX_ITEMS} strings")
    return frozenset(v)


@dataclass(frozen=True)
class Subscription:
    agents: Optional[frozenset] = None
    labels: dict = field(default_factory=dict)
    kinds: Optional[frozenset] = None
    min_severity: Optional[str] = None
    _filter: RecordFilter = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_filter", RecordFilter(
            self.kinds, self.min_severity, self.agents, self.labels, severity_alerts_only=True))

    @classmethod
    def from_dict(cls, d: dict) -> "Subscription":
        if not isinstance(d, dict):
            raise SubscriptionError("subscribe: expected an object")
        unknown = set(d) - {"agents", "labels", "kinds", "min_severity"}
        if unknown:
            raise SubscriptionError(f"subscribe: unknown field(s) {', '.join(sorted(unknown))}")
        labels = d.get("labels") or {}
        if not isinstance(labels, dict) or len(labels) > MAX_ITEMS or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise SubscriptionError("subscribe.labels: expected an object of string values")
        sev = d.get("min_severity")
        if sev is not None and sev not in _RANK:
            raise SubscriptionError(f"subscribe.min_severity: {sev!r} is not one of {', '.join(SEVERITIES)}")
        return cls(_strs(d.get("agents"), "agents"), dict(labels), _strs(d.get("kinds"), "kinds"), sev)

    def to_dict(self) -> dict:
        out: dict = {}
        if self.agents is not None:
            out["agents"] = sorted(self.agents)
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.kinds is not None:
            out["kinds"] = sorted(self.kinds)
        if self.min_severity is not None:
            out["min_severity"] = self.min_severity
        return out

    def matches(self, rec: dict) -> bool:
        return self._filter(rec)


def parse_request(line: bytes) -> tuple[Subscription, Optional[dict]]:
    import orjson
    try:
        req = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise SubscriptionError(f"not JSON: {e}") from None
    if not isinstance(req, dict) or "subscribe" not in req:
        raise SubscriptionError("expected {\"subscribe\": {...}}")
    resume = req.get("resume")
    if resume is not None:
        if not isinstance(resume, dict) or not isinstance(resume.get("instance", ""), str) or \
                not isinstance(resume.get("seq", 0), int):
            raise SubscriptionError("resume: expected {\"instance\": str, \"seq\": int}")
    return Subscription.from_dict(req["subscribe"]), resume
