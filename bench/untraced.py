"""The untraced-syscall phase (`--only untraced`): what a tracer costs a process outside every
agent cgroup, resolved finely enough to judge a 1.01x bound on a noisy 2-vCPU VM.

Why a phase of its own. The rounds time one 270 ms getppid loop per session and divide medians
over 5 sessions; on this VM identical no-tracer sessions spread 32-41%, so the interval of a
ratio spans 0.77-1.48. Two things make that spread (bench/profiles/hbench-untraced.md):
neighbours taking the CPU (wall time only; CPU time is immune) and the cost of the syscall path
itself, which changes between levels about 40% apart for a second or more at a time (130 vs
180 ns per getppid, while a userspace multiply loop timed in between does not move: host
scheduling of the vCPU, not frequency or the guest's own load). A design that resolves ~1%:

- **Blocks of many short chunks.** syscall_blocks (loadgen) runs K chunks of N syscalls in one
  process, each timed with the thread's CPU clock (ns). A block's figure is the minimum over
  its chunks (`floor`): the cost of the syscall path itself, which a per-syscall tax (audit,
  a syscall tracepoint) raises in every chunk, while an interruption or a slow stretch of the
  host only raises some. The median over the chunks (`median`) is kept beside it: it also
  carries intermittent costs (a tracer's wakeups, cache pollution).
- **Alternation with really-off neighbours.** The sequence is off, C1, off, C2, ..., off: an
  "off" block runs with no tracer loaded at all, a C block with configuration C started
  (attached, settled) just before it and stopped right after. Each C block is divided by the
  geometric mean of the off blocks on either side (`ratio of paired neighbours`), which cancels
  any drift that is linear over the ~3 s between them. The configurations' order changes every
  cycle (Williams, bench/schedule.py). `none` runs as a configuration too (nothing started):
  its ratios are the method's own noise, the A/A check; it sleeps as long as the tracers'
  median start and stop take, so its neighbours are as far apart in time as theirs.
- **Placement.** The tracer's process tree is pinned to one CPU; every block runs its loops
  `apart` (workload on the other CPU) and `together` (the tracer's CPU), both reported.
- **Statistics.** Per configuration, workload, placement and figure: the median of the cycles'
  neighbour ratios with a 95% percentile-bootstrap interval over cycles (bench/interval.py
  median_ci, exact up to 8 cycles). Nothing is dropped: every block's chunks are in the result.

The goal (bench/goals.py) is judged on the `floor` ratios of CPU time, the worst of agenttrace's
modes, workloads and placements; the `median` figures and wall-time floors are reported beside."""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

from . import interval, loadgen, schedule, sysinfo, tracers

WORKLOADS = {"getppid": "syscall(SYS_getppid) outside agent cgroups",
             "write": "64-byte write(2) to /dev/null outside agent cgroups"}
FIGURES = ("floor", "median")
# chunk: syscalls timed together; chunks: per block, per workload and placement; cycles: blocks per configuration (each with its own
# start and stop). The host's slow/fast levels last a second or more, longer than a tracer's
# start and stop, so neighbouring blocks fall on independent levels: more cycles, not longer
# blocks, narrow the interval (a block of 100 chunks is ~30 ms; a cycle of 6 configurations ~10 s)
SIZES = {"tiny": {"chunk": 1_000, "chunks": 20, "cycles": 3},
         "small": {"chunk": 2_000, "chunks": 100, "cycles": 12},
         "full": {"chunk": 2_000, "chunks": 200, "cycles": 20}}
INTERVAL = (f"median of the per-cycle neighbour ratios, percentile bootstrap over cycles (exact up to "
            f"{interval.EXACT_MAX} cycles, {interval.SAMPLES} fixed-seed resamples beyond), "
            f"{float(interval.LEVEL) * 100:g}%, at least {interval.MIN_ROUNDS} cycles")
DESIGN = ("off / on blocks alternated (off = no tracer loaded), each on block a fresh tracer session; "
          "a block = {chunks} chunks of {chunk} syscalls per workload and placement, each chunk timed with "
          "the thread's CPU clock; block figure floor = min over chunks, median = median over chunks; "
          "ratio = on block / geometric mean of the off blocks before and after it; per configuration the "
          "median over {cycles} cycles with a 95% percentile-bootstrap interval over cycles; tracer pinned "
          "to CPU {tracer_cpu}, workload on CPU {apart_cpu} (apart) or {tracer_cpu} (together)")


def cpus() -> tuple:
    """(tracer CPU, the other CPU or None on a single-CPU machine)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], (allowed[-1] if len(allowed) > 1 else None)


def placements(tracer_cpu: int, apart_cpu) -> dict:
    return ({"apart": apart_cpu} if apart_cpu is not None else {}) | {"together": tracer_cpu}


def pin_tree(pids: list, cpu: int) -> int:
    """Pin every thread of the tracer's processes to `cpu` (children it forks later inherit it);
    kernel threads (kauditd) are left alone. Returns the threads pinned."""
    n = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, {cpu})
                n += 1
            except (ProcessLookupError, PermissionError, OSError):
                pass
    return n


def block_figures(res: loadgen.GenResult) -> dict:
    """floor / median of a block's chunks, ns per syscall, CPU and wall."""
    n = res.extra["chunk_n"]
    cpu = [c / n for c in res.extra["chunk_cpu_ns"]]
    wall = [w / n for w in res.extra["chunk_wall_ns"]]
    return {"cpu": {"floor": min(cpu), "median": statistics.median(cpu)},
            "wall": {"floor": min(wall), "median": statistics.median(wall)},
            "chunks": len(cpu), "chunk_n": n, "errors": res.errors}


def neighbour_ratios(sequence: list, clock: str, workload: str, placement: str, figure: str) -> dict:
    """{config: [ratio per cycle]}: every on block over the geometric mean of the off blocks
    right before and after it in `sequence` (a list of blocks {"config", "cycle", "figures"};
    "off" blocks have config None). An on block with a missing or failed neighbour has no ratio."""
    out: dict = {}

    def fig(b):
        try:
            return b["figures"][workload][placement][clock][figure]
        except (KeyError, TypeError):
            return None
    for i, b in enumerate(sequence):
        if b["config"] is None:
            continue
        prev = next((s for s in reversed(sequence[:i]) if s["config"] is None), None)
        nxt = next((s for s in sequence[i + 1:] if s["config"] is None), None)
        on, a, z = fig(b), fig(prev) if prev else None, fig(nxt) if nxt else None
        if on is None or not a or not z:
            continue
        out.setdefault(b["config"], []).append(on / math.sqrt(a * z))
    return out


def summarize(sequence: list, configs: list, place: dict) -> dict:
    """{config: {workload: {placement: {clock: {figure: {ratio, ci, ratios, n}}}}}}, plus the
    off blocks' own spread (max - min over median, CPU floor)."""
    cells: dict = {}
    for w in WORKLOADS:
        for pl in place:
            for clock in ("cpu", "wall"):
                for f in FIGURES:
                    rs = neighbour_ratios(sequence, clock, w, pl, f)
                    for c in configs:
                        v = rs.get(c, [])
                        ci = interval.median_ci(v)
                        cells.setdefault(c, {}).setdefault(w, {}).setdefault(pl, {}).setdefault(clock, {})[f] = {
                            "ratio": round(statistics.median(v), 4) if v else None,
                            "ci": [round(ci[0], 4), round(ci[1], 4)] if ci else None,
                            "ratios": [round(x, 4) for x in v], "n": len(v)}
    off: dict = {}
    for w in WORKLOADS:
        for pl in place:
            v = [b["figures"][w][pl]["cpu"]["floor"] for b in sequence
                 if b["config"] is None and b.get("figures", {}).get(w, {}).get(pl)]
            med = [b["figures"][w][pl]["cpu"]["median"] for b in sequence
                   if b["config"] is None and b.get("figures", {}).get(w, {}).get(pl)]
            if v:
                off.setdefault(w, {})[pl] = {
                    "blocks": len(v), "floor_ns_median": round(statistics.median(v), 2),
                    "floor_spread": round((max(v) - min(v)) / statistics.median(v), 4),
                    "median_ns_median": round(statistics.median(med), 2),
                    "median_spread": round((max(med) - min(med)) / statistics.median(med), 4)}
    return {"cells": cells, "off_blocks": off}


def worst(summary: dict, configs: list, clock: str = "cpu", figure: str = "floor"):
    """(name, ratio, ci) of the highest ratio among `configs`, over workloads and placements;
    name is '<config> <workload>/<placement>'. None when nothing was measured."""
    best = None
    for c in configs:
        for w, pls in (summary.get("cells", {}).get(c) or {}).items():
            for pl, clocks in pls.items():
                cell = clocks.get(clock, {}).get(figure, {})
                if cell.get("ratio") is not None and (best is None or cell["ratio"] > best[1]):
                    best = (f"{c} {w}/{pl}", cell["ratio"], cell.get("ci"))
    return best


class Phase:
    def __init__(self, cg: sysinfo.AgentCgroup, work: Path, gens: dict, size: str, log):
        self.cg, self.work, self.gens, self.log = cg, work, gens, log
        self.size = SIZES[size]
        self.tracer_cpu, self.apart_cpu = cpus()
        self.place = placements(self.tracer_cpu, self.apart_cpu)
        self.gaps: list = []  # (start_s, stop_s) of every tracer block

    def block(self) -> dict:
        figs: dict = {}
        for w in WORKLOADS:
            for pl, cpu in self.place.items():
                res = loadgen.run(self.gens["syscall_blocks"], [w, self.size["chunk"], self.size["chunks"]],
                                  None, cpu=cpu)
                figs.setdefault(w, {})[pl] = block_figures(res)
        return figs

    def on_block(self, config: str, cycle: int) -> dict:
        b = {"config": config, "cycle": cycle, "t": time.monotonic()}
        if config == "none":
            # the A/A check waits as long as a tracer's start and stop take, so its neighbours
            # are as far apart in time as a tracer's are: the host's levels drift in that gap
            gap_in, gap_out = self._gaps()
            time.sleep(gap_in)
            b["figures"] = self.block()
            time.sleep(gap_out)
            b.update({"start_s": round(gap_in, 3), "stop_s": round(gap_out, 3)})
            return b
        tracer = tracers.make(config)
        started = False
        t0 = time.monotonic()
        try:
            tracer.start(self.cg, self.work, self.gens)
            started = True
            b["start_s"] = round(time.monotonic() - t0, 3)
            b["startup_s"] = tracer.startup_s
            b["pinned_threads"] = pin_tree(tracer.pids(), self.tracer_cpu)
            c0 = tracer.cpu_ns()
            b["figures"] = self.block()
            b["tracer_cpu_ns"] = tracer.cpu_ns() - c0
            tracer.alive_check()
        except (tracers.TracerError, loadgen.LoadgenError, OSError) as e:
            b["error"] = str(e)
            self.log(f"untraced phase: {config} cycle {cycle}: {e}")
        finally:
            if started or tracer.proc is not None or getattr(tracer, "rule_added", False):
                t1 = time.monotonic()
                try:
                    tracer.stop()
                except (tracers.TracerError, OSError) as e:
                    b["error"] = (b.get("error", "") + f"; stop: {e}").lstrip("; ")
                b["stop_s"] = round(time.monotonic() - t1, 3)
        self.gaps.append((b.get("start_s"), b.get("stop_s")))
        if "error" in b:
            b.pop("figures", None)
        return b

    def _gaps(self) -> tuple:
        """Median start and stop durations of the tracer blocks so far (1.0 s and 0.3 s before any)."""
        ins = [a for a, _ in self.gaps if a is not None]
        outs = [z for _, z in self.gaps if z is not None]
        return (statistics.median(ins) if ins else 1.0), (statistics.median(outs) if outs else 0.3)

    def off_block(self, cycle: int) -> dict:
        return {"config": None, "cycle": cycle, "t": time.monotonic(), "figures": self.block()}

    def run(self, configs: list) -> dict:
        cycles = self.size["cycles"]
        t0 = time.monotonic()
        seq = [self.off_block(0)]
        orders = []
        for cyc in range(cycles):
            order = schedule.round_order(configs, cyc)
            orders.append(order)
            self.log(f"untraced phase: cycle {cyc + 1}/{cycles}: {', '.join(order)}")
            for c in order:
                seq.append(self.on_block(c, cyc))
                seq.append(self.off_block(cyc))
        for b in seq:
            b["t"] = round(b["t"] - t0, 3)
        out = summarize(seq, configs, self.place)
        out.update({
            "design": DESIGN.format(tracer_cpu=self.tracer_cpu, apart_cpu=self.apart_cpu, **self.size),
            "judged_on": "cpu floor ratio (min-of-chunks CPU time per syscall, on / neighbouring off blocks)",
            "workloads": WORKLOADS, "placements": self.place, "configs": configs, "orders": orders,
            "sizes": self.size, "interval": INTERVAL,
            "duration_s": round(time.monotonic() - t0, 1), "blocks": seq})
        return out


def measure(configs: list, cg, work, gens, size: str, log) -> dict:
    return Phase(cg, work, gens, size, log).run(configs)
