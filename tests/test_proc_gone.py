"""Records of a process that had exited before the reader got to them (ProcTable.get `before`).

A process that entered the agent cgroup after its exec is in no table and in no kernel fork
entry; when it has also exited by the time its records are read (the reader behind a storm),
every record used to pay a kernel map look-up and a failed /proc open, making the reader slower
exactly when it was behind. Here the tracer is frozen while such a process makes its connects
and exits, as `agenttrace run` is started by a user: every connect must still arrive whole,
with the process known only by its record, and the look-ups must not grow with the records."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from conftest import AGENTTRACE, need_bpf
from harness import read_jsonl, wait_until

PY = sys.executable

# joins the agent cgroup itself (after its exec, so no exec record names it), then makes N TCP
# connects to a loopback port nothing listens on (refused: a new socket and a record each)
JOIN_AND_CONNECT = r"""
import socket, sys
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write("0")
port, n = int(sys.argv[2]), int(sys.argv[3])
refused = 0
for _ in range(n):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
        refused += 1
    finally:
        s.close()
print(refused, flush=True)
"""


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_connects_of_a_process_gone_before_they_are_read(tmp_path, agent_tree):
    need_bpf()
    a = agent_tree.agent("gone")
    out = tmp_path / "run.jsonl"
    n = 200
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    frozen = False
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        port = _closed_port()
        os.kill(tracer.pid, signal.SIGSTOP)
        frozen = True
        child = subprocess.run([PY, "-c", JOIN_AND_CONNECT, str(a), str(port), str(n)],
                               capture_output=True, timeout=60)
        os.kill(tracer.pid, signal.SIGCONT)
        frozen = False
        assert child.returncode == 0 and child.stdout.strip() == str(n).encode(), child.stderr
        # the child has exited and been reaped: its pid names no process while its records are read

        def mine():
            return [c for c in read_jsonl(out) if c.get("kind") == "connect"
                    and c["net"]["dst"]["port"] == port]
        got = wait_until(lambda: (lambda cs: cs if len(cs) >= n else None)(mine()))
        assert got and len(got) == n, len(mine())
        tracer.send_signal(signal.SIGINT)
        assert tracer.wait(timeout=60) == 0
    finally:
        if frozen:
            os.kill(tracer.pid, signal.SIGCONT)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    pids = {c["proc"]["pid"] for c in got}
    assert len(pids) == 1, pids
    for c in got:
        # known by its record only: no exec was seen, nothing was left to read
        assert c["agent"]["id"] == "gone" and c["proc"]["exec_id"] is None and c["proc"]["exe"] == ""
        assert c["proc"]["comm"].startswith("python") and c["net"]["result"] == "refused", c
    stopped = [x for x in read_jsonl(out) if x.get("kind") == "lifecycle" and x.get("phase") == "stopped"]
    assert stopped, "no stopped record"
    st = stopped[0]
    assert st["drops"]["kernel"] == 0 and st["stages"]["enrich"]["errors"] == 0
    # the first record looked and found nothing; the others were answered from that look-up,
    # or given the part built from it (enrich/procshare.py)
    answered = st["proc_table"]["gone_answered"] + st["stages"]["enrich"]["proc_shared"]
    assert answered >= n - 1, (st["proc_table"], st["stages"]["enrich"])
    assert st["processes"]["userspace_lookups"] < n // 2, st["processes"]
