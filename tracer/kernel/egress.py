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
import re
import struct
import sys
import time
from array import array
from typing import Dict, Iterable, Iterator, List, Tuple

from agenttrace.match.egress_policy import _LABEL, AllowList, check_name_pattern
from agenttrace.match.policy import EgressDest, EgressPolicy, NameAllowTable
from agenttrace.kernel.mapwrite import key_bytes, update_many

RUN_GROUP = "default"       # the group of agents that `run` traces (no group label)
RUN_SCOPES = ["external", "metadata"]
DEFAULT_GRACE_S = 5.0


class SpecError(ValueError):
    pass


def parse_allow_spec(spec: str) -> EgressDest:
    """One --allow-egress SPEC as an allow entry; SpecError names what is wrong."""
    is_cidr, value, ports = _parse_spec(spec)
    return EgressDest(**{"cidr" if is_cidr else "name": value, "ports": list(ports)})


# `name[:port]` as check_name_pattern accepts it already lowercase, without a trailing dot
_PLAIN = re.compile(rf"((?:\*\.)?(?:{_LABEL}\.)*{_LABEL})(?::([0-9]+))?")


def _parse_spec(spec: str) -> Tuple[bool, str, Tuple[str, ...]]:
    """(is a CIDR, the normalised CIDR or name, ports) of one SPEC, checked as `EgressDest`
    checks its fields, without building one: a model per name was most of the time and
    memory a 100,000-name allow-list took."""
    m = _PLAIN.fullmatch(spec)
    if m is not None:
        # a lowercase name (or `*.name`) with an optional port: the common line of a long list;
        # the name is one no network parses as (a letter, `_` or `-` outside its digits)
        name, port = m.group(1), m.group(2)
        if len(name) - (2 if name[0] == "*" else 0) <= 253 and name.strip("0123456789.*"):
            if port is None:
                return False, name, ()
            if 0 < int(port) < 65536:
                return False, name, (port,)
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
    ports: Tuple[str, ...] = ()
    if port is not None:
        lo, _, hi = port.partition("-")
        # ASCII digits: `²` is a digit to str.isdigit() and a traceback to int()
        if (not (lo.isdigit() and (hi.isdigit() or not hi)) or not port.isascii()
                or not 0 < int(lo) <= int(hi or lo) < 65536):
            raise SpecError(f"--allow-egress {spec!r}: {port!r} is not a port or range LO-HI (1-65535)")
        ports = (port,)
    # a name has a character no IPv4 network can (IPv6 always has ':'): no failed parse per
    # name, which was most of the time 10,000 --allow-egress names took
    if ":" not in host and host.strip("0123456789./"):
        net = None
    else:
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError as e:
            if ((":" in host and not host.strip("0123456789abcdefABCDEF:./"))
                    or (":" not in host and "/" in host and not host.strip("0123456789./"))):
                # only address characters, with a prefix or colons: a network with a mistake
                # (10.0.0.0/33, 2001:db8::/129), not a name
                raise SpecError(f"--allow-egress {spec!r}: not a network: {e}") from None
            net = None
    if net is not None:
        return True, str(net), ports
    try:
        return False, check_name_pattern(host), ports
    except ValueError as e:
        raise SpecError(f"--allow-egress {spec!r}: {e}") from None


def _iter_specs(specs: Iterable[str]) -> Iterator[Tuple[str, str, int]]:
    """(spec, file, line) for each --allow-egress value, `@FILE` read as one spec per line
    (blank lines and `#` comments skipped; file "" for a value given inline). A long
    allow-list does not fit on a command line (ARG_MAX), and an option parser walks each of
    100,000 options in turn: a file has neither limit. A generator, so that 100,000 lines
    never exist at once as (spec, "FILE:LINE: ") pairs (~15 MB)."""
    for s in specs:
        if not s.startswith("@"):
            yield s, "", 0
            continue
        path = s[1:]
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"--allow-egress @{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(lines, 1):
            spec = (line.split("#", 1)[0] if "#" in line else line).strip()
            if spec:
                yield spec, path, n


def expand_spec_files(specs: Iterable[str]) -> List[Tuple[str, str]]:
    """(spec, where) for each --allow-egress value (`_iter_specs`); `where` names the file
    and line for errors."""
    return [(spec, f"{path}:{n}: " if path else "") for spec, path, n in _iter_specs(specs)]


def run_policy(specs: Iterable[str], mode: str) -> Dict[str, EgressPolicy]:
    """The egress policy `agenttrace run --allow-egress ...` gives its agents: allow-list on
    external and metadata destinations, enforced in the kernel (monitor mode reports)."""
    egress = run_policy_shell(mode)
    fill_run_policy(egress, specs)
    return egress


def run_policy_shell(mode: str) -> Dict[str, EgressPolicy]:
    """`run_policy` with no entries yet: all the probe plan needs to know (an allow-list is
    on), so the kernel can verify the probes while `fill_run_policy` reads a long list."""
    # built, not validated: every field is one of these constants
    return {RUN_GROUP: EgressPolicy.model_construct(mode="allow-list", scopes=list(RUN_SCOPES), allow=AllowList(),
                                                    action="block", severity="high")}


def fill_run_policy(egress: Dict[str, EgressPolicy], specs: Iterable[str]) -> None:
    """The --allow-egress entries into a `run_policy_shell`; SpecError names the file and line."""
    allow = egress[RUN_GROUP].allow
    add = allow.add
    for spec, path, n in _iter_specs(specs):
        try:
            is_cidr, value, ports = _parse_spec(spec)
        except SpecError as e:
            raise SpecError(f"{path}:{n}: {e}" if path else str(e)) from None
        add(value, is_cidr, ports)


def read_allow_file(path: str, allow: AllowList, max_errors: int = 20) -> List[Tuple[int, str]]:
    """The specs of an allow file (the daemon config's `allow_file:`, the `@FILE` syntax)
    appended to `allow`; returns (line, message) for each bad line (at most `max_errors`, the
    last one saying how many more), so a config error lists them all at once. OSError and
    UnicodeDecodeError (an unreadable file) are the caller's to report."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    bad: List[Tuple[int, str]] = []
    more = 0
    add = allow.add
    for n, line in enumerate(lines, 1):
        spec = (line.split("#", 1)[0] if "#" in line else line).strip()
        if not spec:
            continue
        try:
            is_cidr, value, ports = _parse_spec(spec)
        except SpecError as e:
            if len(bad) < max_errors:
                # the parser words its errors for the command line
                bad.append((n, str(e).replace("--allow-egress ", "entry ", 1)))
            else:
                more += 1
            continue
        add(value, is_cidr, ports)
    if more:
        bad.append((bad[-1][0], f"and {more} more bad line(s) after it"))
    return bad


def write_name_allow(table, entries) -> None:
    """Write new entries first, then delete stale ones: a reload never drops a name that
    stays allowed. `entries` is the policy's `NameAllowTable` (or any list of `NameAllow`):
    keys and values are packed straight from its rows into one batch update. The stale keys
    are the ones the map held before the write (only the tracer writes this map), so a first
    write does not read back the 100,000 keys it just wrote."""
    if not isinstance(entries, NameAllowTable):
        entries = NameAllowTable(entries)
    before = key_bytes(table)
    K, V = table.Key, table.Leaf
    n = len(entries)
    if n:
        leaf_of = []
        for flags, ranges in entries.forms:
            v = V()
            for i, (lo, hi, proto) in enumerate(ranges):
                v.r[i].lo, v.r[i].hi, v.r[i].proto = max(lo, 1), hi, proto
            v.flags = flags
            leaf_of.append(bytes(v))
        if len(leaf_of) == 1:
            values = leaf_of[0] * n
        else:
            values = b"".join([leaf_of[f] for f in entries.form])
        keys = _pack_keys(K, entries)
        update_many(table, keys, values, n)
    if before:
        ks = C.sizeof(K)
        keep = {keys[i:i + ks] for i in range(0, len(keys), ks)} if n else set()
        for kb in before:
            if kb not in keep:
                try:
                    del table[K.from_buffer_copy(kb)]
                except KeyError:
                    pass


def _pack_keys(K, entries) -> bytes:
    """The rows' (gid, 0, hash) keys in the map's key layout."""
    fields = [f[0] for f in K._fields_]
    if fields == ["gid", "pad", "hash"] and (K.gid.offset, K.pad.offset, K.hash.offset, C.sizeof(K)) == (0, 4, 8, 16):
        if sys.byteorder == "little":
            # a u64 holding the gid is (gid, pad 0) as two little-endian u32: the keys are
            # the gid and hash columns interleaved, built in C without an object per key
            out = array("Q", bytes(16 * len(entries)))
            out[0::2] = array("Q", entries.gids)
            out[1::2] = entries.hashes
            return out.tobytes()
        pack = struct.Struct("=IIQ").pack
        return b"".join([pack(g, 0, h) for g, h in zip(entries.gids, entries.hashes)])
    out = []
    for g, h in zip(entries.gids, entries.hashes):
        k = K()
        k.gid, k.pad, k.hash = g, 0, h
        out.append(bytes(k))
    return b"".join(out)


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


FAIL_CLOSED_POLICY = 0xFFFFFFFF       # AT_FAILCLOSED_POLICY in probes/common.h
FAIL_CLOSED_RULE = "agenttrace-fail-closed"


def policy_rule_namer(kp):
    """policy id (from a connect record) -> the rule id it stands for."""
    ids = dict(kp.policy_ids)

    def name(pid: int):
        if pid == FAIL_CLOSED_POLICY:
            return FAIL_CLOSED_RULE
        return ids.get(pid)
    return name
