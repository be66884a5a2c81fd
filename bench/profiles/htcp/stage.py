# Scratch measurement tool of bench/profiles/htcp-connect.md (issue 15); not shipped, not a test.
"""agenttrace CLI with thread-CPU accounting of the connect path's functions (a copy of ../hexec/stage.py)."""
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
                  (EN.Enricher, "_connect_v"), (EN.Enricher, "_listen_v"), (EN.Enricher, "_result_v"), (EN.Enricher, "on_view"),
                  (AC.Activity, "observe"),
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
def _total():
    tot = 0
    for t in os.listdir("/proc/self/task"):
        try: tot += int(open(f"/proc/self/task/{t}/schedstat").read().split()[0])
        except OSError: pass
    return tot
def report():
    n = int(os.environ.get("NCONN", "3000"))
    with open(os.environ.get("STAGE_OUT", "/tmp/stage.txt"), "w") as f:
        for k, (ns, c) in sorted(T.items(), key=lambda kv: -kv[1][0]):
            f.write(f"{k:28s} {ns/n/1000:7.1f} us/conn  {c/n:6.2f} calls/conn\n")
        for g, (ns, c, col) in sorted(G.items()):
            f.write(f"gc gen{g}: {ns/n/1000:.2f} us/conn over {c} collections, {col} collected, threshold {gc.get_threshold()}\n")
import signal as _sig
_t0 = [0]
def _mark(*_):   # SIGUSR1 from the driver: the storm starts now; the report counts from here
    T.clear(); G.clear(); _t0[0] = _total()
_sig.signal(_sig.SIGUSR1, _mark)
_r0 = report
def report():
    _r0()
    with open(os.environ.get("STAGE_OUT", "/tmp/stage.txt"), "a") as f:
        f.write(f"process total {(_total() - _t0[0]) / int(os.environ.get('NCONN', '3000')) / 1000:.1f} us/conn (since the mark, stop included)\n")
atexit.register(report)
from agenttrace.launch import main   # the entry point as shipped (launch prefetch)
sys.argv = ["agenttrace"] + sys.argv[1:]
main()
