"""The probes loaded while the rules are parsed (kernel/prefetch.py, session/probeplan.py):
adopted only when made for the session's own plan, closed otherwise, nothing left behind by a
bad rule file, and the same `started` record as a start without it."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

from conftest import AGENTTRACE, need_bpf

FEATURES = ("proc",)


def _bpf_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf"):
                n += 1
        except OSError:
            pass
    return n


def _started(extra_env: dict, *args) -> dict:
    env = dict(os.environ, **extra_env)
    p = subprocess.run([AGENTTRACE, "run", *args, "--", "true"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return next(r for r in recs if r.get("kind") == "lifecycle" and r.get("phase") == "started")


def test_prefetch_of_the_same_plan_is_adopted():
    need_bpf()
    from agenttrace.kernel.loader import Probes
    from agenttrace.kernel.prefetch import ProbePrefetch
    # the prefetch reads the probe cache only: a fresh machine's first load fills it
    warm = Probes(FEATURES, 64, extra_cflags=["-DAT_WAKE_NS=5000000ULL"])
    try:
        warm.load()
    finally:
        warm.close()
    before = _bpf_fds()
    pre = ProbePrefetch(FEATURES, 64, ["-DAT_WAKE_NS=5000000ULL"])
    p = Probes(FEATURES, 64, extra_cflags=["-DAT_WAKE_NS=5000000ULL"])
    p.prefetched = pre
    try:
        p.load()
        assert pre.outcome == "used" and p.prefetched is None, pre.error
        assert p.bpf.funcs and p.bpf.tracepoint_fds      # loaded by the thread, attached here
        assert p["watched"] is not None
    finally:
        p.close()
    assert _bpf_fds() == before


def test_prefetch_of_another_plan_is_closed_and_the_session_loads_its_own():
    need_bpf()
    from agenttrace.kernel.loader import Probes
    from agenttrace.kernel.prefetch import ProbePrefetch
    before = _bpf_fds()
    pre = ProbePrefetch(FEATURES, 64, ["-DAT_WAKE_NS=5000000ULL"])
    p = Probes(FEATURES, 64, extra_cflags=["-DAT_WAKE_NS=0ULL"])
    p.prefetched = pre
    try:
        p.load()
        assert pre.outcome == "mismatch"
        assert p.bpf.tracepoint_fds
    finally:
        p.close()
    assert _bpf_fds() == before


def test_discarded_prefetch_leaves_no_descriptor():
    need_bpf()
    from agenttrace.kernel.prefetch import ProbePrefetch
    before = _bpf_fds()
    pre = ProbePrefetch(FEATURES, 64, [])
    pre.discard()             # while the thread may still be loading: it closes what it made
    assert pre.wait(60)
    assert pre.outcome == "discarded"
    assert _bpf_fds() == before


def test_cold_cache_prefetch_compiles_nothing(tmp_path, monkeypatch):
    """Nothing in the cache: the prefetch leaves the compile to the session's own load (after
    the rules are checked), so no compiler child can outlive a session that exits on them."""
    need_bpf()
    from agenttrace.kernel import probecache
    from agenttrace.kernel.loader import Probes
    from agenttrace.kernel.prefetch import ProbePrefetch
    monkeypatch.setenv("AGENTTRACE_PROBE_CACHE", str(tmp_path / "empty"))
    called = []
    monkeypatch.setattr(probecache, "_compile_in_child", lambda *a: called.append(a) or {})
    before = _bpf_fds()
    pre = ProbePrefetch(FEATURES, 64, [])
    p = Probes(FEATURES, 64)
    assert pre.take(p.source(), p.cflags()) is None
    assert pre.outcome == "cold" and not called
    assert _bpf_fds() == before


def test_the_guess_for_the_default_pack_is_its_plan(tmp_path, monkeypatch):
    """The default pack blocks TLS server names: its first guess already loads tls.c, and what
    a rule set called for is remembered for the next start's guess."""
    import agenttrace.session as S
    from agenttrace.session import probeplan
    cache = tmp_path / "cache"
    monkeypatch.setenv("AGENTTRACE_PROBE_CACHE", str(cache))
    opts = S.SessionOptions()
    rs = S.load_ruleset(opts)
    features, cflags, key = probeplan.guess(opts)
    assert (features, cflags) == probeplan.plan(opts, rs)
    assert "tls" in features

    rules = tmp_path / "r.yaml"
    rules.write_text(textwrap.dedent("""\
        rules:
          - id: r1
            description: a rule written for a unit test
            category: exec
            severity: low
            on: [exec]
            match: {exe: {basenames: [nc]}}
        """))
    opts = S.SessionOptions(rule_paths=[str(rules)])
    rs = S.load_ruleset(opts)
    features, _c, key = probeplan.guess(opts)
    assert "tls" in features and "tls" not in probeplan.plan(opts, rs)[0]   # first time: wrong
    probeplan.learn(key, rs)
    assert probeplan.guess(opts)[:2] == probeplan.plan(opts, rs)            # then right
    rules.write_text(rules.read_text().replace("[nc]", "[ncat]"))
    assert "tls" in probeplan.guess(opts)[0]       # other bytes: not what was learnt


def test_no_rules_guess_needs_no_rule_files():
    import agenttrace.session as S
    from agenttrace.session import probeplan
    opts = S.SessionOptions(use_rules=False)
    features, cflags, key = probeplan.guess(opts)
    assert key is None and (features, cflags) == probeplan.plan(opts, None)


def test_started_is_the_same_with_and_without_prefetch():
    need_bpf()
    on = _started({})
    off = _started({"AGENTTRACE_PREFETCH": "off"})
    for k in ("probes", "features", "ruleset", "mode"):
        assert on.get(k) == off.get(k), k
    assert "tls" in on["probes"]


def test_bad_rule_file_exits_2_with_nothing_started(tmp_path):
    need_bpf()
    from agenttrace.enrich.cgroups import cgroup2_mount
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    on: [exec\n")
    p = subprocess.Popen([AGENTTRACE, "run", "--rules", str(bad), "--", "true"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert f"{bad}:" in err and "YAML" in err
    assert not out.strip()               # no record: nothing started
    # its agent cgroup (run-<pid>; other sessions' come and go meanwhile) was never made
    assert not (cgroup2_mount() / "agenttrace" / f"run-{p.pid}").exists()


def test_daemon_with_bad_rules_exits_2(tmp_path):
    need_bpf()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    on: [exec\n")
    cfg = tmp_path / "agenttrace.yaml"
    out = tmp_path / "events.jsonl"
    cfg.write_text(textwrap.dedent(f"""\
        mode: monitor
        rules: [{bad}]
        agents:
          - cgroup: /at-prefetch-none
        sinks:
          stdout: false
          file: {{path: {out}}}
          socket: {{path: {tmp_path / "events.sock"}}}
        """))
    p = subprocess.run([AGENTTRACE, "daemon", "--config", str(cfg), "--status-file", str(tmp_path / "st.json")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert f"{bad}:" in p.stderr
    assert not out.exists() or not out.read_text().strip()


def test_bad_rule_file_message_is_the_same_either_way(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - id: x\n    on: [exec\n")
    outs = []
    for env in ({}, {"AGENTTRACE_PREFETCH": "off"}):
        p = subprocess.run([AGENTTRACE, "run", "--rules", str(bad), "--", "true"], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, **env))
        outs.append((p.returncode, p.stderr))
    assert outs[0] == outs[1] and outs[0][0] == 2
    assert outs[0][1].startswith("agenttrace: invalid rules:") and f"{bad}:4:1: YAML error" in outs[0][1]
