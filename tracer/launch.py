"""The `agenttrace` command's entry point: for `agenttrace run`, start the kernel's verification
of the probes from a look at the command line, before the CLI is even imported (issue 15,
docs/STARTUP.md).

At a warm start the path to `started` is the kernel verifying the probes (skb egress alone is
~300k instructions), and the prefetch that overlaps it with the rules' parsing used to begin
only after typer was imported and had parsed the options: 0.25–0.33 s after launch on the
2-core VM. The verifier runs inside bpf(2) without the GIL, so starting it here, ~0.07 s after
launch, takes that Python off the path.

Only a speed-up, never a second source of truth: the options read here are the few the probe
plan depends on (which families, rules, GPU fence, allow-lists, wakeup); anything this look does
not understand starts nothing; and `run` compares this guess with the one it makes from its
own parsed options (probeplan.prefetch), closing this prefetch when they differ. A command that
then fails on its input exits with these maps and unattached programs, which are only file
descriptors of this process: nothing is left behind.
"""
from __future__ import annotations

import sys
from typing import List

# the look at run's argv (its option tables, run_plan_args, _last): runargs.py, shared with
# `agenttrace prepare -- run OPTIONS`; tests/test_launch.py reads them from here
from agenttrace.runargs import RUN_FLAGS, RUN_VALUE_OPTIONS, _last, feature_args, run_plan_args  # noqa: F401


def early_prefetch(argv: List[str]):
    """Start the probe prefetch for `agenttrace run ARGS` (argv without the program name);
    returns it (also kept for probeplan.prefetch to adopt), or None."""
    if len(argv) < 2 or argv[0] != "run":
        return None
    got = run_plan_args(argv[1:])
    if got is None or got["gpu"] not in ("allow", "deny", "off"):
        return None
    from types import SimpleNamespace

    from agenttrace.session import probeplan
    from agenttrace.session.options import SessionOptions, features
    fl = got["flags"]
    opts = SessionOptions(
        features=features(**feature_args(fl)),
        rule_paths=got["rules"] or None, use_rules="--no-rules" not in fl, wakeup_ms=got["wakeup_ms"],
        # what the plan reads of these (probeplan.plan, allow_lists): the GPU fence on or off, an
        # allow-list on or off; the real objects (pydantic models) cost more to import than
        # this look saves
        gpu=None if got["gpu"] == "off" else SimpleNamespace(enabled=True, fence="follow-mode"),
        egress={"run": {"mode": "allow-list"}} if got["allow_egress"] else None)
    return probeplan.start_early(opts)


def main() -> None:
    try:
        early_prefetch(sys.argv[1:])
    except Exception:
        pass          # a speed-up only: `run` starts its own prefetch and meets any error itself
    from agenttrace.cli import main as cli_main
    cli_main()
