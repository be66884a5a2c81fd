# Scratch measurement tool of bench/profiles/hbpf.md (issue 15); not shipped, not a test.
"""BPF run time per storm operation, per program, for one or two builds loaded at once.

Every build named runs `agenttrace run --cgroup ROOT --mode enforce` on the same agent cgroup at
the same time (start order swapped each round), so each storm operation runs every build's
programs: the kernel's run_cnt / run_time_ns (kernel.bpf_stats_enabled) per program id is then a
paired before/after figure that no neighbour's load can skew one way.

    python progcost.py NAME=EXE[,NAME=EXE] STORM N ROUNDS [outside]
"""
import json, os, select, signal, subprocess, sys, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from bench import sysinfo  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pairtool import stop_all  # noqa: E402

builds = [x.split("=", 1) for x in sys.argv[1].split(",")]
storm, n, rounds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
outside = len(sys.argv) > 5 and sys.argv[5] == "outside"
BIN = os.environ.get("BENCH_BIN", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "out", "bin"))
UNI = "/sys/fs/cgroup/unified"


def links(pid):
    """prog_id -> what it is attached to (tracepoint name or attach type), from the link fds."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf_link":
                continue
            kv = dict(l.split(":", 1) for l in open(f"/proc/{pid}/fdinfo/{fd}") if ":" in l)
        except OSError:
            continue
        what = (kv.get("tp_name") or kv.get("attach_type") or kv.get("link_type") or "").strip()
        out[int(kv["prog_id"])] = what
    return out


def start(exe, root):
    p = subprocess.Popen([exe, "run", "--cgroup", root, "--mode", "enforce"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    buf, t0 = b"", time.time()
    while b'"phase":"started"' not in buf and time.time() - t0 < 60:
        r, _, _ = select.select([p.stdout], [], [], 1)
        if r:
            buf += os.read(p.stdout.fileno(), 65536)
    threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(p.stdout.fileno(), 1 << 16), b"")],
                     daemon=True).start()
    return p


STATS = "/proc/sys/kernel/bpf_stats_enabled"
was = open(STATS).read().strip()   # put back as found: another bench may have turned it on
open(STATS, "w").write("1")
res = []
try:
    for r in range(rounds):
        root = f"{UNI}/hbpf{os.getpid()}_{r}"
        os.mkdir(root)
        os.mkdir(root + "/agent")
        order = builds if r % 2 == 0 else builds[::-1]
        ps = {}
        try:
            for name, exe in order:
                ps[name] = start(exe, root[len(UNI):])
            time.sleep(0.5)
            att = {name: links(p.pid) for name, p in ps.items()}
            s0 = {name: sysinfo.bpf_prog_stats([p.pid]) for name, p in ps.items()}

            def pre():
                if not outside:
                    with open(root + "/agent/cgroup.procs", "w") as f:
                        f.write(str(os.getpid()))
            subprocess.run([f"{BIN}/{storm}", str(n)], preexec_fn=pre, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            s1 = {name: sysinfo.bpf_prog_stats([p.pid]) for name, p in ps.items()}
            rec = {"round": r, "storm": storm, "n": n, "outside": outside, "first": order[0][0], "progs": {}}
            for name in ps:
                progs = {}
                for pid_, (pn, c1, t1) in s1[name].items():
                    c0, t0 = s0[name].get(pid_, (pn, 0, 0))[1:]
                    if c1 > c0:
                        key = f"{pn}:{att[name].get(pid_, '?')}"
                        a = progs.setdefault(key, [0, 0])
                        a[0] += c1 - c0
                        a[1] += t1 - t0
                rec["progs"][name] = progs
            print(json.dumps(rec), flush=True)
            res.append(rec)
        finally:
            stop_all(ps.values(), 30)
            os.rmdir(root + "/agent")
            os.rmdir(root)
finally:
    open(STATS, "w").write(was)
