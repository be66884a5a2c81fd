"""What a record costs the tracer when it is read late: a storm read behind against the same storm
read as it comes.

`sudo .venv/bin/python -m bench.backlog [--pairs 5] [--n 9000] [--before PATH] [--out DIR]` starts
`agenttrace run --mode enforce` (the build the bench measures, as `python -m bench` starts it) on
a temporary agent cgroup and runs a loopback connect storm of N inside it, two ways, alternated
pair by pair:

- `live`: the tracer reads while the storm runs (the rounds' connect_storm);
- `behind`: the tracer is stopped (SIGSTOP) while the storm runs, and continued once the
  generator has exited and been reaped: every record is read after its process has gone, as
  when the reader falls behind a storm on a busy node and the ring holds what it has not read.

and prints the tracer's CPU per record each way and their ratio per pair (median, 95% interval).
A record read late should cost what it costs read live: a reader that gets slower per record when
it is behind never catches up. Until aff7ced it did: each record of a process found nowhere (the
generator enters the cgroup after its exec, so no exec record names it) paid a kernel map
look-up and a failed /proc open, ~2x a live record's cost. With `--before PATH` (another build's
`agenttrace`) the same pairs run for that build too, the builds alternated.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import interval, loadgen, sysinfo, tracers

HERE = Path(__file__).resolve().parent


def one(tracer, cg, gens: dict, n: int, behind: bool) -> dict:
    """One storm under a started tracer; its CPU per record read."""
    m0, c0 = tracer.mark(), tracer.cpu_ns()
    pgid = os.getpgid(tracer.proc.pid)      # the tracer runs in a session of its own
    if behind:
        os.killpg(pgid, signal.SIGSTOP)
    try:
        res = loadgen.run(gens["connect_storm"], [n], cg.path)
    finally:
        if behind:
            os.killpg(pgid, signal.SIGCONT)
    tracer.drain(m0, 2 * n)     # a connect and its listener's accept per connection
    m1, c1 = tracer.mark(), tracer.cpu_ns()
    tracer.alive_check()
    records = tracer.window(m0, m1)["events"]
    return {"behind": behind, "n": res.n, "records": records, "tracer_cpu_ns": c1 - c0,
            "us_per_record": round((c1 - c0) / max(records, 1) / 1000, 3)}


def measure(builds: list, pairs: int, n: int, work: Path, log=print, cg=None, gens=None) -> dict:
    """`pairs` pairs of (live, behind) per build; `python -m bench` passes its agent cgroup and
    generators, alone this makes its own."""
    gens = gens or loadgen.build(work / "bin")
    own = cg is None
    cg = cg or sysinfo.AgentCgroup(tag="backlog").create()
    out: dict = {"n": n, "pairs": pairs, "builds": {b: {"runs": []} for b in builds}}
    try:
        for b in builds:
            why = tracers.Agenttrace("enforce", build=b).unavailable()
            if why:
                out["builds"][b] = {"error": why}
        loadgen.run(gens["connect_storm"], [n], cg.path)      # untimed: first use of the generator
        for i in range(pairs):
            for b in (builds if i % 2 == 0 else list(reversed(builds))):
                if "error" in out["builds"][b]:
                    continue
                # a session per build and pair: two tracers on one cgroup would each read (and
                # the stopped one fall behind on) the other's storm
                t = tracers.Agenttrace("enforce", build=b)
                t.start(cg, work, gens)
                try:
                    for behind in ((False, True) if i % 2 == 0 else (True, False)):
                        r = one(t, cg, gens, n, behind)
                        r["pair"] = i
                        out["builds"][b]["runs"].append(r)
                        log(f"pair {i + 1}/{pairs} {b} {'behind' if behind else 'live'}: "
                            f"{r['us_per_record']} us per record, {r['records']} records")
                finally:
                    st = t.stop()
                out["builds"][b].setdefault("drops", []).append(st.get("drops"))
    finally:
        if own:
            cg.remove()
    for b, d in out["builds"].items():
        runs = d.get("runs") or []
        per = {x: {r["pair"]: r["us_per_record"] for r in runs if r["behind"] == x} for x in (False, True)}
        if per[False] and per[True]:
            d["live_us_per_record"] = statistics.median(per[False].values())
            d["behind_us_per_record"] = statistics.median(per[True].values())
            ratios = [per[True][k] / per[False][k] for k in sorted(set(per[True]) & set(per[False]))]
            d["ratio_per_pair"] = [round(x, 3) for x in ratios]
            d["ratio"] = round(statistics.median(ratios), 3)
            d["ratio_ci"] = interval.median_ci(ratios)
    return out


def render(res: dict, level: str = "#") -> str:
    if not res or "builds" not in res:
        return f"{level} Backlog: CPU per record read behind vs live\n\n{(res or {}).get('status', 'not measured')}\n"
    L = [f"{level} Backlog: CPU per record read behind vs live (connect storm of {res['n']}, {res['pairs']} pairs)", "",
         "| build | live us/record | behind us/record | behind / live per pair | 95% interval | records behind |",
         "| --- | --- | --- | --- | --- | --- |"]
    for b, d in res["builds"].items():
        if "ratio" not in d:
            L.append(f"| {b} | - | - | {d.get('error') or 'not measured'} | | |")
            continue
        behind = [r["records"] for r in d["runs"] if r["behind"]]
        L.append(f"| {b} | {d['live_us_per_record']:.2f} | {d['behind_us_per_record']:.2f} | {d['ratio']:.2f}x "
                 f"({', '.join(f'{x:.2f}' for x in d['ratio_per_pair'])}) | {interval.fmt_ci(d['ratio_ci'])} "
                 f"| {min(behind)}-{max(behind)} |")
    L += ["", "behind: the tracer stopped (SIGSTOP) while the storm ran and continued after the generator "
              "was reaped, so every record is read after its process has gone; live: read as it comes. "
              "Tracer CPU (schedstat of its process tree) from before the storm to the last record."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--n", type=int, default=9000, help="connects per storm (default 9000, the rounds' small size)")
    ap.add_argument("--before", default=None, help="another build's agenttrace executable, measured alike")
    ap.add_argument("--out", default=str(HERE / "out"), help="writes backlog.json and backlog.md there")
    opts = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.backlog: needs root (probes, cgroups)", file=sys.stderr)
        return 2
    builds = ["after"]
    if opts.before:
        tracers.BEFORE["exe"] = opts.before
        builds.append("before")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agenttrace-backlog-") as tmp:
        t0 = time.monotonic()
        res = measure(builds, opts.pairs, opts.n, Path(tmp))
        res["duration_s"] = round(time.monotonic() - t0, 1)
    (out / "backlog.json").write_text(json.dumps(res, indent=1, default=str))
    text = render(res)
    (out / "backlog.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
