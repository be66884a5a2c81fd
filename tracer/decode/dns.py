"""DNS messages seen on agent sockets: parsing, the per-agent name cache, and name patterns.

The kernel copies at most ``AT_DNS_MAX`` (512) bytes of each message, so answers with EDNS
can arrive cut. ``parse_message`` uses dnspython for the whole message and, when that fails,
falls back to walking the header, question and as many complete records as were captured
(still with dnspython's name and rdata decoders), and says ``truncated``.

``NameCache`` maps addresses an agent resolved back to the names it asked for, so later
``connect``/``flow`` events carry ``dst.name``. ``name_matches``/``NamePatterns`` match names
against pool-domain style patterns (``*.nanopool.org``).
"""
from __future__ import annotations

import fnmatch
import re
import struct
from typing import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from agenttrace.decode.dnscache import NameCache  # noqa: F401  (re-exported; it lives apart from dnspython)


class DnsParseError(ValueError):
    """The bytes are not a DNS message, not even the start of one."""


_ADDR_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_MAX_ANSWERS = 32


def _name(n: dns.name.Name) -> str:
    t = n.to_text(omit_final_dot=True)
    return t if t != "" else "."


def parse_message(wire: bytes, tcp: bool = False) -> dict:
    """Parse one DNS message. ``tcp``: the bytes start with the 2-byte length prefix of DNS
    over TCP (RFC 1035 §4.2.2), as captured from a TCP segment.

    Returns ``{"id", "response", "opcode", "rcode"?, "query", "qtype", "qclass", "answers"?,
    "truncated"?, "tc"?}``; ``answers`` (responses only) are ``{"name","type","ttl","data"}``.
    Raises DnsParseError when not even the header and question could be read.
    """
    wire = bytes(wire)
    if tcp:
        if len(wire) < 2:
            raise DnsParseError(f"DNS over TCP: {len(wire)} bytes, no length prefix")
        declared = struct.unpack("!H", wire[:2])[0]
        wire = wire[2:2 + declared]
    try:
        msg = dns.message.from_wire(wire, ignore_trailing=True, raise_on_truncation=False)
    except dns.exception.DNSException:
        return _parse_partial(wire)
    out = _header(msg.id, msg.flags)
    if msg.question:
        q = msg.question[0]
        out.update(query=_name(q.name), qtype=dns.rdatatype.to_text(q.rdtype),
                   qclass=dns.rdataclass.to_text(q.rdclass))
    else:
        out.update(query="", qtype="", qclass="")
    if out["response"]:
        answers = []
        for rrset in msg.answer:
            for rd in rrset:
                answers.append(_answer(rrset.name, rrset.rdtype, rrset.ttl, rd))
        out["answers"] = answers[:_MAX_ANSWERS]
    return out


def _header(mid: int, flags: int) -> dict:
    out = {"id": mid, "response": bool(flags & dns.flags.QR),
           "opcode": dns.opcode.to_text(dns.opcode.from_flags(flags))}
    if out["response"]:
        out["rcode"] = dns.rcode.to_text(dns.rcode.from_flags(flags, 0))
    if flags & dns.flags.TC:
        out["tc"] = True  # the server's own truncation flag: the client will retry over TCP
    return out


def _answer(name, rdtype: int, ttl: int, rd) -> dict:
    # an A/AAAA/CNAME type in a class other than IN decodes as GenericRdata (no .address,
    # no .target): fuzzing found it; its text form is still reported
    if rdtype in _ADDR_TYPES and hasattr(rd, "address"):
        data = rd.address
    elif rdtype in (dns.rdatatype.CNAME, dns.rdatatype.PTR, dns.rdatatype.NS) and hasattr(rd, "target"):
        data = _name(rd.target)
    else:
        data = rd.to_text()
    return {"name": _name(name), "type": dns.rdatatype.to_text(rdtype), "ttl": int(ttl), "data": data}


def _parse_partial(wire: bytes) -> dict:
    if len(wire) < 12:
        raise DnsParseError(f"DNS message of {len(wire)} bytes: shorter than the 12-byte header")
    mid, flags, qd, an = struct.unpack("!HHHH", wire[:8])
    out = _header(mid, flags)
    out["truncated"] = True
    pos = 12
    if qd == 0:
        out.update(query="", qtype="", qclass="")
    else:
        try:
            qname, used = dns.name.from_wire(wire, pos)
            pos += used
            qtype, qclass = struct.unpack("!HH", wire[pos:pos + 4])
        except (dns.exception.DNSException, struct.error) as e:
            raise DnsParseError(f"DNS message id {mid}: question unreadable at offset {pos}: {e}") from None
        pos += 4
        out.update(query=_name(qname), qtype=dns.rdatatype.to_text(qtype), qclass=dns.rdataclass.to_text(qclass))
        for _ in range(qd - 1):  # rare, but skip further questions to reach the answers
            try:
                _, used = dns.name.from_wire(wire, pos)
            except dns.exception.DNSException:
                an = 0
                break
            pos += used + 4
    if out["response"]:
        answers = []
        for _ in range(min(an, _MAX_ANSWERS)):
            try:
                rname, used = dns.name.from_wire(wire, pos)
                rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", wire[pos + used:pos + used + 10])
                start = pos + used + 10
                if start + rdlen > len(wire):
                    break  # this record was cut by the capture
                rd = dns.rdata.from_wire(rclass, rtype, wire, start, rdlen)
            except (dns.exception.DNSException, struct.error, ValueError):
                break
            answers.append(_answer(rname, rtype, ttl, rd))
            pos = start + rdlen
        out["answers"] = answers
    return out


def dns_body(parsed: dict, server_addr: str, server_port: int) -> dict:
    """The the record contract (tracer/schema/event.schema.json) ``dns`` body: {query, qtype, server{addr,port}} plus answers (responses),
    rcode and the parse flags. ``server`` is the destination of a query and the source of a
    response."""
    body = {"query": parsed["query"], "qtype": parsed["qtype"],
            "server": {"addr": server_addr, "port": int(server_port)},
            "id": parsed["id"], "response": parsed["response"]}
    for k in ("rcode", "answers", "truncated", "tc"):
        if k in parsed:
            body[k] = parsed[k]
    return body


def dns_parts(rec) -> tuple[dict, dict]:
    """The ``net`` and ``dns`` parts of a the record contract (tracer/schema/event.schema.json) ``dns`` record from one kernel
    ``struct at_dns`` (agenttrace.kernel.wire.Dns). The server is the destination of a query and
    the source of an answer. A message that cannot be parsed still yields a record, with
    ``dns.error`` saying why and the first bytes in hex."""
    from agenttrace.kernel.wire import addr_str

    egress = rec.direction == 0
    tcp = rec.protocol == 6
    src = {"addr": addr_str(rec.saddr, rec.family), "port": int(rec.sport)}
    dst = {"addr": addr_str(rec.daddr, rec.family), "port": int(rec.dport)}
    local, server = (src, dst) if egress else (dst, src)
    net = {"proto": "tcp" if tcp else "udp", "family": "ipv6" if rec.family == 10 else "ipv4",
           "src": local, "dst": dict(server), "verdict": "allowed"}
    wire = bytes(rec.msg)[:min(int(rec.len), len(rec.msg))]
    try:
        body = dns_body(parse_message(wire, tcp=tcp), server["addr"], server["port"])
    except DnsParseError as e:
        body = {"query": "", "qtype": "", "server": dict(server), "error": str(e), "first_bytes": wire[:32].hex()}
    except Exception as e:   # a decoder bug: the record still goes out, saying so
        body = {"query": "", "qtype": "", "server": dict(server), "first_bytes": wire[:32].hex(),
                "error": f"DNS decoder failed: {type(e).__name__}: {e}"}
    body["direction"] = "egress" if egress else "ingress"
    return net, body


# -- name patterns -------------------------------------------------------------------------------

_LABEL_OK = re.compile(r"^[a-z0-9_*?\[\]!-]+$")


def normalize_name(name: str) -> str:
    """Lower case, no trailing dot, IDNA (punycode) for non-ASCII names."""
    name = name.strip().rstrip(".").lower()
    if name and not name.isascii():
        name = name.encode("idna").decode("ascii")
    return name


class NamePatterns:
    """A compiled set of DNS name patterns.

    - ``example.com`` matches exactly that name;
    - ``*.example.com`` matches any name *below* it at any depth (``a.example.com``,
      ``a.b.example.com``), not ``example.com`` itself — list both to cover both;
    - any other ``*``/``?`` is a glob within one label (``xmr-*.nanopool.org``).
    Matching is case-insensitive and ignores a trailing dot. Exact names and ``*.`` suffixes
    are set lookups, so a long pool list costs one probe per label of the name.
    """

    def __init__(self, patterns: Iterable[str]):
        self.exact: set[str] = set()
        self.suffixes: set[str] = set()
        self.globs: list[tuple[str, list[re.Pattern], bool]] = []
        self.patterns: list[str] = []
        for i, raw in enumerate(patterns):
            if not isinstance(raw, str) or not raw.strip(". "):
                raise ValueError(f"name pattern #{i}: {raw!r} is not a DNS name pattern")
            p = normalize_name(raw)
            labels = p.split(".")
            if any(not l or not _LABEL_OK.match(l) for l in labels):
                raise ValueError(f"name pattern #{i}: {raw!r} has an empty or invalid label")
            self.patterns.append(p)
            any_depth = labels[0] == "*"
            rest = labels[1:] if any_depth else labels
            if not any(ch in l for l in rest for ch in "*?["):
                (self.suffixes if any_depth else self.exact).add(".".join(rest))
            else:
                self.globs.append((p, [re.compile(fnmatch.translate(l)) for l in rest], any_depth))

    def match(self, name: str) -> str | None:
        """The first pattern that matches ``name``, or None."""
        n = normalize_name(name)
        if not n:
            return None
        if n in self.exact:
            return n
        labels = n.split(".")
        for i in range(1, len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self.suffixes:
                return "*." + suffix
        for p, regs, any_depth in self.globs:
            if any_depth:
                if len(labels) <= len(regs):
                    continue
                tail = labels[len(labels) - len(regs):]
            else:
                if len(labels) != len(regs):
                    continue
                tail = labels
            if all(r.match(l) for r, l in zip(regs, tail)):
                return p
        return None

    def __contains__(self, name: str) -> bool:
        return self.match(name) is not None


def name_matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches one pattern (see NamePatterns for the syntax)."""
    return NamePatterns([pattern]).match(name) is not None
