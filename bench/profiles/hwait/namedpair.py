# Scratch measurement tool of bench/profiles/hwait-batching.md (issue 15); not shipped, not a test.
"""hexec/pair.py's paired run with a storm of *named* execs (`sh -c :`, a name the reverse-shell
rule is gated on: every exec rings the doorbell): tracer CPU per exec, reads and rings.
usage: namedpair.py BUILD,BUILD... N ROUNDS   (BUILD as in hexec/pair.py: before, base, bwoMS)"""
import json, os, select, signal, statistics, subprocess, sys, threading, time
names = sys.argv[1].split(","); n = int(sys.argv[2]); rounds = int(sys.argv[3])
HERE = os.path.dirname(os.path.abspath(__file__))
AB = os.path.join(HERE, "..", "hexec", "ab.py")
CG = "/sys/fs/cgroup/unified"
def cpu_ns(pid):
    tot = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try: tot += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
        except OSError: pass
    return tot
def start(name, rel):
    env = dict(os.environ); nm = name
    if nm.startswith("before"):
        env["HXROOT"] = os.environ["HXBEFORE"]; nm = nm[6:].lstrip(":")
    env["HXP"] = "" if nm in ("base", "") else nm
    p = subprocess.Popen([sys.executable, AB, "run", "--cgroup", rel, "--mode", "enforce"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env)
    buf = [b""]; t0 = time.time()
    while b'"phase":"started"' not in buf[0] and time.time() - t0 < 60:
        r, _, _ = select.select([p.stdout], [], [], 1)
        if r: buf[0] += os.read(p.stdout.fileno(), 65536)
    def drain():
        while True:
            c = os.read(p.stdout.fileno(), 1 << 16)
            if not c: break
            buf[0] = (buf[0] + c)[-200000:]
    th = threading.Thread(target=drain, daemon=True); th.start()
    return p, buf, th
res = {x: [] for x in names}; st = {x: [] for x in names}
for r in range(rounds):
    root = f"{CG}/hwn{os.getpid()}_{r}"; agent = root + "/agent"
    os.mkdir(root); os.mkdir(agent)
    order = names if r % 2 == 0 else names[::-1]
    ps = {}
    try:
        for nm in order: ps[nm] = start(nm, root[len(CG):])
        time.sleep(0.5)
        a = {nm: cpu_ns(p[0].pid) for nm, p in ps.items()}
        def pre():
            with open(agent + "/cgroup.procs", "w") as f: f.write("0")
        subprocess.run(["/bin/sh", "-c", f"i=0; while [ $i -lt {n} ]; do /bin/sh -c :; i=$((i+1)); done"], preexec_fn=pre)
        time.sleep(1.0)
        b = {nm: cpu_ns(p[0].pid) for nm, p in ps.items()}
        for nm in names: res[nm].append((b[nm] - a[nm]) / n / 1000)
    finally:
        for p, _, _ in ps.values(): p.send_signal(signal.SIGINT)
        for nm, (p, buf, th) in ps.items():
            try: p.wait(20)
            except subprocess.TimeoutExpired: p.kill(); p.wait()
            th.join(5)
            for line in buf[0].split(b"\n"):
                if b'"phase":"stopped"' in line:
                    s = json.loads(line)["stages"]
                    st[nm].append({k: s.get(k) for k in ("read", "read_batches", "read_doorbell", "doorbell_rung")})
        for c in (agent, root):
            for _ in range(50):
                try: os.rmdir(c); break
                except OSError: time.sleep(0.1)
    print(f"round {r} load={os.getloadavg()[0]:.1f}: " + "  ".join(f"{nm}={res[nm][-1]:.1f}us {st[nm][-1] if st[nm] else ''}" for nm in names), flush=True)
base = names[0]
for nm in names:
    ratios = [x / y for x, y in zip(res[nm], res[base])]
    print(f"MEDIAN {nm}: {statistics.median(res[nm]):.1f} us/exec  ratio to {base} {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
