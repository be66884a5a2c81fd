"""A small Prometheus endpoint: counters and gauges in the text exposition format (0.0.4),
served by http.server on its own thread. Off by default; binds 127.0.0.1 unless told.

Hot-path updates are a dict lookup and an add under the GIL; values that already live
elsewhere (sink drops, queue depths, probe status) are read at scrape time through
callbacks, so the pipeline does not have to push them.
"""
from __future__ import annotations

import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Number = Union[int, float]
LabelValues = Tuple[str, ...]


def _esc_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _esc_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(v: Number) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return repr(v)
    return str(v)


class Metric:
    def __init__(self, name: str, help: str, mtype: str, labelnames: Iterable[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        self.labelnames: Tuple[str, ...] = tuple(labelnames)
        for ln in self.labelnames:
            if not _LABEL.match(ln) or ln.startswith("__"):
                raise ValueError(f"bad label name {ln!r}")
        self.name, self.help, self.type = name, help, mtype
        self._values: Dict[LabelValues, Number] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._values[()] = 0

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> List[Tuple[LabelValues, Number]]:
        with self._lock:
            return list(self._values.items())

    def value(self, **labels: object) -> Number:
        return self._values.get(self._key(labels), 0)


class Counter(Metric):
    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help, "counter", labelnames)

    def inc(self, amount: Number = 1, **labels: object) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0) + amount

    def set_total(self, total: Number, **labels: object) -> None:
        """For counters kept elsewhere (a kernel map, a sink's `dropped`): publish the total."""
        k = self._key(labels)
        with self._lock:
            self._values[k] = total


class Gauge(Metric):
    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help, "gauge", labelnames)

    def set(self, value: Number, **labels: object) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = value

    def inc(self, amount: Number = 1, **labels: object) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0) + amount


Collector = Callable[[], Union[Number, Mapping[Union[str, Tuple[str, ...]], Number]]]


class _Func:
    """A metric read at scrape time: fn() → a number, or {label value(s): number}."""

    def __init__(self, name: str, help: str, mtype: str, fn: Collector, labelnames: Iterable[str]):
        if not _NAME.match(name):
            raise ValueError(f"bad metric name {name!r}")
        self.name, self.help, self.type, self.fn = name, help, mtype, fn
        self.labelnames = tuple(labelnames)

    def samples(self) -> List[Tuple[LabelValues, Number]]:
        v = self.fn()
        if isinstance(v, Mapping):
            out = []
            for k, x in v.items():
                key = k if isinstance(k, tuple) else (k,)
                if len(key) != len(self.labelnames):
                    raise ValueError(f"{self.name}: {key} does not match labels {self.labelnames}")
                out.append((tuple(str(p) for p in key), x))
            return out
        return [((), v)]


class Registry:
    def __init__(self, prefix: str = ""):
        self._metrics: Dict[str, object] = {}
        self._lock = threading.Lock()
        self.prefix = prefix
        self.errors = 0

    def _add(self, m):
        with self._lock:
            if m.name in self._metrics:
                raise ValueError(f"metric {m.name} registered twice")
            self._metrics[m.name] = m
        return m

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._add(Counter(self.prefix + name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(self.prefix + name, help, labelnames))

    def gauge_func(self, name: str, help: str, fn: Collector, labelnames: Iterable[str] = ()) -> _Func:
        return self._add(_Func(self.prefix + name, help, "gauge", fn, labelnames))

    def counter_func(self, name: str, help: str, fn: Collector, labelnames: Iterable[str] = ()) -> _Func:
        return self._add(_Func(self.prefix + name, help, "counter", fn, labelnames))

    def render(self) -> str:
        lines: List[str] = []
        with self._lock:
            metrics = list(self._metrics.values())
        for m in metrics:
            try:
                samples = m.samples()
            except Exception:
                # A callback that fails (its source is gone) must not break the whole scrape.
                self.errors += 1
                continue
            lines.append(f"# HELP {m.name} {_esc_help(m.help)}")
            lines.append(f"# TYPE {m.name} {m.type}")
            for key, v in sorted(samples, key=lambda s: s[0]):
                if key:
                    lbl = ",".join(f'{n}="{_esc_label(x)}"' for n, x in zip(m.labelnames, key))
                    lines.append(f"{m.name}{{{lbl}}} {_fmt(v)}")
                else:
                    lines.append(f"{m.name} {_fmt(v)}")
        lines.append(f"# HELP agenttrace_metrics_collect_errors_total Metric callbacks that failed during scrapes.")
        lines.append("# TYPE agenttrace_metrics_collect_errors_total counter")
        lines.append(f"agenttrace_metrics_collect_errors_total {self.errors}")
        return "\n".join(lines) + "\n"


class PipelineMetrics:
    """The metrics the daemon exposes; the pipeline updates these attributes."""

    def __init__(self, registry: Optional[Registry] = None):
        r = self.registry = registry or Registry()
        self.events = r.counter("agenttrace_events_total", "Events emitted, by kind.", ["kind"])
        self.drops = r.counter("agenttrace_drops_total",
                               "Events lost, by where (kernel ring buffer, rate limit, queue, sink) and agent.",
                               ["source", "agent"])
        self.alerts = r.counter("agenttrace_alerts_total", "Alerts raised, by rule and outcome.",
                                ["rule", "outcome"])
        self.probe_up = r.gauge("agenttrace_probe_up", "1 when a probe is attached, 0 when it failed or is off.",
                                ["probe"])
        self.queue_depth = r.gauge("agenttrace_queue_depth", "Records waiting in a queue.", ["queue"])
        self.agents = r.gauge("agenttrace_agents_watched", "Agents currently watched.")
        self.reloads = r.counter("agenttrace_reloads_total", "Config/rules reloads, by result.", ["result"])


class _Handler(BaseHTTPRequestHandler):
    registry: Registry

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.server.registry.render().encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every 15 s would flood the journal


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    """Serves `registry` at http://host:port/metrics on a background thread."""

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 9464):
        cls = _Server
        if ":" in host:
            cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        self._httpd = cls((host, port), _Handler)
        self._httpd.registry = registry  # type: ignore[attr-defined]
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
