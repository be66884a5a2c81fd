"""Enricher.on_view alone per exec (exec+exit records) and per TCP connection, no engine/sinks."""
import os, sys, time
sys.path.insert(0, os.getcwd())
from bench import pipeline_micro as PM
from agenttrace import session
from agenttrace.sinks.outputs import StreamSink
opts = session.SessionOptions(cgroups=[])
rs = session.load_ruleset(opts)
sink = StreamSink(open(os.devnull, "wb"), name="file", close_stream=True)
t = session.build(opts, [sink], ruleset=rs)
agent = os.stat("/").st_ino
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
execs, _ = PM._records(n, agent, 2_000_000, fork_records=False)
tcp = PM._tcp_records(n, agent, os.getpid())
enr = t.enrich
for r in execs[:40] + tcp[:30]:
    enr.on_view(memoryview(r), len(r))
res = {}
WHICH = os.environ.get("WHICH")
for name, recs, per in [x for x in (("exec", execs, n), ("tcp", tcp, n)) if not WHICH or x[0] == WHICH]:
    best = []
    for rep in range(5):
        c0 = time.thread_time_ns()
        for r in recs:
            enr.on_view(memoryview(r), len(r))
        enr.flush_pending()
        best.append((time.thread_time_ns() - c0) / per / 1000)
    res[name] = min(best)
print(res)
