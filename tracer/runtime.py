"""A tracing session: the one pipeline behind `run`, `tail` and `daemon`.

    ring buffer ─▶ decode ─▶ enrich ─▶ match ─▶ act ─▶ sinks

They differ only in what they watch (cgroups given, a fresh cgroup for a command, config
patterns) and where records go (stdout/file, the terminal, sockets/syslog); this class is
the same for all three.
"""
from __future__ import annotations

import collections
import ctypes as C
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import __version__
from . import events as E
from . import ringbuf
from .cgroups import AgentResolver, procs as cgroup_procs
from .clock import SystemClock
from .enrich import Enricher
from .netscope import Scoper
from .pipeline import Event
from .probes import DEFAULT_FEATURES, Probes
from .proctable import ProcTable
from .sockfence import default_entries as default_fence
from .timefmt import format_ns

log = logging.getLogger("agenttrace")
RATE_LIMITED = 0x8000   # AT_DROP_RATE_LIMITED in probes/common.h


@dataclass
class Options:
    cgroups: list[Path] = field(default_factory=list)     # absolute, existing
    mode: str = "monitor"
    features: tuple = DEFAULT_FEATURES
    internal: list[str] = field(default_factory=list)
    ringbuf_pages: int = 4096
    proc_table_size: int = 65536
    connect_hold_ms: int = 250           # how long a TCP connect waits for its outcome
    # Longest a record waits in the ring buffer before the reader takes it (probes/common.h
    # at_wake_flags); 0 = wake the reader on every record, the kernel's default and ~20 us of
    # BPF time per record on VMs.
    wakeup_ms: float = 5.0
    stats_interval_s: float = 0.0        # 0 = no periodic stats records
    labels: dict = field(default_factory=dict)
    rate_limit: int = 0                  # events/s per agent admitted by the kernel (0 = no limit)
    rate_burst: int = 0
    flood_action: str = "report"         # or "freeze-agent" (enforce mode) when events are dropped
    gpu: object = None                   # gpu.GpuConfig; None = no GPU sampling or fence
    gpu_backend: object = None           # a gpu.GpuBackend (tests: the fake); None = real NVML
    # pinned programs (daemon pinning, run --mode enforce): seconds without a heartbeat after
    # which the pinned connect hooks deny agents every non-loopback destination (enforce mode)
    fail_closed_grace_s: float = 5.0
    sock_fence: list = field(default_factory=default_fence)   # sockfence.FenceEntry list


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
        self._records = 0          # ring-buffer records taken, for the reader's idle test
        self._reader: ringbuf.RingReader | None = None   # None: BCC's callback reader
        self._quiet = False        # a full wakeup interval passed with nothing read
        self.gpu = None
        self.keep_pins = False
        self._drops_seen: dict[int, int] = {}      # daemon fail-closed: pinned enforcement outlives us
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
        if "net" in features and "egress" not in features:
            # allow-lists by name need the kernel's DNS learner wherever connects are hooked
            features += ("egress",)
        if self.opts.gpu is not None and getattr(self.opts.gpu, "enabled", True):
            extra, cflags = self._start_gpu()
            features += tuple(f for f in extra if f not in features)
        cflags = list(cflags) + [f"-DAT_WAKE_NS={int(self.opts.wakeup_ms * 1_000_000)}ULL"]
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
            if "files" in self.opts.features:
                self.probes.set_flag("file_enforce", 0, 1 if self.opts.mode == "enforce" else 0)
            if "sock" in features:
                from .sockfence import write_fence
                self.probes.set_flag("sock_config", 0, 1 if self.opts.mode == "enforce" else 0)
                write_fence(self.probes["sock_fence"], self.opts.sock_fence)
            if "escape" in features:
                self.probes.set_flag("escape_config", 0, 1 if self.opts.mode == "enforce" else 0)
            self.probes.fail_closed_grace_s = self.opts.fail_closed_grace_s
            if self.opts.rate_limit:
                self.probes.set_flag("rate_cfg", 0, self.opts.rate_limit)
                self.probes.set_flag("rate_cfg", 1, max(self.opts.rate_burst, self.opts.rate_limit))
            if self.engine is not None:
                # the policy is in the maps before any cgroup is watched: no unenforced window
                self.install_policy(self.engine.ruleset)
            for path in self.opts.cgroups:
                self.watch(path)
            self._open_reader()
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
        from .egress import policy_rule_namer
        self.enrich.policy_rule = policy_rule_namer(kp)

    def set_mode(self, mode: str) -> None:
        self.opts.mode = mode
        enforce = 1 if mode == "enforce" else 0
        for arr in ("proc_enforce", "net_config", "file_enforce", "sock_config", "escape_config"):
            try:
                self.probes.set_flag(arr, 0, enforce)
            except KeyError:
                pass
        if self.engine is not None:
            self.engine.mode = mode

    def reload_rules(self, ruleset) -> None:
        """Swap rules without detaching probes; the caller has validated `ruleset`."""
        self.install_policy(ruleset)
        self.engine.swap_rules(ruleset)
        self._lifecycle("reloaded", rules=len(ruleset.rules))
        self._flush()

    def watch(self, path: Path, mode: str = "child", namer=None, labels: dict | None = None) -> int:
        cid = self.probes.watch(path)
        self.agents.watch(path, mode=mode, namer=namer, labels=labels)
        if "escape" in self.probes.features:
            from .escape import members, seed_members
            seed_members(self.probes, members(path))
        # processes already inside: known from /proc so their events carry identity/ancestry
        self.procs.bootstrap(cgroup_procs(path))
        return cid

    def unwatch(self, cid: int) -> None:
        self.probes.unwatch(cid)
        self.agents.unwatch(cid)

    def _open_reader(self) -> None:
        table = self.probes["events"]
        if ringbuf.supported():
            self._reader = ringbuf.RingReader(table.map_fd, self.opts.ringbuf_pages * ringbuf.PAGE,
                                              self._on_view)
        else:
            table.open_ring_buffer(self._on_record)

    def _read(self, wait_ms: int) -> None:
        """Wait up to wait_ms for a wakeup, then take every record in the ring."""
        if self._reader is not None:
            self._reader.poll(wait_ms)
            return
        bpf = self.probes.bpf
        if wait_ms > 0:
            bpf.ring_buffer_poll(wait_ms)
        bpf.ring_buffer_consume()

    def poll(self, timeout_ms: int = 100) -> None:
        hb = self.probes.heartbeat if self.probes is not None else None
        if hb is not None:
            hb.beat()      # pinned enforcement (probes.enable_pinning) fails closed without it
        if self.opts.wakeup_ms > 0:
            # Most records arrive without a wakeup (probes/common.h at_wake_flags), so wait at
            # most the wakeup interval, then take whatever is in the ring. Once a whole
            # interval has passed with nothing read, every CPU's next record wakes the reader
            # (its last wakeup is older than the interval), so an idle reader may sleep for the
            # caller's full timeout: no 200 wakeups a second on an idle node.
            interval = max(1, int(self.opts.wakeup_ms))
            wait = timeout_ms if self._quiet else min(timeout_ms, interval)
            n0, t0 = self._records, time.monotonic()
            self._read(wait)
            self._quiet = self._records == n0 and (
                self._quiet or (time.monotonic() - t0) * 1000 >= self.opts.wakeup_ms)
        else:
            self._read(timeout_ms)
        for ev in self.enrich.expire_pending(self.opts.connect_hold_ms * 1_000_000):
            self._process(ev)
        if self.gpu is not None:
            for ev in self.gpu.poll():
                self._process(ev)
        while self._notices:
            code, message = self._notices.popleft()
            self._lifecycle("notice", code=code, message=message)
        if time.monotonic() - self._last_tick >= 1.0:
            self._last_tick = time.monotonic()
            if self.engine is not None:
                self._alerts(self.engine.tick())
            self.check_drops()
        if self.opts.stats_interval_s and time.monotonic() - self._last_stats >= self.opts.stats_interval_s:
            self._last_stats = time.monotonic()
            self.enrich.resync_clock()
            self._lifecycle("stats", **self.counters())
        self._flush()

    def drain(self) -> None:
        """Consume what the kernel already wrote and release held connects."""
        self._read(0)
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
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self.probes is not None:
                self.probes.close(keep_pins=self.keep_pins)
            for s in self.sinks:
                try:
                    s.close()
                except Exception:
                    pass
        return counters

    # --- pipeline ----------------------------------------------------------------------
    def _on_view(self, view, size) -> None:
        self._records += 1
        try:
            rtype, obj = E.decode_buf(view, size)
            if obj is None:
                self.enrich.unknown_types += 1
                return
            for ev in self.enrich(rtype, obj):
                self._process(ev)
        except Exception as e:
            # one bad record or a failing enricher never stops the reader; it is counted,
            # and the first of each kind is logged so it cannot go unnoticed
            self._stage_error("decode/enrich", e)

    def _on_record(self, _ctx, data, size) -> int:
        """BCC's callback (architectures without the mmap reader)."""
        self._on_view(C.string_at(data, size), size)
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
        full_by_agent: dict[str, int] = {}
        rate_by_agent: dict[str, int] = {}
        by_type: dict[str, int] = {}
        for (agent, t), n in kdrops.items():
            aid = self.agents.agent(agent)["id"]
            target = rate_by_agent if t & RATE_LIMITED else full_by_agent
            target[aid] = target.get(aid, 0) + n
            name = E.TYPE_NAMES.get(t & ~RATE_LIMITED, str(t))
            by_type[name] = by_type.get(name, 0) + n
        events = {k: v for k, v in self.counts.items() if k != "alert"}
        sink_drops: dict[str, int] = {}
        for s in self.sinks:
            if hasattr(s, "drops"):
                sink_drops.update(s.drops())
            else:
                sink_drops[getattr(s, "name", type(s).__name__)] = getattr(s, "dropped", 0)
        return {
            "events": sum(events.values()),
            "events_by_kind": events,
            "alerts": self.alerts,
            "drops": {
                "kernel": sum(full_by_agent.values()) + sum(rate_by_agent.values()),
                "kernel_by_agent": full_by_agent,
                "rate_limited_by_agent": rate_by_agent,
                "kernel_by_type": by_type,
                "sinks": sink_drops,
                "stage_errors": self.stage_errors,
                "unknown_records": self.enrich.unknown_types,
            },
            "argv_read_failures": self.enrich.argv_read_failures,
            "file_path_read_failures": self.enrich.file_path_read_failures,
            "proc_table": {"size": len(self.procs), "evictions": self.procs.evictions},
            **self._egress_counters(),
        }

    def _egress_counters(self) -> dict:
        # the kernel DNS learner's counts: answers it could not parse are never silent
        if self.probes is None or "egress" not in self.probes.features:
            return {}
        from .egress import egress_stats
        return {"egress_learner": egress_stats(self.probes)}

    def check_drops(self) -> None:
        """An alert when an agent's events are being dropped (flooding blinds a tracer: that
        is itself worth a human's look); optionally freeze the agent."""
        if self.probes is None:
            return
        per_agent: dict[int, int] = {}
        for (agent, _t), n in self.probes.drops().items():
            per_agent[agent] = per_agent.get(agent, 0) + n
        for agent, n in per_agent.items():
            before = self._drops_seen.get(agent, 0)
            if n <= before:
                continue
            self._drops_seen[agent] = n
            ident = self.agents.agent(agent)
            t = time.time_ns()
            action = self.opts.flood_action
            outcome = "reported"
            if action == "freeze-agent" and self.opts.mode == "enforce" and ident.get("cgroup"):
                from .actions import Actions
                res = Actions().freeze_cgroup(ident["cgroup"])
                outcome = res.outcome
            rec = {"ts": format_ns(t), "kind": "alert", "node": self.node, "agent": ident,
                   "trigger": "lifecycle",
                   "rule": {"id": "agenttrace-events-dropped", "category": "evasion", "severity": "high",
                            "action": action, "outcome": outcome, "tags": ["T1562"],
                            "message": f"{n - before} events of agent {ident['id']} were dropped "
                                       f"({n} in all): rate limit or full ring buffer; its activity is "
                                       "partly unseen"},
                   "drops": {"new": n - before, "total": n}}
            self._alerts([Event("alert", t, rec, 0, agent)])


