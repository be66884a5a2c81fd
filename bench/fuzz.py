"""The long fuzz run: the properties of tests/test_fuzz_parsers.py with many random examples.

    .venv/bin/python -m bench.fuzz [--examples N] [--target dns|flow|record]...

Every failing input hypothesis shrinks to is written to tests/fuzz_corpus/<target>/ (so CI
replays it from then on) and the exception printed; also reported: examples run per target
and the slowest input's time (a parser must stay bounded in time per input)."""
from __future__ import annotations

import argparse
import hashlib
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from agenttrace.lab import fuzzing as fuzzing

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_corpus"


def run(target: str, examples: int) -> dict:
    strat = fuzzing.strategies()[target]
    stats = {"examples": 0, "max_ms": 0.0, "failures": []}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(strat, st.integers(0, 3))
    def prop(data, variant):
        t0 = time.perf_counter()
        try:
            fuzzing.run_one(target, data, variant)
        finally:
            stats["examples"] += 1
            ms = (time.perf_counter() - t0) * 1000
            if ms > stats["max_ms"]:
                stats["max_ms"], stats["slowest"] = ms, (bytes(data), variant)

    try:
        prop()
    except Exception as e:   # hypothesis replays the shrunk failing example last
        stats["failures"].append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if "slowest" in stats:
        # timed again, alone: a slow first call (imports) or a busy machine is not the parser
        data, variant = stats["slowest"]
        again = []
        for _ in range(3):
            t0 = time.perf_counter()
            try:
                fuzzing.run_one(target, data, variant)
            except Exception:
                pass
            again.append((time.perf_counter() - t0) * 1000)
        stats["slowest_again_ms"] = min(again)
        stats["slowest_input"] = data[:64].hex()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--target", action="append", choices=["dns", "flow", "record"])
    a = ap.parse_args()
    bad = 0
    for target in a.target or ["dns", "flow", "record"]:
        orig = fuzzing.run_one
        failed: list = []

        def keep(t, data, variant=0, _orig=orig):
            try:
                return _orig(t, data, variant)
            except Exception:
                failed.append((bytes(data), variant))
                raise
        fuzzing.run_one = keep
        try:
            st_ = run(target, a.examples)
        finally:
            fuzzing.run_one = orig
        if st_["failures"] and failed:
            data, variant = failed[-1]      # the shrunk one
            d = CORPUS / target
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{hashlib.sha1(data).hexdigest()[:12]}-v{variant}.bin"
            path.write_bytes(data)
            print(f"kept {path}")
        bad += len(st_["failures"])
        print(f"{target}: {st_['examples']} examples, slowest {st_['max_ms']:.2f} ms "
              f"(that input again, alone: {st_.get('slowest_again_ms', 0):.2f} ms), "
              f"failures: {st_['failures'] or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
