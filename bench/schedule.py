"""The order of the tracer configurations in each round.

Rotating one fixed list by one each round balances positions (each configuration first, second,
... once per len(list) rounds) but keeps its neighbours: inside every round the same
configuration runs right after the same other one (in the 2026-12-02 baseline,
agenttrace-before-enforce always after auditd, none always after agenttrace-before-enforce), so
whatever a session leaves behind (auditd's queued records, a tracer's freed memory, a warm or
cold page cache) always lands on the same successor. A Williams design keeps the balanced
positions and also varies the predecessor: with an even number of configurations every
configuration follows every other exactly once per len(list) rounds; with an odd number, twice
per 2 * len(list) rounds (the second half runs the first half's orders backwards)."""
from __future__ import annotations


def williams(n: int) -> list:
    """Rows of index orders: n rows for even n, 2n for odd n (n >= 1)."""
    if n < 1:
        raise ValueError("no configurations")
    # 0, 1, n-1, 2, n-2, ...: consecutive differences 1, -2, 3, -4, ... are distinct mod n
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    rows = [[(b + r) % n for b in base] for r in range(n)]
    if n % 2:
        rows += [list(reversed(row)) for row in rows]
    return rows


def round_order(configs: list, rnd: int) -> list:
    """The configurations in the order of round `rnd` (0-based)."""
    rows = williams(len(configs))
    return [configs[i] for i in rows[rnd % len(rows)]]
