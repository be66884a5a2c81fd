# Scratch measurement tool of bench/profiles/hrate2.md (issue 15); not shipped, not a test.
"""render_lines of main (OLD=path to its render.py) against this tree's, on the records of a
capture (capture.py), in batches of B (the reader's 64 by default), interleaved repetitions,
thread CPU per record; and the bytes checked equal."""
import importlib.util, os, sys, time, statistics
import orjson
from agenttrace.sinks import render as new
from agenttrace.sinks.outputs import _FAST_OPTS, _default
spec = importlib.util.spec_from_file_location("old_render", os.environ.get("OLD", "/tmp/hrate2_render_old.py"))
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
path, B = sys.argv[1], int(os.environ.get("B", "64"))
kinds = set(filter(None, os.environ.get("KINDS", "").split(",")))
import gzip
recs = [orjson.loads(l) for l in (gzip.open if path.endswith(".gz") else open)(path, "rb") if l.strip()]
recs = [r for r in recs if r.get("kind") != "lifecycle" and (not kinds or r.get("kind") in kinds)]
# rebuild the sharing the tracer has (orjson.loads makes every list new): one object per equal
# ancestry list / proc dict, as the process table hands them out
anc, agents, lastp = {}, {}, None
for r in recs:
    if isinstance(r.get("agent"), dict):
        r["agent"] = agents.setdefault(orjson.dumps(r["agent"]), r["agent"])
    p = r.get("proc")
    # enrich/procshare.py: a connect or accept record gets the part of the one before while
    # the process's table entry is unchanged
    if r.get("kind") in ("connect", "listen") and lastp is not None and p == lastp:
        r["proc"] = p = lastp
    lastp = p if r.get("kind") in ("connect", "listen") else None
    if isinstance(p, dict) and p.get("ancestry"):
        k = orjson.dumps(p["ancestry"])
        p["ancestry"] = anc.setdefault(k, p["ancestry"])
if os.environ.get("DEEP"):
    # the bench harness's chain (hexec-live-gap.md: 2,705 bytes per exec live): every ancestry
    # grown to 8 entries with long paths, still one object per distinct list
    grown = {}
    for r in recs:
        p = r.get("proc")
        if isinstance(p, dict) and p.get("ancestry"):
            a = p["ancestry"]
            if id(a) not in grown:
                g = list(a)
                while len(g) < 8:
                    i = len(g)
                    g.insert(1, {"pid": 40000 + i, "comm": "python3", "exe": "/work/main/.venv/bin/python3.11-harness-" + "x" * 40, "exec_id": "30cebe9b7cce4184-%d-2777430000000" % (40000 + i)})
                grown[id(a)] = (a, g)
            p["ancestry"] = grown[id(a)][1]
batches = [recs[i:i + B] for i in range(0, len(recs), B)]
for b in batches:
    assert new.render_lines(b, _default, _FAST_OPTS) == old.render_lines(b, _default, _FAST_OPTS)
sizes = [len(orjson.dumps(r)) for r in recs]
print(f"{len(recs)} records, {statistics.mean(sizes):.0f} bytes/record mean, {len(anc)} distinct ancestry lists; bytes identical")
res = {"old": [], "new": []}
for rep in range(int(os.environ.get("REPS", "10"))):
    for nm, m in (("old", old), ("new", new)) if rep % 2 == 0 else (("new", new), ("old", old)):
        c0 = time.thread_time_ns()
        for b in batches:
            m.render_lines(b, _default, _FAST_OPTS)
        res[nm].append((time.thread_time_ns() - c0) / len(recs) / 1000)
r = [a / b for a, b in zip(res["new"], res["old"])]
print(f"old {min(res['old']):.3f} us/record (median {statistics.median(res['old']):.3f}), new {min(res['new']):.3f} (median {statistics.median(res['new']):.3f}); new/old median {statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
