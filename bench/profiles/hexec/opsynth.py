# Scratch measurement tool of bench/profiles/hexec-live-gap.md (issue 15); not shipped, not a test.
"""Bytecodes per exec: synthetic (bench.pipeline_micro) vs captured real records, same session."""
import os, sys, pickle
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
if os.environ.get("HXROOT"): sys.path.insert(0, os.environ["HXROOT"])

from bench.pipeline_micro import _records
from agenttrace import session
from agenttrace.kernel import wire as E
from agenttrace.sinks.outputs import StreamSink
opts = session.SessionOptions(cgroups=[])
t = session.build(opts, [StreamSink(open(os.devnull, "wb"), name="f")], ruleset=session.load_ruleset(opts))
t.enrich.warm()
real = [r for r in pickle.load(open(os.environ.get("CAPTURE", "/tmp/capture.pkl"), "rb")) if int.from_bytes(r[:2], "little") in (E.EV_EXEC, E.EV_EXIT)]
agent = os.stat("/").st_ino
o = E.Header.tgid.offset
def shift(rr, k):
    out = []
    for r in rr:
        b = bytearray(r); tg = int.from_bytes(b[o:o+4], "little")
        b[o:o+4] = (tg + k).to_bytes(4, "little"); out.append(bytes(b))
    return out
def feed(rr):
    for i, r in enumerate(rr):
        t._on_view(memoryview(r), len(r))
        if i % 30 == 29: t._flush()
    t._flush()
N = [0]
def tr(frame, event, arg):
    frame.f_trace_opcodes = True
    if event == "opcode": N[0] += 1
    return tr
for name, mk in (("synthetic", lambda k: _records(400, agent, 3_000_000 + k, False)[0]), ("real", lambda k: shift(real[1000:1800], k))):
    feed(mk(0)); rr = mk(100000)
    N[0] = 0; sys.settrace(tr); feed(rr); sys.settrace(None)
    print(f"{name}: {N[0] / (len(rr) / 2):.0f} bytecodes per exec, {len(rr)} records")
