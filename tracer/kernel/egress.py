"""Egress allow-lists by DNS name and CIDR: the `--allow-egress SPEC` syntax, the policy a
`run` gets from it, and the writers of the kernel maps that hold names and the tracer's
heartbeat (probes/net.c, probes/egress.c).

SPEC is a DNS name (`pypi.org`), a `*.` wildcard (`*.pythonhosted.org`: any name below it)
or a CIDR / address (`10.0.0.0/8`, `192.0.2.53`, `[2001:db8::]/32`), optionally followed by
`:PORT` or `:LO-HI`. IPv6 with a port is written in brackets: `[2001:db8::1]:443`.
"""
from __future__ import annotations

import ctypes as C
import ipaddress
import time
from typing import Dict, Iterable, List, Tuple

from pydantic import ValidationError

from agenttrace.match.policy import EgressDest, EgressPolicy, NameAllow
from agenttrace.kernel.mapwrite import delete_stale

RUN_GROUP = "default"       # the group of agents that `run` traces (no group label)
RUN_SCOPES = ["external", "metadata"]
DEFAULT_GRACE_S = 5.0


class SpecError(ValueError):
    pass


def parse_allow_spec(spec: str) -> EgressDest:
    """One --allow-egress SPEC as an allow entry; SpecError names what is wrong."""
    s = spec.strip()
    if not s:
        raise SpecError("empty --allow-egress value")
    host, port = s, None
    if s.startswith("["):
        # [v6addr]:port or [v6net]/plen:port
        end = s.find("]")
        if end < 0:
            raise SpecError(f"--allow-egress {spec!r}: unclosed '['")
        rest = s[end + 1:]
        plen = ""
        if rest.startswith("/"):
            plen, _, rest = rest.partition(":")
            rest = ":" + rest if rest else ""
        if rest and not rest.startswith(":"):
            raise SpecError(f"--allow-egress {spec!r}: unexpected {rest!r} after ']'")
        host, port = s[1:end] + plen, (rest[1:] or None)
    elif s.count(":") == 1:
        host, port = s.split(":")
    ports: List[str] = []
    if port is not None:
        lo, _, hi = port.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not hi)) or not 0 < int(lo) <= int(hi or lo) < 65536:
            raise SpecError(f"--allow-egress {spec!r}: {port!r} is not a port or range LO-HI (1-65535)")
        ports = [port]
    # a name has a character no IPv4 network can (IPv6 always has ':'): no failed parse per
    # name, which was most of the time 10,000 --allow-egress names took
    if ":" not in host and host.strip("0123456789./"):
        is_net = False
    else:
        try:
            ipaddress.ip_network(host, strict=False)
            is_net = True
        except ValueError:
            is_net = False
    try:
        if is_net:
            return EgressDest(cidr=str(ipaddress.ip_network(host, strict=False)), ports=ports)
        return EgressDest(name=host, ports=ports)
    except ValidationError as e:
        detail = e.errors(include_url=False)[0]["msg"]
        if detail.startswith("Value error, "):
            detail = detail[len("Value error, "):]
        raise SpecError(f"--allow-egress {spec!r}: {detail}") from None


def expand_spec_files(specs: Iterable[str]) -> List[Tuple[str, str]]:
    """(spec, where) for each --allow-egress value, `@FILE` read as one spec per line (blank
    lines and `#` comments skipped); `where` names the file and line for errors. A long
    allow-list does not fit on a command line (ARG_MAX), and an option parser walks each of
    100,000 options in turn: a file has neither limit."""
    out: List[Tuple[str, str]] = []
    for s in specs:
        if not s.startswith("@"):
            out.append((s, ""))
            continue
        path = s[1:]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"--allow-egress @{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(lines, 1):
            spec = line.split("#", 1)[0].strip()
            if spec:
                out.append((spec, f"{path}:{n}: "))
    return out


def run_policy(specs: Iterable[str], mode: str) -> Dict[str, EgressPolicy]:
    """The egress policy `agenttrace run --allow-egress ...` gives its agents: allow-list on
    external and metadata destinations, enforced in the kernel (monitor mode reports)."""
    allow = []
    for spec, where in expand_spec_files(specs):
        try:
            allow.append(parse_allow_spec(spec))
        except SpecError as e:
            raise SpecError(f"{where}{e}") from None
    return {RUN_GROUP: EgressPolicy(mode="allow-list", scopes=list(RUN_SCOPES), allow=allow,
                                    action="block", severity="high")}


def write_name_allow(table, entries: List[NameAllow]) -> None:
    """Write new entries first, then delete stale ones: a reload never drops a name that
    stays allowed."""
    keep = set()
    for e in entries:
        k = table.Key()
        k.gid, k.pad, k.hash = e.group_id, 0, e.hash
        v = table.Leaf()
        for i, (lo, hi, proto) in enumerate(e.ranges):
            v.r[i].lo, v.r[i].hi, v.r[i].proto = max(lo, 1), hi, proto
        v.flags = e.flags
        table[k] = v
        keep.add(bytes(k))
    delete_stale(table, keep)


def learned_count(probes) -> int:
    try:
        return len(probes["learned"].items())
    except KeyError:
        return 0


def egress_stats(probes) -> dict:
    """probes/egress.c counters, summed over CPUs."""
    try:
        t = probes["egress_stats"]
    except KeyError:
        return {}
    names = ("answers_allowed", "addresses_learned", "messages_unparsed", "answers_not_allowed",
             "answers_from_unlisted_servers")
    out = {}
    for i, n in enumerate(names):
        out[n] = sum(t[t.Key(i)])
    return out


class Heartbeat:
    """The tracer's pulse in the `heartbeat` map. Armed (enforce mode, pinned programs), the
    connect hooks deny every non-loopback destination of agents once the pulse is older than
    the grace: a killed tracer leaves its agents without network, not without policy."""

    def __init__(self, probes, grace_s: float = DEFAULT_GRACE_S):
        self.table = probes["heartbeat"]
        self.grace_ns = int(grace_s * 1e9)
        self._last = 0

    def _set(self, i: int, v: int) -> None:
        self.table[self.table.Key(i)] = self.table.Leaf(v)

    def arm(self) -> None:
        self.beat(force=True)
        self._set(2, self.grace_ns)
        self._set(0, 1)

    def disarm(self) -> None:
        self._set(0, 0)

    def beat(self, force: bool = False) -> None:
        # CLOCK_MONOTONIC is bpf_ktime_get_ns()'s clock; a write per 100 ms is plenty
        now = time.monotonic_ns()
        if force or now - self._last >= 100_000_000:
            self._last = now
            self._set(1, now)


FAIL_CLOSED_POLICY = 0xFFFFFFFF       # AT_FAILCLOSED_POLICY in probes/net.c
FAIL_CLOSED_RULE = "agenttrace-fail-closed"


def policy_rule_namer(kp):
    """policy id (from a connect record) -> the rule id it stands for."""
    ids = dict(kp.policy_ids)

    def name(pid: int):
        if pid == FAIL_CLOSED_POLICY:
            return FAIL_CLOSED_RULE
        return ids.get(pid)
    return name
