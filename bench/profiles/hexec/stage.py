# Scratch measurement tool of bench/profiles/hexec-live-gap.md (issue 15); not shipped, not a test.
"""agenttrace CLI with thread-CPU accounting of named functions (nested times included in each)."""
import atexit, sys, time, os
if os.environ.get("HXROOT"): sys.path.insert(0, os.environ["HXROOT"])
# it replaces methods of the pipeline's classes, which the compiled build makes immutable: these
# figures are the pure-Python build's (AGENTTRACE_NATIVE=0), whatever the environment says
os.environ["AGENTTRACE_NATIVE"] = "0"
from agenttrace.session import pipeline as P
from agenttrace.kernel import ringbuf as RB
from agenttrace.enrich import enricher as EN, exeid as XI, proctable as PT, activity as AC
from agenttrace.session import summary as SU
from agenttrace.match import engine as EG
from agenttrace.sinks import outputs as O
T = {}
tt = time.thread_time_ns
def wrap(cls, name, key):
    f = getattr(cls, name)
    def w(*a, **k):
        t0 = tt()
        try: return f(*a, **k)
        finally:
            d = T.setdefault(key, [0, 0]); d[0] += tt() - t0; d[1] += 1
    setattr(cls, name, w)
for cls, name in [(P.Tracer, "poll"), (RB.RingReader, "consume"), (P.Tracer, "_on_view"), (P.Tracer, "_flush"),
                  (EN.Enricher, "_exec_v"), (EN.Enricher, "_exit_v"), (EN.Enricher, "_identity"),
                  (PT.ProcTable, "ancestry"), (PT.ProcTable, "on_exec"), (AC.Activity, "observe"),
                  (SU.Summaries, "observe"), (EG.Engine, "process"), (O.StreamSink, "emit_batch"),
                  (P.Tracer, "_process")]:
    wrap(cls, name, f"{cls.__name__}.{name}")
import gc
G = {}
_g0 = [0]
def gccb(phase, info):
    if phase == "start": _g0[0] = tt()
    else:
        d = G.setdefault(info["generation"], [0, 0, 0]); d[0] += tt() - _g0[0]; d[1] += 1; d[2] += info.get("collected", 0)
gc.callbacks.append(gccb)
def report():
    n = int(os.environ.get("NEXEC", "3000"))
    with open(os.environ.get("STAGE_OUT", "/tmp/stage.txt"), "w") as f:
        for k, (ns, c) in sorted(T.items(), key=lambda kv: -kv[1][0]):
            f.write(f"{k:28s} {ns/n/1000:7.1f} us/exec  {c/n:6.2f} calls/exec\n")
        for g, (ns, c, col) in sorted(G.items()):
            f.write(f"gc gen{g}: {ns/n/1000:.2f} us/exec over {c} collections, {col} collected, threshold {gc.get_threshold()}\n")
atexit.register(report)
from agenttrace.launch import main   # the entry point as shipped (launch prefetch)
sys.argv = ["agenttrace"] + sys.argv[1:]
main()
