"""Property checks for every parser that sees agent-controlled bytes, shared by the CI tests
(tests/test_fuzz_parsers.py, bounded examples) and the longer bench run (bench/fuzz.py).

Each target takes raw bytes and drives one real entry point the reader calls — the DNS
decoder (`dns.dns_parts`), the flow classifier (`protocols.flow_parts` → SSH, TLS, HTTP,
stratum), and the ring-buffer record decoder plus the enrich stage (`events.decode_buf` →
`enrich.Enricher`) — then checks the stage's contract: no exception escapes, and what comes
out is bounded (it serializes to one JSON line of bounded size). A target raising means a
record would be lost (counted as a stage error) or, for a parser called outside the reader's
guard, a crash.
"""
from __future__ import annotations

import ctypes as C

from agenttrace.kernel import wire as E

# the largest record a hostile input may make: 256 captured bytes must not become megabytes
MAX_RECORD_BYTES = 64 * 1024


def _line_size(obj) -> int:
    from agenttrace.sinks.outputs import dumps_line
    return len(dumps_line(obj))


def _struct(cls, raw: bytes, **fields):
    o = cls.from_buffer_copy(raw[:C.sizeof(cls)].ljust(C.sizeof(cls), b"\0"))
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def check_dns(wire: bytes, head: bytes = b"", tcp: bool = False, egress: bool = True) -> dict:
    from agenttrace.decode.dns import DnsParseError, dns_parts, parse_message
    # the parser itself may only say "not DNS" (dns_parts also guards against anything else,
    # which would hide a decoder bug from this check)
    from agenttrace.decode.dns import NameCache
    try:
        parsed = parse_message(wire[:E.DNS_MAX], tcp=tcp)
    except DnsParseError:
        parsed = None
    if parsed is not None:
        NameCache().learn(1, parsed)
    rec = _struct(E.Dns, head)
    n = min(len(wire), E.DNS_MAX)
    C.memmove(C.addressof(rec) + E.Dns.msg.offset, wire[:n], n)
    rec.len = n if head == b"" else rec.len
    rec.protocol = 6 if tcp else 17
    rec.direction = 0 if egress else 1
    net, body = dns_parts(rec)
    size = _line_size({"net": net, "dns": body})
    assert size <= MAX_RECORD_BYTES, f"dns record of {size} bytes"
    return body


def check_flow(data: bytes, head: bytes = b"", egress: bool = True) -> dict:
    from agenttrace.decode.protocols import PROTOCOLS, flow_parts
    rec = _struct(E.Flow, head)
    n = min(len(data), E.FLOW_BYTES)
    C.memmove(C.addressof(rec) + E.Flow.data.offset, data[:n], n)
    if head == b"":
        rec.len = n
    rec.direction = 0 if egress else 1
    net, flow = flow_parts(rec)
    assert flow["protocol"] in PROTOCOLS
    size = _line_size({"net": net, "flow": flow})
    assert size <= MAX_RECORD_BYTES, f"flow record of {size} bytes"
    return flow


class _Env:
    """An enrich stage with no kernel behind it (agent and process lookups fall back)."""

    def __init__(self):
        from agenttrace.enrich.cgroups import AgentResolver
        from agenttrace.enrich.enricher import Enricher
        from agenttrace.enrich.scope import Scoper
        from agenttrace.enrich.proctable import ProcTable
        self.enricher = Enricher(AgentResolver(), ProcTable(4096), Scoper(), node="fuzz")


_env: _Env | None = None


def check_record(raw: bytes) -> list:
    """One ring-buffer record as the reader sees it: decode, enrich, serialize."""
    global _env
    if _env is None:
        _env = _Env()
    rtype, obj = E.decode_buf(memoryview(raw), len(raw))
    if obj is None:
        return []
    out = _env.enricher(rtype, obj)
    out += _env.enricher.flush_pending()
    for ev in out:
        size = _line_size(ev.record)
        assert size <= MAX_RECORD_BYTES, f"{ev.kind} record of {size} bytes"
    return out


# --- strategies -----------------------------------------------------------------------------
def strategies():
    """Hypothesis strategies per target: random bytes plus inputs shaped like each protocol,
    cut at every length, so the fuzzer gets past the first byte checks."""
    from hypothesis import strategies as st

    def cut(s):
        return st.tuples(s, st.integers(0, 600)).map(lambda t: t[0][:t[1]] if t[1] < len(t[0]) else t[0])

    label = st.binary(min_size=0, max_size=70)
    name = st.lists(label, min_size=0, max_size=6).map(
        lambda ls: b"".join(bytes([min(len(x), 255) & 0xff]) + x[:63] for x in ls) + b"\0")
    pointer = st.integers(0, 0x3fff).map(lambda p: (0xc000 | p).to_bytes(2, "big"))
    u16 = st.integers(0, 0xffff).map(lambda v: v.to_bytes(2, "big"))
    u32 = st.integers(0, 0xffffffff).map(lambda v: v.to_bytes(4, "big"))
    rr = st.tuples(st.one_of(name, pointer), u16, u16, u32, st.binary(max_size=80)).map(
        lambda t: t[0] + t[1] + t[2] + t[3] + len(t[4]).to_bytes(2, "big") + t[4])
    dns_msg = st.tuples(u16, u16, st.integers(0, 3), st.integers(0, 40), st.integers(0, 3), st.integers(0, 3),
                        name, u16, u16, st.lists(rr, max_size=6)).map(
        lambda t: t[0] + t[1] + b"".join(x.to_bytes(2, "big") for x in t[2:6]) + t[6] + t[7] + t[8] + b"".join(t[9]))
    dns_wire = st.one_of(st.binary(max_size=600), cut(dns_msg))

    ext = st.tuples(st.sampled_from([0, 16, 43, 10, 13, 0x0a0a, 65281]), st.binary(max_size=60)).map(
        lambda t: t[0].to_bytes(2, "big") + len(t[1]).to_bytes(2, "big") + t[1])
    sni = st.binary(max_size=40).map(
        lambda h: (0).to_bytes(2, "big") + (len(h) + 5).to_bytes(2, "big") + (len(h) + 3).to_bytes(2, "big")
        + b"\0" + len(h).to_bytes(2, "big") + h)
    hello_body = st.tuples(st.sampled_from([1, 2, 4, 11]), u16, st.binary(min_size=32, max_size=32),
                           st.binary(max_size=33), st.lists(u16, max_size=8), st.lists(st.one_of(ext, sni), max_size=6)).map(
        lambda t: t[1] + t[2] + bytes([len(t[3])]) + t[3] + (len(t[4]) * 2).to_bytes(2, "big") + b"".join(t[4])
        + b"\x01\x00" + sum(map(len, t[5])).to_bytes(2, "big") + b"".join(t[5]))
    tls = st.tuples(st.sampled_from([1, 2, 4]), hello_body, st.integers(0, 4)).map(
        lambda t: b"\x16\x03" + bytes([t[2]]) + (len(t[1]) + 4).to_bytes(2, "big") + bytes([t[0]])
        + len(t[1]).to_bytes(3, "big") + t[1])
    text = st.text(alphabet=st.characters(codec="latin-1"), max_size=120).map(lambda s: s.encode("latin-1"))
    http = st.one_of(
        st.tuples(st.sampled_from([b"GET", b"POST", b"CONNECT", b"PRI", b"HEAD", b"XYZ"]), text,
                  st.sampled_from([b" HTTP/1.1", b" HTTP/2", b"", b" HTTP/1"]),
                  st.lists(st.tuples(st.sampled_from([b"Host", b"User-Agent", b"Upgrade", b"X"]), text), max_size=5)).map(
            lambda t: t[0] + b" " + t[1] + t[2] + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in t[3])),
        st.tuples(st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 "]), st.integers(0, 999), text).map(
            lambda t: t[0] + str(t[1]).encode() + b" " + t[2] + b"\r\nServer: x\r\n"),
        st.just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    ssh = st.tuples(st.sampled_from([b"", b"junk\r\n", b"\n"]), text, text).map(
        lambda t: t[0] + b"SSH-2.0-" + t[1] + b" " + t[2] + b"\r\n")
    jsonish = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)
    stratum = st.lists(st.tuples(st.sampled_from(["mining.subscribe", "mining.authorize", "login", "getjob",
                                                  "submit", "job", "x"]), jsonish, jsonish), min_size=1, max_size=4).map(
        lambda ms: b"\n".join(
            __import__("json").dumps({"id": i, "method": m, "params": p, "result": r}).encode()
            for i, (m, p, r) in enumerate(ms)) + b"\n")
    flow = st.one_of(st.binary(max_size=300), cut(tls), cut(http), cut(ssh), cut(stratum))

    known = sorted(E.BY_TYPE)
    record = st.tuples(st.sampled_from(known + [0, E.EV_MAX + 3]), st.binary(max_size=5000),
                       st.integers(0, 5000)).map(
        lambda t: t[0].to_bytes(2, "little") + t[1][2:][:max(0, t[2] - 2)])
    return {"dns": dns_wire, "flow": flow, "record": record, "head": st.binary(max_size=120)}


def run_one(target: str, data: bytes, variant: int = 0) -> None:
    """The corpus replays through this: one input for one target (variant picks direction/tcp)."""
    if target == "dns":
        check_dns(data, tcp=bool(variant & 1), egress=not variant & 2)
    elif target == "flow":
        check_flow(data, egress=not variant & 1)
    elif target == "record":
        check_record(data)
    else:
        raise ValueError(target)
