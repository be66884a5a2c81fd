"""The benchmark's round order (bench/schedule.py): positions and neighbours both balanced."""
from __future__ import annotations

from collections import Counter

import pytest

from bench import schedule


@pytest.mark.parametrize("n", range(1, 9))
def test_williams_rows_balance_positions_and_predecessors(n):
    rows = schedule.williams(n)
    assert len(rows) == (n if n % 2 == 0 else 2 * n)
    for row in rows:
        assert sorted(row) == list(range(n))
    # every configuration at every position equally often
    for pos in range(n):
        assert Counter(row[pos] for row in rows) == Counter({c: len(rows) // n for c in range(n)})
    # every ordered pair adjacent equally often: once (even n) or twice (odd n)
    pairs = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    want = 1 if n % 2 == 0 else 2
    assert pairs == Counter({(a, b): want for a in range(n) for b in range(n) if a != b})


def test_round_order_varies_the_predecessor_unlike_a_rotation():
    configs = ["none", "agenttrace-monitor", "agenttrace-enforce", "bpftrace", "bpftrace-syscalls", "auditd",
               "agenttrace-before-enforce"]
    orders = [schedule.round_order(configs, r) for r in range(5)]
    assert orders[0] == ["none", "agenttrace-monitor", "agenttrace-before-enforce", "agenttrace-enforce",
                         "auditd", "bpftrace", "bpftrace-syscalls"]
    before = {o[o.index("agenttrace-before-enforce") - 1] for o in orders if o[0] != "agenttrace-before-enforce"}
    assert len(before) >= 3
    assert schedule.round_order(configs, 14) == orders[0]
    with pytest.raises(ValueError):
        schedule.williams(0)
