"""What the kernel enforces: a rule set compiled into plain tables for BPF maps.

`compile_policy(ruleset)` turns every rule the kernel can hold (action `block`; action `kill`
on exec by exact path/basename; action `kill` on file by class/op) plus the per-group egress policies into a `KernelPolicy` of
plain dataclasses holding ints and bytes — ready to be written into maps by the loader and
free of any BCC import so it is testable offline.

Conventions for the map writer:
- `group_id` 0 means "every agent group"; other ids come from `KernelPolicy.groups`.
- Addresses are network-order bytes (4 for IPv4, 16 for IPv6) with a prefix length, the
  layout of an LPM-trie key after its prefixlen; `prefixlen` 0 with empty `addr` = any address.
- `scope_mask` is a bitmask of `SCOPE_*` bits (0 = any scope). The kernel classifies a
  destination with `scopes` (longest prefix wins; no entry = external).
- Ports are host-order inclusive ranges; (0, 65535) = any port.
- `proto` is the IP protocol number (6 tcp, 17 udp), 0 = any.
- `policy_id` is what the kernel writes into a blocked/killed event so userspace can name
  the rule; `KernelPolicy.policy_ids` maps it back to a rule id.
"""
from __future__ import annotations

import ipaddress
import re
from array import array
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agenttrace.match.rules import CompiledMatch, Rule, RuleModel, RuleSet

SCOPE_LOOPBACK, SCOPE_INTERNAL, SCOPE_METADATA, SCOPE_EXTERNAL = 1, 2, 4, 8
SCOPE_BITS = {"loopback": SCOPE_LOOPBACK, "internal": SCOPE_INTERNAL,
              "metadata": SCOPE_METADATA, "external": SCOPE_EXTERNAL}
PROTO_NUM = {"tcp": 6, "udp": 17, "any": 0}
PROTOCOL_NUM = {"ssh": 1, "stratum": 2}          # flow protocols recognised in the kernel
EXEC_MATCH_PATH, EXEC_MATCH_BASENAME = 1, 2

# The scope table lives in netscope (one table for the kernel's trie and userspace).
from agenttrace.enrich.scope import DEFAULT_INTERNAL, DEFAULT_METADATA, LOOPBACK, scope_rows  # noqa: E402


# --------------------------------------------------------------------------- tables

@dataclass(frozen=True)
class ScopeEntry:
    family: int          # 4 or 6
    addr: bytes
    prefixlen: int
    scope: int           # one SCOPE_* bit


@dataclass(frozen=True)
class DestEntry:
    """Deny (or, in `dest_allow`, allow) connects matching all given parts."""
    policy_id: int
    group_id: int
    family: int          # 0 = any family (only with prefixlen 0)
    addr: bytes
    prefixlen: int
    scope_mask: int
    port_lo: int
    port_hi: int
    proto: int


@dataclass(frozen=True)
class ProtocolDrop:
    """Drop a flow whose first payload bytes identify `protocol` (cgroup_skb egress)."""
    policy_id: int
    group_id: int
    protocol: int        # PROTOCOL_NUM
    scope_mask: int
    port_lo: int
    port_hi: int


@dataclass(frozen=True)
class SniDeny:
    """Drop a TLS ClientHello whose server name is `pattern` (exact) or below it (`*.pattern`):
    probes/tls.c, key (group, name_hash(base)). `subdomains` says which of the two it is."""
    policy_id: int
    group_id: int
    pattern: str         # as the rule lists it (lowercase, no trailing dot)
    hash: int
    subdomains: bool


SNI_NAME_MAX = 253       # AT_SNI_NAME_MAX in probes/agenttrace.h
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


def sni_entry(policy_id: int, group_id: int, pattern: str) -> SniDeny:
    """One listed name as the kernel's SNI check holds it: an exact host name or `*.` and a
    host name (any name below it, at any depth). PolicyError names what it cannot hold."""
    p = pattern.lower().rstrip(".")
    wild = p.startswith("*.")
    base = p[2:] if wild else p
    if not base or len(base) > SNI_NAME_MAX or not all(_LABEL.fullmatch(x) for x in base.split(".")):
        raise PolicyError(f"name {pattern!r}: the kernel's SNI check holds exact host names and "
                          f"'*.' + a host name (labels of letters, digits, '-', '_'; at most "
                          f"{SNI_NAME_MAX} bytes); use action 'kill' for other patterns")
    return SniDeny(policy_id, group_id, p, name_hash(base), wild)


@dataclass(frozen=True)
class ExecKill:
    """Kill an exec at sched_process_exec when the filename (or its basename) equals value."""
    policy_id: int
    match: int           # EXEC_MATCH_PATH | EXEC_MATCH_BASENAME
    value: bytes


# probes/agenttrace.h AT_FCLASS_* and AT_FILE_*
FILE_CLASS_NUM = {"authorized_keys": 1, "private_key": 2, "host_key": 3, "ssh_other": 4}
FILE_OP_NUM = {"read": 1, "write": 2}


@dataclass(frozen=True)
class FileKill:
    """Kill a process at syscall entry when it opens (or renames/links onto) a file of class
    `fclass` for `op` (probes/files.c: key fclass << 8 | op)."""
    policy_id: int
    fclass: int          # FILE_CLASS_NUM
    op: int              # FILE_OP_NUM

    @property
    def key(self) -> int:
        return (self.fclass << 8) | self.op


@dataclass(frozen=True)
class GroupPolicy:
    """Per agent group: in allow-list mode a connect to a destination whose scope is in
    `allow_scope_mask` is denied (with `policy_id`) unless a `dest_allow` entry of the group
    matches it, or an address a DNS answer for one of its `name_allow` names returned
    (kept for the answer's TTL clamped to [ttl_min, ttl_max] seconds)."""
    group_id: int
    name: str
    allow_list: bool
    allow_scope_mask: int
    policy_id: int
    ttl_min: int = 0
    ttl_max: int = 0


NAME_EXACT, NAME_SUBDOMAINS = 1, 2    # AT_DN_* in probes/net.c


@dataclass(frozen=True)
class NameAllow:
    """Allow what DNS answers for a name return (`*.suffix`: for any name below it).
    `hash` is the kernel's key: FNV-1a 64 of the lowercase name read backwards."""
    group_id: int
    pattern: str
    hash: int
    flags: int           # NAME_EXACT | NAME_SUBDOMAINS
    ranges: Tuple[Tuple[int, int, int], ...]   # (port_lo, port_hi, proto), at most NAME_RANGES


NAME_RANGES = 4          # AT_NAME_RANGES in probes/net.c


FNV_BASIS, FNV_PRIME = 0xcbf29ce484222325, 0x100000001b3


def name_hash(name: str) -> int:
    """probes/egress.c's backward FNV-1a over a dotted lowercase name."""
    h = FNV_BASIS
    for c in reversed(name.lower().rstrip(".").encode()):
        h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def _hash_more(h: int, text: str) -> int:
    """Continue a backward FNV-1a over `text` (lowercase)."""
    for c in reversed(text.encode()):
        h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


class _SuffixHasher:
    """`name_hash` for many names at once: the backward hash reads a name's parent first, so
    the hash state after the parent (`bench.test`, `com`) is kept and only the first label is
    hashed per name. Same values as `name_hash` (tests/test_allow_list_memory.py)."""

    def __init__(self) -> None:
        self._parents: Dict[str, int] = {}

    def __call__(self, name: str) -> int:
        label, dot, parent = name.partition(".")
        if not dot:
            return _hash_more(FNV_BASIS, name)
        h = self._parents.get(parent)
        if h is None:
            # the state after the parent and its dot
            h = self._parents[parent] = ((_hash_more(FNV_BASIS, parent) ^ 0x2E) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
        for c in reversed(label.encode()):
            h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
        return h


class NameAllowTable:
    """`KernelPolicy.name_allow`: one row per (group, name hash) in parallel arrays, the port
    ranges and flags as an index into the few distinct ones, instead of one `NameAllow` (and
    its tuples) per name: ~25 MB less at 100,000 names, and the map writer packs the rows
    straight into its batch. Reads as a sequence of `NameAllow`."""
    __slots__ = ("gids", "hashes", "patterns", "form", "forms", "_form_ix")

    def __init__(self, items: Iterable[NameAllow] = ()) -> None:
        self.gids = array("I")
        self.hashes = array("Q")
        self.patterns: List[str] = []
        self.form = array("I")
        self.forms: List[Tuple[int, Tuple[Tuple[int, int, int], ...]]] = []   # (flags, ranges)
        self._form_ix: Dict[Tuple[int, Tuple[Tuple[int, int, int], ...]], int] = {}
        self.extend(items)

    def _form_of(self, flags: int, ranges: Tuple[Tuple[int, int, int], ...]) -> int:
        f = (flags, ranges)
        i = self._form_ix.get(f)
        if i is None:
            i = self._form_ix[f] = len(self.forms)
            self.forms.append(f)
        return i

    def add(self, gid: int, pattern: str, h: int, flags: int, ranges: Tuple[Tuple[int, int, int], ...]) -> int:
        self.gids.append(gid)
        self.hashes.append(h)
        self.patterns.append(pattern)
        self.form.append(self._form_of(flags, ranges))
        return len(self.patterns) - 1

    def set(self, i: int, pattern: str, flags: int, ranges: Tuple[Tuple[int, int, int], ...]) -> None:
        self.patterns[i] = pattern
        self.form[i] = self._form_of(flags, ranges)

    def append(self, n: NameAllow) -> None:
        self.add(n.group_id, n.pattern, n.hash, n.flags, tuple(n.ranges))

    def extend(self, items: Iterable[NameAllow]) -> None:
        for n in items:
            self.append(n)

    def __len__(self) -> int:
        return len(self.patterns)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        flags, ranges = self.forms[self.form[i]]
        return NameAllow(self.gids[i], self.patterns[i], self.hashes[i], flags, ranges)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, NameAllowTable)) else NotImplemented

    __hash__ = None


@dataclass
class KernelPolicy:
    groups: List[GroupPolicy] = field(default_factory=list)
    group_ids: Dict[str, int] = field(default_factory=dict)
    scopes: List[ScopeEntry] = field(default_factory=list)
    dest_deny: List[DestEntry] = field(default_factory=list)
    dest_allow: List[DestEntry] = field(default_factory=list)
    name_allow: NameAllowTable = field(default_factory=NameAllowTable)
    protocol_drop: List[ProtocolDrop] = field(default_factory=list)
    sni_deny: List[SniDeny] = field(default_factory=list)
    exec_kill: List[ExecKill] = field(default_factory=list)
    file_kill: List[FileKill] = field(default_factory=list)
    policy_ids: Dict[int, str] = field(default_factory=dict)     # policy_id → rule id

    def rule_for(self, policy_id: int) -> Optional[str]:
        return self.policy_ids.get(policy_id)


# --------------------------------------------------------------------------- config model

from agenttrace.match.egress_policy import (  # noqa: E402,F401  (the config's egress models)
    EgressDest, EgressPolicy, _port_range, _safe_id, allow_items, check_name_pattern, egress_rule_models)


def _net_bytes(cidr: str) -> Tuple[int, bytes, int]:
    n = ipaddress.ip_network(cidr, strict=False)
    return n.version, n.network_address.packed, n.prefixlen


def _scope_table(internal: Iterable[str], metadata: Iterable[str]) -> List[ScopeEntry]:
    out = []
    for cidr, scope in scope_rows(internal, metadata):
        fam, addr, plen = _net_bytes(cidr)
        out.append(ScopeEntry(fam, addr, plen, SCOPE_BITS[scope]))
    return out


def _ranges(m: CompiledMatch) -> List[Tuple[int, int]]:
    r = sorted(set([(p, p) for p in m.ports] + list(m.port_ranges)))
    return r or [(0, 65535)]


def _scope_mask(m: CompiledMatch) -> int:
    mask = 0
    for s in m.scopes:
        mask |= SCOPE_BITS[s]
    return mask


class PolicyError(ValueError):
    pass


def compile_policy(ruleset: RuleSet, internal: Iterable[str] = DEFAULT_INTERNAL,
                   metadata: Iterable[str] = DEFAULT_METADATA) -> KernelPolicy:
    """Compile what the kernel can hold. Rules were linted at load (a `block` the kernel
    cannot hold never gets here); anything unexpected raises PolicyError rather than
    silently weakening enforcement."""
    kp = KernelPolicy(scopes=_scope_table(internal, metadata))
    names = set(ruleset.egress)
    for r in ruleset.rules:
        if r.match is not None:
            names |= r.match.groups
    kp.group_ids = {n: i for i, n in enumerate(sorted(names), 1)}

    def gids(m: Optional[CompiledMatch]) -> List[int]:
        return [kp.group_ids[g] for g in sorted(m.groups)] if m is not None and m.groups else [0]

    next_id = 1
    allow_list_rules = {}
    hasher = _SuffixHasher()
    for r in ruleset.rules:
        if r.enforced_in != "kernel" or (r.match is not None and r.match.never):
            continue
        pid = next_id
        next_id += 1
        kp.policy_ids[pid] = r.id
        m = r.match
        if m is None:
            raise PolicyError(f"rule {r.id}: kernel action without a match")
        if r.id.startswith("egress-policy.") and r.id.endswith(".allow-list"):
            allow_list_rules[next(iter(m.groups))] = (pid, r)
            continue
        if r.action == "kill" and list(r.on) == ["file"]:
            for c in sorted(m.file_classes):
                if c not in FILE_CLASS_NUM:
                    raise PolicyError(f"rule {r.id}: the kernel cannot classify files as {c!r}")
                for op in sorted(m.file_ops or FILE_OP_NUM):
                    kp.file_kill.append(FileKill(pid, FILE_CLASS_NUM[c], FILE_OP_NUM[op]))
            continue
        if r.action == "kill":
            for p in m.exe_path_list:
                kp.exec_kill.append(ExecKill(pid, EXEC_MATCH_PATH, p.encode()))
            for b in m.basename_list:
                kp.exec_kill.append(ExecKill(pid, EXEC_MATCH_BASENAME, b.encode()))
            continue
        for kind in r.on:
            if kind == "connect":
                protos = sorted(PROTO_NUM[p] for p in m.proto) or [0]
                nets = [_net_bytes(str(n)) for n in m.nets] or [(0, b"", 0)]
                for g in gids(m):
                    for fam, addr, plen in nets:
                        for lo, hi in _ranges(m):
                            for pr in protos:
                                kp.dest_deny.append(DestEntry(pid, g, fam, addr, plen, _scope_mask(m), lo, hi, pr))
            elif kind == "flow" and m.name_patterns:
                # names on a flow are the ClientHello's server name: probes/tls.c
                if set(m.protocols) != {"tls"} or m.nets or m.ports or m.port_ranges or m.scopes:
                    raise PolicyError(f"rule {r.id}: the kernel checks names only as a TLS server "
                                      "name: a 'block' on names needs protocols [tls] and no other dst field")
                for g in gids(m):
                    for n in m.name_patterns:
                        try:
                            kp.sni_deny.append(sni_entry(pid, g, n))
                        except PolicyError as e:
                            raise PolicyError(f"rule {r.id}: {e}") from None
            elif kind == "flow":
                if m.nets:
                    raise PolicyError(f"rule {r.id}: protocol drops by CIDR are not supported in the kernel")
                for g in gids(m):
                    for proto in sorted(m.protocols):
                        if proto not in PROTOCOL_NUM:
                            raise PolicyError(f"rule {r.id}: kernel cannot recognise protocol {proto!r}")
                        for lo, hi in _ranges(m):
                            kp.protocol_drop.append(ProtocolDrop(pid, g, PROTOCOL_NUM[proto], _scope_mask(m), lo, hi))
            else:
                raise PolicyError(f"rule {r.id}: the kernel cannot block {kind} events")
    for name, gid in sorted(kp.group_ids.items(), key=lambda kv: kv[1]):
        pol = ruleset.egress.get(name)
        if pol is not None and not isinstance(pol, EgressPolicy):
            pol = EgressPolicy.model_validate(pol)
        if pol is not None and pol.mode == "allow-list" and name in allow_list_rules:
            pid, _ = allow_list_rules[name]
            mask = 0
            for s in pol.scopes:
                mask |= SCOPE_BITS[s]
            kp.groups.append(GroupPolicy(gid, name, True, mask, pid, pol.ttl_min, pol.ttl_max))
            _group_names(kp, pid, gid, pol.allow, hasher)
        else:
            kp.groups.append(GroupPolicy(gid, name, False, 0, 0))
    return kp


def _group_names(kp: KernelPolicy, pid: int, gid: int, allow, hasher) -> None:
    """One allow-list group's entries into kp.dest_allow and kp.name_allow. Names go in one
    row each, in order, and are checked for a shared kernel key once at the end (a set of
    the group's hashes): a dict of hash -> row kept through the loop was ~12 MB at 100,000
    names. Only where two entries share a key (`x.org` and `*.x.org`, a name listed twice)
    or an entry has too many ranges is the group redone entry by entry (`_add_name`), which
    merges them or names the conflict as it always did."""
    table = kp.name_allow
    start = len(table)
    # the table's columns, appended to in the loop: a method call per name was a third of
    # compiling 100,000 names
    gids_append, hashes_append = table.gids.append, table.hashes.append
    patterns_append, form_append = table.patterns.append, table.form.append
    forms: Dict[Tuple[Any, str, bool], Tuple[Tuple[Tuple[int, int, int], ...], int]] = {}
    per_entry = False
    for is_cidr, spec, ports, proto in allow_items(allow):
        if is_cidr:
            fam, addr, plen = _net_bytes(spec)
            for lo, hi in ([_port_range(p) for p in ports] or [(0, 65535)]):
                kp.dest_allow.append(DestEntry(pid, gid, fam, addr, plen, 0, lo, hi, PROTO_NUM[proto]))
            continue
        wild = spec.startswith("*.")
        known = forms.get((ports, proto, wild))
        if known is None:
            rng = tuple((lo, hi, PROTO_NUM[proto]) for lo, hi in ([_port_range(p) for p in ports] or [(1, 65535)]))
            known = forms[(ports, proto, wild)] = (rng, table._form_of(NAME_SUBDOMAINS if wild else NAME_EXACT, rng))
        rng, form = known
        if per_entry:
            continue
        if len(rng) > NAME_RANGES:
            per_entry = True
            continue
        base = spec[2:] if wild else spec
        gids_append(gid)
        hashes_append(hasher(base))
        patterns_append(spec)
        form_append(form)
    n = len(table) - start
    if not per_entry and len(set(table.hashes[start:])) == n:
        return
    del table.gids[start:], table.hashes[start:], table.patterns[start:], table.form[start:]
    rows: Dict[int, int] = {}
    for is_cidr, spec, ports, proto in allow_items(allow):
        if not is_cidr:
            _add_name(table, rows, gid, spec, forms[(ports, proto, spec.startswith("*."))][0], hasher)


def _add_name(table: NameAllowTable, rows: Dict[int, int], gid: int, name: str,
              rng: Tuple[Tuple[int, int, int], ...], hasher=name_hash) -> None:
    """One allowed name (`x.org` or `*.x.org`) with its port ranges into the group's rows of
    `table`; `rows` maps the group's name hashes to their rows."""
    wild = name.startswith("*.")
    base = name[2:] if wild else name
    flag = NAME_SUBDOMAINS if wild else NAME_EXACT
    h = hasher(base)
    i = rows.get(h)
    if i is None:
        if len(rng) > NAME_RANGES:
            raise PolicyError(f"egress allow entries for {name!r}: more than {NAME_RANGES} port ranges; "
                              "merge them into ranges")
        rows[h] = table.add(gid, base if flag == NAME_EXACT else name, h, flag, rng)
        return
    old_flags, old_ranges = table.forms[table.form[i]]
    # `x.org` and `*.x.org` share one kernel key (the suffix): their ports must agree
    if old_flags != flag and set(old_ranges) != set(rng):
        raise PolicyError(f"egress allow entries {table.patterns[i]!r} and {name!r} share the name "
                          f"{base!r} with different ports or protocols; give them the same")
    flag |= old_flags
    merged = tuple(dict.fromkeys(old_ranges + rng))
    if len(merged) > NAME_RANGES:
        raise PolicyError(f"egress allow entries for {name!r}: more than {NAME_RANGES} port ranges; "
                          "merge them into ranges")
    table.set(i, base if flag == NAME_EXACT else name, flag, merged)
