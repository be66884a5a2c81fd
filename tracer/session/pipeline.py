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
from pathlib import Path
from typing import Callable, Iterable, Optional

from agenttrace import __version__
from agenttrace.kernel import wire as E
from agenttrace.kernel import ringbuf as ringbuf
from agenttrace.enrich.cgroups import AgentResolver, procs as cgroup_procs
from agenttrace.clock import SystemClock
from agenttrace.enrich.enricher import Enricher
from agenttrace.enrich.scope import Scoper
from agenttrace.session.event import Event
from agenttrace.kernel.loader import Probes
from agenttrace.session.options import SessionOptions, describe
from agenttrace.act.worker import ActJob, ActWorker
from agenttrace.enrich.proctable import ProcTable
from agenttrace.schemaver import SCHEMA_VERSION
from agenttrace.session.summary import Summaries, check_removed, finish_all
from agenttrace.timefmt import format_ns

log = logging.getLogger("agenttrace")
from agenttrace.session.flood import RATE_LIMITED  # noqa: E402  (one copy: AT_DROP_RATE_LIMITED in probes/common.h)


# The tracer's knobs are the session's options: one definition (session.py), chosen in one place.
Options = SessionOptions

# Kernel switches flipped together by set_mode (probes/agenttrace.h AT_CFG_*): the exec and
# file kills, connect blocks and protocol drops read AT_CFG_ENFORCE; the GPU fence reads it
# and AT_CFG_GPU_FENCE (GpuFence writes that one from the config).
_HOLD_EXITED_NS = 1_000_000_000     # how long an `exited` alert waits for the exit record
_NOTED = frozenset(("exit", "connect", "flow"))   # kinds whose facts `exited` outcomes report


def _fact_key(rec: dict, pid: int):
    """One process image's key for the facts `exited` outcomes report: its exec_id, the pid
    where a record has none."""
    return (rec.get("proc") or {}).get("exec_id") or pid


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
        self._flood = None         # flood.FloodGuard, made on the first drop check
        self._on_agent: list = []
        self.agents.on_new = self._agent_discovered
        self.agents.on_notice = self._notice
        self._notices: "collections.deque" = collections.deque(maxlen=1000)
        self.summaries = Summaries(self.node)
        self.summary_on_stop: Optional[str] = None   # reason: every agent's summary at stop
        # run once the probes are attached, before the `started` record: what `started` must
        # already cover (the fail-closed pins of `run --mode enforce`: a tracer killed right
        # after `started` still leaves its enforcement behind)
        self.before_started: list = []
        # the act stage: userspace actions on their own thread; the reader never waits for one
        self.act = ActWorker(getattr(engine, "actions", None) if engine is not None else None,
                             procs=self.procs, maxsize=opts.act_queue)
        if engine is not None:
            engine.defer = self._defer
        # what `exited` outcomes report: recent exit statuses, and the rule whose kernel block
        # a process met before it gave up (bounded), by exec_id: a pid handed on within the
        # hold would lend its next holder's exit to the alert (_fact_key)
        self._exits: "collections.OrderedDict[object, tuple]" = collections.OrderedDict()
        self._blocked_by: "collections.OrderedDict[object, str]" = collections.OrderedDict()
        self._await_exit: list = []

    # --- lifecycle -------------------------------------------------------------------
    packet_scan = None               # enrich.packetscan.PacketScan while it runs
    prefetch = None                  # kernel.prefetch.ProbePrefetch for start() to adopt

    def _agent_discovered(self, cid: int, ident: dict) -> None:
        self.summaries.register(ident)
        for cb in self._on_agent:
            cb(cid, ident)
        if self.gpu is not None:
            self.gpu.agent_seen(ident)

    def _notice(self, code: str, message: str) -> None:
        # may be called from other threads (the GPU sampler): queued, written by the reader
        self._notices.append((code, message))

    def _start_gpu(self) -> tuple:
        from agenttrace.gpu.service import GpuService, table_resolver
        cfg = self.opts.gpu
        self.gpu = GpuService(cfg, table_resolver(self.procs, self.agents), mode=self.opts.mode,
                              notice=self._notice, backend=self.opts.gpu_backend, node=self.node)
        self.enrich.gpu_summary = self.gpu.summary
        if cfg.fence == "off":
            return (), []
        return ("device",), self.gpu.probe_cflags()

    def start(self) -> None:
        t0 = time.monotonic()
        from agenttrace.session.probeplan import discard, learn, plan
        if self.opts.gpu is not None and getattr(self.opts.gpu, "enabled", True):
            self._start_gpu()
        rs = self.engine.ruleset if self.engine is not None else None
        features, cflags = plan(self.opts, rs)
        pre, self.prefetch = self.prefetch, None
        try:
            self.probes = Probes(features, self.opts.ringbuf_pages, extra_cflags=cflags)
        except BaseException:
            discard(pre)
            raise
        if pre is not None:
            learn(pre.rules_key, rs)
            self.probes.prefetched = pre     # adopted by load() if it guessed this plan
        try:
            self.probes.load()
            # where the verified programs came from (lifecycle/started `prefetch`): a start's
            # time reads differently for each
            prefetched = pre.started if pre is not None and pre.outcome == "used" else "none"
            if self.gpu is not None and "device" in features:
                self.gpu.install_fence(self.probes)
                self.enrich.device_names = self.gpu.device_names()
            self._write_mode()
            self._write_fork_records()
            if "sock" in features:
                from agenttrace.kernel.sockfence import write_fence
                write_fence(self.probes["sock_fence"], self.opts.sock_fence)
            self.probes.fail_closed_grace_s = self.opts.fail_closed_grace_s
            self.packet_scan = _packet_scan(self)
            if self.packet_scan is not None and "packet" in features:
                self.enrich.on_probe_socket = self.packet_scan.probe_saw
                self.packet_scan.catch_up = lambda: self._read(0)
            if self.opts.rate_limit:
                self.probes.set_flag("rate_cfg", 0, self.opts.rate_limit)
                self.probes.set_flag("rate_cfg", 1, max(self.opts.rate_burst, self.opts.rate_limit))
            if self.engine is not None:
                # the policy is in the maps before any cgroup is watched: no unenforced window
                self.install_policy(self.engine.ruleset)
            for path in self.opts.cgroups:
                self.watch(path)
            self._open_reader()
            for step in self.before_started:
                step()          # failing (a pin it could not make), it unpins with the rest
        except BaseException:
            self.probes.close()
            self.probes = None
            raise
        finally:
            discard(pre)          # a no-op once load() took it
        self.act.start()
        self.started_ns = time.time_ns()
        self._last_stats = time.monotonic()
        self._lifecycle("started", startup_ms=round((time.monotonic() - t0) * 1000, 1),
                        probes=list(features), probe_cache=self.probe_cache(), prefetch=prefetched,
                        watched=[self.agents.agent(c)["cgroup"] for c in self.probes.watched_ids()],
                        **describe(self))
        self._flush()
        # after `started` (the probes and the policy), before any record is read or command
        # started: the identity cache's reads (~55 ms) and the GPU sampler, whose thread imports
        # and opens NVML
        self.enrich.warm()
        if self.gpu is not None:
            self.gpu.start()
        from agenttrace.session.heap import settle
        settle()        # start-up's objects out of every later full collection

    def probe_cache(self) -> str:
        # a start that compiled takes seconds longer than one that did not (docs/STARTUP.md);
        # saying which lets a start time be read (and the bench tell its first start apart)
        from agenttrace.kernel import probecache
        if getattr(self.probes, "cache_hit", False):
            return "hit"
        return "off" if probecache.cache_dir() is None else "compiled"

    def install_policy(self, ruleset) -> None:
        """Compile what the kernel can enforce from `ruleset` and write it into the maps.
        capability.check proves the policy fits first, so a failure here is not a rule the
        kernel cannot hold but a map write that failed."""
        from agenttrace.kernel.capability import check
        from agenttrace.kernel.maps import PolicyWriter
        kp = check(ruleset, internal=self.opts.internal)
        if self.policy_writer is None:
            self.policy_writer = PolicyWriter(self.probes)
            self._on_agent.append(lambda cid, ident: self.policy_writer.assign(cid, ident.get("group")))
        self.policy_writer.apply(kp, {cid: a.get("group") for cid, a in self.agents.known().items()})
        from agenttrace.kernel.egress import policy_rule_namer
        self.enrich.policy_rule = policy_rule_namer(kp)
        from agenttrace.session.flood import exec_watch_names, write_exec_watch
        write_exec_watch(self.probes, exec_watch_names(ruleset))

    def _sni_blocks(self) -> bool:
        from agenttrace.session.probeplan import sni_blocks
        return sni_blocks(self.engine.ruleset if self.engine is not None else None)

    def _allow_lists(self) -> bool:
        from agenttrace.session.probeplan import allow_lists
        return allow_lists(self.engine.ruleset if self.engine is not None else None, self.opts.egress)

    def _write_mode(self) -> None:
        # every kernel enforce switch is this one map slot (AT_CFG_ENFORCE): exec kills, file
        # kills, connect blocks, protocol drops and the GPU fence cannot disagree after a reload
        self.probes.set_flag("at_config", E.CFG_ENFORCE, 1 if self.opts.mode == "enforce" else 0)

    fork_records = False         # fork records sent (kernel/forks.py); else kept in the kernel
    kernel_forks = None          # kernel/forks.KernelForks while the proc probes are loaded

    def _write_fork_records(self, ruleset=None) -> None:
        from agenttrace.kernel.forks import KernelForks, wants_fork_records, write_switch
        if ruleset is None and self.engine is not None:
            ruleset = self.engine.ruleset
        self.fork_records = wants_fork_records(self.opts, ruleset)
        if self.probes is None or "proc" not in self.probes.features:
            return
        write_switch(self.probes, self.fork_records)
        if self.kernel_forks is None:
            self.kernel_forks = KernelForks(self.probes)
            self.procs.fork_lookup = self.kernel_forks.lookup
            self.enrich.exe_ids.reborn = self.kernel_forks.forked_after
            self.act.kernel_forks = self.kernel_forks.live
            self.act.fork_lookup = self.kernel_forks.lookup
            self.summaries.quiet_forks = lambda cid: self.kernel_forks.counts(cid)["forks_quiet"]

    def set_mode(self, mode: str) -> None:
        """monitor <-> enforce, kernel and userspace together."""
        self.opts.mode = mode
        if self.probes is not None:
            self._write_mode()
        if self.gpu is not None:
            self.gpu.mode = mode
            if self.gpu.fence is not None:
                self.gpu.fence.mode = mode
        if self.engine is not None:
            self.engine.mode = mode

    def reload_rules(self, ruleset, mode: str | None = None) -> bool:
        """Swap rules (and optionally the mode) without detaching probes. The new policy is
        proven to fit before anything changes; if it does not, or writing the maps fails, the
        running policy stays and `lifecycle/reload_failed` says why (returns False)."""
        from agenttrace.kernel.capability import CapabilityError, check
        from agenttrace.kernel.maps import EnforceError
        try:
            check(ruleset, internal=self.opts.internal)
            self.install_policy(ruleset)
        except Exception as e:
            # whatever fails (maps that cannot hold it, anything unexpected), the daemon
            # keeps running on the old policy
            if isinstance(e, CapabilityError):
                msg = "; ".join(str(x) for x in e.errors)
            elif isinstance(e, (EnforceError, OSError, KeyError)):
                msg = str(e)
            else:
                msg = f"{type(e).__name__}: {e}"
            if self.engine is not None:
                try:
                    self.install_policy(self.engine.ruleset)   # the running policy, whole again
                except Exception as e2:       # pragma: no cover - maps unwritable
                    self._stage_error("reload", e2)
            self._lifecycle("reload_failed", error=msg)
            self._flush()
            return False
        if mode is not None and mode != self.opts.mode:
            self.set_mode(mode)
        self.engine.swap_rules(ruleset)
        self._write_fork_records(ruleset)     # a rule on `fork` turns the records on
        from agenttrace.session.heap import resettle
        resettle()      # the replaced rules collectable, the new ones frozen
        self._lifecycle("reloaded", rules=len(ruleset.rules), **describe(self))
        self._flush()
        return True

    def reload_failed(self, error: str) -> None:
        self._lifecycle("reload_failed", error=error)
        self._flush()

    def watch(self, path: Path, mode: str = "child", namer=None, labels: dict | None = None) -> int:
        cid = self.probes.watch(path)
        self.agents.watch(path, mode=mode, namer=namer, labels=labels)
        if "escape" in self.probes.features:
            from agenttrace.decode.escape import members, seed_members
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
            self._reader.min_gap_ns = int(self.opts.wakeup_ms * 1_000_000)
            self._reader.max_gap_ns = int(self.opts.batch_wait_ms * 1_000_000) if self.opts.wakeup_ms > 0 else 0
            bells = []
            for name in ("at_doorbell", "at_doorbell_late"):
                try:
                    bells.append(self.probes[name].map_fd)
                except KeyError:
                    break
            if bells:
                # records userspace may have to act on (escapes, execs and connects a rule
                # names) are read within --wakeup-ms, not after the reader's batch gap; execs
                # from outside the system directories within ringbuf.LATE_BELL_MS
                self._reader.attach_doorbell(*bells)
        else:
            table.open_ring_buffer(self._on_record)

    @property
    def backlog(self) -> bool:
        """Records were left in the ring at the end of the last poll (the reader is behind)."""
        return self._reader is not None and self._reader.backlog

    @property
    def records_read(self) -> int:
        return self._records

    def _read(self, wait_ms: int, bounded: bool = True) -> None:
        """Wait up to wait_ms for a wakeup, then take the records in the ring (bounded per
        poll; `drain` takes them all)."""
        if self._reader is not None:
            if self._reader.backlog:
                wait_ms = 0
            if bounded:
                self._reader.poll(wait_ms, self.opts.poll_max_records, int(self.opts.poll_budget_ms * 1e6))
            else:
                # everything already written, but not forever: an agent still flooding while
                # we stop must not keep the stop from finishing
                self._reader.poll(wait_ms, 0, 2_000_000_000)
            return
        # BCC's reader (architectures without the mmap reader) cannot be bounded: it returns
        # only once the ring is empty
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
            # (its previous record is older than the interval), so an idle reader may sleep for the
            # caller's full timeout: no 200 wakeups a second on an idle node.
            # under a steady stream the reader may wait longer to take a bigger batch
            # (--batch-wait-ms, RingReader.max_gap_ns): the wait covers its current gap
            gap_ms = -(-self._reader.gap_ns // 1_000_000) if self._reader is not None else 0
            interval = max(1, int(self.opts.wakeup_ms), gap_ms)
            wait = timeout_ms if self._quiet else min(timeout_ms, interval)
            n0, t0 = self._records, time.monotonic()
            self._read(wait)
            self._quiet = self._records == n0 and (
                self._quiet or (time.monotonic() - t0) * 1000 >= self.opts.wakeup_ms)
        else:
            self._read(timeout_ms)
        hold = self.opts.connect_hold_ms * 1_000_000
        if self.enrich.pending_due(hold):
            # what the ring already holds first: on a busy node the reader can lose the CPU
            # for longer than the hold between reading a connect and this line, while its
            # outcome waits in the ring; released before, it went out "pending"
            self._read(0)
            for ev in self.enrich.expire_pending(hold):
                self._process(ev)
        if self.gpu is not None:
            for ev in self.gpu.poll():
                self._process(self.enrich.gpu_event(ev))
        if self.act.done or self._await_exit:
            self._collect_actions()
        while self._notices:
            code, message = self._notices.popleft()
            self._lifecycle("notice", code=code, message=message)
        if time.monotonic() - self._last_tick >= 1.0:
            self._last_tick = time.monotonic()
            if self.engine is not None:
                self._alerts(self.engine.tick())
            if self.packet_scan is not None:
                if self.enrich.on_probe_socket is not None:
                    # the `packet` probe's records up to now first: a socket it answered (and a
                    # process it is killing) is then known to the scan, not found as new
                    self._read(0)
                for ev in self.packet_scan.tick():
                    self._process(ev)
            self.check_drops()
            check_removed(self)
        if self.opts.stats_interval_s and time.monotonic() - self._last_stats >= self.opts.stats_interval_s:
            self._last_stats = time.monotonic()
            self.enrich.resync_clock()
            self._lifecycle("stats", **self.counters())
        self._flush()

    def drain(self) -> None:
        """Consume what the kernel already wrote and release held connects."""
        self._read(0, bounded=False)
        for ev in self.enrich.flush_pending():
            self._process(ev)
        if self.engine is not None:
            self._alerts(self.engine.flush())
        # actions in flight finish before their alerts are written (bounded by verify time)
        self.act.wait_idle(self.act.actions.verify_s + 1.0)
        self._read(0)
        self._collect_actions(force=True)
        self._flush()

    def stop(self) -> dict:
        if self._stopped:
            return self.counters()
        self._stopped = True
        counters = {}
        try:
            if self.probes is not None:
                self.drain()
                if self.summary_on_stop:
                    finish_all(self, self.summary_on_stop)
                counters = self.counters()
                self._lifecycle("stopped", **counters)
                self._flush()
        finally:
            self.act.stop()
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

    # --- act -------------------------------------------------------------------------
    def _defer(self, job: ActJob) -> None:
        """Engine → act worker, on the reader thread at decision time."""
        job.ktime -= self.enrich.clock_offset       # wall → kernel time of the event
        job.open_target(self.kernel_forks.lookup if self.kernel_forks is not None else None)
        self.act.submit(job)

    def _collect_actions(self, force: bool = False) -> None:
        """Alerts whose action finished: written now, with the final outcome."""
        done = self.act.done
        while done:
            job = done.popleft()
            if self.engine is not None:
                self.engine.job_done(job)
            if job.alert is None:
                continue
            if job.result.outcome == "exited" and _fact_key(job.alert.record, job.pid) not in self._exits \
                    and not force:
                self._await_exit.append((time.monotonic_ns(), job))
                continue
            self._emit_acted(job)
        if self._await_exit:
            now = time.monotonic_ns()
            keep = []
            for t, job in self._await_exit:
                if _fact_key(job.alert.record, job.pid) in self._exits or force or now - t > _HOLD_EXITED_NS:
                    self._emit_acted(job)
                else:
                    keep.append((t, job))
            self._await_exit = keep

    def _emit_acted(self, job: ActJob) -> None:
        r = job.alert.record["rule"]
        if job.result.outcome == "exited":
            key = _fact_key(job.alert.record, job.pid)
            st = self._exits.get(key)
            if st is not None:
                r["exit_code"] = st[0]
                if st[1] is not None:
                    r["exit_signal"] = st[1]
            stopper = self._blocked_by.get(key)
            if stopper:
                r["stopped_by"] = stopper
                r["message"] += f" [its connect was blocked in the kernel by rule {stopper}]"
        self._alerts([job.alert])

    def _note(self, ev: Event) -> None:
        """Facts the act stage reports with `exited`: exit status, kernel blocks."""
        rec = ev.record
        key = _fact_key(rec, ev.pid)
        if ev.kind == "exit":
            d = self._exits
            d[key] = (rec.get("exit_code"), rec.get("signal"))
        elif ev.kind in ("connect", "flow"):
            net = rec.get("net")
            if not net or net.get("verdict") != "blocked":
                return
            pid = net.get("policy_id")
            rid = self.policy_writer.policy.rule_for(pid) if (pid and self.policy_writer and
                                                            self.policy_writer.policy) else None
            if not rid:
                return
            d = self._blocked_by
            d[key] = rid
        else:
            return
        d.move_to_end(key)
        if len(d) > 4096:
            while len(d) > 4096:
                d.popitem(last=False)

    # --- pipeline ----------------------------------------------------------------------
    # _on_view(view, size): the module's function below the class (typed in pipeline.pxd)

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

    # _process(ev) and _flush(): the module's functions below the class (typed in pipeline.pxd)

    def _alerts(self, alerts) -> None:
        # the engine acts (enforce mode) before returning, so each alert's outcome is final
        for al in alerts:
            # when the alert was made, next to `ts` (its trigger's): the detection latency
            al.record.setdefault("alerted", format_ns(time.time_ns()))
            for hook in self.hooks:
                try:
                    hook(al)
                except Exception as e:
                    self._stage_error("hook", e)
            self.alerts += 1
            self.counts["alert"] = self.counts.get("alert", 0) + 1
            self._batch.append(al.record)

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
            "held_connects_displaced": self.enrich.pending_displaced,
            "labels_rejected": self.agents.labels_rejected,
            "actions": {"completed": self.act.completed, "queue_full": self.act.queue_full},
            # each stage's own count, in pipeline order: where records went and where they stopped
            "stages": {
                "read": self._records,
                # reads that found records (the mmap reader): read / read_batches is the batch
                # size the reader's gap (--batch-wait-ms) reached
                "read_batches": self._reader.batches if self._reader is not None else None,
                # gaps cut short for a record userspace may act on (probes/common.h at_doorbell)
                "read_doorbell": self._reader.bell_rings if self._reader is not None else None,
                # rings the probes made (records a rule names, escapes): at most one per read;
                # late: execs from outside the system directories, and the gaps that bell cut
                "doorbell_rung": self._reader.bells if self._reader is not None else None,
                "doorbell_late": ({"rung": self._reader.late_bells, "read": self._reader.late_rings}
                                  if self._reader is not None else None),
                "decode": {"records": sum(self.enrich.by_type.values()), "unknown": self.enrich.unknown_types,
                           "by_type": {E.TYPE_NAMES.get(t, str(t)): n for t, n in self.enrich.by_type.items()}},
                # connect records that were the previous record again but for its time, built
                # from its parts (Enricher._connect_repeat); connect/accept records given the
                # proc part built for an earlier one (enrich/procshare.py)
                "enrich": {"events": sum(events.values()), "errors": self.stage_errors,
                           "connect_repeats": self.enrich.connect_repeats,
                           "proc_shared": self.enrich.shared_procs.shared},
                "match": ({"events": self.engine.stats["events"], "alerts": self.engine.stats["alerts"],
                           "suppressed": self.engine.stats["suppressed"], "errors": self.engine.stats["errors"]}
                          if self.engine is not None else None),
                "act": {"completed": self.act.completed, "queue_full": self.act.queue_full,
                        "pending": len(self._await_exit)},
                "sink": {"drops": sink_drops},
            },
            "argv_read_failures": self.enrich.argv_read_failures,
            "file_path_read_failures": self.enrich.file_path_read_failures,
            "proc_table": {"size": len(self.procs), "evictions": self.procs.evictions,
                           # records of processes gone before they were read, answered from an
                           # earlier look-up that found nothing (ProcTable.get)
                           "gone_answered": self.procs.gone_hits},
            **({"processes": {"fork_records": self.fork_records, **self.kernel_forks.stats()}}
               if self.kernel_forks is not None else {}),
            # the look-back memory of download-then-exec and GPU+network (enrich/activity.py)
            "activity": {**self.enrich.activity.counters(), "fresh_exe": dict(self.enrich.fresh_exe.stats),
                         "gpu_net": dict(self.enrich.gpu_net.stats)},
            **self._egress_counters(),
            **({"packet_scan": dict(self.packet_scan.stats)} if self.packet_scan is not None else {}),
            **self._sni_counters(),
        }

    def _egress_counters(self) -> dict:
        # the kernel DNS learner's counts: answers it could not parse are never silent
        if self.probes is None or "egress" not in self.probes.features:
            return {}
        from agenttrace.kernel.egress import egress_stats
        return {"egress_learner": egress_stats(self.probes)}

    def _sni_counters(self) -> dict:
        # the kernel server-name check's counts: names past the segment went to userspace
        if self.probes is None or "tls" not in self.probes.features:
            return {}
        from agenttrace.kernel.sniwrite import sni_stats
        return {"sni_check": sni_stats(self.probes)}

    def check_drops(self) -> None:
        """An alert when an agent's events are being dropped (flooding blinds a tracer: that
        is itself worth a human's look), by cause; in enforce mode the agent that exceeded its
        own rate limit is frozen (tracer/session/flood.py)."""
        if self.probes is None:
            return
        from agenttrace.session.flood import FloodGuard
        if self._flood is None:
            self._flood = FloodGuard(self.opts.flood_action)

        for ev, freeze in self._flood.check(self.probes.drops(), self.agents, self.opts.mode, self.node):
            if freeze:
                # off the reader, like every action: the act stage fills in the outcome
                self.act.submit(ActJob("freeze-agent", 0, ev.record["agent"]["cgroup"], 0, ev))
            else:
                self._alerts([ev])


def _on_view(self: Tracer, view, size) -> None:
    """One ring-buffer record: decoded and enriched into events, each through _process.
    Module-level, installed as Tracer._on_view (the reader's callback)."""
    self._records += 1
    try:
        for ev in self.enrich.on_view(view, size):
            _process(self, ev)
    except Exception as e:
        # one bad record or a failing enricher never stops the reader; it is counted,
        # and the first of each kind is logged so it cannot go unnoticed
        self._stage_error("decode/enrich", e)


def _process(self: Tracer, ev: Event) -> None:
    """One enriched event: counted, noted, shown to the hooks, batched for the sinks, matched.
    Module-level, installed as Tracer._process: a compiled build types its locals in
    pipeline.pxd (a plain class's method cannot be declared there)."""
    kind = ev.kind
    rec = ev.record
    counts = self.counts
    counts[kind] = counts.get(kind, 0) + 1
    # _note's own tests first: of connects and flows it keeps only kernel blocks
    if kind in _NOTED and (kind == "exit" or (rec.get("net") or {}).get("verdict") == "blocked"):
        self._note(ev)
    hooks = self.hooks
    if hooks:
        for hook in hooks:
            try:
                hook(ev)
            except Exception as e:
                self._stage_error("hook", e)
    batch = self._batch
    batch.append(rec)
    engine = self.engine
    if engine is not None:
        try:
            alerts = engine.process(ev)
        except Exception as e:
            self._stage_error("match", e)
            alerts = None
        if alerts:
            self._alerts(alerts)
    if len(batch) >= 512:
        _flush(self)


def _flush(self: Tracer) -> None:
    """The batch to the summaries and the sinks."""
    batch = self._batch
    if not batch:
        return
    self._batch = []
    for r in batch:
        if "schema_version" not in r:
            r["schema_version"] = SCHEMA_VERSION
    self.summaries.observe_batch(batch)
    for s in self.sinks:
        try:
            s.emit_batch(batch)
        except Exception:
            s.dropped = getattr(s, "dropped", 0) + len(batch)


Tracer._on_view = _on_view
Tracer._process = _process
Tracer._flush = _flush


def _packet_scan(tracer):
    """The zero-syscall-cost packet-socket scan, wherever the fence names packet sockets
    (tracer/enrich/packetscan.py). With the `packet` probe loaded too it is the backstop for what
    no syscall tracepoint sees: io_uring's IORING_OP_SOCKET and compat (`int 0x80`) socket()."""
    if tracer.opts.packet_scan_s <= 0:
        return None
    from agenttrace.enrich.packetscan import PacketScan, fenced_types
    types = fenced_types(tracer.opts.sock_fence)
    return PacketScan(tracer, types, tracer.opts.packet_scan_s) if types else None
