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

import sys
from pathlib import Path

from bench.files_cost import run_rounds

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
    return run_rounds("packet_cost", SRC, WORKLOADS, CONFIGS, "--packet", OUT / "packet_cost.json", argv)


if __name__ == "__main__":
    sys.exit(main())
