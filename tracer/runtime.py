"""A tracing session: the one pipeline behind `run`, `tail` and `daemon`.

    ring buffer ─▶ decode ─▶ enrich ─▶ match ─▶ act ─▶ sinks

They differ only in what they watch (cgroups given, a fresh cgroup for a command, config
patterns) and where records go (stdout/file, the terminal, sockets/syslog); this class is
the same for all three.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import __version__
from . import events as E
from .cgroups import AgentResolver, procs as cgroup_procs
from .clock import SystemClock
from .enrich import Enricher
from .netscope import Scoper
from .pipeline import Event
from .probes import DEFAULT_FEATURES, Probes
from .proctable import ProcTable
from .timefmt import format_ns

log = logging.getLogger("agenttrace")


@dataclass
class Options:
    cgroups: list[Path] = field(default_factory=list)     # absolute, existing
    mode: str = "monitor"
    features: tuple = DEFAULT_FEATURES
    internal: list[str] = field(default_factory=list)
    ringbuf_pages: int = 4096
    proc_table_size: int = 65536
    connect_hold_ms: int = 250           # how long a TCP connect waits for its outcome
    stats_interval_s: float = 0.0        # 0 = no periodic stats records
    labels: dict = field(default_factory=dict)
    gpu: object = None                   # gpu.GpuConfig; None = no GPU sampling or fence
    gpu_backend: object = None           # a gpu.GpuBackend (tests: the fake); None = real NVML


class Tracer:
    def __init__(self, opts: Options, sinks: Iterable, engine=None, actor=None, clock=None):
        # actor: kept for callers that act outside the engine; the engine acts itself
        self.opts = opts
        self.sinks = list(sinks)
        self.engine = engine
        self.actor = actor
        self.clock = clock or SystemClock()
        self.node = socket.gethostname()
        self.agents = AgentResolver(labels=opts.labels)
        self.procs = ProcTable(opts.proc_table_size)
        self.scoper = Scoper(internal=opts.internal)
        self.enrich = Enricher(self.agents, self.procs, self.scoper, self.node)
        self.probes: Optional[Probes] = None
        self.counts: dict[str, int] = {}
        self.alerts = 0
        self.stage_errors = 0
        self.started_ns = 0
        self._batch: list[dict] = []
        self._lock = threading.RLock()
        self._last_stats = 0.0
        self._stopped = False
        self._logged: set = set()
        self.hooks: list[Callable[[Event], None]] = []   # extra observers (tests, gpu, tail)
        self.policy_writer = None
        self._last_tick = 0.0
        self.gpu = None
        self._on_agent: list = []
        self.agents.on_new = self._agent_discovered
        self._notices: "collections.deque" = collections.deque(maxlen=1000)

    # --- lifecycle -------------------------------------------------------------------
    def _agent_discovered(self, cid: int, ident: dict) -> None:
        for cb in self._on_agent:
            cb(cid, ident)
        if self.gpu is not None:
            self.gpu.agent_seen(ident)

    def _notice(self, code: str, message: str) -> None:
        # may be called from other threads (the GPU sampler): queued, written by the reader
        self._notices.append((code, message))

    def _start_gpu(self) -> tuple:
        from .gpu import GpuService, table_resolver
        cfg = self.opts.gpu
        self.gpu = GpuService(cfg, table_resolver(self.procs, self.agents), mode=self.opts.mode,
                              notice=self._notice, backend=self.opts.gpu_backend, node=self.node)
        self.enrich.gpu_summary = self.gpu.summary
        if cfg.fence == "off":
            return (), []
        return ("device",), self.gpu.probe_cflags()

    def start(self) -> None:
        t0 = time.monotonic()
        features, cflags = tuple(self.opts.features), []
        if self.opts.gpu is not None and getattr(self.opts.gpu, "enabled", True):
            extra, cflags = self._start_gpu()
            features += tuple(f for f in extra if f not in features)
        self.probes = Probes(features, self.opts.ringbuf_pages, extra_cflags=cflags)
        try:
            self.probes.load()
            if self.gpu is not None and "device" in features:
                self.gpu.install_fence(self.probes)
                self.enrich.device_names = self.gpu.device_names()
            if "proc" in self.opts.features:
                self.probes.set_flag("proc_enforce", 0, 1 if self.opts.mode == "enforce" else 0)
            if "net" in self.opts.features:
                self.probes.set_flag("net_config", 0, 1 if self.opts.mode == "enforce" else 0)
            if self.engine is not None:
                # the policy is in the maps before any cgroup is watched: no unenforced window
                self.install_policy(self.engine.ruleset)
            for path in self.opts.cgroups:
                self.watch(path)
            self.probes["events"].open_ring_buffer(self._on_record)
        except BaseException:
            self.probes.close()
            self.probes = None
            raise
        if self.gpu is not None:
            self.gpu.start()
        self.started_ns = time.time_ns()
        self._last_stats = time.monotonic()
        self._lifecycle("started", startup_ms=round((time.monotonic() - t0) * 1000, 1),
                        probes=list(features),
                        watched=[self.agents.agent(c)["cgroup"] for c in self.probes.watched_ids()])
        self._flush()

    def install_policy(self, ruleset) -> None:
        """Compile what the kernel can enforce from `ruleset` and write it into the maps."""
        from .enforce import PolicyWriter
        from .netscope import DEFAULT_INTERNAL
        from .policy import compile_policy
        kp = compile_policy(ruleset, internal=list(DEFAULT_INTERNAL) + list(self.opts.internal))
        if self.policy_writer is None:
            self.policy_writer = PolicyWriter(self.probes)
            self._on_agent.append(lambda cid, ident: self.policy_writer.assign(cid, ident.get("group")))
        self.policy_writer.apply(kp, {cid: a.get("group") for cid, a in self.agents.known().items()})

    def reload_rules(self, ruleset) -> None:
        """Swap rules without detaching probes; the caller has validated `ruleset`."""
        self.install_policy(ruleset)
        self.engine.swap_rules(ruleset)
        self._lifecycle("reloaded", rules=len(ruleset.rules))
        self._flush()

    def watch(self, path: Path) -> int:
        cid = self.probes.watch(path)
        self.agents.watch(path)
        # processes already inside: known from /proc so their events carry identity/ancestry
        self.procs.bootstrap(cgroup_procs(path))
        return cid

    def unwatch(self, cid: int) -> None:
        self.probes.unwatch(cid)
        self.agents.unwatch(cid)

    def poll(self, timeout_ms: int = 100) -> None:
        self.probes.bpf.ring_buffer_poll(timeout_ms)
        for ev in self.enrich.expire_pending(self.opts.connect_hold_ms * 1_000_000):
            self._process(ev)
        if self.gpu is not None:
            for ev in self.gpu.poll():
                self._process(ev)
        while self._notices:
            code, message = self._notices.popleft()
            self._lifecycle("notice", code=code, message=message)
        if self.engine is not None and time.monotonic() - self._last_tick >= 1.0:
            self._last_tick = time.monotonic()
            self._alerts(self.engine.tick())
        if self.opts.stats_interval_s and time.monotonic() - self._last_stats >= self.opts.stats_interval_s:
            self._last_stats = time.monotonic()
            self.enrich.resync_clock()
            self._lifecycle("stats", **self.counters())
        self._flush()

    def drain(self) -> None:
        """Consume what the kernel already wrote and release held connects."""
        self.probes.bpf.ring_buffer_consume()
        for ev in self.enrich.flush_pending():
            self._process(ev)
        if self.engine is not None:
            self._alerts(self.engine.flush())
        self._flush()

    def stop(self) -> dict:
        if self._stopped:
            return self.counters()
        self._stopped = True
        counters = {}
        try:
            if self.probes is not None:
                self.drain()
                counters = self.counters()
                self._lifecycle("stopped", **counters)
                self._flush()
        finally:
            if self.gpu is not None:
                self.gpu.stop()
            if self.probes is not None:
                self.probes.close()
            for s in self.sinks:
                try:
                    s.close()
                except Exception:
                    pass
        return counters

    # --- pipeline ----------------------------------------------------------------------
    def _on_record(self, _ctx, data, size) -> int:
        try:
            rtype, obj = E.decode(data, size)
            if obj is None:
                self.enrich.unknown_types += 1
                return 0
            for ev in self.enrich(rtype, obj):
                self._process(ev)
        except Exception as e:
            # one bad record or a failing enricher never stops the reader; it is counted,
            # and the first of each kind is logged so it cannot go unnoticed
            self._stage_error("decode/enrich", e)
        return 0

    def _stage_error(self, stage: str, e: Exception) -> None:
        self.stage_errors += 1
        key = (stage, type(e).__name__)
        if key not in self._logged:
            self._logged.add(key)
            import traceback
            log.error("agenttrace: %s failed (%s: %s); further such errors are only counted\n%s",
                      stage, type(e).__name__, e, traceback.format_exc())

    def _process(self, ev: Event) -> None:
        self.counts[ev.kind] = self.counts.get(ev.kind, 0) + 1
        for hook in self.hooks:
            try:
                hook(ev)
            except Exception as e:
                self._stage_error("hook", e)
        self._batch.append(ev.record)
        if self.engine is not None:
            try:
                alerts = self.engine.process(ev)
            except Exception as e:
                self._stage_error("match", e)
                alerts = []
            self._alerts(alerts)
        if len(self._batch) >= 512:
            self._flush()

    def _alerts(self, alerts) -> None:
        # the engine acts (enforce mode) before returning, so each alert's outcome is final
        for al in alerts:
            for hook in self.hooks:
                try:
                    hook(al)
                except Exception as e:
                    self._stage_error("hook", e)
            self.alerts += 1
            self.counts["alert"] = self.counts.get("alert", 0) + 1
            self._batch.append(al.record)

    def _flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        for s in self.sinks:
            try:
                s.emit_batch(batch)
            except Exception:
                s.dropped = getattr(s, "dropped", 0) + len(batch)

    def _lifecycle(self, phase: str, **extra) -> None:
        t = time.time_ns()
        rec = {"ts": format_ns(t), "kind": "lifecycle", "node": self.node, "agent": None,
               "phase": phase, "version": __version__, "mode": self.opts.mode}
        rec.update(extra)
        self._batch.append(rec)

    def emit(self, ev: Event) -> None:
        """Inject an event from another source (GPU sampler, tests) into the pipeline."""
        self._process(ev)

    def counters(self) -> dict:
        kdrops = self.probes.drops() if self.probes else {}
        by_agent: dict[str, int] = {}
        for (agent, _t), n in kdrops.items():
            aid = self.agents.agent(agent)["id"]
            by_agent[aid] = by_agent.get(aid, 0) + n
        events = {k: v for k, v in self.counts.items() if k != "alert"}
        return {
            "events": sum(events.values()),
            "events_by_kind": events,
            "alerts": self.alerts,
            "drops": {
                "kernel": sum(kdrops.values()),
                "kernel_by_agent": by_agent,
                "kernel_by_type": {E.TYPE_NAMES.get(t, str(t)): n for (_a, t), n in _sum_by_type(kdrops).items()},
                "sinks": {getattr(s, "name", type(s).__name__): getattr(s, "dropped", 0) for s in self.sinks},
                "stage_errors": self.stage_errors,
                "unknown_records": self.enrich.unknown_types,
            },
            "argv_read_failures": self.enrich.argv_read_failures,
            "proc_table": {"size": len(self.procs), "evictions": self.procs.evictions},
        }


def _sum_by_type(kdrops: dict) -> dict:
    out: dict = {}
    for (_agent, t), n in kdrops.items():
        out[(0, t)] = out.get((0, t), 0) + n
    return out
