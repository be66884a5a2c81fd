"""Confidence intervals for the benchmark's ratios, and what they let a goal say.

A ratio is median(sessions under a tracer) / median(sessions with no tracer), one figure per
session (the median of its repetitions), one session of each configuration per round. Its
interval is a percentile bootstrap over rounds: a resample draws rounds with replacement and
takes both configurations' sessions of each drawn round, so the ratio is re-estimated as
median(tracer's drawn sessions) / median(no tracer's drawn sessions).

Why paired per round, not each configuration resampled on its own: the machine drifts between
rounds, for every configuration alike. In the two small runs of 2026-12-02 (5 rounds x 7
configurations, 11 workload cells; bench/order_effects.py) the rounds' sessions were on average
-6.3% to +6.1% and -8.5% to +6.3% off their configuration's median, and the variance of
log(tracer / none) within rounds was 0.67 and 0.71 of the sum of the two configurations' own
variances: pairing removes the drift from the interval instead of counting it as noise. A round
where one side has no session (an error) is left out of that ratio's interval.

The bootstrap distribution is computed exactly (every multiset of rounds, weighted by how many
ordered resamples give it) up to EXACT_MAX rounds, and from a fixed-seed sample beyond: the same
figures always give the same bounds, so a report can be regenerated and tests can assert exact
bounds. With 5 rounds a 95% interval is close to the range of the per-round ratios: that is all
five rounds can tell."""
from __future__ import annotations

import itertools
import math
import random
import statistics
from fractions import Fraction
from functools import lru_cache

LEVEL = Fraction(95, 100)
MIN_ROUNDS = 3          # fewer and the interval is a point or two: it would claim a precision it lacks
EXACT_MAX = 8             # C(15, 8) = 6,435 multisets of 8 rounds: tens of ms per cell
SAMPLES = 4000            # resamples past EXACT_MAX
SEED = 15                 # issue 15; any fixed seed makes the bounds reproducible
METHOD = (f"percentile bootstrap over rounds (a round's tracer and no-tracer sessions drawn together), "
          f"exact up to {EXACT_MAX} rounds, {SAMPLES} fixed-seed resamples beyond; at least "
          f"{MIN_ROUNDS} rounds with both sessions")


def _median_sorted(v: list):
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


@lru_cache(maxsize=1024)
def ratio_distribution(pairs: tuple) -> tuple:
    """((ratio, weight), ...) sorted by ratio: the bootstrap distribution of
    median(a) / median(b) over resamples of the (a, b) pairs; weights are integers (ordered
    resamples giving that ratio: they sum to n**n when exact, to SAMPLES otherwise)."""
    n = len(pairs)
    if n == 0:
        raise ValueError("no pairs")
    dist: dict = {}
    if n <= EXACT_MAX:
        fact = [math.factorial(k) for k in range(n + 1)]
        for pick in itertools.combinations_with_replacement(range(n), n):
            r = (_median_sorted(sorted(pairs[i][0] for i in pick))
                 / _median_sorted(sorted(pairs[i][1] for i in pick)))
            w = fact[n]
            for _, grp in itertools.groupby(pick):
                w //= fact[sum(1 for _ in grp)]
            dist[r] = dist.get(r, 0) + w
    else:
        rng = random.Random(SEED)
        for _ in range(SAMPLES):
            pick = [rng.randrange(n) for _ in range(n)]
            r = statistics.median(pairs[i][0] for i in pick) / statistics.median(pairs[i][1] for i in pick)
            dist[r] = dist.get(r, 0) + 1
    return tuple(sorted(dist.items()))


def _quantiles(dist: tuple, total: int, level: Fraction) -> tuple:
    """Lower and upper percentile of a weighted discrete distribution: the smallest value whose
    cumulative weight reaches (1 - level) / 2, resp. (1 + level) / 2, of the total (exact)."""
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    lo = hi = None
    cum = 0
    for value, w in dist:
        cum += w
        if lo is None and cum >= lo_q * total:
            lo = value
        if cum >= hi_q * total:
            hi = value
            break
    return lo, dist[-1][0] if hi is None else hi


def ratio_ci(num: dict, den: dict, level: Fraction = LEVEL) -> tuple | None:
    """The `level` interval of median(num) / median(den), both {round: figure}, paired by round;
    None with fewer than MIN_ROUNDS rounds that have both figures, or a non-positive one."""
    pairs = tuple((num[k], den[k]) for k in sorted(set(num) & set(den))
                  if num[k] is not None and den[k] is not None)
    if len(pairs) < MIN_ROUNDS or min(b for _, b in pairs) <= 0:
        return None
    dist = ratio_distribution(pairs)
    return _quantiles(dist, sum(w for _, w in dist), level)


def median_ci(values: list, level: Fraction = LEVEL) -> tuple | None:
    """The `level` interval of the median of `values` (one paired ratio per cycle, as the
    untraced phase has), by the same exact / fixed-seed bootstrap; None with fewer than
    MIN_ROUNDS values or a non-positive one."""
    if len(values) < MIN_ROUNDS or min(values) <= 0:
        return None
    dist = ratio_distribution(tuple((v, 1) for v in values))
    return _quantiles(dist, sum(w for _, w in dist), level)


def by_round(cell: dict, field: str) -> dict:
    """{round: figure} of a summary cell (session_rounds and one of its session_* lists)."""
    return dict(zip(cell.get("session_rounds") or [], cell.get(field) or []))


def fmt_ci(ci, digits: int = 2) -> str:
    """`[1.05–1.19]`, or '' when there is no interval. Rounded outwards, so that a point
    estimate at a bound (0.937x at 0.9370) is never printed outside it ([0.94–1.00])."""
    if not ci:
        return ""
    k = 10 ** digits
    lo, hi = math.floor(round(ci[0] * k, 6)) / k, math.ceil(round(ci[1] * k, 6)) / k
    return f"[{lo:.{digits}f}–{hi:.{digits}f}]"


def judge_bound(figures: dict, bound: float, level: Fraction = LEVEL) -> tuple:
    """What the intervals say about 'every figure <= bound'. figures: {name: (point, ci or None)}.

    Returns (ci_verdict, sentence): "missed" when some interval lies wholly above the bound,
    "met" when every interval lies at or below it, "undecided" otherwise, None when no figure
    has an interval. The verdict on the point estimate is not changed by this: a goal the point
    misses is never called met here either, only "undecided" at best."""
    pct = f"{float(level) * 100:g}%"
    with_ci = {k: v for k, v in figures.items() if v[1]}
    if not figures:
        return None, ""
    if not with_ci:
        return None, f"no {pct} interval (fewer than {MIN_ROUNDS} rounds with both sessions)"
    above = {k: v for k, v in with_ci.items() if v[1][0] > bound}
    straddle = {k: v for k, v in with_ci.items() if v[1][0] <= bound < v[1][1]}
    point_ok = all(p <= bound for p, _ in figures.values())
    missing = [k for k in figures if k not in with_ci]

    def cis(group: dict) -> str:
        if len(group) == 1:
            (k, v), = group.items()
            return f"{k} {pct} CI {v[1][0]:.3f}–{v[1][1]:.3f}"
        return f"{pct} CIs of " + ", ".join(f"{k} {v[1][0]:.3f}–{v[1][1]:.3f}" for k, v in group.items())

    def includes(group: dict) -> str:
        return (f"{cis(group)} {'includes' if len(group) == 1 else 'include'} {bound:g}: "
                "not distinguishable from the goal at this noise")
    if above:
        verdict = "missed"
        text = f"{cis(above)} above {bound:g}: missed beyond this run's noise"
        if straddle:
            text += "; " + includes(straddle)
    elif straddle:
        verdict = "undecided"
        text = includes(straddle) + ("" if point_ok else " (missed on the point estimate only)")
    else:
        verdict = "met" if point_ok and not missing else "undecided"
        text = (f"every {pct} CI at or below {bound:g}: met beyond this run's noise" if point_ok else
                f"every {pct} CI at or below {bound:g} but a point estimate above it")
    if missing:
        text += f"; no interval for {', '.join(missing)}"
    return verdict, text
