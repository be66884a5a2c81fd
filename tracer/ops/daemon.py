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

from agenttrace.enrich.cgroups import cgroup2_mount, relpath

log = logging.getLogger("agenttrace")

STATUS_PATH = Path("/run/agenttrace/status.json")


class DaemonInputError(Exception):
    """Config or rules invalid: exit 2, nothing started."""


def load_inputs(config_path: str):
    """Config + rules, all validated and proven to fit the kernel: (config, ruleset)."""
    cfg = _load_config(config_path)
    return cfg, _load_rules(config_path, cfg)


def _load_config(config_path: str):
    from agenttrace.config import ConfigError, load_config
    try:
        cfg = load_config(config_path, trust=True)
    except ConfigError as e:
        raise DaemonInputError(str(e)) from None
    except OSError as e:
        raise DaemonInputError(f"{config_path}: {e.strerror}") from None
    missing = [p for p in cfg.rules if not Path(p).exists()]
    if missing:
        raise DaemonInputError(f"{config_path}: rules: no such file or folder: {', '.join(missing)}")
    return cfg


def _load_rules(config_path: str, cfg, opts=None):
    import agenttrace.session as S
    try:
        return S.load_ruleset(opts or S.from_config(cfg))
    except S.InputError as e:
        raise DaemonInputError(f"{config_path}: {e}") from None


def _start_inputs(config_path: str):
    """load_inputs for a start: the probes are loaded (not attached) while the rules are
    parsed (session/probeplan.py); a bad rule set closes them. (config, ruleset, prefetch)."""
    import agenttrace.session as S
    cfg = _load_config(config_path)
    opts = S.from_config(cfg)
    pre = S.prefetch(opts)
    try:
        return cfg, _load_rules(config_path, cfg, opts), pre
    except BaseException:
        S.discard(pre)
        raise


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


def _tracer_from(cfg, ruleset, prefetch=None):
    import agenttrace.session as S
    from agenttrace.sinks.outputs import build_sinks
    try:
        fanout = build_sinks(cfg.sinks, queue_size=cfg.limits.sink_queue)
    except BaseException:
        S.discard(prefetch)
        raise
    return S.build(S.from_config(cfg), [fanout], ruleset, prefetch=prefetch), fanout


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
    from agenttrace.session.runner import StopFlag
    from agenttrace.ops.sdnotify import Notifier
    cfg, rs, pre = _start_inputs(config_path)      # DaemonInputError → the CLI exits 2
    notifier = Notifier()
    flag = StopFlag().install()
    tracer, fanout = _tracer_from(cfg, rs, pre)
    metrics = None
    records = heartbeat = None
    if cfg.metrics.enabled:
        from agenttrace.ops.metrics import Heartbeat, RecordCounter
        records, heartbeat = RecordCounter(), Heartbeat()
        fanout.tap(records)      # before start: the `started` record counts too
    try:
        tracer.start()
        if tracer.probe_cache() == "compiled":
            # the seconds this start spent compiling are the operator's to save: the package's
            # postinst prepared the shipped config, not one edited since (ops/prepare.py)
            log.warning("agenttrace: the probes for this config were compiled at start (not in the cache); "
                        "`agenttrace prepare --config %s` after editing the config makes the next start load "
                        "them from the cache", config_path)
        watcher = PatternWatcher(cfg.agents, tracer)
        watcher.scan()
        # connections the agents opened while no daemon ran (tracer/enrich/inventory.py)
        from agenttrace.enrich.inventory import inventory
        inventory(tracer)
        pinning = cfg.pinning.enabled and cfg.pinning.fail_mode == "closed"
        if pinning:
            tracer.probes.enable_pinning(Path(cfg.pinning.path))
            tracer.probes.remove_foreign_pins()
            tracer.keep_pins = True
        if cfg.metrics.enabled:
            metrics = _start_metrics(cfg, tracer, fanout, records, heartbeat)
        write_status(tracer, cfg, status_path)
        notifier.ready(f"watching {len(tracer.agents.known())} agent cgroups, mode {cfg.mode}")
        last = 0.0
        pinged_at = -1
        while not flag.stop:
            tracer.poll(100)
            # the watchdog vouches for the reader: it pings while the reader is caught up or
            # has taken records since the last ping, never for a loop that only spins
            if not tracer.backlog or tracer.records_read != pinged_at:
                if notifier.tick():
                    pinged_at = tracer.records_read
                if heartbeat is not None:      # /healthz vouches on the same terms
                    heartbeat.beat()
            if flag.reload:
                flag.reload = False
                notifier.reloading()
                try:
                    cfg = _reload(config_path, cfg, tracer, watcher)
                except Exception as e:      # a reload never takes the daemon down
                    log.exception("agenttrace: reload failed")
                    tracer._lifecycle("reload_failed", error=f"{type(e).__name__}: {e}")
                    tracer._flush()
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


# Sections a running daemon cannot change without reattaching probes or reopening sinks.
RESTART_SECTIONS = ("sinks", "limits", "metrics", "pinning", "probes", "node")


def _has_allow_list(egress) -> bool:
    return any(getattr(p, "mode", None) == "allow-list" for p in (egress or {}).values())


def _only_fork_records(old, new) -> bool:
    # fork records are a runtime switch (at_config), applied by a reload like the rules
    return old.model_copy(update={"fork_records": new.fork_records}) == new


def _restart_needed(old, new) -> list[str]:
    out = [k for k in RESTART_SECTIONS if getattr(old, k) != getattr(new, k)
           and not (k == "probes" and _only_fork_records(old.probes, new.probes))]
    og, ng = old.gpu, new.gpu
    # GPU policy (groups, quotas, thresholds, trainers) applies live; whether the sampler and
    # the device fence exist at all was decided when the probes were loaded
    # the DNS learner (probes/egress.c) is loaded only where an allow-list is configured
    if _has_allow_list(old.egress) != _has_allow_list(new.egress):
        out.append("egress (an allow-list turned on or off)")
    if (og is None) != (ng is None) or (og is not None and (og.enabled != ng.enabled or
                                                            (og.fence == "off") != (ng.fence == "off"))):
        out.append("gpu")
    return out


def _reload(config_path, old_cfg, tracer, watcher):
    """All of the new config and rules, or none of it: the old ones stay, and a
    `lifecycle/reload_failed` record says why (also when a section changed that only a
    restart can apply). Nothing raised while reading or applying them stops the daemon."""
    def failed(msg):
        tracer._lifecycle("reload_failed", error=msg)
        tracer._flush()
        log.error("agenttrace: reload failed, keeping the running config and rules: %s", msg.replace("\n", " "))
        return old_cfg
    try:
        cfg, rs = load_inputs(config_path)
    except DaemonInputError as e:
        return failed(str(e))
    except Exception as e:
        return failed(f"reading the config failed: {type(e).__name__}: {e}")
    later = _restart_needed(old_cfg, cfg)
    if later:
        return failed(f"{config_path}: {', '.join(later)} changed: these take effect only when the "
                      "daemon restarts; nothing was changed")
    import agenttrace.session as S
    new_internal, own = S.config_internal(cfg)
    old_internal, old_own = tracer.opts.internal, getattr(tracer.opts, "node_subnets", [])
    tracer.opts.internal, tracer.opts.node_subnets = new_internal, own
    old_forks, tracer.opts.fork_records = tracer.opts.fork_records, cfg.probes.fork_records
    try:
        ok = tracer.reload_rules(rs, mode=cfg.mode)     # policy first: it may not fit
    except Exception as e:      # reload_rules keeps the running policy whatever it raises
        tracer.opts.internal, tracer.opts.node_subnets = old_internal, old_own
        tracer.opts.fork_records = old_forks
        return failed(f"applying the rules failed: {type(e).__name__}: {e}")
    if not ok:
        tracer.opts.internal, tracer.opts.node_subnets = old_internal, old_own
        tracer.opts.fork_records = old_forks
        log.error("agenttrace: reload failed, keeping the running config and rules")
        return old_cfg
    try:
        if new_internal != old_internal:
            from agenttrace.enrich.scope import Scoper
            tracer.scoper = tracer.enrich.scoper = Scoper(internal=new_internal)
        if tracer.gpu is not None and cfg.gpu is not None:
            tracer.gpu.set_config(cfg.gpu, tracer.agents.known().values())
        watcher.watches = cfg.agents
        watcher.scan()
    except Exception as e:
        tracer._lifecycle("notice", code="reload_partial", message=f"{type(e).__name__}: {e}")
        log.error("agenttrace: reload: applying the config failed part-way: %s", e)
    return cfg


def _start_metrics(cfg, tracer, fanout, records, heartbeat):
    from agenttrace.ops.metrics import MetricsServer, make_registry
    reg = make_registry(tracer, fanout, records, max_agents=cfg.metrics.max_agents,
                        features=tracer.opts.features)
    return MetricsServer(reg, *cfg.metrics.address, health=heartbeat)
