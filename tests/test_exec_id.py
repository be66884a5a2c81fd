"""exec_id: unique per process image over a node's boot even when pids are reused, and
parent_exec_id joins each exec to the exec record of the process that created it.

Reuse is forced through /proc/sys/kernel/ns_last_pid (the next pid the kernel hands out),
cycling a handful of pids. A small pid_max in a new pid namespace (per-namespace since 6.14,
and it works on this kernel) would only recycle the namespace's own numbers: the tracer sees
global pids, which keep counting, so it would not test what matters here."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from agenttrace.enrich.proctable import BOOT_ID

N = 10_000
WORKLOAD = textwrap.dedent(f"""
    import os, sys
    base = int(open('/proc/sys/kernel/ns_last_pid').read()) + 200
    for i in range({N}):
        with open('/proc/sys/kernel/ns_last_pid', 'w') as f:
            f.write(str(base + i % 8 - 1))
        pid = os.fork()
        if pid == 0:
            os.execv('/bin/true', ['/bin/true', 'burst-' + str(i)])
        os.waitpid(pid, 0)
""")


def test_exec_id_unique_under_forced_pid_reuse(agent_tree, make_session):
    a = agent_tree.agent("burst")
    sess = make_session([agent_tree.root], features=("proc",))
    p = agent_tree.spawn(a, [sys.executable, "-c", WORKLOAD, "burst-parent"], stdout=subprocess.DEVNULL)
    try:
        while p.poll() is None:
            sess.tracer.poll(50)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert p.returncode == 0
    sess.wait_for(lambda: sum(1 for r in sess.of("exec") if r["proc"]["exe"] == "/bin/true") >= N, timeout=60)
    sess.settle()
    assert sess.tracer.counters()["drops"]["kernel"] == 0
    execs = sess.of("exec")
    burst = [r for r in execs if r["proc"]["exe"] == "/bin/true"]
    assert len(burst) == N
    pids = {r["proc"]["pid"] for r in burst}
    assert len(pids) < N // 10, f"pid reuse not forced: {len(pids)} distinct pids"
    ids = [r["proc"]["exec_id"] for r in execs]
    assert len(set(ids)) == len(ids), "exec_id reused"
    assert all(i.startswith(BOOT_ID + "-") for i in ids)
    by_id = {r["proc"]["exec_id"]: r for r in execs}
    parent = [r for r in execs if "burst-parent" in r["proc"]["args"]]
    assert len(parent) == 1
    for r in burst:
        joined = by_id.get(r["proc"]["parent_exec_id"])
        assert joined is parent[0], r["proc"]
    # exits name the image that exited: every burst exec has exactly one exit with its id
    exits = {}
    for r in sess.of("exit"):
        exits[r["proc"]["exec_id"]] = exits.get(r["proc"]["exec_id"], 0) + 1
    assert all(exits.get(r["proc"]["exec_id"]) == 1 for r in burst)
