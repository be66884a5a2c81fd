"""The daemon config's `egress:` section: per agent group, which destinations (CIDRs and DNS
name patterns, optional ports/proto) its agents may reach, and the rules it becomes.

Its own module, depending only on the rule schema: the rule loader turns these policies into
rules and the kernel-policy compiler (match/policy.py) turns them into map entries, so neither
of those needs to import the other.
"""
from __future__ import annotations

import ipaddress
import re
from array import array
from collections.abc import Sequence
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agenttrace.match.schema import RuleModel

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
# the whole name in one match: a regex call per label was most of the time a config with
# 100,000 allowed names took to validate
_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")


def check_name_pattern(v: str) -> str:
    """A DNS name, or `*.` and a name (any name below it); returned lowercase."""
    n = v.strip().lower().rstrip(".")
    base = n[2:] if n.startswith("*.") else n
    if len(base) > 253 or not _NAME.fullmatch(base):
        raise ValueError(f"not a DNS name or '*.name' pattern: {v!r}")
    return n


class EgressDest(BaseModel):
    """One allow or deny entry: a CIDR (`cidr`) or, for allow entries, a DNS name (`name`:
    `pypi.org`, or `*.pythonhosted.org` for every name below it), with optional ports and
    protocol."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    cidr: Optional[str] = None
    name: Optional[str] = None
    ports: List[Union[int, str]] = Field(default_factory=list)     # 443, "8000-8100"; empty = any
    proto: Literal["tcp", "udp", "any"] = "any"

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            ipaddress.ip_network(v, strict=False)   # ValueError names the bad value
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_name_pattern(v)

    @model_validator(mode="after")
    def _one(self) -> "EgressDest":
        if (self.cidr is None) == (self.name is None):
            raise ValueError("give exactly one of 'cidr' or 'name'")
        return self

    def spec(self) -> str:
        return self.cidr if self.cidr is not None else self.name

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: List[Union[int, str]]) -> List[Union[int, str]]:
        for p in v:
            _port_range(p)
        return v


class EgressPolicy(BaseModel):
    """Egress policy of one agent group, for embedding in the daemon's config file.

    mode `open`: everything not denied is allowed; `allow-list`: connects to destinations in
    `scopes` (default: external) must match an `allow` entry. `deny` entries apply in both
    modes. `action` says what a violation does: `report`, or `block` (in the kernel)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["open", "allow-list"] = "open"
    scopes: List[Literal["internal", "metadata", "external"]] = Field(default_factory=lambda: ["external"])
    allow: List[EgressDest] = Field(default_factory=list)
    # a file of `--allow-egress` specs, one per line (`NAME[:PORTS]`, `CIDR[:PORTS]`, `#`
    # comments), added after `allow`'s entries. For long lists: 100,000 entries inline cost
    # ~10 s and ~370 MB to load (a YAML node and a model each); from a file they are read
    # like `run --allow-egress @FILE` (~2 s). Relative to the config file's folder; read again
    # on every reload. The config loader fills `allow` from it (config._read_allow_files).
    allow_file: Optional[str] = None
    deny: List[EgressDest] = Field(default_factory=list)
    action: Literal["report", "block"] = "report"
    severity: Literal["info", "low", "medium", "high", "critical"] = "medium"
    # addresses learned from DNS answers for `name` entries stay allowed for the answer's TTL,
    # clamped: the floor covers runtimes that cache lookups (Java keeps them 30 s), the
    # ceiling bounds how long an address outlives the name that pointed at it
    ttl_min: int = Field(30, ge=0, le=86400)
    ttl_max: int = Field(3600, ge=1, le=7 * 86400)

    @model_validator(mode="after")
    def _ttls(self) -> "EgressPolicy":
        if self.ttl_max < self.ttl_min:
            raise ValueError("ttl_max must not be below ttl_min")
        if self.allow_file is not None and self.mode != "allow-list":
            # in open mode allow entries decide nothing: a file given there is a forgotten mode
            raise ValueError("allow_file needs mode: allow-list (in open mode allow entries decide nothing)")
        for d in self.deny:
            if d.name is not None:
                raise ValueError(f"deny entries are CIDRs; name {d.name!r} cannot be denied by address")
        return self


class AllowList(Sequence):
    """`EgressPolicy.allow` for long lists (`run --allow-egress @FILE`): each entry kept as its
    spec text and the index of its (cidr?, ports, proto) form, not as one pydantic model each.
    100,000 `EgressDest` models took ~55 MB and most of a 4.9 s start; the rule loader and the
    kernel-policy compiler read the entries through `allow_items`, which never builds them.
    Entries must be valid already (the parser checked each); indexing builds an `EgressDest`
    for callers that want one."""
    __slots__ = ("_specs", "_form", "_forms", "_form_ix")

    def __init__(self) -> None:
        self._specs: List[str] = []
        self._form = array("I")
        self._forms: List[Tuple[bool, Tuple[Union[int, str], ...], str]] = []
        self._form_ix: Dict[Tuple[bool, Tuple[Union[int, str], ...], str], int] = {}

    def add(self, spec: str, is_cidr: bool, ports: Tuple[Union[int, str], ...] = (), proto: str = "any") -> None:
        f = (is_cidr, ports, proto)
        i = self._form_ix.get(f)
        if i is None:
            i = self._form_ix[f] = len(self._forms)
            self._forms.append(f)
        self._specs.append(spec)
        self._form.append(i)

    def __len__(self) -> int:
        return len(self._specs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        is_cidr, ports, proto = self._forms[self._form[i]]
        kw: Dict[str, Any] = {"cidr" if is_cidr else "name": self._specs[i], "ports": list(ports)}
        if proto != "any":
            kw["proto"] = proto
        return EgressDest.model_construct(_fields_set=set(kw), **kw)

    def items(self) -> Iterator[Tuple[bool, str, Tuple[Union[int, str], ...], str]]:
        forms, form = self._forms, self._form
        for i, spec in enumerate(self._specs):
            is_cidr, ports, proto = forms[form[i]]
            yield is_cidr, spec, ports, proto

    def by_form(self) -> Iterator[Tuple[bool, Tuple[Union[int, str], ...], str, List[str]]]:
        """(is_cidr, ports, proto, specs) per distinct form, forms in the order they first
        appear and each one's specs in order."""
        if len(self._forms) == 1:
            yield (*self._forms[0], list(self._specs))
            return
        groups: List[List[str]] = [[] for _ in self._forms]
        for spec, f in zip(self._specs, self._form):
            groups[f].append(spec)
        for f, specs in zip(self._forms, groups):
            yield (*f, specs)

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, AllowList)) else NotImplemented

    __hash__ = None


def allow_items(allow) -> Iterator[Tuple[bool, str, Tuple[Union[int, str], ...], str]]:
    """(is_cidr, spec, ports, proto) of each entry of an `allow` list, in order, whether it is
    a list of `EgressDest` (the config file's) or an `AllowList`."""
    if isinstance(allow, AllowList):
        yield from allow.items()
        return
    for a in allow:
        yield a.cidr is not None, a.spec(), tuple(a.ports), a.proto


def _port_range(p: Union[int, str]) -> Tuple[int, int]:
    if isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536:
        return p, p
    if isinstance(p, str):
        lo, _, hi = p.partition("-")
        if lo.isdigit() and (hi.isdigit() or not hi):
            a, b = int(lo), int(hi or lo)
            if 0 < a <= b < 65536:
                return a, b
    raise ValueError(f"not a port or range 'lo-hi': {p!r}")


def egress_rule_models(egress: Dict[str, Any]) -> List[RuleModel]:
    """Rules equivalent to the per-group egress policies, so the engine reports/attributes
    violations exactly like file rules (ids `egress-policy.<group>.deny.<n>` and
    `egress-policy.<group>.allow-list`)."""
    out: List[RuleModel] = []
    for group, pol in sorted(egress.items()):
        if not isinstance(pol, EgressPolicy):
            pol = EgressPolicy.model_validate(pol)
        gid = _safe_id(group)
        base = dict(category="egress", severity=pol.severity, on=["connect"], action=pol.action,
                    tags=["T1041"])
        for i, d in enumerate(pol.deny):
            m: Dict[str, Any] = {"groups": [group], "dst": {"cidrs": [d.cidr], "ports": list(d.ports)}}
            if d.proto != "any":
                m["proto"] = [d.proto]
            out.append(RuleModel.model_validate(dict(
                base, id=f"egress-policy.{gid}.deny.{i}", match=m,
                description=f"Egress policy of agent group '{group}' denies {d.cidr} "
                            f"ports {d.ports or 'any'} ({d.proto}); edit the config's egress.deny to change it.")))
        if pol.mode == "allow-list":
            # entries that differ only in their name (or CIDR) are one `unless` match listing them
            # all: the same OR, and the engine then checks a connect against one set per distinct
            # (ports, proto) instead of walking 10,000 one-name matches
            merged: Dict[Tuple[str, Tuple[Any, ...], str], Dict[str, Any]] = {}
            forms = (pol.allow.by_form() if isinstance(pol.allow, AllowList)
                     else ((c, p, pr, [s]) for c, s, p, pr in allow_items(pol.allow)))
            for is_cidr, ports, proto, specs in forms:
                key = "cidrs" if is_cidr else "names"
                u = merged.get((key, ports, proto))
                if u is None:
                    u = merged[(key, ports, proto)] = {"dst": {key: [], "ports": list(ports)}}
                    if proto != "any":
                        u["proto"] = [proto]
                u["dst"][key].extend(specs)
            unless = list(merged.values())
            out.append(RuleModel.model_validate(dict(
                base, id=f"egress-policy.{gid}.allow-list",
                match={"groups": [group], "dst": {"scopes": list(pol.scopes)}, "unless": unless},
                description=f"Agent group '{group}' may only reach listed destinations in scopes "
                            f"{', '.join(pol.scopes)}; add entries to the config's egress.allow to permit more.")))
    return out


def _safe_id(name: str) -> str:
    import re
    return re.sub(r"[^a-z0-9_.-]", "-", name.lower()) or "group"


# --------------------------------------------------------------------------- compile

