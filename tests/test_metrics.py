"""The Prometheus endpoint, scraped over loopback."""
from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from agenttrace.metrics import MetricsServer, PipelineMetrics, Registry


def scrape(server: MetricsServer, path: str = "/metrics") -> tuple:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as r:
        return r.headers["Content-Type"], r.read().decode()


def parse(text: str) -> dict:
    """{'name{labels}': value} for every sample line; checks the line grammar on the way."""
    out = {}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \S+ .*$", line), line
            continue
        m = sample.match(line)
        assert m, f"not a valid sample line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_pipeline_metrics_are_scraped_over_loopback():
    pm = PipelineMetrics()
    depths = {"sink:stdout": 3, "pipeline": 7}
    pm.registry.gauge_func("agenttrace_sink_queue_depth", "Depth per sink.", lambda: depths, ["sink"])
    pm.registry.counter_func("agenttrace_sink_dropped_total", "Drops per sink.", lambda: {"stdout": 5}, ["sink"])
    pm.events.inc(kind="exec")
    pm.events.inc(3, kind="connect")
    pm.drops.set_total(12, source="kernel_ringbuf", agent="a1")
    pm.alerts.inc(rule="tunnel.ssh", outcome="blocked")
    pm.probe_up.set(1, probe="exec")
    pm.probe_up.set(0, probe="gpu")
    pm.agents.set(2)
    srv = MetricsServer(pm.registry, "127.0.0.1", 0)
    try:
        assert srv.address[0] == "127.0.0.1"
        ctype, body = scrape(srv)
        assert ctype.startswith("text/plain; version=0.0.4")
        got = parse(body)
        assert got['agenttrace_events_total{kind="exec"}'] == 1
        assert got['agenttrace_events_total{kind="connect"}'] == 3
        assert got['agenttrace_drops_total{source="kernel_ringbuf",agent="a1"}'] == 12
        assert got['agenttrace_alerts_total{rule="tunnel.ssh",outcome="blocked"}'] == 1
        assert got['agenttrace_probe_up{probe="gpu"}'] == 0
        assert got['agenttrace_agents_watched'] == 2
        assert got['agenttrace_sink_queue_depth{sink="sink:stdout"}'] == 3
        assert got['agenttrace_sink_dropped_total{sink="stdout"}'] == 5
        assert "# TYPE agenttrace_events_total counter" in body
        assert "# TYPE agenttrace_queue_depth gauge" in body
        # Scrape-time values follow their source.
        depths["pipeline"] = 99
        assert parse(scrape(srv)[1])['agenttrace_sink_queue_depth{sink="pipeline"}'] == 99
        with pytest.raises(urllib.error.HTTPError) as ei:
            scrape(srv, "/other")
        assert ei.value.code == 404
    finally:
        srv.close()


def test_label_values_from_agents_are_escaped():
    r = Registry()
    c = r.counter("x_total", "help with \\ and\nnewline", ["agent"])
    c.inc(agent='ev"il\\\n} 1\nfake_metric 1')
    text = r.render()
    got = parse(text)
    assert "fake_metric" not in got
    assert list(k for k in got if k.startswith("x_total")) == ['x_total{agent="ev\\"il\\\\\\n} 1\\nfake_metric 1"}']


def test_a_failing_callback_does_not_break_the_scrape():
    r = Registry()
    r.gauge_func("broken", "raises", lambda: 1 / 0)
    g = r.gauge("fine", "ok")
    g.set(4)
    got = parse(r.render())
    assert got["fine"] == 4 and "broken" not in got
    assert got["agenttrace_metrics_collect_errors_total"] == 1


def test_misuse_is_refused():
    r = Registry()
    c = r.counter("a_total", "a", ["kind"])
    with pytest.raises(ValueError):
        c.inc(-1, kind="x")
    with pytest.raises(ValueError):
        c.inc(agent="x")
    with pytest.raises(ValueError):
        r.counter("a_total", "again")
    with pytest.raises(ValueError):
        r.gauge("bad-name", "x")
