import os, sys, time
sys.path.insert(0, os.getcwd())
from bench import pipeline_micro as PM
from agenttrace import session
from agenttrace.kernel import wire as E
from agenttrace.timefmt import format_ns
from agenttrace.sinks.outputs import StreamSink
opts = session.SessionOptions(cgroups=[])
t = session.build(opts, [StreamSink(open(os.devnull, "wb"), name="file", close_stream=True)], ruleset=session.load_ruleset(opts))
agent = os.stat("/").st_ino
execs, _ = PM._records(200, agent, 2_000_000, fork_records=False)
enr = t.enrich
for r in execs[:40]:
    enr.on_view(memoryview(r), len(r))
x = memoryview(execs[100]); e = memoryview(execs[101])
N = 100000
tk = time.monotonic_ns()
rec = enr._exec_v(x)[0].record
def bench(name, f):
    t0 = time.thread_time_ns()
    for _ in range(N):
        f()
    print(f"{name:28s} {(time.thread_time_ns() - t0) / N:8.0f} ns")
bench("noop", lambda: None)
bench("format_ns", lambda: format_ns(tk))
bench("agents.agent", lambda: enr.agents.agent(agent))
bench("unpack exec", lambda: E.unpack(E.EXEC_S, x))
bench("exec_args", lambda: E.exec_args(x, 5))
bench("identity", lambda: enr._identity(2_000_100, "/bin/true", "/bin/true", ["true"], tk))
bench("observe exec", lambda: enr.activity.observe("exec", tk, 2_000_100, agent, rec))
bench("observe exit", lambda: enr.activity.observe("exit", tk, 2_000_100, agent, rec))
bench("procs.ancestry", lambda: enr.procs.ancestry(2_000_100))
