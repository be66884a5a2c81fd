"""CPU per record of this branch's stages alone (match, pipeline bookkeeping, summaries,
rendering + sink write), on the records bench/pipeline_micro.py's exec and TCP streams make:
the records are produced once through the real pipeline, then each stage is run over them
again and again (thread CPU, best of R). For quick before/after iterations; the live pairs
(pair.py) are the figure.

    .venv/bin/python bench/profiles/htyped-match/parts.py [N] [R]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from bench import pipeline_micro as PM  # noqa: E402


def best(fn, reps):
    out = []
    for _ in range(reps):
        c0 = time.thread_time_ns()
        fn()
        out.append(time.thread_time_ns() - c0)
    return min(out)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    from agenttrace import native, session
    from agenttrace.sinks.outputs import StreamSink, _FAST_OPTS, _default
    from agenttrace.sinks.render import render_lines
    opts = session.SessionOptions(cgroups=[])
    rs = session.load_ruleset(opts)
    sink = StreamSink(open(os.devnull, "wb", buffering=1 << 16), name="file", close_stream=True)
    t = session.build(opts, [sink], ruleset=rs)
    agent = os.stat("/").st_ino
    execs, _ = PM._records(n, agent, 3_000_000, False)
    tcp = PM._tcp_records(n, agent, os.getpid())
    got = []
    t.hooks.append(got.append)
    res = {}
    for name, recs in (("exec", execs), ("tcp", tcp)):
        got.clear()
        PM._feed(t, recs)
        for ev in t.enrich.flush_pending():
            t._process(ev)
        t._flush()
        evs = list(got)
        recs_out = [e.record for e in evs]
        batches = [recs_out[i:i + 64] for i in range(0, len(recs_out), 64)]
        eng, summ = t.engine, t.summaries

        def match():
            p = eng.process
            for e in evs:
                p(e)

        def observe():
            o = summ.observe
            for r in recs_out:
                o(r)

        def render():
            for b in batches:
                render_lines(b, _default, _FAST_OPTS)

        def sinkw():
            for b in batches:
                sink.emit_batch(b)

        def pipeline():       # _process + _flush per 64, with the engine, summaries and sink
            pr = t._process
            for i, e in enumerate(evs):
                pr(e)
                if i % 64 == 63:
                    t._flush()
            t._flush()
        t.hooks.remove(got.append)        # not timed: the capture hook
        r = {k: best(f, reps) / n / 1000 for k, f in
             (("match", match), ("observe", observe), ("render", render), ("sink", sinkw), ("pipeline", pipeline))}
        t.hooks.append(got.append)
        res[name] = r
    print("native loaded:", len(native.status().get("loaded", [])) if hasattr(native, "status") else "?")
    for name, r in res.items():
        unit = "exec (exec+exit)" if name == "exec" else "TCP connection (connect+accept)"
        print(f"{name}: us per {unit}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
