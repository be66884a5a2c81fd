"""The match and act stages: events in, alert events out.

    engine = Engine(load_rules(paths), mode="enforce")
    for alert in engine.process(event): sink.emit(alert.record)
    ...                                  # about once a second:
    for alert in engine.tick(): sink.emit(alert.record)

Rules are indexed by event kind; a rule's declarative `match` runs before its CEL
`condition`, and a `window` counts what passed both. Every matching event is acted on (in
enforce mode), but alerts are de-duplicated: the first (rule, agent, key fields) alert goes
out, repeats within the rule's span are counted, and a later alert with `rule.repeats`
summarises them — so a looping agent produces a handful of records, not a million.

CEL library choice (measured on this machine, Python 3.11, same expression, same record,
20k evaluations; `proc.comm in ["ssh","autossh","dbclient"] && proc.args.exists(a, a ==
"-R" || a.startsWith("-R") || a.startsWith("RemoteForward"))`):
    cel-expr-python 0.1.3 (C++ cel-cpp)      ~8-10 µs/eval   (`kind == "exec"`: ~3 µs)
    common-expression-language 0.10.0 (Rust) ~30 µs/eval     (`kind == "exec"`: ~29 µs)
cel-expr-python is 3-10x faster and, more importantly, type-checks at compile time (with
declared variable types, `net.dst.port == "22"` and the misspelt `proc.argz` are load errors
in rules.py; common-expression-language accepted both and would only fail, or silently not
match, at evaluation). Only the record sections an expression names are converted per event.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from agenttrace.act.actions import ActionResult, Actions
from agenttrace.clock import Clock, SystemClock
from agenttrace.session.event import Event
from agenttrace.match.celgate import gate as cel_gate, has_field
from agenttrace.match.rules import CompiledMatch, Rule, RuleSet, load_rules

MODES = ("monitor", "enforce")

_MISSING = object()


def get_path(rec: dict, path: str) -> Any:
    cur: Any = rec
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
            if cur is _MISSING:
                return None
        else:
            return None
    return cur


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _scopes_of(rule: Rule) -> frozenset:
    """The destination scopes a rule's match requires (empty: any). Rules the kernel decides
    (kernel_rule: the record's policy_rule is the answer, whatever the scope) require none."""
    m = rule.match
    if m is None or m.kernel_rule is not None or not m.has_dst:
        return frozenset()
    return m.scopes


def _ports_of(rule: Rule) -> frozenset:
    """The destination ports a rule's match requires (empty: any, or ranges too wide to list).
    Same exemption as scopes: a kernel-decided rule is answered by the record's policy_rule."""
    m = rule.match
    if m is None or m.kernel_rule is not None or not m.has_dst or m.port_ranges:
        return frozenset()
    return m.ports


def cmdline_only(m) -> Optional[Callable[[dict], bool]]:
    """For a compiled `match` whose only test is `exe.cmdline_regex` (the default pack's
    stratum-URL rule, met by every exec), the same test without CompiledMatch's walk over
    every empty criterion: any pattern found in the space-joined argv. None otherwise."""
    if not isinstance(m, CompiledMatch) or not m.has_exe or not m.cmdline_regex:
        return None
    try:
        bare = dataclasses.replace(m, has_exe=False, cmdline_regex=())
        if bare != CompiledMatch():
            return None
    except Exception:
        return None
    cre = tuple(m.cmdline_regex)
    # the last argv list asked about and its answer: the enricher shares one list between the
    # execs of equal argv (enrich/decodecache.py), so a storm's execs are answered without the
    # join and the search. Keyed by identity, and the list is held, so its id cannot be reused
    # by another list while it is the key; nothing mutates a record's args.
    last: list = [None, False]

    def match(rec: dict) -> bool:
        proc = rec.get("proc")
        if not proc:
            return False
        args = proc.get("args")
        if args is last[0] and args is not None:
            return last[1]
        line = " ".join(args or [])
        hit = False
        for r in cre:
            if r.search(line):
                hit = True
                break
        if type(args) is list:
            last[0], last[1] = args, hit
        return hit
    return match


def _presence(keys: tuple) -> Callable[[dict], tuple]:
    """proc -> whether each of `keys` is in it, as a tuple (part of a candidate-cache key):
    asked for every exec and connect, so no generator for the usual one or two keys."""
    if len(keys) == 1:
        k0, = keys
        return lambda proc: (k0 in proc,)
    if len(keys) == 2:
        k0, k1 = keys
        return lambda proc: (k0 in proc, k1 in proc)
    return lambda proc: tuple([k in proc for k in keys])


def _needs_name(rule: Rule) -> bool:
    """Whether the rule's match holds only for a record with a host name (net.dst.name, a DNS
    query or a flow's server name): a `names` list is an AND like scopes. Same exemption for
    kernel-decided rules, whose answer is the record's policy_rule."""
    m = rule.match
    return m is not None and m.kernel_rule is None and m.has_dst and m.names is not None


_PORT_IX_CACHE = 4096      # (scope, port) candidate tuples kept per kind


def _agent_id(rec: dict) -> str:
    a = rec.get("agent") or {}
    return str(a.get("id") or a.get("cgroup_id") or "?")


def _fmt_dst(net: dict) -> str:
    dst = net.get("dst") or {}
    addr = dst.get("addr", "?")
    host = f"[{addr}]" if ":" in str(addr) else str(addr)
    s = f"{host}:{dst.get('port', '?')}"
    if dst.get("name"):
        s += f" ({dst['name']})"
    if dst.get("scope"):
        s += f" {dst['scope']}"
    return s


def describe_event(rec: dict) -> str:
    """A short human summary of what the event shows (used in alert messages)."""
    proc = rec.get("proc") or {}
    who = proc.get("comm") or (proc.get("exe") or "?").rsplit("/", 1)[-1]
    kind = rec.get("kind")
    if kind == "exec":
        cmd = " ".join(proc.get("args") or []) or proc.get("exe") or "?"
        return f"exec {cmd[:300]}"
    if kind in ("connect", "flow") and rec.get("net"):
        s = f"{who} → {_fmt_dst(rec['net'])}"
        fl = rec.get("flow")
        if fl and fl.get("protocol"):
            s += f" speaking {fl['protocol']}"
        return s
    if kind == "dns" and rec.get("dns"):
        return f"{who} resolved {rec['dns'].get('query')}"
    if kind == "device" and rec.get("device"):
        d = rec["device"]
        return f"{who} opened device {d.get('major')}:{d.get('minor')}"
    if kind == "file" and rec.get("file"):
        f = rec["file"]
        verb = {"read": "read", "write": "wrote"}.get(f.get("op"), f.get("op"))
        s = f"{who} {verb} {f.get('class')} {f.get('path') or '<unreadable path>'} ({f.get('syscall')})"
        if f.get("verdict") == "killed":
            s += ("; killed after the new name was in place" if f.get("kill_effect") == "name_in_place"
                  else "; killed at open, before any byte was read or written")
        return s
    if kind == "gpu" and rec.get("gpu"):
        g = rec["gpu"]
        return f"{who} on GPU {g.get('index')} ({g.get('used_memory_mib')} MiB, {g.get('sm_util_pct')}% SM)"
    return f"{kind} by {who}"


def render_message(rule: Rule, rec: dict, window: Optional[dict] = None) -> str:
    if rule.message:
        import re

        def sub(m):
            k = m.group(1)
            if window is not None and k.startswith("window."):
                v = window.get(k[7:])
            else:
                v = get_path(rec, k)
            if isinstance(v, list):
                v = " ".join(str(x) for x in v)
            elif isinstance(v, float):
                v = format(v, "g")
            return "?" if v is None else str(v)[:300]
        return re.sub(r"\{([a-z_][\w.]*)\}", sub, rule.message)
    msg = describe_event(rec)
    if window is not None:
        what = "distinct " + "+".join(window["fields"]) if window.get("fields") else "events"
        msg += f"; {window['count']} {what} in {window['seconds']:g}s"
    return msg


def _action(rule: Rule) -> str:
    """What userspace does for `rule` once the kernel did not block the event: a `block` the
    kernel could not apply this time (Rule.fallback) is done as the fallback says."""
    if rule.action == "block" and rule.fallback:
        return rule.fallback
    return rule.action


@dataclass
class _Win:
    keys: "OrderedDict[Any, int]" = field(default_factory=OrderedDict)   # distinct value → last seen
    times: deque = field(default_factory=deque)                           # plain count
    fired: bool = False                 # an episode is open
    fired_count: int = 0                # count when the alert fired
    reported_count: int = 0             # count in the last alert/summary sent
    episode_keys: set = field(default_factory=set)
    episode_count: int = 0
    last_seen: int = 0
    summary_at: int = 0
    last_event: Optional[Event] = None
    outcome: str = "reported"


@dataclass
class _Dup:
    first_ns: int
    span_ns: int
    rule: Rule
    suppressed: int = 0
    last_event: Optional[Event] = None
    outcomes: Counter = field(default_factory=Counter)


class _ReplayClock:
    """Time follows the replayed events, so windows and de-dup spans mean what they mean live."""

    def __init__(self) -> None:
        self.now = 0

    def monotonic_ns(self) -> int:
        return self.now

    def wall_ns(self) -> int:
        return self.now


class Engine:
    """Match events against a RuleSet and act on them.

    mode: "monitor" reports only; "enforce" applies rule actions through `actions`.
    Memory is bounded: at most `max_agents` agents with window state (least recently seen
    evicted), `max_keys` distinct values per (agent, window rule), `max_dedup` de-dup
    entries; every eviction is counted in `stats`."""

    def __init__(self, ruleset: RuleSet, mode: str = "monitor", clock: Optional[Clock] = None,
                 actions: Optional[Actions] = None, max_agents: int = 4096, max_keys: int = 4096,
                 max_dedup: int = 65536):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.clock = clock or SystemClock()
        self._actions = actions
        self.max_agents = max_agents
        self.max_keys = max_keys
        self.max_dedup = max_dedup
        self._lock = threading.Lock()
        self._windows: "OrderedDict[str, Dict[str, _Win]]" = OrderedDict()
        self._dedup: "OrderedDict[Tuple, _Dup]" = OrderedDict()
        self._pending: List[Event] = []
        self.stats: Dict[str, Any] = {
            "events": 0, "alerts": 0, "suppressed": 0, "summaries": 0, "cel_errors": 0,
            "window_key_evictions": 0, "window_agent_evictions": 0, "dedup_evictions": 0,
            "action_failures": 0, "errors": 0, "last_error": None, "matched": Counter(),
        }
        # Set by the pipeline: userspace actions (kill, kill-agent, freeze-agent) in enforce
        # mode go to the act worker (act.ActWorker) instead of running here, so matching never
        # waits for a kill to be verified. Unset (offline replay, unit tests): acted inline.
        self.defer: Optional[Callable[[Any], None]] = None
        self._set_rules(ruleset)

    # ------------------------------------------------------------------ rules
    def _set_rules(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        # rule id -> a match specialised to what it tests, where it tests only the command line
        self._matchers = {r.id: f for r in ruleset.rules if (f := cmdline_only(r.match)) is not None}
        self._by_kind = {k: tuple(v) for k, v in ruleset.by_kind.items()}
        self._gated_kinds = frozenset(k for k, v in ruleset.by_kind.items()
                                      if any(r.gate or r.exe_prefixes for r in v))
        # gated kinds with rules keyed by exe prefix: proc.exe is then part of the candidate key
        self._prefix_kinds = frozenset(k for k, v in ruleset.by_kind.items() if any(r.exe_prefixes for r in v))
        self._lists = ruleset.lists
        # Per kind, the rules that can match a destination of each scope: a rule whose `match`
        # names scopes cannot match any other (the scope is an AND at the top of the match),
        # so a loopback connect meets 2 of the pack's 11 connect rules, not all of them.
        self._by_scope = {}
        for kind, rules in self._by_kind.items():
            if not any(_scopes_of(r) for r in rules):
                continue
            self._by_scope[kind] = {
                sc: tuple(r for r in rules if not _scopes_of(r) or sc in _scopes_of(r))
                for sc in ("loopback", "internal", "metadata", "external")}
        # Per kind whose rules name ports: a rule listing ports cannot match any other (ports
        # are an AND like scopes), so the candidates for one (scope, port) are computed once
        # and kept: with hundreds of port rules a connect meets only those naming its port.
        self._port_kinds = frozenset(k for k, rules in self._by_kind.items() if any(_ports_of(r) for r in rules))
        self._port_ix: Dict[tuple, tuple] = {}
        self._gate_cache: Dict[tuple, tuple] = {}
        # (kind rules, kind, net, proc) of the last record that met no candidate (process)
        self._no_cand: tuple = (None, None, None, None, None)
        # Per gated kind (exec): exact name -> positions of the rules it opens, and the rules
        # without a gate; an exec of a name no rule names meets only the latter.
        self._gate_ix = {}
        for kind, rules in self._by_kind.items():
            if kind in self._by_scope or not any(r.gate or r.exe_prefixes for r in rules):
                continue
            names: Dict[str, set] = {}
            for i, r in enumerate(rules):
                for n in r.gate or ():
                    names.setdefault(n, set()).add(i)
            self._gate_ix[kind] = (names, tuple(r for r in rules if r.gate is None))
        # Per gated kind: rules with no `match` whose condition starts with has(proc.KEY) can
        # hold only for a record whose proc has KEY (celgate.has_field); the presence of each
        # such KEY is part of the candidate key, so an exec without `ssh` or `fresh_exe` does
        # not meet the rules that need them (two CEL gates per exec in the default pack).
        self._needs_key = {}
        for kind in set(self._gate_ix) | self._port_kinds:   # the kinds with a candidate cache
            need = {}       # rule id -> the proc key it needs (ids, not positions: unique)
            for r in self._by_kind[kind]:
                if r.match is None and r.condition is not None:
                    f = has_field(r.condition.source)
                    if f is not None and len(f) == 2 and f[0] == "proc":
                        need[r.id] = f[1]
            if need:
                keys = tuple(sorted(set(need.values())))
                self._needs_key[kind] = (keys, need, _presence(keys))
        # the candidates left, by the values their conditions first compare (match/eqindex.py):
        # an accept does not meet the `net.what == "listen"` rule
        from agenttrace.match.eqindex import EqIndex
        self._eq_ix = {k: ix for k, rules in self._by_kind.items() if (ix := EqIndex.for_rules(rules)) is not None}
        # kinds whose candidates only net.dst and proc choose (scope and port indexes, the
        # program gate, the name and proc-key tests): not those that index reads more of net
        self._dst_keyed = frozenset(k for k in set(self._by_scope) | self._port_kinds if k not in self._eq_ix)
        # kinds that index is the only one of: their candidates are chosen first (process)
        self._eq_only = frozenset(k for k in self._eq_ix if k not in self._by_scope
                                  and k not in self._port_kinds and k not in self._gated_kinds)
        # conditions whose first conjunct the record's own fields can decide (match/celgate.py)
        self._gates = {}
        for r in ruleset.rules:
            if r.condition is not None:
                g = cel_gate(r.condition.source)
                if g is not None:
                    self._gates[r.id] = g

    @property
    def actions(self) -> Actions:
        if self._actions is None:
            self._actions = Actions()
        return self._actions

    def swap_rules(self, ruleset: RuleSet) -> None:
        """Install a new rule set. Window and de-dup state survive for rules whose id (and,
        for windows, whose window definition) is unchanged; the rest is dropped."""
        with self._lock:
            keep_win = {r.id for r in ruleset.rules if r.window is not None and
                        (old := self.ruleset.get(r.id)) is not None and old.window == r.window}
            for agent, states in list(self._windows.items()):
                for rid in list(states):
                    if rid not in keep_win:
                        del states[rid]
                if not states:
                    del self._windows[agent]
            new_by_id = {r.id: r for r in ruleset.rules}
            for key, d in list(self._dedup.items()):
                if key[0] not in new_by_id:
                    del self._dedup[key]
                    # counted repeats of a removed rule still go out, with the next tick
                    self._summary(key, d, self._pending)
                else:
                    d.rule = new_by_id[key[0]]
            self._set_rules(ruleset)

    # ------------------------------------------------------------------ evaluation
    def _cel(self, rule: Rule, rec: dict) -> bool:
        c = rule.condition
        g = self._gates.get(rule.id)
        if g is not None:
            decided = g(rec)
            if decided is not None:
                return decided
        data = {}
        for v in c.variables:
            if v == "lists":
                data["lists"] = c.lists
            elif v in rec:
                data[v] = rec[v]
        try:
            res = c.program.eval(data=data).value()
        except Exception:
            res = None
        if res is True:
            return True
        if res is not False:
            # missing field or runtime type mismatch: the rule does not fire, but it is counted
            self.stats["cel_errors"] += 1
        return False

    # process(event) -> alerts: the module's _process below (Engine.process = _process)

    # ------------------------------------------------------------------ windows
    def _win_state(self, agent: str, rule_id: str) -> _Win:
        states = self._windows.get(agent)
        if states is None:
            states = self._windows[agent] = {}
            if len(self._windows) > self.max_agents:
                self._windows.popitem(last=False)
                self.stats["window_agent_evictions"] += 1
        else:
            self._windows.move_to_end(agent)
        st = states.get(rule_id)
        if st is None:
            st = states[rule_id] = _Win()
        return st

    def _window(self, rule: Rule, event: Event, now: int, out: List[Event]) -> None:
        """Count what matched, per agent, over the rule's span.

        Crossing the threshold fires one alert and opens an episode. The episode lasts while
        matching events keep coming; it ends after a quiet span, and a summary with the
        episode total (`rule.repeats` = growth since the last report) goes out then, or every
        `_progress_ns` while the behaviour goes on, so a looping scanner is one alert plus a
        summary a minute, not an alert per span."""
        w = rule.window
        span = int(w.seconds * 1e9)
        st = self._win_state(_agent_id(event.record), rule.id)
        if st.fired:
            if now - st.last_seen > span:
                self._end_episode(rule, st, out)
            elif now - st.summary_at >= self._progress_ns(span):
                self._summarise_episode(rule, st, out, now)
        fields = w.distinct_fields()
        if st.fired:
            st.last_seen = now
            if fields:
                key = tuple(_hashable(get_path(event.record, f)) for f in fields)
                if key in st.episode_keys:
                    return
                if len(st.episode_keys) < self.max_keys:
                    st.episode_keys.add(key)
                else:
                    self.stats["window_key_evictions"] += 1
            st.episode_count += 1
            st.last_event = event
            if self.mode == "enforce" and rule.action != "report":
                # an enforcing window rule keeps enforcing while the behaviour goes on
                st.outcome = self._act(rule, event).outcome
            return
        if fields:
            key = tuple(_hashable(get_path(event.record, f)) for f in fields)
            keys = st.keys
            keys[key] = now
            keys.move_to_end(key)
            if len(keys) > self.max_keys:
                keys.popitem(last=False)
                self.stats["window_key_evictions"] += 1
            cutoff = now - span
            while keys:
                t0 = next(iter(keys.values()))
                if t0 >= cutoff:
                    break
                keys.popitem(last=False)
            n = len(keys)
        else:
            st.times.append(now)
            while st.times and st.times[0] < now - span:
                st.times.popleft()
            if len(st.times) > self.max_keys:
                st.times.popleft()
                self.stats["window_key_evictions"] += 1
            n = len(st.times)
        if n >= w.count:
            st.fired = True
            st.fired_count = st.reported_count = st.episode_count = n
            st.last_seen = st.summary_at = now
            st.episode_keys = set(st.keys) if fields else set()
            st.keys.clear()
            st.times.clear()
            st.outcome = self._fire(rule, event, now, out, window=self._window_info(rule, n), dedup=False)

    @staticmethod
    def _progress_ns(span: int) -> int:
        return max(60_000_000_000, 6 * span)

    def _window_info(self, rule: Rule, n: int) -> dict:
        w = rule.window
        return {"count": n, "threshold": w.count, "seconds": w.seconds,
                "fields": list(w.distinct_fields())}

    def _summarise_episode(self, rule: Rule, st: _Win, out: List[Event], now: int) -> None:
        if st.episode_count > st.reported_count and st.last_event is not None:
            info = self._window_info(rule, st.episode_count)
            rec = self._alert_record(rule, st.last_event.record, st.outcome, info)
            rec["rule"]["repeats"] = st.episode_count - st.reported_count
            rec["rule"]["message"] += f" (episode total so far; first alert at {st.fired_count})"
            out.append(self._event(st.last_event, rec))
            self.stats["summaries"] += 1
            st.reported_count = st.episode_count
        st.summary_at = now

    def _end_episode(self, rule: Rule, st: _Win, out: List[Event]) -> None:
        self._summarise_episode(rule, st, out, st.last_seen)
        st.fired = False
        st.keys.clear()
        st.times.clear()
        st.episode_keys = set()
        st.episode_count = st.fired_count = st.reported_count = 0
        st.last_event = None

    # ------------------------------------------------------------------ firing
    def _act(self, rule: Rule, event: Event) -> ActionResult:
        rec = event.record
        proc = rec.get("proc") or {}
        net = rec.get("net") or {}
        dev = rec.get("device") or {}
        # What the kernel already did is the truth in either mode.
        if proc.get("killed_in_kernel"):
            return ActionResult("killed", "exec killed in the kernel")
        fil = rec.get("file")
        if fil and fil.get("verdict") == "killed":
            return ActionResult("killed", "killed in the kernel at syscall entry")
        sock = rec.get("socket") or {}
        if sock.get("verdict") == "killed":
            return ActionResult("killed", "killed in the kernel on return from socket()")
        if net.get("verdict") == "blocked" or dev.get("verdict") in ("blocked", "denied") \
                or sock.get("verdict") == "blocked":
            return ActionResult("blocked", "blocked in the kernel")
        if self.mode != "enforce" or rule.action == "report":
            return ActionResult("reported")
        agent = rec.get("agent") or {}
        cg = agent.get("cgroup")
        action = _action(rule)
        if self.defer is not None and action in ("kill", "kill-agent", "freeze-agent"):
            return ActionResult("pending")
        if action == "block":
            res = ActionResult("reported", "kernel verdict was not 'blocked' (is the kernel policy loaded?)")
        elif action == "kill":
            pid = int(proc.get("pid") or event.pid or 0)
            # an escaped process is by definition no longer in its agent's cgroup
            res = self.actions.kill_pid(pid, None if event.kind == "escape" else cg)
        elif rule.action == "kill-agent":
            res = self.actions.kill_cgroup(cg) if cg else ActionResult("reported", "event has no agent cgroup")
        elif rule.action == "freeze-agent":
            res = self.actions.freeze_cgroup(cg) if cg else ActionResult("reported", "event has no agent cgroup")
        else:
            res = ActionResult("reported")
        if not res.ok:
            self.stats["action_failures"] += 1
        return res

    def _alert_record(self, rule: Rule, rec: dict, outcome: str, window: Optional[dict] = None,
                      detail: str = "") -> dict:
        msg = render_message(rule, rec, window)
        fil = rec.get("file")
        if outcome == "killed" and isinstance(fil, dict) and fil.get("kill_effect") == "name_in_place":
            # said in every alert, whatever the rule's message template: the kill came after the fact
            msg += " [killed after the new name was in place: the file was changed]"
        if detail and outcome == "reported" and self.mode == "enforce" and rule.action != "report":
            msg += f" [{rule.action} not done: {detail}]"
        out = dict(rec)
        out["kind"] = "alert"
        out["trigger"] = rec.get("kind")
        out["rule"] = {"id": rule.id, "category": rule.category, "severity": rule.severity,
                       "action": rule.action, "outcome": outcome, "tags": list(rule.tags),
                       "message": msg}
        if window is not None:
            out["window"] = window
        return out

    @staticmethod
    def _event(src: Event, rec: dict) -> Event:
        return Event("alert", src.t_ns, rec, src.pid, src.agent_cgroup_id, src.cookie)

    def _job(self, rule: Rule, event: Event, alert: Optional[Event], on_done=None):
        from agenttrace.act.worker import ActJob
        rec = event.record
        proc = rec.get("proc") or {}
        cg = (rec.get("agent") or {}).get("cgroup")
        # ktime carries the event's wall time here; the pipeline turns it into kernel time
        job = ActJob(_action(rule), int(proc.get("pid") or event.pid or 0), cg, event.t_ns, alert, on_done)
        if event.kind == "escape" and rule.action == "kill":
            # an escaped process is by definition no longer in its agent's cgroup: the pidfd
            # taken at decision time is what guards against pid reuse
            job.cgroup = None
        self.defer(job)
        return job

    def job_done(self, job) -> None:
        """Called on the reader thread when the act worker finished `job`: the alert's outcome
        becomes what the worker saw."""
        res = job.result
        if not res.ok and res.outcome != "exited":
            self.stats["action_failures"] += 1
        if job.on_done is not None:
            with self._lock:
                job.on_done(res.outcome)
        if job.alert is not None:
            r = job.alert.record["rule"]
            r["outcome"] = res.outcome
            rule = self.ruleset.get(r["id"])
            if res.outcome == "reported" and res.detail:
                r["message"] += f" [{r['action']} not done: {res.detail}]"
            elif res.outcome == "exited" and res.detail:
                r["message"] += f" [{res.detail}]"
            elif res.outcome == "killed" and res.detail and rule is not None:
                r["detail"] = res.detail
            if getattr(job, "descendants", None):
                r["killed_descendants"] = list(job.descendants)

    def _fire(self, rule: Rule, event: Event, now: int, out: List[Event],
              window: Optional[dict] = None, dedup: bool = True) -> str:
        res = self._act(rule, event)
        rec = event.record
        if dedup:
            key = (rule.id, _agent_id(rec)) + tuple(_hashable(get_path(rec, f)) for f in rule.dedup_fields)
            d = self._dedup.get(key)
            if d is not None and now - d.first_ns < d.span_ns:
                d.suppressed += 1
                d.last_event = event
                if res.outcome == "pending":
                    # the repeat is acted on all the same; its outcome counts when known
                    self._job(rule, event, None, lambda oc, d=d: d.outcomes.__setitem__(oc, d.outcomes[oc] + 1))
                else:
                    d.outcomes[res.outcome] += 1
                self.stats["suppressed"] += 1
                return res.outcome
            if d is not None:
                del self._dedup[key]
                self._summary(key, d, out)
            self._dedup[key] = _Dup(now, int(rule.dedup_seconds * 1e9), rule)
            if len(self._dedup) > self.max_dedup:
                k0, d0 = self._dedup.popitem(last=False)
                self.stats["dedup_evictions"] += 1
                self._summary(k0, d0, out)
        alert = self._event(event, self._alert_record(rule, rec, res.outcome, window, res.detail))
        self.stats["alerts"] += 1
        if res.outcome == "pending":
            # written by the pipeline once the act worker has the final outcome
            self._job(rule, event, alert)
        else:
            out.append(alert)
        return res.outcome

    def _summary(self, key: Tuple, d: _Dup, out: List[Event]) -> None:
        if not d.suppressed or d.last_event is None:
            return
        outcome = d.outcomes.most_common(1)[0][0]
        rec = self._alert_record(d.rule, d.last_event.record, outcome)
        rec["rule"]["repeats"] = d.suppressed
        oc = ", ".join(f"{k} {v}" for k, v in sorted(d.outcomes.items()))
        rec["rule"]["message"] += f" (repeated {d.suppressed} more times within {d.span_ns / 1e9:g}s: {oc})"
        out.append(self._event(d.last_event, rec))
        self.stats["summaries"] += 1

    # ------------------------------------------------------------------ time
    def tick(self) -> List[Event]:
        """Summaries that are due: de-dup spans that ended with repeats, and window episodes
        that went quiet. Call about once a second from the pipeline."""
        with self._lock:
            out, self._pending = self._pending, []
            now = self.clock.monotonic_ns()
            for key, d in list(self._dedup.items()):
                if now - d.first_ns >= d.span_ns:
                    del self._dedup[key]
                    self._summary(key, d, out)
            self._tick_windows(now, out, force=False)
        return out

    def _tick_windows(self, now: int, out: List[Event], force: bool) -> None:
        for agent, states in list(self._windows.items()):
            for rid, st in list(states.items()):
                rule = self.ruleset.get(rid)
                if rule is None or rule.window is None:
                    continue
                if not st.fired:
                    continue
                span = int(rule.window.seconds * 1e9)
                if force or now - st.last_seen > span:
                    self._end_episode(rule, st, out)
                elif now - st.summary_at >= self._progress_ns(span):
                    self._summarise_episode(rule, st, out, now)

    def flush_agent(self, agent_cgroup_id: int, agent_id: str) -> List[Event]:
        """Every pending summary of one agent now: its cgroup is gone, and its `summary`
        record must come after the last alert about it."""
        with self._lock:
            out = [e for e in self._pending if e.agent_cgroup_id == agent_cgroup_id]
            self._pending = [e for e in self._pending if e.agent_cgroup_id != agent_cgroup_id]
            for key, d in list(self._dedup.items()):
                if d.last_event is not None and d.last_event.agent_cgroup_id == agent_cgroup_id:
                    del self._dedup[key]
                    self._summary(key, d, out)
            states = self._windows.get(agent_id) or {}
            for rid, st in list(states.items()):
                rule = self.ruleset.get(rid)
                if rule is not None and rule.window is not None and st.fired:
                    self._end_episode(rule, st, out)
        return out

    def flush(self) -> List[Event]:
        """Every pending summary now (end of a replay, shutdown)."""
        with self._lock:
            out, self._pending = self._pending, []
            for key, d in list(self._dedup.items()):
                self._summary(key, d, out)
            self._dedup.clear()
            self._tick_windows(self.clock.monotonic_ns(), out, force=True)
        return out


def _port_candidates(self: "Engine", key: tuple, rules: tuple, port, named: bool, nk, present) -> tuple:
    """(rules, the candidates among them) for one (kind, scope, port, named, keys present),
    kept in the engine's port index: computed once per key, not per record."""
    have = {k for k, p in zip(nk[0], present) if p} if present is not None else None
    kept = tuple(r for r in rules if (not (ps := _ports_of(r)) or port in ps)
                 and (named or not _needs_name(r))
                 and (have is None or r.id not in nk[1] or nk[1][r.id] in have))
    if len(self._port_ix) >= _PORT_IX_CACHE:
        self._port_ix.clear()
    cand = self._port_ix[key] = (rules, kept)
    return cand


def _gate_candidates(self: "Engine", key, ix: tuple, rules: tuple, gate_names: tuple, pexe, nk, present) -> tuple:
    """(rules, the candidates among them) for one (exe basename, comm, keys present, exe,
    identity names), kept in the engine's gate cache unless the key is unhashable (None)."""
    names, ungated = ix
    hit = set()
    for n in gate_names:
        got = names.get(n) if isinstance(n, str) else None
        if got:
            hit |= got
    keep = [(i, r) for i, r in enumerate(rules) if (r.gate is None or i in hit)
            and (r.exe_prefixes is None or (isinstance(pexe, str) and pexe.startswith(r.exe_prefixes)))]
    if present is not None:
        have = {k for k, p in zip(nk[0], present) if p}
        need = nk[1]
        keep = [(i, r) for i, r in keep if r.id not in need or need[r.id] in have]
    cand = (rules, tuple(r for _, r in keep))
    if key is not None:
        if len(self._gate_cache) >= _PORT_IX_CACHE:
            self._gate_cache.clear()
        self._gate_cache[key] = cand
    return cand


def _process(self: "Engine", event: Event) -> List[Event]:
    """Alerts (kind "alert") raised by this event, acted on in enforce mode."""
    # module-level, installed as Engine.process: a compiled build types its locals in
    # engine.pxd (a plain class's method cannot be declared there; the class stays plain so
    # its instances keep their __dict__, e.g. tests that wrap `_cel`)
    kind = event.kind
    by_kind = self._by_kind
    rules = by_kind.get(kind)
    stats = self.stats
    stats["events"] += 1
    if not rules:
        return []
    rec = event.record
    if kind in self._eq_only:
        # no other index applies: an accept settles here that it meets none
        rules = self._eq_ix[kind].candidates(rules, rec)
        if not rules:
            return []
    # the candidates are chosen from the kind's rules, net and proc (and "dns"/"flow",
    # fixed per kind): a repeated connect holds the record before's very net and proc
    # objects (enrich/enricher.py _connect_repeat), so it meets none when that one did
    nc = self._no_cand
    net_o = rec.get("net")
    if nc[0] is rules and nc[1] == kind and nc[3] is rec.get("proc") and net_o is not None and (
            nc[2] is net_o or (nc[4] is not None and type(net_o) is dict and net_o.get("dst") is nc[4])):
        return []
    all_rules = rules
    by_scope = self._by_scope.get(kind)
    ported = kind in self._port_kinds
    if by_scope is not None or ported:
        net = rec.get("net")
        dst = net.get("dst") if isinstance(net, dict) else None
        if by_scope is not None and isinstance(dst, dict):
            rules = by_scope.get(dst.get("scope"), rules)
    if ported:
        port = dst.get("port") if isinstance(dst, dict) else False
        if port is None or type(port) is int:   # a malformed record meets every rule (and its error)
            # a record naming no host cannot meet a rule that matches host names
            named = bool(dst.get("name")) or "dns" in rec or "flow" in rec
            nk = self._needs_key.get(kind)
            proc = rec.get("proc")
            present = nk[2](proc) if nk is not None and isinstance(proc, dict) else None
            key = (kind, dst.get("scope"), port, named, present)
            port_ix = self._port_ix
            cand = port_ix.get(key)
            if cand is None or cand[0] is not rules:
                cand = _port_candidates(self, key, rules, port, named, nk, present)
            rules = cand[1]
    out: List[Event] = []
    base = comm = exe = None
    inames: Any = ()
    if kind in self._gated_kinds:
        proc = rec.get("proc")
        if isinstance(proc, dict):
            pd = proc           # typed dict in engine.pxd: these gets are C calls
            exe = pd.get("exe")
            base = exe[exe.rfind("/") + 1:] if isinstance(exe, str) else None
            comm = pd.get("comm")
            ident = pd.get("identity")
            if isinstance(ident, dict) and isinstance(ident.get("names"), list):
                inames = ident["names"]   # a renamed copy is gated by what it is
        ix = self._gate_ix.get(kind)
        if ix is not None:
            nk = self._needs_key.get(kind)
            present = nk[2](proc) if nk is not None and isinstance(proc, dict) else None
            # the candidates for one (exe basename, comm, keys present, identity names) are
            # computed once: a storm repeats a handful of programs
            pexe = exe if kind in self._prefix_kinds else None
            key = (kind, base, comm, present, pexe, *inames)
            gate_cache = self._gate_cache
            try:
                cand = gate_cache.get(key)
            except TypeError:          # a malformed identity name: no caching
                cand = key = None
            if cand is None or cand[0] is not rules:
                cand = _gate_candidates(self, key, ix, rules, (base, comm, *inames), pexe, nk, present)
            rules = cand[1]
    eq = self._eq_ix.get(kind)
    if eq is not None and kind not in self._eq_only:
        rules = eq.candidates(rules, rec)
    if not rules:
        # where only the destination and the process chose the candidates (scope, port,
        # name, program), a record holding the same dst and proc objects meets none either:
        # a storm to one listener, whose enricher shares one dst (Enricher._dst)
        dst_o = net_o.get("dst") if kind in self._dst_keyed and type(net_o) is dict else None
        self._no_cand = (all_rules, kind, net_o, rec.get("proc"), dst_o if type(dst_o) is dict else None)
        return out
    matchers = self._matchers
    with self._lock:
        now = None      # read once, when the first rule matches: most records match none
        for rule in rules:
            g = rule.gate
            if g is not None and base not in g and comm not in g and (not inames or g.isdisjoint(inames)):
                continue
            try:
                m = rule.match
                if m is not None and not matchers.get(rule.id, m)(rec):
                    continue
                if rule.condition is not None and not self._cel(rule, rec):
                    continue
                if now is None:
                    now = self.clock.monotonic_ns()
                stats["matched"][rule.id] += 1
                if rule.window is not None:
                    self._window(rule, event, now, out)
                else:
                    self._fire(rule, event, now, out)
            except Exception as e:
                # a malformed record (wrong types from a buggy enricher) must not stop
                # the pipeline or the other rules; it is counted and shown in stats
                stats["errors"] += 1
                stats["last_error"] = f"{rule.id}: {type(e).__name__}: {e}"
    return out


Engine.process = _process


# --------------------------------------------------------------------------- offline

def read_events(events_file: str) -> Iterable[Event]:
    """Events from a JSON-lines file; a bad line raises ValueError naming file and line."""
    import orjson

    with open(events_file, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                yield Event.from_record(rec)
            except (ValueError, orjson.JSONDecodeError) as e:
                raise ValueError(f"{events_file}:{n}: {e}") from None


def replay(rule_paths: Iterable[str], events_file: str, ruleset: Optional[RuleSet] = None) -> List[dict]:
    """Run recorded events through the rules (no root, no kernel) and return alert records.

    Time follows the events' timestamps. No actions are taken (nothing live to act on); an
    alert's outcome shows what the recorded kernel verdicts say (blocked, killed)."""
    rs = ruleset if ruleset is not None else load_rules(rule_paths)
    clock = _ReplayClock()
    eng = Engine(rs, mode="monitor", clock=clock)
    alerts: List[dict] = []
    last_tick = None
    for ev in read_events(events_file):
        net = ev.record.get("net")
        if isinstance(net, dict):
            # the recorded kernel decision was taken under the recording's policy; a replay
            # asks what these rules say
            net.pop("policy_rule", None)
        clock.now = ev.t_ns
        if last_tick is None or ev.t_ns - last_tick >= 1_000_000_000:
            alerts.extend(a.record for a in eng.tick())
            last_tick = ev.t_ns
        alerts.extend(a.record for a in eng.process(ev))
    alerts.extend(a.record for a in eng.flush())
    return alerts
