"""The unit that flows through reader → decode → enrich → match → act → sink, and the wiring."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from agenttrace.timefmt import parse_ns


class Event:
    """One event on its way through the pipeline.

    `record` is exactly the JSON record of the record contract (tracer/schema/event.schema.json); the other fields are what stages need
    cheaply without digging into the record (and what never goes on the wire).
    """

    __slots__ = ("kind", "t_ns", "record", "pid", "agent_cgroup_id", "cookie")

    def __init__(self, kind: str, t_ns: int, record: dict, pid: int = 0,
                 agent_cgroup_id: int = 0, cookie: int = 0):
        self.kind = kind
        self.t_ns = t_ns
        self.record = record
        self.pid = pid
        self.agent_cgroup_id = agent_cgroup_id
        self.cookie = cookie

    @classmethod
    def from_record(cls, record: dict) -> "Event":
        """Rebuild an event from a JSON line (offline replay)."""
        kind = record.get("kind")
        if not isinstance(kind, str):
            raise ValueError("record has no 'kind'")
        ts = record.get("ts")
        if not isinstance(ts, str):
            raise ValueError("record has no 'ts'")
        proc = record.get("proc") or {}
        agent = record.get("agent") or {}
        return cls(kind, parse_ns(ts), record, int(proc.get("pid") or 0),
                   int(agent.get("cgroup_id") or 0), 0)

    def __repr__(self) -> str:
        return f"Event({self.kind!r}, pid={self.pid}, t_ns={self.t_ns})"


Stage = Callable[[Event], Optional[Iterable[Event]]]
