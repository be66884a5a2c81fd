"""Engine cost per event: events/s through match (+ CEL, windows, de-dup) with the default
rule pack over recorded events. Prints one JSON object.

    .venv/bin/python bench/engine_bench.py [--events N] [--events-file F.jsonl ...] [--rounds R]

The events (tests/fixtures/events_*.jsonl: development work recorded with the real probes,
plus crafted the record contract (tracer/schema/event.schema.json) records of development work and attacks) are
replayed round-robin across 64 agents with the clock advancing 100 µs per event, so windows
and de-dup see realistic per-agent rates. Each round builds a fresh Engine; the best and
median rounds are reported. Budget context (docs/ARCHITECTURE.md §4): the reader decodes at most ~360 k
events/s, so match must stay well above that share of a core.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agenttrace.clock import FakeClock  # noqa: E402
from agenttrace.match.engine import Engine, read_events  # noqa: E402
from agenttrace.session.event import Event  # noqa: E402
from agenttrace.match.rules import default_rule_paths, load_rules  # noqa: E402

DEFAULT_FILES = [HERE.parent / "tests" / "fixtures" / f"events_{n}.jsonl"
                 for n in ("recorded_devwork", "benign", "attack")]


def build_events(files, n, agents=64):
    base = [e for f in files for e in read_events(str(f))]
    out = []
    for i in range(n):
        src = base[i % len(base)]
        rec = copy.deepcopy(src.record)
        a = i % agents
        rec["agent"] = dict(rec.get("agent") or {}, id=f"agent-{a}", cgroup=f"/agents/agent-{a}", cgroup_id=1000 + a)
        out.append(Event(src.kind, src.t_ns, rec, src.pid, 1000 + a, 0))
    return out


def run_once(ruleset, events):
    clock = FakeClock()
    eng = Engine(ruleset, mode="monitor", clock=clock)
    alerts = 0
    t0 = time.perf_counter()
    for i, ev in enumerate(events):
        clock._mono += 100_000          # 100 µs per event, no lock round-trip in the timed loop
        alerts += len(eng.process(ev))
        if i % 10_000 == 0:
            alerts += len(eng.tick())
    alerts += len(eng.flush())
    return time.perf_counter() - t0, alerts, eng


def baseline(events):
    """The loop with no engine: what the harness itself costs per event."""
    t0 = time.perf_counter()
    n = 0
    for ev in events:
        n += len(ev.record)
    return time.perf_counter() - t0


def per_kind(ruleset, events):
    out = {}
    kinds = Counter(e.kind for e in events)
    for kind in sorted(kinds):
        evs = [e for e in events if e.kind == kind]
        dt, _, _ = run_once(ruleset, evs)
        out[kind] = {"events": len(evs), "rules": len(ruleset.by_kind.get(kind, ())),
                     "events_per_s": round(len(evs) / dt), "us_per_event": round(dt / len(evs) * 1e6, 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events-file", action="append", default=None)
    args = ap.parse_args(argv)
    files = [Path(f) for f in (args.events_file or DEFAULT_FILES)]

    t0 = time.perf_counter()
    ruleset = load_rules(default_rule_paths())
    load_ms = (time.perf_counter() - t0) * 1e3
    events = build_events(files, args.events)
    base_s = baseline(events)
    rounds = []
    for _ in range(args.rounds):
        dt, alerts, eng = run_once(ruleset, events)
        rounds.append(dt)
    best, med = min(rounds), statistics.median(rounds)
    result = {
        "bench": "engine",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "rule_files": [Path(p).name for p in ruleset.files],
        "rules": len(ruleset.rules),
        "rules_by_kind": {k: len(v) for k, v in sorted(ruleset.by_kind.items())},
        "rule_load_ms": round(load_ms, 1),
        "events": len(events),
        "event_mix": dict(Counter(e.kind for e in events)),
        "rounds": args.rounds,
        "events_per_s_best": round(len(events) / best),
        "events_per_s_median": round(len(events) / med),
        "us_per_event_median": round(med / len(events) * 1e6, 2),
        "harness_us_per_event": round(base_s / len(events) * 1e6, 3),
        "alerts_per_round": alerts,
        "engine_stats": {k: (dict(v) if isinstance(v, Counter) else v) for k, v in eng.stats.items() if k != "matched"},
        "per_kind": per_kind(ruleset, events),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
