"""What the `packet` probe feature costs: `sudo .venv/bin/python -m bench.packet_cost`.

Like bench/files_cost.py (whose tracer launcher and cgroup helpers it reuses), one run
alternates, round by round with the order rotated, three configurations:
  none              no tracer
  agenttrace        `agenttrace run --cgroup <tmp> --no-rules` (default features)
  agenttrace+packet the same with --packet (syscalls:sys_enter_socket + sys_exit_socket)
and times three loops with CLOCK_MONOTONIC around the loop only (ns per iteration):
  getppid-outside   getppid() outside agent cgroups: the slow syscall path every task pays
                    while any syscalls:* tracepoint is attached
  socket-outside    socket(AF_INET, SOCK_DGRAM)+close outside agent cgroups (the fence lookups
                    at sys_enter, one hash lookup at sys_exit)
  socket-inside     the same inside the watched agent cgroup (an unfenced socket: the same
                    lookups; cgroup/sock_create runs in every configuration but `none`)
Ratios are per round against `none` of the same round, medians and spread (min-max) printed
and written to bench/out/packet_cost.json. Noisy on a shared machine: read the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from bench.files_cost import Tracer, _cgroup_root, remove_tree, report

OUT = Path(__file__).resolve().parent / "out"
SRC = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static long long ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(int argc, char **argv) {
    const char *mode = argv[1]; long n = atol(argv[2]);
    if (argc > 3 && argv[3][0]) { FILE *f = fopen(argv[3], "w"); if (!f || fprintf(f, "0") < 0 || fclose(f)) { perror("join"); return 2; } }
    long long t0 = ns();
    if (!strcmp(mode, "getppid")) { for (long i = 0; i < n; i++) syscall(SYS_getppid); }
    else { for (long i = 0; i < n; i++) { int fd = socket(AF_INET, SOCK_DGRAM, 0); if (fd < 0) return 3; close(fd); } }
    printf("{\"ns_per_op\": %.2f}\n", (double)(ns() - t0) / n);
    return 0;
}
"""
WORKLOADS = {  # name -> (mode, iterations, inside agent cgroup)
    "getppid-outside": ("getppid", 2_000_000, False),
    "socket-outside": ("socket", 200_000, False),
    "socket-inside": ("socket", 200_000, True),
}
CONFIGS = ("none", "agenttrace", "agenttrace+packet")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every loop's iterations")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("packet_cost: needs root", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="agenttrace-packetcost-"))
    gen = work / "gen"
    subprocess.run(["gcc", "-O2", "-o", str(gen), "-x", "c", "-"], input=SRC.encode(), check=True)
    watched = _cgroup_root() / f"agenttrace-bench-packet-{uuid.uuid4().hex[:6]}"
    agent = watched / "a1"
    agent.mkdir(parents=True)
    res: dict = {c: {w: [] for w in WORKLOADS} for c in CONFIGS}
    try:
        for rnd in range(args.rounds):
            order = CONFIGS[rnd % 3:] + CONFIGS[:rnd % 3]
            for cfg in order:
                tr = None if cfg == "none" else Tracer(["--packet"] if cfg.endswith("packet") else [], watched, work)
                try:
                    for w, (mode, n, inside) in WORKLOADS.items():
                        r = subprocess.run([str(gen), mode, str(int(n * args.scale)),
                                            str(agent / "cgroup.procs") if inside else ""],
                                           capture_output=True, text=True, check=True)
                        res[cfg][w].append(json.loads(r.stdout)["ns_per_op"])
                finally:
                    if tr is not None:
                        tr.stop()
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        remove_tree(agent, watched, work)
    report(res, CONFIGS, WORKLOADS, "agenttrace+packet", "packet_vs_agenttrace", OUT / "packet_cost.json",
           {"rounds": args.rounds, "scale": args.scale})
    return 0


if __name__ == "__main__":
    sys.exit(main())
