# Scratch measurement tool of bench/profiles/hexec-live-gap.md (issue 15); not shipped, not a test.
"""Replay captured exec/exit records (fresh pids each pass) in batches of B, with an
interferer between batches (not counted): none | sleep | sweep (16 MB) | spawn (fork+exec /bin/true x K)."""
import os, sys, time, gc, pickle, subprocess
from agenttrace import session
from agenttrace.kernel import wire as E
from agenttrace.sinks.outputs import StreamSink
recs = pickle.load(open(os.environ.get("CAPTURE", "/tmp/capture.pkl"), "rb"))
recs = [r for r in recs if int.from_bytes(r[:2], "little") in (E.EV_EXEC, E.EV_EXIT)][:4000]
B = int(sys.argv[1]); kinds = sys.argv[2].split(",")
opts = session.SessionOptions(cgroups=[])
rs = session.load_ruleset(opts)
sink = StreamSink(open(os.devnull, "wb", buffering=1 << 16), name="file", close_stream=True)
t = session.build(opts, [sink], ruleset=rs)
t.enrich.warm()
gc.collect(); gc.freeze()
o = E.Header.tgid.offset
buf = bytearray(16 << 20)
def shift(k):
    out = []
    for r in recs:
        b = bytearray(r); tg = int.from_bytes(b[o:o+4], "little")
        b[o:o+4] = (tg + k * 100000).to_bytes(4, "little"); out.append(bytes(b))
    return out
k = 0
res = {x: [] for x in kinds}
for rnd in range(3):
    for kind in kinds:
        k += 1; rr = shift(k); cpu = 0
        for i in range(0, len(rr), B):
            if kind == "sleep": time.sleep(0.005)
            elif kind == "sweep":
                for j in range(0, len(buf), 4096): buf[j] = 1
                buf[::64] = bytes(len(buf[::64]))
            elif kind == "spawn":
                for _ in range(3): os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0)
            c0 = time.thread_time_ns()
            for rec in rr[i:i + B]:
                t._on_view(memoryview(rec), len(rec))
            t._flush()
            cpu += time.thread_time_ns() - c0
        res[kind].append(cpu / len(rr) / 1000)
for kind in kinds:
    print(f"batch {B} {kind}: us/record {sorted(res[kind])} median {sorted(res[kind])[1]:.1f}")
