"""Which probe families and flags a session loads, and the guess of it made before its rules
are parsed, so the kernel can verify the probes while they are (docs/STARTUP.md).

Two of the families depend on the session's inputs beyond its options: `egress` (the DNS
learner) where an allow-list is configured, `tls` (the ClientHello name check) where a rule
blocks server names. The first is in the options; the second is only known once the rules are
compiled, so the guess takes it from what the same rule files' bytes needed last time
(kept beside the compiled probes), or, the first time, assumes a rule set needs it (the
default pack does). A wrong guess costs the speculative load, never the session: the
session's own plan is made from its rules and a prefetch made for another plan is dropped.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, List, Optional, Tuple

from agenttrace import __version__

_MEMO = "plan"


def sni_blocks(ruleset) -> bool:
    """A rule the kernel enforces by blocking TLS server names (probes/tls.c)."""
    if ruleset is None:
        return False
    from agenttrace.match.rules import sni_block
    return any(r.enforced_in == "kernel" and sni_block(r.model) for r in ruleset.rules)


def allow_lists(ruleset, egress) -> bool:
    pols = list((getattr(ruleset, "egress", None) or {}).values()) + list((egress or {}).values())
    return any(getattr(p, "mode", None) == "allow-list" or (isinstance(p, dict) and p.get("mode") == "allow-list")
               for p in pols)


def rule_features(ruleset) -> List[str]:
    """The families the rules themselves call for."""
    return ["tls"] if sni_blocks(ruleset) else []


def plan(opts, ruleset=None, from_rules: Optional[List[str]] = None) -> Tuple[tuple, List[str]]:
    """(features, extra cflags) of a session: its options, its rules (or `from_rules`, the
    families they call for, when they are not loaded yet) and its GPU fence."""
    features, cflags = tuple(opts.features), []
    if "net" in features and "egress" not in features and allow_lists(ruleset, opts.egress):
        # allow-lists by name need the kernel's DNS learner; without one it would only
        # cost its verification at every start
        features += ("egress",)
    wanted = rule_features(ruleset) if from_rules is None else from_rules
    if "flow" in features and "tls" not in features and "tls" in wanted:
        # the ClientHello server-name check (probes/tls.c): only where a rule blocks names
        features += ("tls",)
    gpu = opts.gpu
    if gpu is not None and getattr(gpu, "enabled", True) and getattr(gpu, "fence", None) != "off":
        from agenttrace.gpu.devices import nvidia_uvm_major
        if "device" not in features:
            features += ("device",)
        cflags = [f"-DAT_NVIDIA_UVM_MAJOR={nvidia_uvm_major() or 0}"]
    return features, cflags + [f"-DAT_WAKE_NS={int(opts.wakeup_ms * 1_000_000)}ULL"]


def rules_key(opts) -> Optional[List[str]]:
    """What the rule-dependent part of the plan depends on: the bytes of the rule files the
    session will read (load_ruleset's choice of files). None without rules."""
    if not opts.use_rules:
        return None
    from agenttrace.match.rulefiles import default_rule_paths, expand_paths
    files = expand_paths(opts.rule_paths) if opts.rule_paths else default_rule_paths()
    parts = [__version__]
    for f in files:
        try:
            with open(f, "rb") as fh:
                parts.append(f"{os.path.abspath(f)}:{hashlib.sha256(fh.read()).hexdigest()}")
        except OSError:
            return None       # load_ruleset reports it; nothing worth guessing
    return parts


def guess(opts) -> Tuple[tuple, List[str], Optional[List[str]]]:
    """(features, cflags, rules key) the session will most likely load, without its rules."""
    key = rules_key(opts)
    if key is None:
        return plan(opts, None, from_rules=[]) + (None,)
    from agenttrace.kernel.probecache import recall
    known: Any = recall(_MEMO, key)
    return plan(opts, None, from_rules=known if isinstance(known, list) else ["tls"]) + (key,)


def learn(key: Optional[List[str]], ruleset) -> None:
    """Keep what these rule files called for, for the next start's guess."""
    if key is None or ruleset is None:
        return
    from agenttrace.kernel.probecache import recall, remember
    wanted = rule_features(ruleset)
    if recall(_MEMO, key) != wanted:
        remember(_MEMO, key, wanted)


# A prefetch started from the command line before the CLI was imported (agenttrace/launch.py),
# for the command's own prefetch() to adopt when it guesses the same plan.
_early = None


def _start(opts):
    if os.environ.get("AGENTTRACE_PREFETCH", "").lower() in ("off", "0", "no") or os.geteuid() != 0:
        return None
    from agenttrace.kernel.loader import ProbeError, bcc_in_process
    if bcc_in_process():
        return None
    from agenttrace.kernel.prefetch import ProbePrefetch
    try:
        features, cflags, key = guess(opts)
        pf = ProbePrefetch(features, opts.ringbuf_pages, cflags)
    except (ProbeError, OSError, ValueError):
        return None           # a speed-up only: the session's own load says what is wrong
    pf.rules_key = key
    pf.guessed = (features, cflags, key, opts.ringbuf_pages)
    return pf


def start_early(opts):
    """The prefetch of a command line's guess (agenttrace/launch.py), kept for prefetch()."""
    global _early
    discard(_early)
    _early = _start(opts)
    if _early is not None:
        _early.started = "launch"
    return _early


def prefetch(opts):
    """Start loading the probes this session will most likely need (kernel/prefetch.py), on
    a thread; None where that cannot help (no root, BCC in the process, switched off with
    AGENTTRACE_PREFETCH=off). One started at launch for the same guess is adopted instead
    (its `started` is "launch"); one for another guess is closed."""
    global _early
    early, _early = _early, None
    if early is not None:
        try:
            features, cflags, key = guess(opts)
        except (OSError, ValueError):
            features = cflags = key = None
        if early.guessed == (features, cflags, key, opts.ringbuf_pages):
            return early
        early.discard()
        early.outcome = "replaced"
    return _start(opts)


def discard(pf) -> None:
    if pf is not None:
        pf.discard()
