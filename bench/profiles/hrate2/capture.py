# Scratch measurement tool of bench/profiles/hrate2.md (issue 15); not shipped, not a test.
"""One tracer (`agenttrace run --cgroup`, monitor) traces one storm; its JSON lines are kept in
OUT, and with PERF=1 the tracer is recorded by `perf record -g` during the storm.
    capture.py STORM N OUT"""
import os, sys, subprocess, time, signal, select, threading
storm, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BIN = os.environ.get("BENCH_BIN", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "out", "bin"))
root = "/sys/fs/cgroup/unified/hr2cap%d" % os.getpid()
os.mkdir(root); agent = root + "/agent"; os.mkdir(agent)
fo = open(out, "wb")
p = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "agenttrace"), "run", "--cgroup", root[len("/sys/fs/cgroup/unified"):], "--mode", "monitor"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
buf = b""; t0 = time.time()
while b'"phase":"started"' not in buf and time.time() - t0 < 60:
    r, _, _ = select.select([p.stdout], [], [], 1)
    if r: buf += os.read(p.stdout.fileno(), 65536)
fo.write(buf)
def drain():
    while True:
        b = os.read(p.stdout.fileno(), 1 << 16)
        if not b: break
        fo.write(b)
th = threading.Thread(target=drain); th.start()
perf = None
try:
    time.sleep(0.5)
    if os.environ.get("PERF"):
        perf = subprocess.Popen(["perf", "record", "-g", "-F", "2000", "-o", out + ".perf", "-p", str(p.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    if os.environ.get("PYSPY"):
        perf = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(p.pid), "--rate", "500", "--native", "--format", "raw", "--threads", "--output", out + ".pyspy"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    def pre():
        with open(agent + "/cgroup.procs", "w") as f: f.write(str(os.getpid()))
    subprocess.run([f"{BIN}/{storm}", str(n)], preexec_fn=pre, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
finally:
    if perf:
        perf.send_signal(signal.SIGINT); perf.wait(30)
    p.send_signal(signal.SIGINT)
    try: p.wait(20)
    except subprocess.TimeoutExpired: p.kill(); p.wait()
    th.join(10); fo.close()
    for c in (agent, root):
        for _ in range(50):
            try: os.rmdir(c); break
            except OSError: time.sleep(0.1)
