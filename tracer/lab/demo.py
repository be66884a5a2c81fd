"""`agenttrace demo`: a misbehaving "agent" in a throwaway sandbox, traced live, first in
monitor mode and then in enforce mode, with a summary of what was detected and stopped.

The sandbox is the same private network the tests use (agenttrace.lab): an agent network
namespace with no default route, wired to a server namespace that hosts a real sshd, a
stratum pool stub, a DNS resolver and a web server at documentation addresses. Nothing
leaves the machine. GPU use comes from the fake NVML backend when there is no GPU.
Everything made is removed at the end, also on Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from agenttrace.enrich.cgroups import cgroup2_mount, kill_and_remove


STOPPED = ("blocked", "killed", "exited")


@dataclass
class Step:
    name: str            # what the agent does, for the table
    rules: tuple         # rule ids that detect it (any of them)
    # outcomes enforce mode may end with, all of its alerts for this step: a stop is a stop
    # whether the kernel blocked it, our signal killed it, or it gave up (exited) after a block
    expect: tuple
    argv: list = field(default_factory=list)
    netns: bool = True


def _steps(lab, tmp: Path) -> list[Step]:
    py = sys.executable
    miner = tmp / "xmrig"
    shutil.copy("/bin/sleep", miner)
    burner = tmp / "gpu-burner"
    if not burner.exists():
        os.symlink("/bin/sleep", burner)
    stratum = textwrap.dedent(f"""
        import json, socket
        s = socket.create_connection(("{lab.pool_host}", 3333), timeout=5)
        s.sendall(json.dumps({{"id": 1, "method": "mining.subscribe", "params": ["xmrig/6.21.0"]}}).encode() + b"\\n")
        print(s.recv(512)[:60])
    """)
    scan = textwrap.dedent(f"""
        import socket
        for port in range(20000, 20040):
            s = socket.socket(); s.settimeout(1); s.connect_ex(("{lab.internal_host}", port)); s.close()
    """)
    return [
        Step("benign: python prints, fetches from the internal web server", (), (),
             [py, "-c", f"import urllib.request; print(len(urllib.request.urlopen('http://{lab.internal_host}/', timeout=5).read()))"]),
        Step("reverse SSH tunnel: ssh -R 9000:127.0.0.1:8000 to an external host",
             ("tunnel-ssh-forwarding", "tunnel-ssh-external-port", "tunnel-ssh-external-flow"), STOPPED,
             ["timeout", "8"] + lab.ssh_argv(lab.ssh_host, 22, "-N", "-R", "9000:127.0.0.1:8000")),
        Step("miner binary: xmrig", ("mining-binary-exec",), STOPPED, [str(miner), "3"], netns=False),
        Step("stratum handshake to a pool on port 3333",
             ("mining-pool-port", "mining-stratum-flow"), STOPPED, [py, "-c", stratum]),
        Step("scan of 40 ports on an internal host", ("scan-internal-ports",), ("reported",), [py, "-c", scan]),
        Step("cloud metadata endpoint 169.254.169.254", ("egress-metadata-address",), ("blocked",),
             [py, "-c", "import socket; print(socket.socket().connect_ex(('169.254.169.254', 80)))"]),
        Step("GPU held by a non-ML process (fake NVML)", ("gpu-busy-non-ml-process",), ("reported",),
             [str(burner), "4"], netns=False),
    ]


class _Collect:
    name = "demo"
    dropped = 0

    def __init__(self, show):
        self.records = []
        self.show = show

    def emit_batch(self, records):
        for r in records:
            self.records.append(r)
            self.show(r)

    def emit(self, r):
        self.emit_batch([r])

    def close(self):
        pass


def run_demo(out=print, color: bool = True, events_path: str | None = None) -> int:
    import agenttrace.session as S
    from agenttrace.gpu.service import FAKE_ENV, GpuConfig, GpuGroupPolicy
    NetLab = _netlab()
    from agenttrace.sinks.tailview import Filter, render

    os.environ.setdefault(FAKE_ENV, str(Path(__file__).with_name("demo_gpu.yaml")))
    interesting = Filter(kinds=["exec", "connect", "alert", "gpu"])
    results: dict[str, dict[str, str]] = {}
    outcome_sets: dict[str, dict[str, set]] = {}
    root = cgroup2_mount() / f"agenttrace-demo-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="agenttrace-demo-"))
    root.mkdir()
    try:
        with NetLab() as lab:
            # what the demo makes, by name: all of it is gone when the demo ends
            out(f"lab: network namespaces {lab.agent_ns}, {lab.server_ns}; agent cgroups under {root.name}")
            steps = _steps(lab, tmp)
            for mode in ("monitor", "enforce"):
                out(f"\n=== {mode} mode " + "=" * 60)
                agent = root / f"agent-{mode}"
                agent.mkdir()
                sink = _Collect(lambda r: out(render(r, color=color)) if interesting.accepts(r) else None)
                # the session `agenttrace run --cgroup ROOT --mode MODE` builds: same probes,
                # same default pack, same enforcement; only the sink differs
                opts = S.SessionOptions(cgroups=[root], mode=mode, internal=["10.77.0.0/24", "fd77::/64"],
                                        gpu=GpuConfig(default=GpuGroupPolicy(allowed=True), interval_s=0.5))
                tracer = S.build(opts, [sink], S.load_ruleset(opts))
                tracer.start()
                spans = {}
                try:
                    for st in steps:
                        out(f"--- agent: {st.name}")
                        start = len(sink.records)
                        if st.netns:
                            p = lab.run_in_agent(st.argv, cgroup=agent, stdout=open(os.devnull, "w"),
                                                 stderr=open(os.devnull, "w"))
                        else:
                            p = _spawn_in(agent, st.argv)
                        deadline = time.monotonic() + 20
                        while p.poll() is None and time.monotonic() < deadline:
                            tracer.poll(50)
                        if p.poll() is None:
                            p.kill()
                            p.wait()
                        for _ in range(10):
                            tracer.poll(30)
                        tracer.drain()
                        spans[st.name] = (start, len(sink.records))
                finally:
                    tracer.stop()
                if events_path:     # what was traced, for `agenttrace report`
                    from agenttrace.sinks.outputs import dumps_line
                    with open(events_path, "ab") as f:
                        f.writelines(dumps_line(r) for r in sink.records)
                for st in steps:
                    a, b = spans.get(st.name, (0, 0))
                    # this agent's alerts only: another process on the node (another demo, a
                    # real GPU user) must not count for or against a step
                    raised = [r for r in sink.records[a:b] if r.get("kind") == "alert"
                              and (r.get("agent") or {}).get("id") == agent.name]
                    alerts = [r for r in raised if r["rule"]["id"] in st.rules]
                    if not st.rules:
                        results.setdefault(st.name, {})[mode] = (
                            "quiet" if not raised else "ALERT: " + ", ".join(sorted({r["rule"]["id"] for r in raised})))
                    elif alerts:
                        outcomes = sorted({a["rule"]["outcome"] for a in alerts})
                        stopper = sorted({a["rule"]["stopped_by"] for a in alerts if a["rule"].get("stopped_by")})
                        results.setdefault(st.name, {})[mode] = "detected, " + "/".join(outcomes) + (
                            f" ({', '.join(stopper)})" if stopper else "")
                        outcome_sets.setdefault(st.name, {})[mode] = set(outcomes)
                    else:
                        results.setdefault(st.name, {})[mode] = "MISSED"
                kill_and_remove(agent)
    finally:
        kill_and_remove(root)
        shutil.rmtree(tmp, ignore_errors=True)

    out("\n=== summary " + "=" * 64)
    w = max(len(s) for s in results) + 2
    out(f"{'behaviour':<{w}}{'monitor':<28}{'enforce':<28}")
    ok = True
    for st in steps:
        row = results.get(st.name, {})
        mon, enf = row.get("monitor", "-"), row.get("enforce", "-")
        got = outcome_sets.get(st.name, {}).get("enforce", set())
        good = (("quiet" == mon == enf) if not st.rules else
                (mon.startswith("detected") and enf.startswith("detected") and bool(got) and got <= set(st.expect)))
        ok &= good
        out(f"{st.name:<{w}}{mon:<28}{enf:<28}{'' if good else '  <-- unexpected'}")
    out("\nall behaviours detected; enforce mode stopped what the default pack blocks" if ok
        else "\nsome behaviours were not handled as expected (see above)")
    return 0 if ok else 1


def _netlab():
    """The sandbox network: agenttrace.lab.netlab, the same lab the test suite uses."""
    from agenttrace.lab.netlab import NetLab
    return NetLab


def _spawn_in(cgroup: Path, argv):
    import subprocess
    procs = str(cgroup / "cgroup.procs")

    def enter():
        with open(procs, "w") as f:
            f.write("0")
    return subprocess.Popen(argv, preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
