"""Crafted command lines against the default pack's regex rules: RE2 (what the rules use) next
to Python's backtracking `re` compiling the same pattern.

    .venv/bin/python -m bench.regex_argv [REPEATS]

For each crafted argv (4 KiB, the most the kernel keeps) it times the whole exec match of the
rule as the engine runs it (`Rule.match(record)`) and the bare pattern search with `re`,
median of REPEATS (default 20). No root needed. The point is the shape, not the digits: RE2
stays in microseconds whatever the input, the backtracking engine grows with it.
"""
from __future__ import annotations

import re
import statistics
import sys
import time

from agenttrace.kernel.wire import ARGS_MAX
from agenttrace.match.rules import default_rule_paths, load_rules

# (rule id, argv) — each built to make a backtracking engine retry from every offset
CRAFTED = [
    ("tunnel-socat-relay", ["socat"] + ["tcp:" * 1020]),
    ("tunnel-socat-relay", ["socat"] + ["tcp4-listen:" * 338]),
    ("tunnel-ssh-forwarding", ["ssh"] + ["-" + "N" * 4080]),
    ("mining-stratum-args", ["xx"] + ["stratum+" * 510]),
    ("exec-download-pipe-shell", ["sh", "-c", "curl " * 800]),
]


def _fit(argv: list[str]) -> list[str]:
    # what the kernel hands over: at most ARGS_MAX bytes of NUL-separated argv
    out, used = [], 0
    for a in argv:
        room = ARGS_MAX - used - 1
        if room <= 0:
            break
        out.append(a[:room])
        used += len(out[-1]) + 1
    return out


def _median_us(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main(argv: list[str]) -> int:
    repeats = int(argv[0]) if argv else 20
    rs = load_rules(default_rule_paths())
    print(f"{'rule':28} {'argv bytes':>10} {'RE2 match':>12} {'re search':>12}")
    for rid, args in CRAFTED:
        rule = rs.get(rid)
        args = _fit(args)
        exe = "/usr/bin/" + args[0]
        rec = {"kind": "exec", "proc": {"exe": exe, "comm": args[0], "args": args}}
        line = " ".join(args)
        pats = [re.compile(p) for p in rule.model.match.exe.cmdline_regex]
        t_re2 = _median_us(lambda: rule.match(rec), repeats)
        t_re = _median_us(lambda: [p.search(line) for p in pats], max(3, repeats // 4))
        print(f"{rid:28} {len(line):>10} {t_re2:>9.1f} us {t_re / 1000:>9.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
