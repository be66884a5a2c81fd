"""`agenttrace prepare`: compile the probes a start will load into the probe cache now, so that
a node's first `agenttrace run` and first daemon start load them like every later start does.

Why: a start on an empty cache compiles its flag set with clang in a child (3.7-4.7 s on the
2-core VM) before the kernel can verify it; a warm start is ~0.6 s (docs/STARTUP.md). Every
later start with the same flags is warm, so the cost was a node's first start only, but that is
the start an operator watches (the package's first `systemctl start`, a fresh CI runner, a
demo). Setup and the Debian package's postinst run this; after editing the daemon's config,
`agenttrace prepare --config FILE` makes its next start warm again.

The plans are made exactly as the session makes its own (session/probeplan.plan with the rules
the start would load, then loader.Probes' source and flags), so what is compiled here is the
object the start looks up. What each rule set called for is also remembered (probeplan.learn),
so the launch-time prefetch guesses right at that first start too.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

DEFAULT_CONFIG = Path("/etc/agenttrace/agenttrace.yaml")


class PrepareInputError(Exception):
    """A config or rule file is invalid, or there is no cache to fill: exit 2, nothing compiled."""


@dataclass
class Plan:
    name: str            # what starts with it: `run`, `run --allow-egress`, `run OPTIONS`, `daemon --config F`
    features: tuple
    source: str
    cflags: List[str]
    outcome: str = ""    # "cached" or "compiled"
    seconds: float = 0.0
    key: str = field(default="", repr=False)


def _plan(name: str, opts, ruleset) -> Plan:
    from agenttrace.kernel.loader import Probes
    from agenttrace.kernel.probecache import cache_key
    from agenttrace.session.probeplan import learn, plan, rules_key
    features, cflags = plan(opts, ruleset)
    p = Probes(features, opts.ringbuf_pages, extra_cflags=cflags)
    src, flags = p.source(), p.cflags()
    learn(rules_key(opts), ruleset)
    return Plan(name, p.features, src, flags, key=cache_key(src, flags))


def run_plans() -> List[Plan]:
    """`agenttrace run`'s default plan (its default pack, `--gpu allow`), and the same with
    `--allow-egress` (which adds the kernel's DNS learner): what `run` loads unless told to
    load less or more (--no-*, --files, --packet, --rules)."""
    import agenttrace.session as S
    from agenttrace.gpu.service import GpuConfig, GpuGroupPolicy
    from agenttrace.kernel.egress import run_policy_shell
    out = []
    for name, egress in (("run", None), ("run --allow-egress", run_policy_shell("monitor"))):
        opts = S.SessionOptions(features=S.features(), gpu=GpuConfig(default=GpuGroupPolicy(allowed=True)),
                                egress=egress)
        try:
            rs = S.load_ruleset(opts)
        except S.InputError as e:
            raise PrepareInputError(str(e)) from None
        out.append(_plan(name, opts, rs))
    return out


def command_plan(argv: List[str]) -> Plan:
    """The plan of one `agenttrace run OPTIONS` command line (argv after `run`), read as the
    launch-time prefetch reads it (runargs.run_plan_args: only the options the probes depend on),
    with the rules it names loaded and checked as that run will."""
    import agenttrace.session as S
    from agenttrace.gpu.service import GpuConfig, GpuGroupPolicy
    from agenttrace.kernel.egress import run_policy_shell
    from agenttrace.runargs import feature_args, run_plan_args
    got = run_plan_args(argv)
    if got is None or got["gpu"] not in ("allow", "deny", "off"):
        raise PrepareInputError(f"run {' '.join(argv)}: not a command line whose probes can be told "
                                "(an option `agenttrace run` does not take, or a value it refuses)")
    fl = got["flags"]
    if got["allow_egress"] and "--no-net" in fl:
        raise PrepareInputError("--allow-egress needs the connect hooks: drop --no-net")
    opts = S.SessionOptions(
        features=S.features(**feature_args(fl)),
        rule_paths=got["rules"] or None, use_rules="--no-rules" not in fl, wakeup_ms=got["wakeup_ms"],
        gpu=None if got["gpu"] == "off" else GpuConfig(default=GpuGroupPolicy(allowed=got["gpu"] == "allow")),
        egress=run_policy_shell("monitor") if got["allow_egress"] else None)
    try:
        rs = S.load_ruleset(opts)
    except S.InputError as e:
        raise PrepareInputError(str(e)) from None
    return _plan(f"run {' '.join(argv)}", opts, rs)


def config_plan(path: Path) -> Plan:
    """The daemon's plan for this config, its rules loaded and checked as its start does."""
    import agenttrace.session as S
    from agenttrace.ops.daemon import DaemonInputError, _load_config, _load_rules
    try:
        cfg = _load_config(str(path))
        opts = S.from_config(cfg)
        rs = _load_rules(str(path), cfg, opts)
    except DaemonInputError as e:
        raise PrepareInputError(str(e)) from None
    return _plan(f"daemon --config {path}", opts, rs)


def _fill(p: Plan) -> Plan:
    from agenttrace.kernel import probecache
    t0 = time.monotonic()
    _obj, hit = probecache.compiled(p.source, p.cflags)
    p.outcome, p.seconds = ("cached" if hit else "compiled"), time.monotonic() - t0
    return p


def prepare(configs: List[Path], with_run: bool, out: Callable[[str], None],
            jobs: Optional[int] = None, command: Optional[List[str]] = None) -> List[Plan]:
    """Every plan checked first (a bad config compiles nothing), then each distinct flag set
    compiled into the cache, in parallel children (clang is single-threaded)."""
    import os

    from agenttrace.kernel import probecache
    d = probecache.cache_dir()
    if d is None:
        raise PrepareInputError("the probe cache is off (AGENTTRACE_PROBE_CACHE=off): every start compiles, "
                                "nothing to prepare")
    # the operator's input first: its errors end it soonest
    daemon = [config_plan(c) for c in configs]
    given = [command_plan(command)] if command is not None else []
    plans = (run_plans() if with_run else []) + given + daemon
    if not plans:
        raise PrepareInputError("nothing to prepare: --no-run, no -- run OPTIONS and no --config "
                                "(and no /etc/agenttrace/agenttrace.yaml)")
    distinct = {}
    for p in plans:
        distinct.setdefault(p.key, p)
    with ThreadPoolExecutor(max_workers=jobs or max(1, min(len(distinct), os.cpu_count() or 1))) as ex:
        done = {p.key: p for p in ex.map(_fill, distinct.values())}
    for p in plans:
        first = done[p.key]
        how = (f"compiled in {first.seconds:.1f} s" if first.outcome == "compiled" and first is p
               else "already in the cache" if first.outcome == "cached" else "same probes as above")
        out(f"{p.name}: {len(p.features)} probe families ({', '.join(p.features)}): {how}")
    out(f"probe cache: {d}")
    return plans
