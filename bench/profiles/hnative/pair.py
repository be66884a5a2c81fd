# Scratch measurement tool of bench/profiles/hnative.md (issue 15); not shipped, not a test.
"""The same tree twice, compiled (`native`) and pure (`pure`: AGENTTRACE_NATIVE=0), tracing the same
storm at once (STORM=exec_storm|connect_storm|refused_storm): paired tracer CPU per operation
(schedstat, all threads), rounds with the start order swapped. A copy of ../htcp/pair.py whose
two sides differ only by AGENTTRACE_NATIVE."""
import os, sys, subprocess, time, signal, select, threading, statistics
names = sys.argv[1].split(","); n = int(sys.argv[2]); rounds = int(sys.argv[3])
STORM = os.environ.get("STORM", "connect_storm")
mode = os.environ.get("MODE", "monitor")
HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("BENCH_BIN", os.path.join(HERE, "..", "..", "out", "bin"))
def cpu_ns(pid):
    tot = 0; flt = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            tot += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
            flt += int(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[7])
        except OSError: pass
    return tot, flt
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
def start(name, root):
    env = dict(os.environ)
    env["AGENTTRACE_NATIVE"] = "0" if name == "pure" else "1"
    env["AGENTTRACE_REQUIRE_NATIVE"] = "1" if name == "native" else "0"
    # BEFORE_EXE=PATH adds a third side, `before`: another build's agenttrace (the session's start)
    exe = os.environ["BEFORE_EXE"] if name == "before" else os.path.join(os.path.dirname(sys.executable), "agenttrace")
    if name == "before":
        env.pop("AGENTTRACE_REQUIRE_NATIVE")
    p = subprocess.Popen([exe, "run", "--cgroup", root, "--mode", mode], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    buf = b""; t0 = time.time()
    while b'"phase":"started"' not in buf and time.time() - t0 < 60:
        r, _, _ = select.select([p.stdout], [], [], 1)
        if r: buf += os.read(p.stdout.fileno(), 65536)
    def drain():
        while os.read(p.stdout.fileno(), 1 << 16): pass
    threading.Thread(target=drain, daemon=True).start()
    return p
res = {x: [] for x in names}; flts = {x: [] for x in names}; rs = {x: [] for x in names}
for r in range(rounds):
    root = "/sys/fs/cgroup/unified/htcp%d_%d" % (os.getpid(), r)
    os.mkdir(root); agent = root + "/agent"; os.mkdir(agent)
    order = names if r % 2 == 0 else names[::-1]
    ps = {}
    try:
        for nm in order: ps[nm] = start(nm, root[len("/sys/fs/cgroup/unified"):])
        time.sleep(0.5)
        a = {nm: cpu_ns(p.pid) for nm, p in ps.items()}; r0 = {nm: rss(p.pid) for nm, p in ps.items()}
        def pre():
            with open(agent + "/cgroup.procs", "w") as f: f.write(str(os.getpid()))
        subprocess.run([f"{BIN}/{STORM}", str(n)], preexec_fn=pre, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        b = {nm: cpu_ns(p.pid) for nm, p in ps.items()}; r1 = {nm: rss(p.pid) for nm, p in ps.items()}
        line = []
        for nm in names:
            v = (b[nm][0] - a[nm][0]) / n / 1000; res[nm].append(v)
            flts[nm].append((b[nm][1] - a[nm][1]) / n); rs[nm].append(r1[nm] - r0[nm])
            line.append(f"{nm}={v:.1f}us flt={flts[nm][-1]:.2f} rss+={rs[nm][-1]}kB")
        print(f"round {r} load={os.getloadavg()[0]:.1f}: " + "  ".join(line), flush=True)
    finally:
        for p in ps.values(): p.send_signal(signal.SIGINT)
        for p in ps.values():
            try: p.wait(20)
            except subprocess.TimeoutExpired: p.kill(); p.wait()
        for c in (agent, root):
            for _ in range(50):
                try: os.rmdir(c); break
                except OSError: time.sleep(0.1)
base = names[0]
for nm in names:
    ratios = [x / y for x, y in zip(res[nm], res[base])]
    print(f"MEDIAN {nm}: {statistics.median(res[nm]):.1f} us/conn  ratio to {base} {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]  flt {statistics.median(flts[nm]):.2f}  rss+ {statistics.median(rs[nm])} kB")
