"""Session options: every knob of a tracing session, and the checks that turn CLI flags or the
daemon config into them (see the session package for the builder)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from agenttrace.kernel.loader import DEFAULT_FEATURES, OPTIONAL_FEATURES

MODES = ("monitor", "enforce")


def _default_fence() -> list:
    from agenttrace.kernel.sockfence import default_entries
    return default_entries()


class InputError(Exception):
    """Bad CLI/config/rules input, or an environment that cannot run: exit 2, nothing started."""


@dataclass
class SessionOptions:
    cgroups: List[Path] = field(default_factory=list)      # absolute, existing
    mode: str = "monitor"
    features: tuple = DEFAULT_FEATURES
    internal: List[str] = field(default_factory=list)
    ringbuf_pages: int = 4096
    proc_table_size: int = 65536
    connect_hold_ms: int = 250           # how long a TCP connect waits for its outcome
    # Longest a record waits in the ring buffer before the reader takes it (probes/common.h
    # at_wake_flags); 0 = wake the reader on every record, the kernel's default and ~20 us of
    # BPF time per record on VMs.
    wakeup_ms: float = 5.0
    # While records keep coming, the reader may let them gather this long (ms) so each read
    # takes a batch of ~256 (ringbuf.RingReader.batch_target): fewer cold-cache wakeups, less CPU
    # per record; a fast stream already fills batches at wakeup_ms and is read at that pace.
    # Records userspace may act on ring a doorbell that ends the wait sooner (probes/common.h
    # at_doorbell), so this bounds only records no decision waits for (bench/profiles/
    # hwait-batching.md). Not above wakeup_ms = never longer than wakeup_ms.
    batch_wait_ms: float = 50.0
    stats_interval_s: float = 0.0        # 0 = no periodic stats records
    # Work per poll: at most this many records / this much time before timers, drop alerts
    # and the caller's loop (sd_notify watchdog, signals) get their turn; what is left is read
    # on the next poll without waiting. A flood costs records (dropped in the kernel, counted)
    # instead of the schedule.
    poll_max_records: int = 8192
    poll_budget_ms: float = 100.0
    labels: Dict[str, str] = field(default_factory=dict)
    rate_limit: int = 0                  # events/s per agent admitted by the kernel (0 = no limit)
    rate_burst: int = 0
    # on an agent over its rate limit: "auto" = freeze-agent in enforce mode, report in monitor
    flood_action: str = "auto"
    gpu: Any = None                      # gpu.GpuConfig; None = no GPU sampling or fence
    gpu_backend: Any = None              # a gpu.GpuBackend (tests: the fake); None = real NVML
    # rules: None = the built-in pack; [] with use_rules False = trace only
    rule_paths: Optional[List[str]] = None
    use_rules: bool = True
    egress: Optional[Dict[str, Any]] = None
    # where `egress` came from: (config file, {group: line}); errors about a group point there
    egress_origin: Optional[tuple] = None
    node: Optional[str] = None
    act_queue: int = 1024                # pending userspace actions (kills/freezes) at most
    # pinned programs (daemon pinning, run --mode enforce): seconds without a heartbeat after
    # which the pinned connect hooks deny agents every non-loopback destination (enforce mode)
    fail_closed_grace_s: float = 5.0
    sock_fence: list = field(default_factory=_default_fence)   # sockfence.FenceEntry list
    node_subnets: List[str] = field(default_factory=list)   # of `internal`: the node's own links
    # run -- CMD: capabilities taken from the command before exec (capdrop.py), for
    # lifecycle/started; None = no command of ours (--cgroup, the daemon)
    drop_caps: Optional[List[int]] = None
    # seconds between scans of the agents' packet sockets while the `packet` probe is off
    # (enrich/packetscan.py); 0 = no scan
    packet_scan_s: float = 2.0
    # a `fork` record per new process (the record contract before schema 1.2, docs/MIGRATION.md);
    # off, the kernel keeps the creator chain and exec records carry it. On anyway when a rule
    # matches kind `fork`.
    fork_records: bool = False


def features(no_net: bool = False, no_flow: bool = False, no_dns: bool = False,
             no_listen: bool = False, files: bool = False, packet: bool = False) -> tuple:
    """The probe families of a session: the full default set unless the user opts out."""
    drop = set()
    if no_net:
        # without the connect hooks there are no agent sockets to follow
        drop |= {"net", "flow", "dns", "listen", "icmp"}
    if no_flow:
        drop.add("flow")
    if no_dns:
        drop.add("dns")
    if no_listen:
        drop.add("listen")
    out = tuple(f for f in DEFAULT_FEATURES if f not in drop)
    if files:
        out += tuple(f for f in OPTIONAL_FEATURES if f == "files")
    if packet:
        out += tuple(f for f in OPTIONAL_FEATURES if f == "packet")
    return out


def check_mode(mode: str, what: str = "--mode") -> str:
    if mode not in MODES:
        raise InputError(f"{what}: '{mode}' is not one of {', '.join(MODES)}")
    return mode


def load_ruleset(opts: SessionOptions):
    """The session's rules, validated, with everything the kernel must hold checked to fit:
    a rule set that loads here always starts and always reloads. None when rules are off."""
    if not opts.use_rules and not opts.egress:
        return None
    from agenttrace.kernel.capability import CapabilityError, check
    from agenttrace.match.rules import RulesError, default_rule_paths, expand_paths, load_rules
    paths = opts.rule_paths
    for p in paths or []:
        if not Path(p).exists():
            raise InputError(f"--rules: {p} does not exist")
    # --no-rules with an egress allow-list: the allow-list alone is the rule set
    files = expand_paths(paths) if paths else default_rule_paths() if opts.use_rules else []
    try:
        rs = load_rules(files, egress=opts.egress or None, egress_origin=opts.egress_origin)
        check(rs, internal=opts.internal)
    except RulesError as e:
        raise InputError("invalid rules:\n" + "\n".join(f"  {x}" for x in e.errors)) from None
    except CapabilityError as e:
        raise InputError("rules the kernel cannot hold:\n" + "\n".join(f"  {x}" for x in e.errors)) from None
    return rs


def config_internal(cfg) -> tuple[List[str], List[str]]:
    """(internal CIDRs, of which the node's own subnets) for a config: `internal_cidrs`, plus
    the node's interface subnets (netlink, tracer/enrich/nodenet.py) unless `node_subnets_internal`
    is off. Read again on each reload: interfaces change."""
    given = [str(c) for c in cfg.internal_cidrs]
    if not getattr(cfg, "node_subnets_internal", False):
        return given, []
    from agenttrace.enrich.nodenet import node_subnets
    own = node_subnets(exclude=given)
    return given + own, own


def from_config(cfg) -> SessionOptions:
    """The daemon's session, from a validated `config.Config`."""
    from agenttrace.kernel.sockfence import parse_fence
    feats = features(files=cfg.probes.files, packet=cfg.probes.packet)
    internal, own = config_internal(cfg)
    return SessionOptions(
        cgroups=[], mode=cfg.mode, internal=internal, node_subnets=own, features=feats,
        ringbuf_pages=cfg.limits.ring_buffer_pages, proc_table_size=cfg.limits.proc_table_size,
        stats_interval_s=cfg.limits.stats_interval, gpu=cfg.gpu,
        rate_limit=cfg.limits.agent_events_per_sec,
        rate_burst=cfg.limits.agent_burst or cfg.limits.agent_events_per_sec,
        flood_action=cfg.limits.flood_action, wakeup_ms=cfg.limits.wakeup_ms,
        batch_wait_ms=cfg.limits.batch_wait_ms,
        rule_paths=list(cfg.rules) or None, egress=cfg.egress or None, node=cfg.node,
        egress_origin=(cfg.source or "<config>", dict(cfg._egress_lines)) if cfg.egress else None,
        fail_closed_grace_s=cfg.pinning.grace_s, sock_fence=[parse_fence(s) for s in cfg.socket_fence],
        packet_scan_s=cfg.probes.packet_scan_s, fork_records=cfg.probes.fork_records)


def describe(tracer) -> dict:
    """What `lifecycle/started` says is active: probes, features, rules, mode, enforcement."""
    e = tracer.engine
    from agenttrace import native
    out: Dict[str, Any] = {"features": list(tracer.opts.features),
                           "fork_records": bool(getattr(tracer, "fork_records", False)),
                           "native": native.status()}
    if getattr(tracer.opts, "node_subnets", None):
        out["node_subnets"] = list(tracer.opts.node_subnets)
    fence = getattr(tracer.opts, "sock_fence", None)
    if fence:
        from agenttrace.kernel.sockfence import spec_of, unseen
        out["socket_fence"] = {"entries": [spec_of(e) for e in fence],
                               "unseen": unseen(fence, tracer.opts.features,
                                                getattr(tracer.opts, "drop_caps", None) or ())}
        if getattr(tracer, "packet_scan", None) is not None:
            out["socket_fence"]["scan_s"] = tracer.packet_scan.interval_s
    if getattr(tracer.opts, "drop_caps", None) is not None:
        from agenttrace.session.capdrop import cap_name
        out["capabilities_dropped"] = [cap_name(c) for c in tracer.opts.drop_caps]
    if e is not None:
        rs = e.ruleset
        out["ruleset"] = {"count": len(rs.rules),
                        "files": [str(f) for f in rs.files],
                        "kernel_enforced": sorted(r.id for r in rs.rules if r.enforced_in == "kernel"),
                        "userspace_enforced": sorted(r.id for r in rs.rules if r.enforced_in == "userspace")}
    else:
        out["ruleset"] = None
    return out
