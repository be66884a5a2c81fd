# Scratch measurement tool of bench/profiles/hexec-live-gap.md (issue 15); not shipped, not a test.
"""agenttrace CLI with one factor switched off/changed (HXP=comma list), for live A/B."""
import os, sys
if os.environ.get("HXROOT"): sys.path.insert(0, os.environ["HXROOT"])
# it replaces methods of the pipeline's classes, which the compiled build makes immutable: these
# figures are the pure-Python build's (AGENTTRACE_NATIVE=0), whatever the environment says
os.environ["AGENTTRACE_NATIVE"] = "0"
from agenttrace.session import pipeline as P
from agenttrace.enrich import proctable as PT, activity as AC, enricher as EN
from agenttrace.session import summary as SU
opts = set(filter(None, os.environ.get("HXP", "").split(",")))
if "pt4k" in opts:
    i0 = PT.ProcTable.__init__
    PT.ProcTable.__init__ = lambda self, max_entries=65536: i0(self, min(max_entries, 4096))
if "keep1k" in opts:
    PT.EXITED_KEEP = 1024
if "keep64k" in opts:
    PT.EXITED_KEEP = 1 << 20
import gc as _gc
if "gc7k" in opts or "gcboth" in opts:
    _gc.set_threshold(7000, 10, 10)
if "gcfreeze" in opts or "gcboth" in opts:
    def _cb(phase, info):
        if phase == "stop" and info["generation"] == 2:
            _gc.freeze()
    _gc.callbacks.append(_cb)
if "noact" in opts:
    AC.Activity.observe = lambda self, *a: None
if "nosum" in opts:
    SU.Summaries.observe = lambda self, r: None
if "noid" in opts:
    EN.Enricher._identity = lambda self, *a: None
if "noeng" in opts:
    from agenttrace.match import engine as EG
    EG.Engine.process = lambda self, ev: None
if "nosink" in opts:
    from agenttrace.sinks import outputs as O
    O.StreamSink.emit_batch = lambda self, b: None
if "noanc" in opts:
    PT.ProcTable.ancestry = lambda self, pid, depth=8: []
if "cnt" in opts:
    import atexit, time
    from agenttrace.enrich import exeid as XI
    C = {"exists": 0, "gone": 0, "stat_memo": 0, "gone_calls": 0}
    ex0 = XI._exists
    def ex(pid):
        r = ex0(pid); C["exists" if r else "gone"] += 1; return r
    XI._exists = ex
    g0 = XI.ExeIdentifier._gone
    def g(self, *a):
        C["gone_calls"] += 1; return g0(self, *a)
    XI.ExeIdentifier._gone = g
    atexit.register(lambda: open("/tmp/ab-counts.txt", "w").write(repr(C)))
from agenttrace.launch import main   # the entry point as shipped (launch prefetch)
sys.argv = ["agenttrace"] + sys.argv[1:]
for o in opts:
    if o.startswith("bwo"):
        sys.argv += ["--batch-wait-ms", o[3:]]
    elif o.startswith("bw"):
        sys.argv += ["--batch-wait-ms", o[2:], "--wakeup-ms", o[2:]]
main()
