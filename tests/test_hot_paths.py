"""Shortcuts taken on the per-record path (issue 15) give the answers of the long way round."""
from __future__ import annotations

import os
import random
import subprocess
import sys

from agenttrace.enrich import exeid
from agenttrace.enrich.proctable import ProcTable, Proc
from agenttrace.kernel import wire as E
from agenttrace.match.linregex import Searcher, compile_linear, _MEMO_TEXT


def _per_arg(raw: bytes) -> list[str]:
    # what split_args did before: each argument decoded on its own
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return [a.decode("utf-8", "backslashreplace") for a in raw.split(b"\0")] if raw else []


def test_argv_decoded_whole_equals_each_argument_decoded_alone():
    rnd = random.Random(15)
    parts = [b"\0", b"a", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f\x98", b"\x80", b"\xff",
             b"\xed\xa0\x80", "é".encode(), "😀".encode()]
    for _ in range(20000):
        raw = b"".join(rnd.choice(parts) for _ in range(rnd.randint(0, 10)))
        assert E.split_args(raw) == _per_arg(raw), raw
    for _ in range(2000):
        raw = os.urandom(rnd.randint(0, 32))
        assert E.split_args(raw) == _per_arg(raw), raw


class _Closed(ProcTable):
    """Nothing outside the table (the test's pids need not exist). A subclass, not an instance
    attribute: the compiled ProcTable is a C type whose instances take no new attributes."""

    def get(self, pid, before=0):
        return self.peek(pid)


def _table(chain: list[int]) -> ProcTable:
    """pids[0] forked pids[1] forked ... : a table that never reads /proc."""
    t = _Closed()
    for i, pid in enumerate(chain):
        p = Proc(pid, chain[i - 1] if i else 0, 0, f"c{pid}", f"/bin/p{pid}", [], start_ktime=pid)
        t._put(p)
    return t


def _walk(t: ProcTable, pid: int) -> list[int]:
    """The chain by parent links, stopping at a pid seen before (the rule ancestry keeps)."""
    out, seen, cur = [], {pid}, t.peek(pid).parent
    while cur and cur not in seen and len(out) < 8:
        seen.add(cur)
        a = t.peek(cur)
        if a is None:
            break
        out.append(cur)
        cur = a.parent
    return out


def test_new_child_takes_the_parents_chain_and_stops_at_its_own_pid():
    t = _table([10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    t.ancestry(19)                      # the parent's chain is cached
    for child in (20, 21):
        t._put(Proc(child, 19, 0, "kid", "/bin/kid", [], start_ktime=child))
        assert [s["pid"] for s in t.ancestry(child)] == _walk(t, child) == [19, 18, 17, 16, 15, 14, 13, 12]
    # a pid on its parent's chain again (an entry replaced behind the table's back, which
    # _put would have counted as a change): the chain stops before it, as the walk does
    t2 = _table([30, 31, 32, 33])
    assert [s["pid"] for s in t2.ancestry(33)] == [32, 31, 30]
    t2._t[31] = Proc(31, 33, 0, "again", "/bin/again", [], start_ktime=2)
    assert [s["pid"] for s in t2.ancestry(31)] == _walk(t2, 31) == [33, 32]


def test_exists_tells_a_running_process_from_a_reaped_one():
    assert exeid._exists(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not exeid._exists(p.pid)
    assert not exeid._exists(0) and not exeid._exists(-1)


def test_identity_of_an_exited_process_comes_from_its_path():
    ids = exeid.ExeIdentifier()
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    gone = ids.identify(p.pid, "/bin/true", "/bin/true", ["true"])
    live = ids.identify(os.getpid(), sys.executable, sys.executable, [sys.executable])
    with open(os.path.realpath("/bin/true"), "rb") as f:
        import hashlib
        assert gone["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert live["runtime"] == "cpython"
    assert ids.stats["unreadable"] == 1         # the exe link of the exited one, as before


def test_searcher_remembers_short_texts_only_and_answers_the_same():
    s = Searcher(compile_linear(r"(?i)\bstratum[12]?\+tcp\b"))
    for text in ("true", "xmrig -o stratum+tcp://pool:3333", "true", "STRATUM+TCP://x", ""):
        assert s.search(text) == (s.compiled.search(text) is not None)
    assert "true" in s._seen
    long = "a " * _MEMO_TEXT + "stratum+tcp://x"
    assert s.search(long) and long not in s._seen


def test_heap_settles_once_and_a_reload_frees_what_the_old_rules_held_in_cycles():
    import gc
    import weakref
    from agenttrace.session import heap
    heap.settle()
    assert heap._settled and gc.get_freeze_count() > 0
    n = gc.get_freeze_count()
    heap.settle()                       # once per process: nothing more is frozen
    assert gc.get_freeze_count() == n

    class Rules:
        pass
    old = Rules()
    old.me = old                        # a cycle: only the collector frees it
    gone = weakref.ref(old)
    gc.freeze()                         # as if it had been there at start-up
    assert gc.get_freeze_count() > n
    del old
    gc.collect()
    assert gone() is not None           # frozen: never collected
    heap.resettle()
    assert gone() is None and gc.get_freeze_count() > 0
