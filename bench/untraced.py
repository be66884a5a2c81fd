"""The untraced-syscall phase (`--only untraced`): what a tracer costs a process outside every
agent cgroup, resolved finely enough to judge a 1.01x bound on a noisy 2-vCPU VM.

Why a phase of its own. The rounds time one 270 ms getppid loop per session and divide medians
over 5 sessions; on this VM identical no-tracer sessions spread 32-41%, so the interval of a
ratio spans 0.77-1.48. Three things make that spread (bench/profiles/hbench-untraced.md):
neighbours taking the CPU (wall time only; CPU time is immune), the cost of the syscall path
itself, which changes between levels about 40% apart for milliseconds to seconds at a time (130
vs 180 ns per getppid, while a userspace multiply loop timed in between does not move: the host,
not frequency or the guest's own load), and the process: each new process pays its own cost,
~12% apart from the next one's. The design:

- **Blocks of many short chunks.** syscall_blocks (loadgen) runs K chunks of N syscalls, each
  timed with the thread's CPU clock (ns), in one long-lived process per placement (`serve`) for
  the whole phase, off and on blocks alike: a fresh process per block moved the figure by ~12%
  (sd of the log ratio of neighbouring blocks) where blocks of one process moved 1-7%. A
  block's figure is the minimum over its chunks (`floor`): the cost of the syscall path itself, which a per-syscall tax (audit,
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
- **The stop edge.** A tracer's start takes 0.1-4 s, its stop 0.05-0.5 s, and the host's
  levels move within seconds, so block neighbours a start apart still differ by ~10% (sd of the
  log ratio in the A/A). While each tracer is stopped, the apart generator (getppid and write
  chunks alternated) runs across the stop: the chunks of the 0.15 s before the stop
  began (loaded, idle) over those of 0.15 s from just after it returned (nothing loaded). This
  is the pair the goal is judged on: the closest "on" and really-"off" that can be had.
- **Placement.** The tracer's process tree is pinned to one CPU; every block runs its loops
  `apart` (workload on the other CPU) and `together` (the tracer's CPU), both reported.
- **Frozen vs running.** Inside each agenttrace block, `freeze_pairs` pairs of short blocks
  with its userspace running and stopped (SIGSTOP, programs still attached), a few ms apart:
  what its own wakeups cost (reader timer, heartbeat, GPU sampler), at a spacing where both
  sides of a pair see the same host level. Not a substitute for "off" (the programs stay), the
  part of the tax that timing alone can resolve finely here.
- **Statistics.** Per configuration, workload, placement and figure: the median of the cycles'
  neighbour ratios with a 95% percentile-bootstrap interval over cycles (bench/interval.py
  median_ci, exact up to 8 cycles). Nothing is dropped: every block's figures are in the result.
- **BPF run-time stats.** With them available and wanted (`--no-bpf-stats` turns them off) the
  phase turns them on for its whole length itself, for the blocks' BPF runs per syscall; the
  rounds before it run without them.

The goal (bench/goals.py) is judged on the stop edge's CPU `floor` ratios, the worst of
agenttrace's modes and workloads (on the blocks' floor ratios for a phase without edges); the
blocks, `median` figures, wall-time floors and running/frozen pairs are reported beside."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from . import interval, loadgen, schedule, sysinfo, tracers

WORKLOADS = {"getppid": "syscall(SYS_getppid) outside agent cgroups",
             "write": "64-byte write(2) to /dev/null outside agent cgroups"}
FIGURES = ("floor", "median")
# chunk: syscalls timed together; chunks: per block, per workload and placement; cycles: blocks per configuration (each with its own
# start and stop). The host's slow/fast levels last a second or more, longer than a tracer's
# start and stop, so neighbouring blocks fall on independent levels: more cycles, not longer
# blocks, narrow the interval (a block of 100 chunks is ~35 ms per loop; a cycle of the 6 default
# configurations ~19 s on the 2-vCPU VM, mostly starts: agenttrace 2-3 s, bpftrace-syscalls 4 s)
# the stop edge (Phase.edge): the generator runs EDGE_LEAD_S before the on window, windows of
# EDGE_WINDOW_S either side of the stop, the off one from EDGE_MARGIN_S after the tracer exited
# (its programs are released when its last fd closes at exit)
EDGE_LEAD_S, EDGE_WINDOW_S, EDGE_MARGIN_S = 0.3, 0.15, 0.02
# freeze_pairs: running / frozen pairs per agenttrace block, of freeze_chunks chunks each side
SIZES = {"tiny": {"chunk": 1_000, "chunks": 20, "cycles": 3, "freeze_pairs": 2, "freeze_chunks": 10},
         "small": {"chunk": 2_000, "chunks": 100, "cycles": 8, "freeze_pairs": 6, "freeze_chunks": 25},
         "full": {"chunk": 2_000, "chunks": 200, "cycles": 20, "freeze_pairs": 10, "freeze_chunks": 25}}
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


def block_figures(rec: dict) -> dict:
    """floor / median of a block's chunks (one result line of the generator), ns per syscall,
    CPU and wall."""
    n = rec["chunk_n"]
    cpu = [c / n for c in rec["chunk_cpu_ns"]]
    wall = [w / n for w in rec["chunk_wall_ns"]]
    return {"cpu": {"floor": min(cpu), "median": statistics.median(cpu)},
            "wall": {"floor": min(wall), "median": statistics.median(wall)},
            "chunks": len(cpu), "chunk_n": n, "errors": rec["errors"]}


class Server:
    """One `syscall_blocks serve` process pinned to a CPU for the whole phase: every block of a
    placement runs in the same process, off and on alike (see the generator's header for why)."""

    def __init__(self, exe: Path, chunk: int, cpu: int):
        self.proc = subprocess.Popen([str(exe), "serve", str(chunk)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                                     preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise loadgen.LoadgenError(f"syscall_blocks serve: exit {self.proc.returncode}: "
                                       f"{self.proc.stderr.read().strip()}")
        return json.loads(line)

    def run(self, mode: str, chunks: int) -> dict:
        self.proc.stdin.write(f"{mode} {chunks}\n")
        return self._read()

    def follow(self, mode: str = "mix") -> None:
        self.proc.stdin.write(f"{mode} 200000 follow\n")

    def end_follow(self) -> dict:
        self.proc.stdin.write("end\n")
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the generator ends at its stdin's EOF
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our child, by pid
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


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


def edge_figures(rec: dict, t_a: int, t_b: int) -> dict:
    """Per workload, the floor and median of the chunks wholly inside [t_a - W, t_a) ("on") and
    [t_b + margin, t_b + margin + W) ("off"), ns per syscall (CPU and wall); the mix generator's
    even chunks are getppid, odd ones write."""
    n = rec["chunk_n"]
    w_ns, m_ns = int(EDGE_WINDOW_S * 1e9), int(EDGE_MARGIN_S * 1e9)
    sides = {"on": (t_a - w_ns, t_a), "off": (t_b + m_ns, t_b + m_ns + w_ns)}
    out: dict = {"stop_ms": round((t_b - t_a) / 1e6, 1)}
    for i, (at, c, w) in enumerate(zip(rec["chunk_at_ns"], rec["chunk_cpu_ns"], rec["chunk_wall_ns"])):
        wl = "write" if i % 2 else "getppid"
        for side, (lo, hi) in sides.items():
            if lo <= at and at + w <= hi:
                d = out.setdefault(wl, {}).setdefault(side, {"cpu": [], "wall": []})
                d["cpu"].append(c / n)
                d["wall"].append(w / n)
    for wl in WORKLOADS:
        for side in ("on", "off"):
            d = out.get(wl, {}).get(side)
            if not d:
                continue
            out[wl][side] = {clock: {"floor": min(v), "median": statistics.median(v)} for clock, v in d.items()}
            out[wl][side]["chunks"] = len(d["cpu"])
    return out


def edge_summary(blocks: list) -> dict:
    """{config: {workload: {clock: {figure: {ratio, ci, ratios, n}}}}}: on / off of every stop edge,
    median over cycles, interval over cycles."""
    acc: dict = {}
    for b in blocks:
        e = b.get("edge")
        if b["config"] is None or not e:
            continue
        for wl in WORKLOADS:
            on, off = (e.get(wl) or {}).get("on"), (e.get(wl) or {}).get("off")
            if not on or not off:
                continue
            for clock in ("cpu", "wall"):
                for f in FIGURES:
                    acc.setdefault(b["config"], {}).setdefault(wl, {}).setdefault(clock, {}).setdefault(f, []).append(
                        on[clock][f] / off[clock][f])
    for c, ws in acc.items():
        for wl, clocks in ws.items():
            for clock, fs in clocks.items():
                for f, v in fs.items():
                    ci = interval.median_ci(v)
                    fs[f] = {"ratio": round(statistics.median(v), 4), "ci": [round(ci[0], 4), round(ci[1], 4)] if ci else None,
                             "ratios": [round(x, 4) for x in v], "n": len(v)}
    return acc


def _wait_stopped(pids: list, timeout: float = 1.0) -> None:
    """Until every thread of `pids` is in the stopped state (SIGSTOP is asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for pid in pids:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
                            busy = True
            except (FileNotFoundError, ProcessLookupError):
                continue
        if not busy:
            return
        time.sleep(0.001)


def freeze_summary(blocks: list, place: dict) -> dict:
    """{config: {workload: {placement: {figure: {ratio, ci, n}}}}}: running / frozen of every
    pair, median over all pairs of all cycles, interval by the bootstrap over pairs."""
    out: dict = {}
    for b in blocks:
        for pair in b.get("freeze") or []:
            for w in WORKLOADS:
                for pl in place:
                    for f in FIGURES:
                        try:
                            r = pair["running"][w][pl]["cpu"][f] / pair["frozen"][w][pl]["cpu"][f]
                        except (KeyError, ZeroDivisionError):
                            continue
                        out.setdefault(b["config"], {}).setdefault(w, {}).setdefault(pl, {}).setdefault(f, []).append(r)
    for c, ws in out.items():
        for w, pls in ws.items():
            for pl, fs in pls.items():
                for f, v in fs.items():
                    ci = interval.median_ci(v)
                    fs[f] = {"ratio": round(statistics.median(v), 4), "n": len(v),
                             "ci": [round(ci[0], 4), round(ci[1], 4)] if ci else None}
    return out


class Phase:
    def __init__(self, cg: sysinfo.AgentCgroup, work: Path, gens: dict, size: str, log, bpf_stats: bool = False):
        self.cg, self.work, self.gens, self.log = cg, work, gens, log
        self.bpf_stats = bpf_stats
        self.size = SIZES[size]
        self.tracer_cpu, self.apart_cpu = cpus()
        self.place = placements(self.tracer_cpu, self.apart_cpu)
        self.gaps: list = []  # (start_s, stop_s) of every tracer block

    def block(self, chunks: int | None = None) -> dict:
        figs: dict = {}
        for w in WORKLOADS:
            for pl in self.place:
                figs.setdefault(w, {})[pl] = block_figures(self.servers[pl].run(w, chunks or self.size["chunks"]))
        return figs

    def on_block(self, config: str, cycle: int) -> dict:
        b = {"config": config, "cycle": cycle, "t": time.monotonic()}
        if config == "none":
            # the A/A check waits as long as a tracer's start and stop take, so its neighbours
            # are as far apart in time as a tracer's are: the host's levels drift in that gap
            gap_in, gap_out = self._gaps()
            time.sleep(gap_in)
            b["figures"] = self.block()
            b["edge"] = self.edge(lambda: time.sleep(gap_out))
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
            pids = tracer.pids()
            p0 = sysinfo.bpf_prog_stats(pids) if self.bpf_stats else {}
            b["figures"] = self.block()
            if self.bpf_stats:
                # the tracer's programs that ran meanwhile: a syscall-path program would run once
                # per syscall; process starts and exits elsewhere on the machine account for the rest
                b["bpf"] = sysinfo.bpf_stats_delta(p0, sysinfo.bpf_prog_stats(pids))
            b["tracer_cpu_ns"] = tracer.cpu_ns() - c0
            if tracer.family == "agenttrace" and self.size["freeze_pairs"]:
                b["freeze"] = self.freeze_pairs(tracer, cycle)
            tracer.alive_check()
            b["edge"] = self.edge(tracer.stop)
            b["stop_s"] = round(b["edge"]["stop_ms"] / 1000, 3)  # the stop alone, not the edge's windows
            started = False  # stopped inside the edge
        except (tracers.TracerError, loadgen.LoadgenError, OSError) as e:
            b["error"] = str(e)
            self.log(f"untraced phase: {config} cycle {cycle}: {e}")
        finally:
            if started or (tracer.proc is not None and tracer.proc.poll() is None) or getattr(tracer, "rule_added", False):
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

    def freeze_pairs(self, tracer, cycle: int) -> list:
        """Short blocks with the tracer's userspace running and frozen (SIGSTOP, its programs
        still attached), alternated a few ms apart: what its own wakeups (reader timer,
        heartbeat, GPU sampler) cost an untraced process, at a spacing where the host's levels
        are shared by both sides of a pair. Always continued again, also on an error."""
        pids = tracer.pids()
        out = []
        try:
            for i in range(self.size["freeze_pairs"]):
                pair = {}
                for state in (("running", "frozen") if (i + cycle) % 2 == 0 else ("frozen", "running")):
                    sig = signal.SIGSTOP if state == "frozen" else signal.SIGCONT
                    for pid in pids:
                        try:
                            os.kill(pid, sig)  # the tracer's own processes, by pid
                        except ProcessLookupError:
                            pass
                    if state == "frozen":
                        _wait_stopped(pids)
                    pair[state] = self.block(self.size["freeze_chunks"])
                out.append(pair)
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        return out

    def edge(self, stop) -> dict:
        """The stop edge: one `mix` generator (getppid and write chunks alternated) runs on the
        apart CPU while `stop()` stops the tracer; the chunks of the EDGE_WINDOW_S before the
        stop began (tracer loaded and idle) against those of the same length from EDGE_MARGIN_S
        after it returned (nothing loaded). The teardown itself falls between the two windows."""
        srv = self.servers["apart" if "apart" in self.servers else "together"]
        srv.follow("mix")
        try:
            time.sleep(EDGE_LEAD_S + EDGE_WINDOW_S)
            t_a = time.monotonic_ns()
            stop()
            t_b = time.monotonic_ns()
            time.sleep(EDGE_MARGIN_S + EDGE_WINDOW_S + 0.02)
        finally:
            rec = srv.end_follow()
        return edge_figures(rec, t_a, t_b)

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
        orders = []
        self.servers = {}
        try:
            for pl, cpu in self.place.items():
                self.servers[pl] = Server(self.gens["syscall_blocks"], self.size["chunk"], cpu)
            self.block(self.size["chunks"])  # untimed: the servers' first use (pages, caches)
            seq = [self.off_block(0)]
            for cyc in range(cycles):
                order = schedule.round_order(configs, cyc)
                orders.append(order)
                self.log(f"untraced phase: cycle {cyc + 1}/{cycles}: {', '.join(order)}")
                for c in order:
                    seq.append(self.on_block(c, cyc))
                    seq.append(self.off_block(cyc))
        finally:
            for srv in self.servers.values():
                srv.close()
        for b in seq:
            b["t"] = round(b["t"] - t0, 3)
        out = summarize(seq, configs, self.place)
        out["freeze"] = freeze_summary(seq, self.place)
        out["edge"] = edge_summary(seq)
        out["edge_design"] = (f"one getppid/write generator on CPU {self.place.get('apart', self.tracer_cpu)} across "
                              f"each tracer's stop: chunks of the {EDGE_WINDOW_S:g} s before the stop began (loaded, "
                              f"idle) / chunks of {EDGE_WINDOW_S:g} s from {EDGE_MARGIN_S:g} s after it returned "
                              "(nothing loaded); none sleeps the tracers' median stop time instead")
        out["bpf"] = bpf_per_syscall(seq, self.place, self.size)
        out.update({
            "design": DESIGN.format(tracer_cpu=self.tracer_cpu, apart_cpu=self.apart_cpu, **self.size),
            "judged_on": "stop edge, cpu floor ratio (min-of-chunks CPU time per syscall, the 0.15 s before "
                         "the tracer's stop / the 0.15 s after it)",
            "workloads": WORKLOADS, "placements": self.place, "configs": configs, "orders": orders,
            "sizes": self.size, "interval": INTERVAL,
            "duration_s": round(time.monotonic() - t0, 1), "blocks": seq})
        return out


def measure(configs: list, cg, work, gens, size: str, log, bpf_stats: bool = False) -> dict:
    """The phase; with `bpf_stats` BPF run-time stats are on for its whole length (the rounds run
    without them): its per-syscall BPF figures need them, and every block, off and on alike, then
    runs under the same stats as before the rounds turned them off."""
    with sysinfo.bpf_stats_on(bpf_stats) as on:
        return Phase(cg, work, gens, size, log, on).run(configs)


def bpf_per_syscall(blocks: list, place: dict, sizes: dict) -> dict:
    """{config: {runs_per_syscall, ns_per_syscall, programs}} over the on blocks that carry
    BPF statistics: every program run of the tracer while its blocks ran, per syscall made."""
    per_block = sizes["chunk"] * sizes["chunks"] * len(WORKLOADS) * len(place)
    out: dict = {}
    for b in blocks:
        if b["config"] is None or "bpf" not in b:
            continue
        o = out.setdefault(b["config"], {"blocks": 0, "runs": 0, "run_time_ns": 0, "programs": {}})
        o["blocks"] += 1
        for name, p in b["bpf"].items():
            o["runs"] += p["run_cnt"]
            o["run_time_ns"] += p["run_time_ns"]
            o["programs"][name] = o["programs"].get(name, 0) + p["run_cnt"]
    for o in out.values():
        n = per_block * o["blocks"]
        o["syscalls"] = n
        o["runs_per_syscall"] = o["runs"] / n
        o["ns_per_syscall"] = round(o["run_time_ns"] / n, 4)
    return out


def _cell_text(c: dict) -> str:
    if not c or c.get("ratio") is None:
        return "-"
    return f"{c['ratio']:.3f}x" + (f" {interval.fmt_ci(c['ci'])}" if c.get("ci") else "")


def markdown(phase: dict) -> list:
    """The report's section for the phase: design, then one table per figure."""
    if not phase or not phase.get("cells"):
        return ([f"## Untraced syscalls, alternated", "", phase.get("status", "not measured"), ""]
                if phase and phase.get("status") else [])
    place = list(phase.get("placements") or {})
    cols = [(w, pl) for w in WORKLOADS for pl in place]
    L = ["## Untraced syscalls, alternated (the 1.01x goal)", "",
         f"Design: {phase['design']}. Interval: {phase.get('interval', '')}. "
         f"{phase.get('duration_s', 0)} s. The goal is judged on the stop edge's floor when the phase has it, "
         "else on the first table; `none` is the A/A check (nothing started, the same gaps): its intervals are "
         "the method's resolution on this machine.", ""]
    edge = phase.get("edge") or {}
    if edge:
        L += [f"**Stop edge** ({phase.get('edge_design', '')}): CPU time per syscall, on / off, median over cycles "
              "[95% interval]; the goal is judged on the floor", "",
              "| configuration | " + " | ".join(f"{w} {f}" for w in WORKLOADS for f in FIGURES) + " |",
              "| --- |" + " --- |" * (len(WORKLOADS) * len(FIGURES))]
        for c in phase.get("configs") or edge:
            if c in edge:
                L.append(f"| {c} | " + " | ".join(_cell_text((edge[c].get(w, {}).get("cpu") or {}).get(f))
                                               for w in WORKLOADS for f in FIGURES) + " |")
        L.append("")
    for title, clock, fig in (("CPU time per syscall, floor (min over a block's chunks)", "cpu", "floor"),
                              ("CPU time per syscall, median over a block's chunks", "cpu", "median"),
                              ("Wall time per syscall, floor", "wall", "floor")):
        L += [f"**{title}**, on block / neighbouring off blocks, median over cycles [95% interval]", "",
              "| configuration | " + " | ".join(f"{w} {pl}" for w, pl in cols) + " |",
              "| --- |" + " --- |" * len(cols)]
        for c in phase.get("configs") or phase["cells"]:
            cells = phase["cells"].get(c) or {}
            L.append(f"| {c} | " + " | ".join(_cell_text((cells.get(w, {}).get(pl, {}).get(clock) or {}).get(fig))
                                           for w, pl in cols) + " |")
        L.append("")
    fr = phase.get("freeze") or {}
    if fr:
        L += ["**agenttrace running / frozen** (SIGSTOP, programs attached), CPU time per syscall, median over "
              "all pairs [95% interval]: floor; median of chunks", "",
              "| configuration | " + " | ".join(f"{w} {pl}" for w, pl in cols) + " |",
              "| --- |" + " --- |" * len(cols)]
        for c, ws in fr.items():
            L.append(f"| {c} | " + " | ".join(
                f"{_cell_text((ws.get(w, {}).get(pl) or {}).get('floor'))}; "
                f"{_cell_text((ws.get(w, {}).get(pl) or {}).get('median'))}" for w, pl in cols) + " |")
        n = next((x["n"] for ws in fr.values() for pls in ws.values() for fs in pls.values() for x in fs.values()), 0)
        L += ["", f"{n} pairs per cell.", ""]
    bpf = phase.get("bpf") or {}
    if bpf:
        L.append("BPF programs of the tracer that ran during its blocks, per syscall made: " + "; ".join(
            f"{c} {o['runs_per_syscall']:.2g} runs, {o['ns_per_syscall']:g} ns"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(o['programs'].items()))})" if o["programs"] else "")
            for c, o in bpf.items()) + " (a program on the syscall path would run once per syscall).")
        L.append("")
    off = phase.get("off_blocks") or {}
    if off:
        L.append("Off blocks (no tracer): " + "; ".join(
            f"{w} {pl} floor {o['floor_ns_median']} ns per syscall (spread {100 * o['floor_spread']:.0f}% over "
            f"{o['blocks']} blocks), median {o['median_ns_median']} ns (spread {100 * o['median_spread']:.0f}%)"
            for w, pls in off.items() for pl, o in pls.items()) + ".")
        L.append("")
    return L
