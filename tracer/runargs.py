"""What `agenttrace run`'s probe plan depends on, read from its command line without the CLI:
the launch-time prefetch (agenttrace/launch.py) and `agenttrace prepare -- run OPTIONS`
(ops/prepare.py) both read argv this way. No imports, so the entry point stays light and
nothing here can import the CLI back."""
from __future__ import annotations

from typing import List, Optional

# `agenttrace run`'s options (tracer/cli/__init__.py run()), by kind. tests/test_launch.py
# holds this against typer's own list of the command's options, so a new one cannot go unseen.
RUN_VALUE_OPTIONS = frozenset({
    "--cgroup", "-c", "--mode", "--format", "--output", "-o", "--internal", "--agent", "--rules", "-r",
    "--gpu", "--allow-egress", "--wakeup-ms", "--batch-wait-ms", "--user", "--netns", "--label", "-l",
    "--drop-caps"})
RUN_FLAGS = frozenset({
    "--no-rules", "--no-net", "--no-flow", "--no-dns", "--no-listen", "--files", "--no-files", "--packet",
    "--no-packet", "--fork-records", "--no-fork-records"})


def run_plan_args(argv: List[str]) -> Optional[dict]:
    """What `run`'s probe plan depends on, from its arguments (after `run`); None where the
    look is unsure (an option it does not know, --help, a malformed value): then the command's
    own parse starts the prefetch as before."""
    got: dict = {"flags": [], "rules": [], "gpu": "allow", "allow_egress": False, "wakeup_ms": 5.0}
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--" or not a.startswith("-") or a == "-":
            break                      # CMD ARGS: not run's options any more
        name, eq, value = a.partition("=") if a.startswith("--") else (a[:2], "", a[2:])
        if not a.startswith("--") and value:
            eq = "="                   # -rFILE, as click reads a short option's value
        if name in RUN_FLAGS and not eq:
            got["flags"].append(name)
            continue
        if name not in RUN_VALUE_OPTIONS:
            return None
        if not eq:
            if i >= len(argv):
                return None
            value = argv[i]
            i += 1
        if name in ("--rules", "-r"):
            got["rules"].append(value)
        elif name == "--gpu":
            got["gpu"] = value
        elif name == "--allow-egress":
            got["allow_egress"] = True
        elif name == "--wakeup-ms":
            try:
                got["wakeup_ms"] = float(value)
            except ValueError:
                return None
    return got


def _last(flags: list, on: str, off: str) -> bool:
    """A --X/--no-X pair as click reads it: the last one given wins."""
    for f in reversed(flags):
        if f in (on, off):
            return f == on
    return False


def feature_args(flags: list) -> dict:
    """session.options.features()'s arguments for run's flags, as run() passes them."""
    return {"no_net": "--no-net" in flags, "no_flow": "--no-flow" in flags, "no_dns": "--no-dns" in flags,
            "no_listen": "--no-listen" in flags, "files": _last(flags, "--files", "--no-files"),
            "packet": _last(flags, "--packet", "--no-packet")}
