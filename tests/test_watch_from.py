"""The probes' cgroup walks start at the shallowest watched cgroup's level (common.h
watch_from, written by the loader's watch). Watching a deep subtree first and a shallower one
after must lower it before the shallower one is in the map: both subtrees' agents are seen,
with their agent ids, and a process outside both is not. Through `agenttrace run` as a user
starts it, with the kernel's own map read back."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import AGENTTRACE, need_bpf
from harness import end_process, loopback_listener, read_jsonl, wait_until

PY = sys.executable
CONNECT = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1]))).close()"


def test_deep_then_shallow_watch_sees_both_subtrees(tmp_path, agent_tree):
    need_bpf()
    deep = agent_tree.root / "d1" / "d2" / "d3"
    deep.mkdir(parents=True)
    shallow = agent_tree.root / "s"
    shallow.mkdir()
    deep_agent, shallow_agent = deep / "deepagent", shallow / "shallowagent"
    deep_agent.mkdir()
    shallow_agent.mkdir()
    outside = agent_tree.agent("outside")
    srv, port = loopback_listener(64)
    out = tmp_path / "run.jsonl"
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(deep), "--cgroup", str(shallow), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        pids = {}
        for name, cg in (("deepagent", deep_agent), ("shallowagent", shallow_agent), ("outside", outside)):
            p = agent_tree.spawn(cg, [PY, "-c", CONNECT, str(port)])
            pids[name] = p.pid
            assert p.wait(timeout=30) == 0
            srv.accept()[0].close()

        def connects():
            return {r["agent"]["id"]: r for r in read_jsonl(out) if r.get("kind") == "connect"
                    and r["net"]["dst"]["port"] == port}
        seen = wait_until(lambda: (lambda c: c if {"deepagent", "shallowagent"} <= set(c) else None)(connects()))
        assert seen, connects()
        for name, cg in (("deepagent", deep_agent), ("shallowagent", shallow_agent)):
            assert seen[name]["proc"]["pid"] == pids[name]
            assert seen[name]["agent"]["cgroup_id"] == os.stat(cg).st_ino
        assert pids["outside"] not in {r["proc"]["pid"] for r in read_jsonl(out) if "proc" in r}
    finally:
        srv.close()
        end_process(tracer)


def test_watch_from_is_lowered_before_a_shallower_watch(agent_tree, monkeypatch):
    need_bpf()
    from test_flow_probes import Kernel
    deep = agent_tree.root / "x1" / "x2"
    deep.mkdir(parents=True)
    k = Kernel(deep, monkeypatch)
    try:
        from agenttrace.kernel.loader import level
        t = k.p["watch_from"]
        assert t[t.Key(0)].value == level(deep)
        k.p.watch(agent_tree.root)
        assert t[t.Key(0)].value == level(agent_tree.root)
        k.p.watch(agent_tree.root / "x1")     # deeper than the lowest: unchanged
        assert t[t.Key(0)].value == level(agent_tree.root)
    finally:
        k.close()
