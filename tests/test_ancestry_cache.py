"""Cached ancestries (enrich/proctable.py) must always equal a fresh walk of the table, whatever
mix of forks, execs, pid reuse, removals and late-filled holes came before."""
import random

from agenttrace.enrich import proctable as PT


def _fresh(t, pid):
    p = t._t.get(pid)
    out, seen, nxt = [], {pid}, (p.parent if p else 0)
    while nxt and nxt not in seen and len(out) < PT.ANCESTRY_DEPTH:
        seen.add(nxt)
        a = t._t.get(nxt)
        if a is None:
            break
        out.append({"pid": a.pid, "comm": a.comm, "exe": a.exe, "exec_id": a.exec_id})
        nxt = a.parent
    return out


def test_cached_ancestry_equals_a_fresh_walk(monkeypatch):
    monkeypatch.setattr(PT, "from_proc", lambda pid: None)    # pids outside the table are holes
    rnd = random.Random(15)
    t = PT.ProcTable(200)
    t.on_exec(1, 0, 0, "init", "/sbin/init", [], 1)
    nxt = 2
    for step in range(8000):
        pids = list(t._t)
        op = rnd.random()
        if op < 0.4:        # fork: a new pid, or a reused one
            child = nxt if rnd.random() < 0.7 else rnd.randint(1, nxt)
            nxt += 1
            t.on_fork(rnd.choice(pids), child, step, 0, "c")
        elif op < 0.7:      # exec in a known process (maybe someone's ancestor)
            t.on_exec(rnd.choice(pids), rnd.choice(pids), 0, f"e{step}", f"/x{step}", [], step)
        elif op < 0.75:
            t.forget(rnd.choice(pids))
        elif op < 0.8:      # exec of a process we never saw (may fill a hole)
            t.on_exec(rnd.randint(1, nxt + 5), rnd.choice(pids), 0, "n", "/n", [], step)
        pid = rnd.choice(list(t._t) + [nxt + 3])
        assert t.ancestry(pid) == _fresh(t, pid), step


def test_exec_storm_reuses_one_walk():
    t = PT.ProcTable()
    t.on_exec(10, 1, 0, "sh", "/bin/sh", [], 1)
    t.on_fork(10, 11, 2, 0, "sh")
    first = t.ancestry(11)
    gen = t._gen
    t.on_exec(11, 10, 0, "true", "/bin/true", [], 3)     # nobody descends from 11
    assert t._gen == gen and t.ancestry(11) == first
    t.on_fork(11, 12, 4, 0, "true")
    t.ancestry(12)                                       # 11 is now an ancestor
    t.on_exec(11, 10, 0, "x", "/bin/x", [], 5)
    assert t._gen != gen and t.ancestry(12)[0]["exe"] == "/bin/x"
