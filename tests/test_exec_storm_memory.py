"""What an exec storm leaves behind (issue 15): distinct pids counted exactly in bounded
memory, argv decoded once and shared, and the stratum-URL rule's answer for a shared argv."""
from __future__ import annotations

import sys

from agenttrace.enrich.decodecache import MAX_ENTRIES, DecodeCache
from agenttrace.session.summary import Summaries, _Pids


def _exec(pid: int, ppid: int, agent: dict) -> dict:
    return {"ts": f"2026-12-02T05:00:00.{pid:09d}Z", "kind": "exec", "agent": agent,
            "proc": {"pid": pid, "ppid": ppid, "exec_id": f"x-{pid}", "exe": "/bin/true", "args": ["true"]}}


def test_distinct_pids_stay_exact_past_the_set_and_root_search_ends():
    agent = {"id": "a", "cgroup": "/a", "cgroup_id": 4242}
    s = Summaries("node")
    s.observe(_exec(10, 1, agent))            # the root: its parent is outside the agent
    n = _Pids.SET_MAX * 3
    for pid in range(100, 100 + n):
        s.observe(_exec(pid, 10, agent))
        if pid % 7 == 0:
            s.observe(_exec(pid, 10, agent))  # the same pid again (a reused pid) counts once
    a = s._a[4242]
    assert a.seen_pids is None and a.pids._set is None     # a bitmap now, the search over
    assert sys.getsizeof(a.pids._bits) < 64 * 1024
    body = s.finish(4242, "test")["summary"]
    assert body["processes"]["distinct_pids"] == n + 1
    assert body["processes"]["execs"] == n + 1 + len([p for p in range(100, 100 + n) if p % 7 == 0])
    assert body["root"]["pid"] == 10


def test_pid_counter_matches_a_set_across_the_switch():
    got, want = _Pids(), set()
    for i in range(_Pids.SET_MAX * 2):
        pid = (i * 7919) % 300_000
        got.add(pid)
        want.add(pid)
        assert len(got) == len(want)


def test_argv_decoded_once_per_distinct_bytes():
    dc = DecodeCache()
    a = dc.argv(b"true\0")
    assert a == ["true"] and dc.argv(b"true\0") is a and dc.argv(b"false\0") == ["false"]
    assert dc.text(b"bash\0\0\0") == "bash" and dc.text(b"bash\0\0\0") is dc.text(b"bash\0\0\0")
    assert dc.argv(b"a\0b\xff\0") == ["a", "b\\xff"]
    for i in range(MAX_ENTRIES + 5):          # bounded: a full cache starts over
        dc.argv(b"x%d\0" % i)
    assert len(dc._argv) <= MAX_ENTRIES


def test_stratum_rule_answers_shared_and_fresh_argv_alike():
    from agenttrace import session
    from agenttrace.match.engine import cmdline_only
    opts = session.SessionOptions(cgroups=[])
    rs = session.load_ruleset(opts)
    rule = rs.get("mining-stratum-args")
    m = cmdline_only(rule.match)
    assert m is not None
    bad = ["xmrig", "-o", "stratum+tcp://pool.example.org:3333"]
    shared = ["true"]
    assert m({"proc": {"args": shared}}) is False
    assert m({"proc": {"args": shared}}) is False          # answered from the last one
    assert m({"proc": {"args": bad}}) is True
    assert m({"proc": {"args": list(bad)}}) is True         # equal content, another list
    assert m({"proc": {"args": ["true"]}}) is False
    assert m({"proc": {}}) is False and m({}) is False


def test_pid_counter_with_an_odd_pid_stays_a_set():
    got = _Pids()
    got.add("7")
    for pid in range(_Pids.SET_MAX + 10):
        got.add(pid)
    assert got._set is not None and len(got) == _Pids.SET_MAX + 11
