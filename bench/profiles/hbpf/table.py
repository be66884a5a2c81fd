# Scratch: per-program table from progcost.py JSON lines (bench/profiles/hbpf.md).
import json, math, statistics, sys
recs = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.startswith("{")]
by = {}
for r in recs:
    k = (r["storm"], "outside" if r["outside"] else "inside")
    for build, progs in r["progs"].items():
        by.setdefault(k, {}).setdefault(build, []).append((r["n"], progs))
for k in sorted(by):
    print(f"\n### {k[0]} ({k[1]} agents)\n")
    builds = sorted(by[k])
    names = sorted({p for b in builds for _, ps in by[k][b] for p in ps})
    print("| program | " + " | ".join(f"{b} runs/op | {b} ns/run | {b} ns/op" for b in builds) + " |")
    print("| --- |" + " --- |" * (3 * len(builds)))
    tot = {b: [] for b in builds}
    for b in builds:
        for n, ps in by[k][b]:
            tot[b].append(sum(v[1] for v in ps.values()) / n)
    for p in sorted(names, key=lambda p: -sum(ps.get(p, [0, 0])[1] for _, ps in by[k][builds[0]])):
        row = []
        for b in builds:
            c = sum(ps.get(p, [0, 0])[0] for _, ps in by[k][b]); t = sum(ps.get(p, [0, 0])[1] for _, ps in by[k][b])
            n = sum(n for n, _ in by[k][b])
            row += [f"{c/n:.2f}", f"{t/c:.0f}" if c else "-", f"{t/n:.0f}"]
        print(f"| {p} | " + " | ".join(row) + " |")
    print("| total (median of rounds [min-max]) | " + " | ".join(
        f" | | {statistics.median(tot[b]):.0f} [{min(tot[b]):.0f}-{max(tot[b]):.0f}]" for b in builds) + " |")
    if len(builds) == 2:
        a, b = "main", "hbpf"
        rat = [y / x for x, y in zip(tot[a], tot[b])]
        # the set of programs attached first runs first and pays the cold misses (~1.6x the
        # second's): rounds alternate the order, so a round and the next, swapped, cancel it
        g = sorted(math.sqrt(rat[i] * rat[i + 1]) for i in range(0, len(rat) - 1, 2))
        print(f"\npaired {b}/{a} BPF ns per op, order-cancelled (geometric mean of two rounds, start order "
              f"swapped): median {statistics.median(g):.3f} [{g[0]:.3f}-{g[-1]:.3f}] over {len(g)} pairs; "
              f"per round {', '.join(f'{x:.3f}' for x in rat)}")
