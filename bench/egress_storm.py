"""What an egress allow-list costs a connect storm: `sudo .venv/bin/python -m bench.egress_storm`.

One run, alternating rounds of two configurations of `agenttrace` in enforce mode:
  plain       no allow-list (the connect hooks as shipped)
  allow-list  10,000 name entries and 100,000 learned addresses in the kernel maps; the
              storm's destination is one of the learned addresses
The storm: a process in the agent cgroup, in a network namespace of its own with no route
(so nothing is sent anywhere), does N non-blocking connects to 198.18.0.1:443; each passes
the hook (ENETUNREACH after it) in both configurations. Reported per configuration: the
connect4 program's own run time per call (kernel BPF stats: run_time_ns / run_cnt) and the
storm's wall time per connect, median over rounds, side by side. Writes
bench/out/egress_storm.json.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
TARGET = "198.18.0.1"
CHILD = r"""
import ctypes, errno, json, os, socket, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write("0")
if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.exit("unshare(CLONE_NEWNET) failed")
n, bad = int(sys.argv[2]), 0
t0 = time.perf_counter_ns()
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    e = s.connect_ex((sys.argv[3], 443))
    s.close()
    if e != errno.ENETUNREACH:
        bad += 1
print(json.dumps({"ns_per_connect": (time.perf_counter_ns() - t0) / n, "unexpected": bad}))
"""


class _Null:
    name = "null"
    dropped = 0

    def emit(self, r):
        pass

    def emit_batch(self, rs):
        pass

    def close(self):
        pass


def _prog_stats(fd: int) -> tuple[int, int]:
    cnt = rt = 0
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "run_cnt":
                cnt = int(v)
            elif k == "run_time_ns":
                rt = int(v)
    return cnt, rt


def _fill_learned(tracer, n_learned: int) -> None:
    from agenttrace.match.policy import name_hash
    probes = tracer.probes
    gid = tracer.policy_writer.policy.group_ids["default"]
    t = probes["learned"]
    exp = time.monotonic_ns() + 3600 * 10**9
    key0 = name_hash("n0.bench.test")
    base = int(ipaddress.ip_address(TARGET))
    for i in range(n_learned):
        k = t.Key()
        k.gid = gid
        raw = b"\0" * 10 + b"\xff\xff" + (base + i).to_bytes(4, "big")
        ctypes.memmove(ctypes.addressof(k) + 4, raw, 16)
        v = t.Leaf()
        v.expires_ns[0] = exp
        v.name[0] = key0
        t[k] = v


def one(config: str, n: int, n_names: int, n_learned: int) -> dict:
    from agenttrace.enrich.cgroups import cgroup2_mount
    from agenttrace.match.engine import Engine
    from agenttrace.kernel.egress import run_policy
    from agenttrace.match.rules import load_rules
    from agenttrace.session.pipeline import Options, Tracer
    cg = cgroup2_mount() / f"agenttrace-bench-egress-{uuid.uuid4().hex[:6]}"
    cg.mkdir()
    engine = None
    if config == "allow-list":
        specs = [f"n{i}.bench.test:443" for i in range(n_names)] + ["192.0.2.53:53"]
        engine = Engine(load_rules([], egress=run_policy(specs, "enforce")), mode="enforce")
    tracer = Tracer(Options(cgroups=[cg], mode="enforce", features=("proc", "net")), [_Null()], engine=engine)
    tracer.start()
    try:
        if config == "allow-list":
            t0 = time.monotonic()
            _fill_learned(tracer, n_learned)
            fill_s = time.monotonic() - t0
        fd = next(fn.fd for fn, atype in tracer.probes._cgroup_funcs if atype == 10)
        c0, r0 = _prog_stats(fd)
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(cg), str(n), TARGET], stdout=subprocess.PIPE)
        while p.poll() is None:
            tracer.poll(20)
        out = json.loads(p.stdout.read())
        c1, r1 = _prog_stats(fd)
        res = {"config": config, "connects": n, "unexpected_errno": out["unexpected"],
               "wall_ns_per_connect": round(out["ns_per_connect"], 1),
               "bpf_ns_per_connect": round((r1 - r0) / max(c1 - c0, 1), 1), "bpf_runs": c1 - c0}
        if config == "allow-list":
            res.update(names=n_names, learned=n_learned, fill_s=round(fill_s, 1))
        return res
    finally:
        tracer.stop()
        try:
            cg.rmdir()
        except OSError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--learned", type=int, default=100000)
    a = ap.parse_args(argv)
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats.read_text().strip()
    stats.write_text("1")
    runs = []
    try:
        for r in range(a.rounds):
            order = ["plain", "allow-list"] if r % 2 == 0 else ["allow-list", "plain"]
            for c in order:
                runs.append(one(c, a.connects, a.names, a.learned))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        stats.write_text(old)
    summary = {}
    for c in ("plain", "allow-list"):
        rs = [x for x in runs if x["config"] == c]
        summary[c] = {k: statistics.median(x[k] for x in rs) for k in ("wall_ns_per_connect", "bpf_ns_per_connect")}
    summary["bpf_extra_ns"] = round(summary["allow-list"]["bpf_ns_per_connect"] - summary["plain"]["bpf_ns_per_connect"], 1)
    OUT.mkdir(exist_ok=True)
    (OUT / "egress_storm.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
