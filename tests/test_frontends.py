"""Every front end started the way a user starts it — `run --cgroup`, `run -- CMD`,
`tail --cgroup --alerts`, the daemon — loads the full default probe set (from its
`lifecycle/started` record) and raises a tunnel alert for SSH spoken on port 443.

This is the test that would have caught `run` loading two of five probe families while the
unit tests, built on internal constructors, stayed green."""
import json
import os
import signal
import subprocess
import textwrap
import threading

from conftest import AGENTTRACE, need_bpf
from harness import read_jsonl, wait_until

# unique per test run: `run -- CMD` locks its agent name, and another checkout's suite may run
# this same test at the same time
_AGENT_CMD443 = f"cmd443-{os.getpid()}"

FULL = {"proc", "net", "listen", "flow", "dns"}
TUNNEL_RULE = "tunnel-ssh-external-flow"


def _ssh443(lab):
    return lab.ssh_argv(lab.ssh_host, 443, command=["true"])


def _started(recs):
    return [r for r in recs if r.get("kind") == "lifecycle" and r.get("phase") == "started"]


def _tunnel(recs):
    return [r for r in recs if r.get("kind") == "alert" and r["rule"]["id"] == TUNNEL_RULE]


def _check_started(rec):
    assert FULL <= set(rec["probes"]), rec["probes"]
    assert FULL <= set(rec["features"])
    assert rec["ruleset"]["count"] > 10, rec["ruleset"]


def _stop(p: subprocess.Popen) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            return p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()
    return p.returncode


def test_run_cgroup(netlab, agent_tree, tmp_path):
    need_bpf()
    out = tmp_path / "ev.jsonl"
    a = agent_tree.agent("a443")
    p = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "--internal", "10.77.0.0/24",
                          "--output", str(out)], stderr=subprocess.PIPE)
    try:
        st = wait_until(lambda: _started(read_jsonl(out)))
        assert st, p.stderr.read().decode() if p.poll() is not None else "no started record"
        _check_started(st[0])
        r = netlab.check_in_agent(_ssh443(netlab), cgroup=a)
        assert r.returncode == 0, r.stderr
        al = wait_until(lambda: _tunnel(read_jsonl(out)))
        assert al and al[0]["agent"]["id"] == "a443" and al[0]["net"]["dst"]["port"] == 443
    finally:
        assert _stop(p) == 0


def test_run_command(netlab, tmp_path):
    need_bpf()
    out = tmp_path / "ev.jsonl"
    cmd = ["nsenter", f"--net=/var/run/netns/{netlab.agent_ns}", *_ssh443(netlab)]
    r = subprocess.run([AGENTTRACE, "run", "--agent", _AGENT_CMD443, "--internal", "10.77.0.0/24",
                        "--output", str(out), "--", *cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr        # ssh's own exit code
    recs = read_jsonl(out)
    _check_started(_started(recs)[0])
    al = _tunnel(recs)
    assert al and al[0]["agent"]["id"] == _AGENT_CMD443, [x["rule"]["id"] for x in recs if x.get("kind") == "alert"]


def test_tail_cgroup_alerts(netlab, agent_tree):
    need_bpf()
    a = agent_tree.agent("tail443")
    p = subprocess.Popen([AGENTTRACE, "tail", "--cgroup", str(agent_tree.root), "--alerts", "--no-color",
                          "--internal", "10.77.0.0/24"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    th = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    th.start()
    try:
        started = wait_until(lambda: [x for x in lines if x.startswith("started") or " started " in x])
        assert started, p.stderr.read() if p.poll() is not None else "no started line"
        for f in FULL:
            assert f in started[0], started[0]
        r = netlab.check_in_agent(_ssh443(netlab), cgroup=a)
        assert r.returncode == 0, r.stderr
        al = wait_until(lambda: [x for x in lines if TUNNEL_RULE in x])
        assert al and "tail443" in al[0]
        # --alerts: no plain event lines (exec, connect, flow) made it through
        assert not [x for x in lines if " exec " in x and "ALERT" not in x]
    finally:
        _stop(p)


def test_daemon(netlab, agent_tree, tmp_path):
    need_bpf()
    out = tmp_path / "ev.jsonl"
    cfg = tmp_path / "agenttrace.yaml"
    cfg.write_text(textwrap.dedent(f"""
        mode: monitor
        agents:
          - cgroup: /{agent_tree.root.name}
        internal_cidrs: [10.77.0.0/24]
        sinks:
          stdout: false
          file: {{path: {out}}}
    """))
    a = agent_tree.agent("d443")
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    p = subprocess.Popen([AGENTTRACE, "daemon", "--config", str(cfg), "--status-file", str(tmp_path / "st.json")],
                         stderr=subprocess.PIPE, env=env)
    try:
        st = wait_until(lambda: _started(read_jsonl(out)))
        assert st, p.stderr.read().decode() if p.poll() is not None else "no started record"
        _check_started(st[0])
        # the daemon finds agent cgroups by pattern: wait until it watches ours
        wait_until(lambda: (tmp_path / "st.json").exists() and
              f"/{agent_tree.root.name}" in json.loads((tmp_path / "st.json").read_text()).get("watched", []))
        r = netlab.check_in_agent(_ssh443(netlab), cgroup=a)
        assert r.returncode == 0, r.stderr
        al = wait_until(lambda: _tunnel(read_jsonl(out)))
        assert al and al[0]["agent"]["id"] == "d443"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


def test_bad_gpu_and_egress_sections_exit_2(tmp_path):
    """Typed config: the gpu: and egress: sections are validated by their real models."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(textwrap.dedent("""
        mode: enforce
        gpu:
          interval_s: -1
        egress:
          web:
            mode: allow-list
            allow:
              - cidr: not-a-cidr
    """).lstrip())
    r = subprocess.run([AGENTTRACE, "daemon", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert f"{cfg}:3:" in r.stderr and "gpu.interval_s" in r.stderr
    assert f"{cfg}:8:" in r.stderr and "egress.web.allow[0].cidr" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_command_enforce_leaves_nothing_behind(tmp_path, cgroup2_root):
    """`run --mode enforce -- CMD` pins its cgroup programs while it runs; at its end the
    agent cgroup, the pins and the shared parent folders it created are gone."""
    need_bpf()
    from agenttrace.session.isolation import RUN_PIN_ROOT
    parents = [cgroup2_root / "agenttrace", RUN_PIN_ROOT]
    existed = {p: p.exists() for p in parents}
    name = f"tidy-{os.getpid()}"
    probe = ("import os, sys; d = sys.argv[1]; "
             "print(int(os.path.isdir(d) and bool(os.listdir(d))))")
    r = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--no-rules", "--agent", name,
                        "--output", str(tmp_path / "ev.jsonl"), "--",
                        "python3", "-c", probe, str(RUN_PIN_ROOT / name)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1", "the agent ran while its programs were pinned"
    assert not (cgroup2_root / "agenttrace" / name).exists()
    assert not (RUN_PIN_ROOT / name).exists()
    # the cgroup parent goes with the last run out, whoever made it (an empty one left by an
    # earlier run included)
    assert not _empty_folder(cgroup2_root / "agenttrace", cgroup=True), "an empty <cgroup2>/agenttrace left behind"
    for p in parents[1:]:
        if not existed[p]:
            # another checkout's run may have made it meanwhile and still use it (its entry is
            # inside); what this run must not do is leave it behind empty
            assert not _empty_folder(p), f"{p} left behind"


def _empty_folder(p, cgroup: bool = False) -> bool:
    """There, with no entry in it; a cgroup folder always lists its control files (cgroup.procs
    & co.), so for one only child cgroups (folders) count."""
    try:
        return not any(c.is_dir() if cgroup else True for c in p.iterdir())
    except FileNotFoundError:
        return False
