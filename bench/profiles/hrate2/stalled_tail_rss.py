# Scratch measurement tool of bench/profiles/hrate2.md (issue 15); not shipped, not a test.
"""RSS a socket sink (the daemon's `tail` stream) holds for one client that stopped reading:
10,000 records (its default queue_size) of a captured exec storm, in batches of 64."""
import os, socket, sys, time
import orjson
from agenttrace.sinks.outputs import UnixSocketSink
def rss():
    for l in open(f"/proc/{os.getpid()}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
recs = [orjson.loads(l) for l in open(sys.argv[1], "rb")][3:]
recs = (recs * (10000 // len(recs) + 1))[:10000]
size = sum(len(orjson.dumps(r)) + 1 for r in recs)
path = f"/tmp/hr2-stall-{os.getpid()}.sock"
s = UnixSocketSink(path)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); c.connect(path)
while not s.clients(): time.sleep(0.005)
r0 = rss()
for i in range(0, len(recs), 64):
    s.emit_batch(recs[i:i + 64])
print(f"queued {s.clients()[0]['queued']} lines, {size / 1e6:.1f} MB of JSON; RSS +{(rss() - r0) / 1024:.1f} MB")
c.close(); s.close()
