"""A node's first start, with and without `agenttrace prepare` before it: launch → `started`
of `agenttrace run -- CMD` and of a daemon start (bench/profiles/startup.py's measures), each on
a probe cache of its own that is empty ("cold", as on a fresh node before this change) or was
filled by `agenttrace prepare` (what setup and the package's postinst now do). Alternated per
round; prepare's own time is reported apart (it runs at install, not at start).

    .venv/bin/python bench/profiles/hprepare/first_start.py [--rounds N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import startup  # noqa: E402  (bench/profiles/startup.py)

EXE = str(Path(sys.executable).with_name("agenttrace"))
# the plan of startup.daemon_once's config (sinks and cgroup do not change the probes)
DAEMON_CFG = textwrap.dedent("""
    mode: monitor
    agents:
      - cgroup: /at-prepare-plan
    sinks:
      stdout: false
""")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    res = {k: {"run": [], "daemon": []} for k in ("cold", "prepared")}
    prep_s = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cfg = t / "plan.yaml"
        cfg.write_text(DAEMON_CFG)
        for i in range(a.rounds):
            for kind in (("cold", "prepared") if i % 2 == 0 else ("prepared", "cold")):
                for what, once in (("run", startup.run_once), ("daemon", startup.daemon_once)):
                    cache = t / f"cache-{kind}-{what}-{i}"
                    os.environ["AGENTTRACE_PROBE_CACHE"] = str(cache)
                    if kind == "prepared":
                        t0 = time.monotonic()
                        args = ["--no-run", "--config", str(cfg)] if what == "daemon" else []
                        subprocess.run([EXE, "prepare", *args], check=True, capture_output=True)
                        prep_s.append(time.monotonic() - t0)
                    res[kind][what].append(once(startup.HERE, t))
    os.environ.pop("AGENTTRACE_PROBE_CACHE", None)
    print(f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f}; {a.rounds} rounds, alternated")
    for kind, whats in res.items():
        for what, rs in whats.items():
            s = [r["started_s"] for r in rs if r["started_s"] is not None]
            cpu = [r["cpu_s"] for r in rs]
            print(f"{kind:9} {what:7} launch -> started median {statistics.median(s):.2f} s "
                  f"(min {min(s):.2f}, max {max(s):.2f}; {len(s)}/{len(rs)} started), "
                  f"tracer CPU median {statistics.median(cpu):.2f} s")
    print(f"prepare (at install, not at start): median {statistics.median(prep_s):.2f} s, max {max(prep_s):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
