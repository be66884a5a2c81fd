"""`agenttrace policy learn`: the egress allow-list a recorded (benign) run needed.

From JSON lines: every connect or UDP send to a destination in the learned scopes becomes an
allow entry -- by the DNS name the agent resolved to get the address when there was one
(names come from the record's `dst.name` or from the run's DNS answers), else by address
(/32, /128) -- with the port used. Grouped by agent group. Metadata destinations are never
learned: an allow-list must not open what a lab never wants reached; they are listed as
skipped. The result is where an operator starts, not where they stop: widen names into
`*.` wildcards, addresses into the mirror's CIDR, by hand."""
from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import orjson

LEARN_SCOPES = ("external",)


class LearnError(ValueError):
    pass


@dataclass
class Learned:
    # group -> {(kind "name"|"cidr", value, port, proto)}
    entries: Dict[str, Set[Tuple[str, str, int, str]]] = field(default_factory=lambda: defaultdict(set))
    skipped: List[str] = field(default_factory=list)
    connects: int = 0
    records: int = 0

    def specs(self, group: str) -> List[str]:
        """The entries as `--allow-egress` values."""
        out = []
        for kind, value, port, _proto in sorted(self.entries.get(group, ())):
            if kind == "cidr" and ":" in value:
                net, plen = value.split("/")
                out.append(f"[{net}]/{plen}:{port}")
            else:
                out.append(f"{value}:{port}")
        return out


def learn(events_file: str, scopes=LEARN_SCOPES) -> Learned:
    res = Learned()
    names: Dict[Tuple[str, str], str] = {}     # (agent id, addr) -> name resolved for it
    try:
        f = open(events_file, "rb")
    except OSError as e:
        raise LearnError(f"{events_file}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise LearnError(f"{events_file}:{n}: not JSON: {e}") from None
            if not isinstance(rec, dict):
                raise LearnError(f"{events_file}:{n}: not a JSON object")
            res.records += 1
            agent = rec.get("agent") or {}
            aid = agent.get("id") or ""
            kind = rec.get("kind")
            if kind == "dns":
                d = rec.get("dns") or {}
                q = (d.get("query") or "").rstrip(".").lower()
                for a in d.get("answers") or ():
                    if a.get("type") in ("A", "AAAA") and q and a.get("data"):
                        names[(aid, _norm(a["data"]))] = q
                continue
            if kind != "connect":
                continue
            net = rec.get("net") or {}
            dst = net.get("dst") or {}
            addr, port = dst.get("addr"), dst.get("port")
            if not addr or not isinstance(port, int):
                raise LearnError(f"{events_file}:{n}: connect record without net.dst.addr/port")
            scope = dst.get("scope")
            if scope == "metadata":
                res.skipped.append(f"{addr}:{port} (metadata: never allowed)")
                continue
            if scope not in scopes:
                continue
            res.connects += 1
            group = agent.get("group") or "default"
            name = (dst.get("name") or names.get((aid, _norm(addr))) or "").rstrip(".").lower()
            proto = net.get("proto") or "any"
            if name:
                res.entries[group].add(("name", name, port, proto))
            else:
                ip = ipaddress.ip_address(addr)
                res.entries[group].add(("cidr", f"{ip}/{ip.max_prefixlen}", port, proto))
    return res


def _norm(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr


def to_yaml(res: Learned, source: str) -> str:
    """A daemon config `egress:` section (comments say where it came from)."""
    import yaml
    egress = {}
    for group in sorted(res.entries):
        allow = []
        for kind, value, port, _proto in sorted(res.entries[group]):
            allow.append({kind: value, "ports": [port]})
        egress[group] = {"mode": "allow-list", "scopes": ["external", "metadata"], "action": "block",
                         "allow": allow}
    head = [f"# learned by `agenttrace policy learn` from {source}: {res.records} records,",
            f"# {res.connects} connects to external destinations, "
            f"{sum(len(v) for v in res.entries.values())} allow entries.",
            "# Review before enforcing: widen names into *. wildcards and addresses into CIDRs",
            "# where the service moves; metadata destinations are never learned."]
    for s in sorted(set(res.skipped)):
        head.append(f"# skipped: {s}")
    body = yaml.safe_dump({"egress": egress or {"default": {"mode": "allow-list", "scopes": ["external", "metadata"],
                                                            "action": "block", "allow": []}}},
                          sort_keys=False, default_flow_style=None)
    return "\n".join(head) + "\n" + body


def render(res: Learned, source: str, as_flags: bool = False) -> str:
    """The CLI's output: config YAML, or `--allow-egress` arguments for `run` (every group's
    entries: run has one group)."""
    if as_flags:
        return " ".join(f"--allow-egress {s}" for g in sorted(res.entries) for s in res.specs(g)) + "\n"
    return to_yaml(res, source)
