# Scratch measurement tool of bench/profiles/hwait-batching.md (issue 15); not shipped, not a test.
"""Record latency and userspace-kill latency of one tracer configuration at a time.

usage: latency.py CONFIG[,CONFIG...] ROUNDS     CONFIG = BUILD:BATCH_WAIT_MS (BUILD: cur | before)
  before: the build in $HXBEFORE (a dir holding it as `agenttrace`), run by this venv.
Per round, every configuration in turn (order rotated), each an `agenttrace run --cgroup X
--mode enforce` with the default pack, stdout read by a thread that stamps each line's arrival:
  slow: `rate exec 100/s` for 3 s: record latency = arrival (wall) - the record's `ts` (kernel
        ktime on the wall clock), over every exec/exit record of /bin/true;
  fast: `rate exec 1000/s` for 3 s, the same;
  udp:  `rate udp 20000/s` for 2 s (issue 7's kind of fast stream), connect records;
  (after a 1-s warm-up stream: the first execs after `started` pay the tracer's cold start)
  kill: under a 200/s exec stream, victims killed from userspace: `bash -c '... /dev/tcp/...'`
        (exec-reverse-shell, gated on a name the kernel knows: rings the doorbell) and a copy of
        ssh renamed /tmp/hwait-upd-PID with -R (tunnel-ssh-forwarding by content identity: no
        doorbell; it waits on a loopback listener that never sends a banner); kill latency = the victim's exit record ts - its exec record ts (both kernel
        clocks)."""
import json, os, shutil, signal, socket, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
from bench.tap import LineTap          # noqa: E402
from agenttrace.timefmt import parse_ns  # noqa: E402

BIN = os.environ.get("BENCH_BIN", "/tmp/hwait-bin")
CG = "/sys/fs/cgroup/unified"
PY = sys.executable
RUNNER = ("import os, sys\nif os.environ.get('HXROOT'): sys.path.insert(0, os.environ['HXROOT'])\n"
          "from agenttrace.launch import main\nsys.argv = ['agenttrace'] + sys.argv[1:]\nmain()\n")
UPD = f"/tmp/hwait-upd-{os.getpid()}"


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def start(build, bw, rel):
    env = dict(os.environ)
    env.pop("HXROOT", None)
    if build == "before":
        env["HXROOT"] = os.environ["HXBEFORE"]
    p = subprocess.Popen([PY, "-c", RUNNER, "run", "--cgroup", rel, "--mode", "enforce", "--batch-wait-ms", str(bw)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    tap = LineTap(p.stdout.fileno())
    t0 = time.time()
    while not any(b'"phase":"started"' in l[2] for l in tap.lines[-5:]) and time.time() - t0 < 90:
        time.sleep(0.1)
    return p, tap


def gen(agent, rate, ms, mode="exec"):
    env = {"PATH": "/usr/bin:/bin", "BENCH_CGROUP": agent}
    return subprocess.Popen([f"{BIN}/rate", mode, str(rate), str(ms)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def enter(agent):
    def pre():
        with open(agent + "/cgroup.procs", "w") as f:
            f.write("0")
    return pre


def records(tap, a, b):
    out = []
    for wall, _, line in tap.lines[a:b]:
        if line.startswith(b"{"):
            try:
                out.append((wall, json.loads(line)))
            except ValueError:
                pass
    return out


def stream_lat(recs):
    return [(w - parse_ns(r["ts"])) / 1e6 for w, r in recs
            if r.get("kind") in ("exec", "exit") and r.get("proc", {}).get("exe") == "/bin/true"]


def one(build, bw, tag):
    root = f"{CG}/hwl{os.getpid()}_{tag}"
    agent = root + "/agent"
    os.mkdir(root)
    os.mkdir(agent)
    p, tap = start(build, bw, root[len(CG):])
    res = {}
    try:
        gen(agent, 100, 1000).wait()   # warm-up: the first execs pay the tracer's cold start
        time.sleep(1.0)
        for name, mode, rate in (("slow", "exec", 100), ("fast", "exec", 1000), ("udp", "udp", 20000)):
            a = len(tap.lines)
            g = gen(agent, rate, 3000 if mode == "exec" else 2000, mode)
            g.wait()
            time.sleep(0.5)
            recs = records(tap, a, len(tap.lines))
            res[name] = stream_lat(recs) if mode == "exec" else [
                (w - parse_ns(r["ts"])) / 1e6 for w, r in recs if r.get("kind") == "connect"]
        # a loopback listener that never answers: the renamed ssh waits for its banner (a
        # ProxyCommand would run `sh`, a name that rings the doorbell)
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)
        port = ls.getsockname()[1]
        a = len(tap.lines)
        g = gen(agent, 200, 8000)
        time.sleep(0.5)
        victims = []
        for i in range(6):
            for kind, argv in (("bell", ["/bin/bash", "-c", "sleep 30 # >/dev/tcp/192.0.2.1/9"]),
                               ("nobell", [UPD, "-N", "-R", "9000:localhost:22", "-p", str(port), "127.0.0.1"])):
                v = subprocess.Popen(argv, preexec_fn=enter(agent), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                victims.append((kind, v))
                time.sleep(0.4)
        for _, v in victims:
            try:
                v.wait(20)
            except subprocess.TimeoutExpired:
                v.kill()
                v.wait()
        g.wait()
        ls.close()
        time.sleep(1.0)
        recs = [r for _, r in records(tap, a, len(tap.lines))]
        ex = {r["proc"]["pid"]: parse_ns(r["ts"]) for r in recs if r.get("kind") == "exec"}
        xt = {r["proc"]["pid"]: parse_ns(r["ts"]) for r in recs if r.get("kind") == "exit"}
        for kind, v in victims:
            k = f"kill_{kind}"
            if v.pid in ex and v.pid in xt and v.returncode == -9:
                res.setdefault(k, []).append((xt[v.pid] - ex[v.pid]) / 1e6)
            else:
                res.setdefault(k + "_missed", []).append(v.returncode)
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        time.sleep(0.3)
        tap.close()
        for wall, _, line in tap.lines[-3:]:
            if b'"phase":"stopped"' in line:
                st = json.loads(line)["stages"]
                res["stages"] = {k: st.get(k) for k in ("read", "read_batches", "read_doorbell", "doorbell_rung", "doorbell_late")}
        for c in (agent, root):
            for _ in range(50):
                try:
                    os.rmdir(c)
                    break
                except OSError:
                    time.sleep(0.1)
    return res


def main():
    cfgs = [tuple(c.split(":")) for c in sys.argv[1].split(",")]
    rounds = int(sys.argv[2])
    shutil.copy("/usr/bin/ssh", UPD)
    allres = {c: {} for c in cfgs}
    try:
        for r in range(rounds):
            order = cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]
            for c in order:
                res = one(c[0], float(c[1]), f"{r}_{c[0]}_{c[1]}")
                for k, v in res.items():
                    if k == "stages":
                        allres[c].setdefault("stages", []).append(v)
                    else:
                        allres[c].setdefault(k, []).extend(v)
                print(f"round {r} {c[0]}:{c[1]} load={os.getloadavg()[0]:.1f} " +
                      " ".join(f"{k}: p50 {pct(v, .5):.1f} p99 {pct(v, .99):.1f} max {max(v):.1f} (n={len(v)})"
                               for k, v in res.items() if k != "stages" and v and not k.endswith("missed")) +
                      f" missed={ {k: v for k, v in res.items() if k.endswith('missed')} } stages={res.get('stages')}",
                      flush=True)
    finally:
        os.unlink(UPD)
    print("SUMMARY (ms)")
    for c, res in allres.items():
        print(f"{c[0]}:{c[1]}: " + "; ".join(
            f"{k} p50 {pct(v, .5):.1f} p99 {pct(v, .99):.1f} max {max(v):.1f} n={len(v)}"
            for k, v in sorted(res.items()) if k != "stages" and v and not k.endswith("missed")) +
            f"; missed {sum(len(v) for k, v in res.items() if k.endswith('missed'))}; stages {res.get('stages')}")


if __name__ == "__main__":
    main()
