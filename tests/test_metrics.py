"""Prometheus metrics (prometheus-client): the registry's parts on their own, and a scrape of a
real daemon parsed by `prometheus_client.parser`, its counters matching the records it emitted.
The same daemon also delivers its records over syslog TCP to a real rsyslogd."""
from __future__ import annotations

import errno
import json
import os
import sys
import textwrap
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agenttrace.ops.metrics import Heartbeat, MetricsServer, RecordCounter, bounded, make_registry

from harness import Daemon, block_port_rule, free_port, loopback_listener

PY = sys.executable


def get(host, port, path="/metrics", accept=None):
    req = urllib.request.Request(f"http://{host}:{port}{path}")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} from a parsed exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by_name(smp: dict, name: str) -> dict:
    return {dict(k[1]).__repr__(): v for k, v in smp.items() if k[0] == name}


def test_bounded_agent_labels_keep_the_top_and_sum_the_rest():
    drops = {f"ep-{i}": i for i in range(1, 101)}
    b = bounded(drops, 10)
    assert len(b) == 11 and b["ep-100"] == 100 and "ep-1" not in b
    assert sum(b.values()) == sum(drops.values())
    assert bounded({"a": 1}, 10) == {"a": 1}


def test_registry_without_a_tracer_serves_build_process_and_health():
    beat = Heartbeat(max_silence_s=3600)
    srv = MetricsServer(make_registry(), "127.0.0.1", 0, health=beat)
    try:
        code, ctype, body = get(*srv.address)
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
        smp = samples(body)
        info = [dict(k[1]) for k in smp if k[0] == "agenttrace_build_info"]
        assert info and info[0]["version"] and info[0]["kernel"] == os.uname().release
        assert smp[("process_resident_memory_bytes", frozenset())] > 0
        assert ("python_info", frozenset()) not in smp   # has labels
        assert any(k[0] == "python_info" for k in smp)
        # OpenMetrics when the scraper asks for it
        _, ctype, body = get(*srv.address, accept="application/openmetrics-text; version=1.0.0")
        assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith("# EOF")
        assert get(*srv.address, "/healthz")[2] == "ok\n"
        beat.last -= 7200
        with pytest.raises(urllib.error.HTTPError) as ei:
            get(*srv.address, "/healthz")
        assert ei.value.code == 503
        with pytest.raises(urllib.error.HTTPError) as ei:
            get(*srv.address, "/other")
        assert ei.value.code == 404
    finally:
        srv.close()


def test_record_counter_counts_kinds_and_alerts_by_rule():
    rc = RecordCounter()
    rc([{"kind": "exec"}, {"kind": "exec"}, {"kind": "alert", "rule": {"id": "r1", "severity": "high",
                                                                     "outcome": "blocked"}}])
    kinds, alerts = rc.snapshot()
    assert kinds == {"exec": 2, "alert": 1} and alerts == {("r1", "high", "blocked"): 1}




@pytest.fixture
def rsyslogd(tmp_path):
    from rsyslog import RSYSLOGD, Rsyslogd
    if not os.path.exists(RSYSLOGD):
        pytest.fail("rsyslogd not installed: scripts/setup.sh --test installs it")
    r = Rsyslogd(tmp_path / "rsyslog").start()
    yield r
    r.stop()


def test_daemon_metrics_match_the_records_it_emitted(tmp_path, agent_tree, rsyslogd):
    srv, port = loopback_listener()
    rules = tmp_path / "rules.yaml"
    rules.write_text(block_port_rule(port, f"test-metrics-block-{port}"))
    mport = free_port()
    a = agent_tree.agent("m1")
    d = Daemon(tmp_path, agent_tree.root, rules, tmp_path / "unused-pins")
    d.cfg.write_text(textwrap.dedent(f"""
        mode: enforce
        agents:
          - cgroup: /{agent_tree.root.name}
        rules: [{rules}]
        sinks:
          stdout: false
          file: {{path: {d.out}}}
          socket: {{path: {d.sock}}}
          syslog:
            address: "tcp://127.0.0.1:{rsyslogd.tcp_port}"
            facility: local4
            filter: {{kinds: [exec, alert], agents: ["m*"]}}
        metrics: {{enabled: true, listen: "127.0.0.1:{mport}"}}
    """))
    try:
        d.start()
        assert d.wait_record(lambda r: r.get("phase") == "started")
        for _ in range(3):
            r = agent_tree.run(a, [PY, "-c", f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {port})))"])
            assert int(r.stdout) == errno.EPERM
        # (repeats of one alert may be folded by the engine's dedup: at least one is written)
        assert len(d.wait_record(lambda r: r.get("kind") == "alert")) >= 1
        deadline = time.monotonic() + 60
        counted = kinds = None
        # the file sink writes from its own queue: wait until it holds what the tap counted
        while time.monotonic() < deadline:
            smp = samples(get("127.0.0.1", mport)[2])
            counted = {dict(k[1])["kind"]: v for k, v in smp.items() if k[0] == "agenttrace_records_total"}
            recs = d.records()
            kinds = {}
            for r in recs:
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
            if counted == kinds:
                break
            time.sleep(0.2)
        assert counted == kinds and kinds["alert"] >= 1 and kinds["exec"] >= 3
        alerts = {(dict(k[1])["rule"], dict(k[1])["outcome"]): v for k, v in smp.items()
                  if k[0] == "agenttrace_alerts_total"}
        file_alerts = {}
        for r in recs:
            if r["kind"] == "alert":
                key = (r["rule"]["id"], r["rule"]["outcome"])
                file_alerts[key] = file_alerts.get(key, 0) + 1
        assert alerts == file_alerts and alerts[(f"test-metrics-block-{port}", "blocked")] >= 1

        # probe state from the loaded programs: every default feature's programs are up, and
        # each cgroup program is linked to the one watched cgroup
        up = {(dict(k[1])["feature"], dict(k[1])["program"]): v for k, v in smp.items()
              if k[0] == "agenttrace_probe_up"}
        assert up[("proc", "sched:sched_process_exec")] == 1 and up[("net", "at_connect4")] == 1
        assert set(f for f, _ in up) >= {"proc", "net", "listen", "flow", "dns"} and all(v == 1 for v in up.values())
        links = {dict(k[1])["program"]: v for k, v in smp.items() if k[0] == "agenttrace_probe_cgroup_links"}
        assert links and all(v == 1 for v in links.values())
        assert smp[("agenttrace_mode", frozenset({("mode", "enforce")}))] == 1
        assert smp[("agenttrace_watched_cgroups", frozenset())] == 1
        assert any(k[0] == "agenttrace_build_info" for k in smp)
        assert smp[("process_resident_memory_bytes", frozenset())] > 0
        assert smp[("process_open_fds", frozenset())] > 0
        assert ("agenttrace_sink_drops_total", frozenset({("sink", f"syslog:tcp://127.0.0.1:{rsyslogd.tcp_port}")})) in smp
        assert get("127.0.0.1", mport, "/healthz")[2] == "ok\n"
        # what is served is what the README lists, no more, no less
        import re
        from pathlib import Path
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        para = readme[readme.index("- Metrics (`metrics.enabled`"):readme.index("### Shipping records")]
        documented = set(re.findall(r"`(agenttrace_[a-z_]+)", para))
        body = get("127.0.0.1", mport)[2]
        served = set(re.findall(r"^# TYPE (agenttrace_[a-z_]+) ", body, re.M))   # families without samples too
        assert served == documented, (served - documented, documented - served)

        # the same records, as the syslog sink's filter selects them, reached rsyslogd over
        # TCP, each once
        file_lines = [json.dumps(r, sort_keys=True) for r in d.records()
                      if r["kind"] in ("exec", "alert") and (r.get("agent") or {}).get("id", "").startswith("m")]
        assert len(file_lines) >= 4
        got = rsyslogd.wait_lines(len(file_lines))
        assert sorted(json.dumps(json.loads(m), sort_keys=True) for _, _, m in got) == sorted(file_lines)
        assert all(inp == "imtcp" for inp, _, _ in got)
    finally:
        assert d.stop() == 0
        srv.close()


def test_probe_state_is_read_from_the_loaded_programs(agent_tree):
    """Detach one cgroup program behind the tracer's back: its series goes to 0, the rest stay."""
    from agenttrace.ops.metrics import probe_states
    from agenttrace.session.pipeline import Options, Tracer
    t = Tracer(Options(cgroups=[agent_tree.root]), [])
    t.start()
    try:
        states = {(f, p): (up, n) for f, p, _h, up, n in probe_states(t.probes)}
        assert states[("net", "at_connect4")] == (True, 1) and states[("proc", "sched:sched_process_exec")][0]
        att = next(iter(t.probes._attached.values()))
        os.close(att.link_fds[0])        # at_connect4's link to the watched cgroup: detached
        states = {(f, p): (up, n) for f, p, _h, up, n in probe_states(t.probes)}
        assert states[("net", "at_connect4")] == (False, 0)
        assert states[("net", "at_connect6")] == (True, 1)
        att.link_fds[0] = os.open("/dev/null", os.O_RDONLY)   # something for close() to close
    finally:
        t.stop()
