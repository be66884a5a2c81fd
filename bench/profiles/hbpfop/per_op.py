"""BPF run time per operation of a storm, program by program, and the storm's own CPU untraced
(issue #15: which of the storms' slowdown the probes' kernel time explains).

One `agenttrace run --cgroup C --mode enforce` as shipped (every default probe); BPF run-time
accounting on (BPF_ENABLE_STATS, bench/sysinfo.py: two clock reads per program run, so these are
upper bounds); the storm run once in the agent cgroup C; per program: runs per operation, ns per
run, ns per operation. Then the same storm with no tracer, for the CPU an operation costs.

    .venv/bin/python bench/profiles/hbpfop/per_op.py [--cgroup at-bpfop] [refused_storm:20000 ...]
    (root; load generators from scripts/setup.sh --bench in bench/out/bin)
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
from bench import loadgen, sysinfo  # noqa: E402

CG_ROOT = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
EXE = os.path.join(ROOT, ".venv", "bin", "agenttrace")
BIN = os.path.join(ROOT, "bench", "out", "bin")


def storm(cg: str, gen: str, n: int):
    """The generator inside cgroup `cg` (bench.loadgen.run: it joins the cgroup itself)."""
    return loadgen.run(Path(BIN) / gen, [n], Path(cg))


def traced(cgname: str, gens) -> dict:
    cg = os.path.join(CG_ROOT, cgname)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.jsonl")
        p = subprocess.Popen([EXE, "run", "--cgroup", cgname, "--mode", "enforce", "--output", out],
                             stderr=subprocess.DEVNULL)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                if os.path.exists(out) and '"started"' in open(out).read():
                    break
                time.sleep(0.05)
            else:
                raise SystemExit("agenttrace printed no started record in 60 s")
            time.sleep(1.0)
            fd = sysinfo.enable_bpf_stats()
            res = {}
            try:
                for gen, n in gens:
                    a = sysinfo.bpf_prog_stats([p.pid])
                    storm(cg, gen, n)
                    b = sysinfo.bpf_prog_stats([p.pid])
                    res[gen] = (n, sysinfo.bpf_stats_delta(a, b))
            finally:
                os.close(fd)
            return res
        finally:
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroup", default="at-bpfop")
    ap.add_argument("storms", nargs="*", default=["refused_storm:20000", "connect_storm:10000", "exec_storm:4000"])
    a = ap.parse_args()
    gens = [(s.split(":")[0], int(s.split(":")[1])) for s in a.storms]
    cg = os.path.join(CG_ROOT, a.cgroup)
    os.makedirs(cg, exist_ok=True)
    try:
        res = traced(a.cgroup, gens)
        for gen, n in gens:
            base = storm(cg, gen, n)
            per_op_ns = base.cpu_ns / n
            n_, progs = res[gen]
            total = sum(v["run_time_ns"] for v in progs.values()) / n
            print(f"\n{gen} ({n} operations): untraced {per_op_ns / 1000:.1f} us CPU per operation; "
                  f"BPF {total:.0f} ns per operation ({100 * total / per_op_ns:.1f}% of it)")
            print("| program | runs/op | ns/run | ns/op |\n| --- | --- | --- | --- |")
            for name, v in sorted(progs.items(), key=lambda kv: -kv[1]["run_time_ns"]):
                if v["run_time_ns"] / n >= 1:
                    print(f"| {name} | {v['run_cnt'] / n:.2f} | {v['run_time_ns'] / v['run_cnt']:.0f} "
                          f"| {v['run_time_ns'] / n:.0f} |")
    finally:
        os.rmdir(cg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
