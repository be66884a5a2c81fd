"""`agenttrace daemon`: the systemd service on every GPU node.

The same Tracer as `run`; what differs is where its inputs come from (one YAML config:
agent cgroup patterns, rules, egress and GPU policy, limits) and where records go (the
configured sinks: journal via stdout, rotated file, the root-only socket `tail` attaches
to, syslog). Also: sd_notify READY/STOPPING/WATCHDOG, SIGHUP reload without detaching
probes (a bad config or rule set keeps the old one running), a status file for
`agenttrace status`, and pinned enforcement that survives a restart when configured.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import time
from pathlib import Path

from .cgroups import cgroup2_mount, relpath

log = logging.getLogger("agenttrace")

STATUS_PATH = Path("/run/agenttrace/status.json")


class DaemonInputError(Exception):
    """Config or rules invalid: exit 2, nothing started."""


def load_inputs(config_path: str):
    """Config + rules + compiled policy, all validated: (config, engine_ruleset)."""
    from .config import ConfigError, load_config
    from .netscope import DEFAULT_INTERNAL
    from .policy import PolicyError, compile_policy
    from .rules import RulesError, default_rule_paths, expand_paths, load_rules
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise DaemonInputError(str(e)) from None
    except OSError as e:
        raise DaemonInputError(f"{config_path}: {e.strerror}") from None
    missing = [p for p in cfg.rules if not Path(p).exists()]
    if missing:
        raise DaemonInputError(f"{config_path}: rules: no such file or folder: {', '.join(missing)}")
    paths = expand_paths(cfg.rules) if cfg.rules else default_rule_paths()
    try:
        rs = load_rules(paths, egress=cfg.egress or None)
        compile_policy(rs, internal=list(DEFAULT_INTERNAL) + [str(c) for c in cfg.internal_cidrs])
    except RulesError as e:
        raise DaemonInputError("invalid rules:\n" + "\n".join(f"  {x}" for x in e.errors)) from None
    except PolicyError as e:
        raise DaemonInputError(f"rules cannot be enforced: {e}") from None
    return cfg, rs


class PatternWatcher:
    """Finds the cgroups the config's `agents` patterns match, now and as they appear."""

    def __init__(self, watches, tracer):
        self.watches = watches
        self.tracer = tracer
        self.mount = cgroup2_mount()
        self.watched: dict[Path, int] = {}

    def _matches(self, w) -> list[Path]:
        pat = w.cgroup.strip("/")
        if not pat:
            return [self.mount]
        if not any(c in pat for c in "*?["):
            p = self.mount / pat
            return [p] if (p / "cgroup.procs").exists() else []
        return sorted(p for p in self.mount.glob(pat) if (p / "cgroup.procs").exists())

    def scan(self) -> list[str]:
        new = []
        seen = set()
        for w in self.watches:
            for path in self._matches(w):
                seen.add(path)
                if path in self.watched:
                    continue
                labels = dict(w.labels)

                def namer(rel, cid, w=w):
                    return w.agent_id(rel, cid)
                try:
                    self.watched[path] = self.tracer.watch(path, mode=w.agent, namer=namer, labels=labels)
                    new.append(relpath(path))
                except FileNotFoundError:
                    continue
        for path in list(self.watched):
            if path not in seen and not path.exists():
                self.tracer.unwatch(self.watched.pop(path))
        return new


def _tracer_from(cfg, ruleset):
    from .engine import Engine
    from .runtime import Options, Tracer
    from .sinks import build_sinks
    from .sockfence import parse_fence
    gpu = None
    if cfg.gpu is not None:
        from .gpu import GpuConfig
        gpu = cfg.gpu if isinstance(cfg.gpu, GpuConfig) else GpuConfig.model_validate(cfg.gpu)
    fanout = build_sinks(cfg.sinks, queue_size=cfg.limits.sink_queue)
    from .probes import DEFAULT_FEATURES
    features = DEFAULT_FEATURES + (("files",) if cfg.probes.files else ())
    opts = Options(cgroups=[], mode=cfg.mode, internal=[str(c) for c in cfg.internal_cidrs], features=features,
                   ringbuf_pages=cfg.limits.ring_buffer_pages, proc_table_size=cfg.limits.proc_table_size,
                   stats_interval_s=60.0, gpu=gpu,
                   rate_limit=cfg.limits.agent_events_per_sec,
                   rate_burst=cfg.limits.agent_burst or cfg.limits.agent_events_per_sec,
                   flood_action=cfg.limits.flood_action, wakeup_ms=cfg.limits.wakeup_ms,
                   fail_closed_grace_s=cfg.pinning.grace_s,
                   sock_fence=[parse_fence(s) for s in cfg.socket_fence])
    t = Tracer(opts, [fanout], engine=Engine(ruleset, mode=cfg.mode))
    if cfg.node:
        t.node = t.enrich.node = cfg.node
    return t, fanout


def write_status(tracer, cfg, path: Path = STATUS_PATH) -> None:
    st = {"pid": os.getpid(), "mode": cfg.mode, "config": cfg.source,
          "probes": list(tracer.probes.features) if tracer.probes else [],
          "agents": sorted({a["id"] for a in tracer.agents.known().values()}),
          "watched": [relpath(p) for p in tracer.agents.watched().values()],
          "pinning": {"enabled": cfg.pinning.enabled, "fail_mode": cfg.pinning.fail_mode},
          "counters": tracer.counters(), "updated": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def run_daemon(config_path: str, status_path: Path = STATUS_PATH) -> int:
    from .runner import StopFlag
    from .sdnotify import Notifier
    cfg, rs = load_inputs(config_path)          # DaemonInputError → the CLI exits 2
    notifier = Notifier()
    flag = StopFlag().install()
    tracer, fanout = _tracer_from(cfg, rs)
    metrics = None
    try:
        tracer.start()
        watcher = PatternWatcher(cfg.agents, tracer)
        watcher.scan()
        pinning = cfg.pinning.enabled and cfg.pinning.fail_mode == "closed"
        if pinning:
            tracer.probes.enable_pinning(Path(cfg.pinning.path))
            tracer.probes.remove_foreign_pins()
            tracer.keep_pins = True
        if cfg.metrics.enabled:
            metrics = _start_metrics(cfg, tracer, fanout)
        write_status(tracer, cfg, status_path)
        notifier.ready(f"watching {len(tracer.agents.known())} agent cgroups, mode {cfg.mode}")
        last = 0.0
        while not flag.stop:
            tracer.poll(100)
            notifier.tick()
            if flag.reload:
                flag.reload = False
                notifier.reloading()
                cfg = _reload(config_path, cfg, tracer, watcher)
                notifier.ready()
            now = time.monotonic()
            if now - last >= 2.0:
                last = now
                watcher.scan()
                write_status(tracer, cfg, status_path)
        notifier.stopping()
    finally:
        flag.restore()
        tracer.stop()
        if metrics is not None:
            metrics.close()
        try:
            status_path.unlink()
        except OSError:
            pass
    return 0


def _reload(config_path, old_cfg, tracer, watcher):
    """New config and rules, or the old ones with the reason in a lifecycle record."""
    try:
        cfg, rs = load_inputs(config_path)
    except DaemonInputError as e:
        tracer._lifecycle("reload_failed", error=str(e))
        tracer._flush()
        log.error("agenttrace: reload failed, keeping the running config and rules:\n%s", e)
        return old_cfg
    if cfg.mode != tracer.opts.mode:
        tracer.set_mode(cfg.mode)
    if cfg.probes.files != ("files" in tracer.opts.features):
        # the probes stay attached across a reload: adding/removing one needs a restart
        tracer._lifecycle("notice", code="restart_needed",
                          message="probes.files changed: it takes effect when the daemon restarts")
    tracer.reload_rules(rs)
    watcher.watches = cfg.agents
    watcher.scan()
    return cfg


def _start_metrics(cfg, tracer, fanout):
    from .metrics import MetricsServer, Registry
    reg = Registry()
    reg.counter_func("agenttrace_events_total", "Events by kind",
                   lambda: {(k,): v for k, v in tracer.counts.items()}, ["kind"])
    reg.counter_func("agenttrace_kernel_drops_total", "Ring-buffer drops by agent",
                   lambda: {(a,): n for a, n in tracer.counters()["drops"]["kernel_by_agent"].items()}, ["agent"])
    reg.counter_func("agenttrace_sink_drops_total", "Drops by sink",
                   lambda: {(k,): v for k, v in fanout.drops().items()}, ["sink"])
    reg.gauge_func("agenttrace_queue_depth", "Sink queue depths",
                   lambda: {(k,): v for k, v in fanout.depths().items()}, ["sink"])
    reg.counter_func("agenttrace_alerts_total", "Alerts raised", lambda: tracer.alerts)
    reg.gauge_func("agenttrace_probe_up", "Probes loaded and attached",
                   lambda: {(f,): 1 if tracer.probes else 0 for f in tracer.opts.features}, ["probe"])
    return MetricsServer(reg, *cfg.metrics.address)
