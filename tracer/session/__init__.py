"""The one place a tracing session is chosen: features, rules, mode, GPU policy, limits, sinks.

`run`, `tail`, `daemon`, `demo` and the benchmark harness (through `run`) all build their
session here and differ only in what they watch and where records go. A front end that
assembled its own pipeline drifted once (`run` loaded two of five probe families while its
unit tests stayed green); routing every front end through `SessionOptions` and `build()` is
what keeps "what a user runs" equal to "what was tested".

Input problems raise `InputError` (the CLI exits 2, nothing is attached): rules that do not
load, or that the kernel cannot hold (`capability.check`), are found before any probe is
attached. A front end may `prefetch(opts)` first, so the kernel verifies the probes while the
rules are parsed; on an input error it `discard`s that (unattached programs and maps, closed).
"""
from __future__ import annotations

from typing import Iterable

from agenttrace.session.options import (  # noqa: F401  (the session API, in one place)
    MODES, InputError, SessionOptions, check_mode, config_internal, describe, features, from_config,
    load_ruleset)
from agenttrace.session.probeplan import discard, prefetch  # noqa: F401


def build(opts: SessionOptions, sinks: Iterable, ruleset=None, clock=None, actions=None, prefetch=None):
    """A Tracer (not started) with the rules engine of `ruleset` (load_ruleset's result);
    `prefetch`: what prefetch(opts) started before the rules were loaded, for start() to adopt."""
    from agenttrace.match.engine import Engine
    from agenttrace.session.pipeline import Tracer
    engine = Engine(ruleset, mode=opts.mode, clock=clock, actions=actions) if ruleset is not None else None
    t = Tracer(opts, sinks, engine=engine, clock=clock)
    t.prefetch = prefetch
    if opts.node:
        t.node = t.enrich.node = opts.node
    return t
