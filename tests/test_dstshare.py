"""A storm to one listener: its connects share one `dst` part while the destination's scope and
DNS name hold (Enricher._dst), and the engine takes a record holding the same dst and proc as
one that met no candidate to meet none either (Engine.process). Each is checked against the
same records without it, after each thing it keys on changes."""
import io
import os
import subprocess
import textwrap

from agenttrace.match.engine import Engine
from agenttrace.match.rules import default_rule_paths, load_rules
from agenttrace.session.event import Event

from test_procshare import _Wire, _tracer


def _unshared_dst(self, agent_id, addr, port):
    d = {"addr": addr, "port": port, "scope": self.scoper.scope(addr), "name": None}
    if self.name_lookup is not None:
        d["name"] = self.name_lookup(agent_id, addr)
    return d


def test_shared_dst_parts_are_the_parts_built_afresh():
    """Byte-identical to building every dst afresh, with connects after a DNS name is learned
    for the address, after the scope table is replaced (a reload's internal ranges) and from a
    second agent to the same address."""
    from agenttrace.enrich.scope import Scoper
    child = subprocess.Popen(["sleep", "60"])
    try:
        agent = os.stat("/").st_ino
        w = _Wire(child.pid, agent)
        marks = {}
        for what in (None, "dns", "scope", "agent"):
            marks[len(w.out)] = what
            if what == "agent":
                w.agent = agent + 1
            for _ in range(3):
                w.conn(ip="198.51.100.7", port=8443)
        outs = []
        for share in (True, False):
            t, buf = _tracer(True)
            if not share:
                t.enrich._dst = _unshared_dst.__get__(t.enrich)
            for i, rec in enumerate(w.out):
                what = marks.get(i)
                if what == "dns":
                    t.enrich.names.add(agent, "198.51.100.7", "svc.example", 300)
                elif what == "scope":
                    t.scoper = t.enrich.scoper = Scoper(internal=["198.51.100.0/24"], replace_internal=True)
                t._on_view(memoryview(rec), len(rec))
            t._flush()
            for ev in t.enrich.flush_pending():
                t._process(ev)
            t._flush()
            outs.append(buf.getvalue())
        import json
        # the same bytes but the alerts' `alerted` (the wall clock when the alert was made)
        recs = [[{k: v for k, v in json.loads(x).items() if k != "alerted"} for x in o.splitlines()] for o in outs]
        assert recs[0] == recs[1]
        assert [r for r in recs[0] if r["kind"] == "alert"]      # the external ones met their rule
        assert outs[0].replace(b"\n", b"").count(b'"kind":"connect"') == 12
        dsts = [r["net"]["dst"] for r in recs[0] if r["kind"] == "connect"]
        assert [d["name"] for d in dsts[2:4]] == [None, "svc.example"]
        assert dsts[5]["scope"] == "external" and dsts[6]["scope"] == "internal"
        assert dsts[8]["name"] == "svc.example" and dsts[9]["name"] is None     # the other agent's
    finally:
        child.kill()
        child.wait()


def test_dst_keyed_rule_fires_when_the_shared_dst_meets_new_candidates():
    """Two engines over the same records, one without the dst shortcut: the same alerts. A
    record with the no-candidate record's very dst but another proc (a GPU holder) meets the
    rules that need the GPU summary; one with the same dst and proc but another result meets
    a rule whose condition compares the result first (that kind is not dst-keyed); one with
    the same proc and another dst meets that dst's rules."""
    rules = "rules:\n" + textwrap.indent(textwrap.dedent("""\
        - id: t-gpu-loopback
          description: a GPU holder's loopback connect
          category: egress
          severity: low
          on: [connect]
          condition: has(proc.gpu) && net.dst.scope == "loopback" && net.result == "established"
          action: report
        """), "  ")
    eq_rule = "rules:\n" + textwrap.indent(textwrap.dedent("""\
        - id: t-established
          description: an established connect
          category: egress
          severity: low
          on: [connect]
          condition: net.result == "established" && net.dst.port == 8443
          action: report
        """), "  ")
    for text, expect, which in ((rules, "t-gpu-loopback", "gpu"), (eq_rule, "t-established", "result"),
                                (rules, "tunnel-ssh-external-port", "dst")):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        try:
            rs = load_rules(default_rule_paths() + [f.name])
        finally:
            os.unlink(f.name)
        fast, slow = Engine(rs), Engine(rs)
        slow._dst_keyed = frozenset()
        dst = {"addr": "127.0.0.1", "port": 8443, "scope": "loopback", "name": None}
        plain = {"pid": 5, "ppid": 1, "uid": 0, "comm": "c", "exe": "/c", "args": ["c"], "exec_id": "x",
                 "parent_exec_id": None, "ancestry": []}
        gpu = dict(plain, gpu={"sm_util_pct": 90})

        def rec(proc, result, dst=dst):
            return {"ts": "2026-01-01T00:00:00.000000000Z", "kind": "connect", "node": "n",
                    "agent": {"id": "a", "cgroup": "/a", "cgroup_id": 7}, "proc": proc,
                    "net": {"proto": "tcp", "family": "ipv4", "src": None, "dst": dst,
                            "verdict": "allowed", "result": result}}
        # the first record meets no candidate; the second holds its dst and differs by one thing
        other = {"addr": "198.51.100.7", "port": 22, "scope": "external", "name": None}
        seq = [rec(plain, "pending"), {"gpu": rec(gpu, "established"), "result": rec(plain, "established"),
                                       "dst": rec(plain, "pending", other)}[which]]
        got = []
        for i, r in enumerate(seq):
            a = [al.record["rule"]["id"] for al in fast.process(Event("connect", i, r, 5, 7))]
            b = [al.record["rule"]["id"] for al in slow.process(Event("connect", i, dict(r), 5, 7))]
            assert a == b, (expect, i)
            got += a
        assert expect in got and (which == "dst" or got == [expect]), (expect, got)
