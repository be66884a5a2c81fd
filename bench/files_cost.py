"""What the `files` probe feature costs: `sudo .venv/bin/python -m bench.files_cost`.

One run alternates, round by round (order rotated each round), three configurations:
  none            no tracer
  agenttrace      `agenttrace run --cgroup <tmp> --no-rules` (default features)
  agenttrace+files  the same with --files (syscall tracepoints on open/openat/... + sys_exit_openat)
and times three loops with CLOCK_MONOTONIC around the loop only (ns per iteration):
  getppid-outside   getppid() in a process outside agent cgroups (syscall slow-path cost)
  openat-outside    openat()+close() of a temp file, outside agent cgroups
  openat-inside     the same inside the watched agent cgroup (scope check + path classification;
                    the file is not an ssh file, so no event is sent)
Ratios are per round against `none` of the same round; the medians and the spread (min-max)
are printed and written to bench/out/files_cost.json. Quick (< 2 min) and noisy on a shared
machine: read the spread, not only the median.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
SRC = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static long long ns(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(int argc, char **argv) {
    /* mode n [cgroup.procs] [file] */
    const char *mode = argv[1]; long n = atol(argv[2]);
    if (argc > 3 && argv[3][0]) { FILE *f = fopen(argv[3], "w"); if (!f || fprintf(f, "0") < 0 || fclose(f)) { perror("join"); return 2; } }
    const char *path = argc > 4 ? argv[4] : "/dev/null";
    long long t0 = ns(CLOCK_MONOTONIC), c0 = ns(CLOCK_PROCESS_CPUTIME_ID);
    if (!strcmp(mode, "getppid")) { for (long i = 0; i < n; i++) syscall(SYS_getppid); }
    else { for (long i = 0; i < n; i++) { int fd = openat(AT_FDCWD, path, O_RDONLY); if (fd < 0) return 3; close(fd); } }
    long long t1 = ns(CLOCK_MONOTONIC), c1 = ns(CLOCK_PROCESS_CPUTIME_ID);
    printf("{\"ns_per_op\": %.2f, \"cpu_ns_per_op\": %.2f}\n", (double)(t1 - t0) / n, (double)(c1 - c0) / n);
    return 0;
}
"""
WORKLOADS = {  # name -> (mode, iterations, inside agent cgroup)
    "getppid-outside": ("getppid", 2_000_000, False),
    "openat-outside": ("openat", 400_000, False),
    "openat-inside": ("openat", 400_000, True),
}
CONFIGS = ("none", "agenttrace", "agenttrace+files")


def _agenttrace() -> str:
    exe = Path(sys.executable).parent / "agenttrace"
    return str(exe) if exe.exists() else (shutil.which("agenttrace") or "agenttrace")


def _cgroup_root() -> Path:
    from agenttrace.enrich.cgroups import cgroup2_mount
    return cgroup2_mount()


class Tracer:
    """`agenttrace run --cgroup WATCHED --no-rules` plus `extra` (the feature under test),
    started and waited for; bench.packet_cost uses it too."""

    def __init__(self, extra: list, watched: Path, workdir: Path):
        self.out = workdir / f"events-{uuid.uuid4().hex[:6]}.jsonl"
        argv = [_agenttrace(), "run", "--cgroup", str(watched), "--no-rules", "--gpu", "off",
                "--output", str(self.out)] + list(extra)
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.out.exists() and b'"started"' in self.out.read_bytes()[:4096]:
                return
            if self.p.poll() is not None:
                raise RuntimeError(f"agenttrace exited: {self.p.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("agenttrace did not start within 60 s")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        try:
            self.out.unlink()
        except OSError:
            pass


def run_rounds(name: str, src: str, workloads: dict, configs: tuple, flag: str, out_json: Path,
               argv=None, extra=lambda work: []) -> int:
    """The syscall-cost bench both files_cost and packet_cost are: `configs` (no tracer, plain
    agenttrace, agenttrace with `flag`) alternated over rounds, each round running every
    workload of the generator built from `src` (args: mode, iterations, the agent cgroup's procs
    file or "", then `extra(work)`), and the report against no tracer and against plain
    agenttrace."""
    ap = argparse.ArgumentParser(description=f"{name}: slowdown of {flag} against agenttrace without it")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every loop's iterations")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print(f"{name}: needs root", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"agenttrace-{name.replace('_', '')}-"))
    gen = work / "gen"
    subprocess.run(["gcc", "-O2", "-o", str(gen), "-x", "c", "-"], input=src.encode(), check=True)
    tail = extra(work)
    watched = _cgroup_root() / f"agenttrace-bench-{flag.lstrip('-')}-{uuid.uuid4().hex[:6]}"
    agent = watched / "a1"
    agent.mkdir(parents=True)
    res: dict = {c: {w: [] for w in workloads} for c in configs}
    try:
        for rnd in range(args.rounds):
            order = configs[rnd % 3:] + configs[:rnd % 3]
            for cfg in order:
                tr = None if cfg == "none" else Tracer([flag] if cfg == configs[2] else [], watched, work)
                try:
                    for w, (mode, n, inside) in workloads.items():
                        r = subprocess.run([str(gen), mode, str(int(n * args.scale)),
                                            str(agent / "cgroup.procs") if inside else "", *tail],
                                           capture_output=True, text=True, check=True)
                        res[cfg][w].append(json.loads(r.stdout)["ns_per_op"])
                finally:
                    if tr is not None:
                        tr.stop()
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        remove_tree(agent, watched, work)
    hook = configs[2].split("+", 1)[1]
    report(res, configs, workloads, configs[2], f"{hook}_vs_agenttrace", out_json,
           {"rounds": args.rounds, "scale": args.scale})
    return 0


def _plain_file(work: Path) -> list:
    target = work / "plain.txt"
    target.write_text("x")
    return [str(target)]


def main(argv=None) -> int:
    return run_rounds("files_cost", SRC, WORKLOADS, CONFIGS, "--files", OUT / "files_cost.json", argv, _plain_file)


def remove_tree(agent: Path, watched: Path, work: Path) -> None:
    """The bench's agent cgroup, its parent and scratch folder (a cgroup empties a moment after
    its last process exits, so rmdir is retried)."""
    for _ in range(100):
        try:
            agent.rmdir()
            watched.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.05)
    shutil.rmtree(work, ignore_errors=True)


def report(res: dict, configs, workloads, hook_cfg: str, hook_key: str, out: Path, meta: dict) -> dict:
    """Print and write each configuration's slowdown against no tracer and, for `hook_cfg`, the
    hook alone (against plain agenttrace of the same round): median (min-max) over rounds."""
    summary = {**meta, "ns_per_op": res, "ratios": {}}
    label = hook_key.replace("_", " ")
    print(f"{'workload':<18} {'none ns/op':>11} " + " ".join(f"{c:>28}" for c in configs[1:])
          + f" {label:>28}")
    for w in workloads:
        base = res["none"][w]
        cells = []
        for c in configs[1:]:
            ratios = [v / b for v, b in zip(res[c][w], base)]
            summary["ratios"].setdefault(w, {})[c] = {"median": statistics.median(ratios),
                                                       "min": min(ratios), "max": max(ratios)}
            cells.append(f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        hook = [f / a for f, a in zip(res[hook_cfg][w], res["agenttrace"][w])]
        summary["ratios"][w][hook_key] = {"median": statistics.median(hook), "min": min(hook), "max": max(hook)}
        cells.append(f"{statistics.median(hook):.3f}x ({min(hook):.2f}-{max(hook):.2f})")
        print(f"{w:<18} {statistics.median(base):>11.1f} " + " ".join(f"{c:>28}" for c in cells))
    out.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
