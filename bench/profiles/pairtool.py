# Scratch measurement support of bench/profiles/*.md (issue 15); not shipped, not a test.
"""The pairing loop the profiles' pair.py tools share: every side named on the command line
traces the same storm at once (same records, same machine state), tracer CPU per operation from
schedstat over all its threads, rounds with the start order swapped. A tool supplies only how a
side is launched: `main(launch)`, launch(name, cgroup_rel, env) -> Popen with stdout=PIPE.

usage: pair.py NAME[,NAME...] N ROUNDS   (env: STORM, MODE, BENCH_BIN)"""
import os, select, signal, statistics, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
CG = "/sys/fs/cgroup/unified"


def cpu_ns(pid):
    tot = 0; flt = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            tot += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
            flt += int(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[7])
        except OSError:
            pass
    return tot, flt


def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])


def _started(p):
    buf = b""; t0 = time.time()
    while b'"phase":"started"' not in buf and time.time() - t0 < 60:
        r, _, _ = select.select([p.stdout], [], [], 1)
        if r:
            buf += os.read(p.stdout.fileno(), 65536)

    def drain():
        while os.read(p.stdout.fileno(), 1 << 16):
            pass
    threading.Thread(target=drain, daemon=True).start()
    return p


def stop_all(procs, timeout):
    """SIGINT every tracer at once (each writes its `stopped` record), SIGKILL what outlives timeout."""
    procs = list(procs)
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()


def main(launch, storm="exec_storm", unit="op", tag="pair"):
    names = sys.argv[1].split(","); n = int(sys.argv[2]); rounds = int(sys.argv[3])
    storm = os.environ.get("STORM", storm)
    mode = os.environ.get("MODE", "monitor")
    bin_dir = os.environ.get("BENCH_BIN", os.path.join(HERE, "..", "out", "bin"))
    res = {x: [] for x in names}; flts = {x: [] for x in names}; rs = {x: [] for x in names}
    for r in range(rounds):
        root = f"{CG}/{tag}{os.getpid()}_{r}"
        os.mkdir(root); agent = root + "/agent"; os.mkdir(agent)
        order = names if r % 2 == 0 else names[::-1]
        ps = {}
        try:
            for nm in order:
                ps[nm] = _started(launch(nm, root[len(CG):], dict(os.environ, MODE=mode)))
            time.sleep(0.5)
            a = {nm: cpu_ns(p.pid) for nm, p in ps.items()}; r0 = {nm: rss(p.pid) for nm, p in ps.items()}

            def pre():
                with open(agent + "/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            subprocess.run([f"{bin_dir}/{storm}", str(n)], preexec_fn=pre,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            b = {nm: cpu_ns(p.pid) for nm, p in ps.items()}; r1 = {nm: rss(p.pid) for nm, p in ps.items()}
            line = []
            for nm in names:
                v = (b[nm][0] - a[nm][0]) / n / 1000; res[nm].append(v)
                flts[nm].append((b[nm][1] - a[nm][1]) / n); rs[nm].append(r1[nm] - r0[nm])
                line.append(f"{nm}={v:.1f}us flt={flts[nm][-1]:.2f} rss+={rs[nm][-1]}kB")
            print(f"round {r} load={os.getloadavg()[0]:.1f}: " + "  ".join(line), flush=True)
        finally:
            stop_all(ps.values(), 20)
            for c in (agent, root):
                for _ in range(50):
                    try:
                        os.rmdir(c); break
                    except OSError:
                        time.sleep(0.1)
    base = names[0]
    for nm in names:
        ratios = [x / y for x, y in zip(res[nm], res[base])]
        print(f"MEDIAN {nm}: {statistics.median(res[nm]):.1f} us/{unit}  ratio to {base} "
              f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]  "
              f"flt {statistics.median(flts[nm]):.2f}  rss+ {statistics.median(rs[nm])} kB")


def ab_launcher(abpath):
    """A side run by hexec/ab.py: HXP=the side's name (its switched factors; `base` none), and a
    name starting `before` runs the build in the folder HXBEFORE names."""
    def launch(name, root, env):
        if name.startswith("before"):
            env["HXROOT"] = os.environ["HXBEFORE"]
        env["HXP"] = "" if name in ("base", "") else name
        return subprocess.Popen([os.environ.get("PY", sys.executable), abpath, "run", "--cgroup", root,
                                 "--mode", env["MODE"]], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    return launch
