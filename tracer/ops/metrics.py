"""Prometheus metrics with `prometheus-client`: one registry, served over HTTP by the daemon
(`/metrics`, `/healthz`), off by default, bound to 127.0.0.1 unless told.

Nothing is pushed from the hot path except one tap on the sink fan-out (`RecordCounter`) that
counts the records actually emitted, by kind and, for alerts, by rule and outcome. Everything
else already lives somewhere (kernel drop maps, sink counters, the loaded BPF programs) and is
read at scrape time by `TracerCollector`, so a scrape shows the state of the moment, not a copy.

Label cardinality is bounded: agent ids come from cgroup names (one per episode in RL training,
unbounded over a node's life), so per-agent series are kept for the `max_agents` agents with
the most drops and the rest are summed under `agent="_other"`. Rule ids come from the loaded
rule pack (bounded by it); outcomes, kinds and causes are fixed sets.
"""
from __future__ import annotations

import collections
import os
import platform
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder

from agenttrace import __version__

OTHER = "_other"


class RecordCounter:
    """A tap on the sink fan-out: counts every record emitted (what a SIEM received, before
    any per-sink filter), by kind, and alerts by rule, severity and outcome."""

    name = "metrics"

    def __init__(self) -> None:
        self.by_kind: collections.Counter = collections.Counter()
        self.alerts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, records: Iterable[dict]) -> None:
        with self._lock:
            for r in records:
                kind = r.get("kind")
                self.by_kind[kind] += 1
                if kind == "alert":
                    rule = r.get("rule") or {}
                    self.alerts[(str(rule.get("id")), str(rule.get("severity")), str(rule.get("outcome")))] += 1

    def snapshot(self) -> Tuple[dict, dict]:
        with self._lock:
            return dict(self.by_kind), dict(self.alerts)


def bounded(by_agent: Dict[str, int], limit: int) -> Dict[str, int]:
    """The `limit` agents with the largest values, the rest summed under `_other`.

    Which agents are named may change between scrapes (a counter series then appears or stops);
    the sum over all series stays the true total, which is what alerting should use."""
    if len(by_agent) <= limit:
        return dict(by_agent)
    top = sorted(by_agent.items(), key=lambda kv: (-kv[1], kv[0]))
    out = dict(top[:limit])
    out[OTHER] = out.get(OTHER, 0) + sum(v for _, v in top[limit:])
    return out


_TP = re.compile(r"^\s*TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)", re.M)
_RAW_TP = re.compile(r"^\s*RAW_TRACEPOINT_PROBE\(\s*(\w+)\s*\)", re.M)


def _fd_kind(fd: int) -> str:
    """What a file descriptor of ours refers to, from /proc: 'perf_event', 'bpf_link', 'bpf-prog'
    (empty when it is closed)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    if target.startswith("anon_inode:"):
        return target[len("anon_inode:"):].strip("[]")
    return target


def probe_states(probes) -> list:
    """One entry per BPF program the features declare: (feature, program, hook, up, links).

    `up` is read from the kernel objects the loaded BPF object holds: a tracepoint program is
    up while its perf-event (or raw tracepoint link) fd is open; a cgroup program is up when it
    is loaded and linked to every watched cgroup (`links` counts the live links)."""
    from agenttrace.paths import probes_dir
    from agenttrace.kernel.loader import FEATURES
    out = []
    bpf = getattr(probes, "bpf", None)
    tp_fds = getattr(bpf, "tracepoint_fds", {}) if bpf is not None else {}
    raw_fds = getattr(bpf, "raw_tracepoint_fds", {}) if bpf is not None else {}
    attached = list(getattr(probes, "_attached", {}).values()) if probes is not None else []
    # Probes.load appends cgroup programs in feature order, and each attachment's link fds
    # follow that order: the i-th program's link to a cgroup is that cgroup's i-th link fd.
    cgroup_funcs = list(getattr(probes, "_cgroup_funcs", [])) if probes is not None else []
    i = 0
    for feat in (probes.features if probes is not None else ()):
        fname, progs = FEATURES[feat]
        try:
            src = (probes_dir() / fname).read_text()
        except OSError:
            src = ""
        compiled = (getattr(bpf, "_obj", None) or {}).get("programs")
        for cat, ev in _TP.findall(src):
            fd = tp_fds.get(f"{cat}:{ev}".encode())
            # a tracepoint the file compiles only for some feature sets (net.c's state changes
            # go to listen.c's sock_ops program where listen is on): not this build's program
            if fd is None and compiled is not None and f"tracepoint__{cat}__{ev}" not in compiled:
                continue
            # a tracepoint file compiles only the syscalls this kernel has (files feature)
            if fd is None and cat == "syscalls" and not Path(f"/sys/kernel/tracing/events/{cat}/{ev}").exists():
                continue
            up = fd is not None and _fd_kind(fd) != ""
            out.append((feat, f"{cat}:{ev}", "tracepoint", up, 1 if up else 0))
        for ev in _RAW_TP.findall(src):
            fd = raw_fds.get(ev.encode())
            up = fd is not None and _fd_kind(fd) != ""
            out.append((feat, ev, "raw_tracepoint", up, 1 if up else 0))
        for pname, _ptype, _atype in progs:
            fn = cgroup_funcs[i][0] if i < len(cgroup_funcs) else None
            loaded = fn is not None and _fd_kind(fn.fd) != ""
            links = sum(1 for att in attached
                        if i < len(att.link_fds) and _fd_kind(att.link_fds[i]) == "bpf_link")
            out.append((feat, pname, "cgroup", loaded and links == len(attached), links))
            i += 1
    # tls, dns and icmp run inside skb.c's programs (listed under flow): each is up as they are
    from agenttrace.kernel.loader import SKB_PROGRAMS
    rows = {r[1]: r for r in out if r[2] == "cgroup"}
    for feat in (probes.features if probes is not None else ()):
        if FEATURES[feat][1] or feat == "flow":
            continue
        for pname, _atype, feats in SKB_PROGRAMS:
            if feat in feats and pname in rows:
                out.append((feat,) + rows[pname][1:])
    return out


class TracerCollector:
    """Reads a running Tracer (and its fan-out and record counter) at scrape time."""

    def __init__(self, tracer, fanout, records: RecordCounter, max_agents: int = 50,
                 features: Iterable[str] = ()):
        self.tracer, self.fanout, self.records = tracer, fanout, records
        self.max_agents = max_agents
        self.features = tuple(features)

    def describe(self):
        return []    # families are built per scrape; nothing to check at registration

    def collect(self):
        t = self.tracer
        by_kind, alerts = self.records.snapshot()
        fam = CounterMetricFamily("agenttrace_records", "Records emitted to the sinks, by kind.", labels=["kind"])
        for kind, n in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
            fam.add_metric([str(kind)], n)
        yield fam
        fam = CounterMetricFamily("agenttrace_alerts", "Alerts emitted, by rule, severity and outcome.",
                                  labels=["rule", "severity", "outcome"])
        for key, n in sorted(alerts.items()):
            fam.add_metric(list(key), n)
        yield fam

        counters = t.counters()
        d = counters["drops"]
        fam = CounterMetricFamily(
            "agenttrace_drops", "Records lost, by cause (ring_buffer_full, rate_limited: in the kernel; "
            "sink: a sink's queue or receiver) and agent (the top agents by drops, the rest as _other).",
            labels=["cause", "agent"])
        for cause, key in (("ring_buffer_full", "kernel_by_agent"), ("rate_limited", "rate_limited_by_agent")):
            for agent, n in sorted(bounded(d.get(key) or {}, self.max_agents).items()):
                fam.add_metric([cause, agent], n)
        yield fam
        fam = CounterMetricFamily("agenttrace_sink_drops", "Records a sink lost (queue full, receiver gone).",
                                  labels=["sink"])
        for sink, n in sorted((d.get("sinks") or {}).items()):
            fam.add_metric([sink], n)
        yield fam
        fam = GaugeMetricFamily("agenttrace_sink_queue_depth", "Records waiting in a sink's queue.",
                                labels=["sink"])
        for sink, n in sorted(self.fanout.depths().items()):
            fam.add_metric([sink], n)
        yield fam
        yield CounterMetricFamily("agenttrace_stage_errors", "Pipeline stage failures (counted, never fatal).",
                                  value=d.get("stage_errors", 0))

        states = probe_states(t.probes) if t.probes is not None else \
            [(f, "-", "-", False, 0) for f in self.features]
        fam = GaugeMetricFamily("agenttrace_probe_up", "1 while a BPF program is loaded and attached "
                                "(read from the loaded programs' kernel objects), else 0.",
                                labels=["feature", "program", "hook"])
        links = GaugeMetricFamily("agenttrace_probe_cgroup_links", "Live cgroup links of a cgroup program.",
                                  labels=["feature", "program"])
        for feat, prog, hook, up, n in states:
            fam.add_metric([feat, prog, hook], 1 if up else 0)
            if hook == "cgroup":
                links.add_metric([feat, prog], n)
        yield fam
        yield links
        yield GaugeMetricFamily("agenttrace_agents", "Agents currently known.", value=len(t.agents.known()))
        yield GaugeMetricFamily("agenttrace_watched_cgroups", "Cgroup subtrees watched.",
                                value=len(t.agents.watched()))
        pt = counters.get("proc_table") or {}
        yield GaugeMetricFamily("agenttrace_proc_table_size", "Processes in the process table.",
                                value=pt.get("size", 0))
        yield CounterMetricFamily("agenttrace_proc_table_evictions", "Process table evictions.",
                                  value=pt.get("evictions", 0))
        mode = GaugeMetricFamily("agenttrace_mode", "1 for the mode the tracer runs in.", labels=["mode"])
        for m in ("monitor", "enforce"):
            mode.add_metric([m], 1 if t.opts.mode == m else 0)
        yield mode


def build_info() -> Dict[str, str]:
    # BCC's version from its package files: importing bcc would map libLLVM (~64 MB) into
    # the daemon, which otherwise never loads it (tracer/kernel/probecache.py)
    import importlib.util
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        bcc_version = "missing"
    else:
        try:
            text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text)
            bcc_version = m.group(1) if m else "unknown"
        except OSError:
            bcc_version = "unknown"
    return {"version": __version__, "python": platform.python_version(), "bcc": str(bcc_version),
            "kernel": platform.release()}


class _BuildInfo:
    def collect(self):
        fam = InfoMetricFamily("agenttrace_build", "agenttrace build and platform.")
        fam.add_metric([], build_info())
        yield fam


def make_registry(tracer=None, fanout=None, records: Optional[RecordCounter] = None, max_agents: int = 50,
                  features: Iterable[str] = ()) -> CollectorRegistry:
    """The daemon's registry: build info, process and Python runtime metrics, and (given a
    tracer) the tracer's own."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_BuildInfo())
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    if tracer is not None:
        reg.register(TracerCollector(tracer, fanout, records or RecordCounter(), max_agents, features))
    return reg


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == "/healthz":
            ok, why = srv.health()  # type: ignore[attr-defined]
            body = (("ok" if ok else f"unhealthy: {why}") + "\n").encode()
            self._reply(200 if ok else 503, "text/plain; charset=utf-8", body)
            return
        if path not in ("/metrics", "/"):
            self.send_error(404)
            return
        encoder, ctype = choose_encoder(self.headers.get("Accept"))
        try:
            body = encoder(srv.registry)  # type: ignore[attr-defined]
        except Exception as e:   # a collector that fails must show, not hang the scrape
            self._reply(500, "text/plain; charset=utf-8", f"collect failed: {e}\n".encode())
            return
        self._reply(200, ctype, body)

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every 15 s would flood the journal


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    """Serves `registry` at http://host:port/metrics and liveness at /healthz on a thread.

    `health()` → (ok, reason); the daemon passes one that fails when its reader loop has not
    turned for a while (a wedged daemon answers 503 while systemd's watchdog catches up)."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464,
                 health: Optional[Callable[[], Tuple[bool, str]]] = None):
        cls = _Server
        if ":" in host:
            cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self._httpd = cls((host, port), _Handler)
        self._httpd.registry = registry  # type: ignore[attr-defined]
        self._httpd.health = health or (lambda: (True, ""))  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="agenttrace-metrics",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        a = self._httpd.server_address
        return a[0], a[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class Heartbeat:
    """The reader loop's pulse, for /healthz."""

    def __init__(self, max_silence_s: float = 10.0):
        self.max_silence_s = max_silence_s
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def __call__(self) -> Tuple[bool, str]:
        silent = time.monotonic() - self.last
        if silent > self.max_silence_s:
            return False, f"reader loop silent for {silent:.1f}s"
        return True, ""


