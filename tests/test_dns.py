"""DNS message parsing, the per-agent name cache and name patterns."""
from __future__ import annotations

import struct

import dns.edns
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from agenttrace.clock import FakeClock
from agenttrace.decode.dns import (DnsParseError, NameCache, NamePatterns, dns_body, name_matches,
                            parse_message)


def _response(qname: str, addrs: list[str], ttl: int = 300, cname: str | None = None, pad: int = 0) -> bytes:
    q = dns.message.make_query(qname, "A", use_edns=0 if pad else None, payload=4096)
    r = dns.message.make_response(q)
    owner = qname + "."
    if cname:
        r.answer.append(dns.rrset.from_text(qname + ".", ttl, "IN", "CNAME", cname + "."))
        owner = cname + "."
    if addrs:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", "A", *addrs))
    if pad:
        r.use_edns(0, 0, 4096, options=[dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\0" * pad)])
    return r.to_wire()


def test_query_and_response():
    q = dns.message.make_query("pool.supportxmr.com", "A").to_wire()
    p = parse_message(q)
    assert p["response"] is False and p["query"] == "pool.supportxmr.com" and p["qtype"] == "A"
    assert "answers" not in p and "truncated" not in p
    p = parse_message(_response("pool.supportxmr.com", ["203.0.113.20", "203.0.113.21"]))
    assert p["response"] is True and p["rcode"] == "NOERROR"
    assert sorted(p["answers"], key=lambda a: a["data"]) == [
        {"name": "pool.supportxmr.com", "type": "A", "ttl": 300, "data": "203.0.113.20"},
        {"name": "pool.supportxmr.com", "type": "A", "ttl": 300, "data": "203.0.113.21"}]
    body = dns_body(p, "192.0.2.53", 53)
    assert body["query"] == "pool.supportxmr.com" and body["qtype"] == "A"
    assert body["server"] == {"addr": "192.0.2.53", "port": 53} and len(body["answers"]) == 2


def test_tcp_length_prefix_and_nxdomain():
    q = dns.message.make_query("nothing.example", "AAAA")
    r = dns.message.make_response(q)
    r.set_rcode(dns.rcode.NXDOMAIN)
    wire = r.to_wire()
    p = parse_message(struct.pack("!H", len(wire)) + wire + b"trailing segment bytes", tcp=True)
    assert (p["query"], p["qtype"], p["rcode"], p["answers"]) == ("nothing.example", "AAAA", "NXDOMAIN", [])
    with pytest.raises(DnsParseError, match="length prefix"):
        parse_message(b"\x00", tcp=True)


def test_response_cut_by_the_capture_keeps_complete_answers():
    full = _response("pool.supportxmr.com", [f"203.0.113.{i}" for i in range(1, 40)])
    assert len(full) > 512
    p = parse_message(full[:512])
    assert p["truncated"] is True and p["query"] == "pool.supportxmr.com"
    assert 20 < len(p["answers"]) < 39
    # The complete records before the cut, in wire order (the full parse lists them in that order too).
    in_wire_order = [a["data"] for a in parse_message(full)["answers"]]
    assert "truncated" not in parse_message(full)
    assert [a["data"] for a in p["answers"]] == in_wire_order[:len(p["answers"])]
    # Cut inside the question: header-only knowledge is not enough.
    with pytest.raises(DnsParseError, match="question unreadable"):
        parse_message(full[:20])
    with pytest.raises(DnsParseError, match="shorter than the 12-byte header"):
        parse_message(b"\x12\x34")


def test_cname_chain_names_the_query():
    p = parse_message(_response("pool.minexmr.example", ["203.0.113.30"], cname="edge.cdn.example"))
    assert [a["type"] for a in p["answers"]] == ["CNAME", "A"]
    assert p["answers"][0]["data"] == "edge.cdn.example"
    cache = NameCache(FakeClock())
    assert cache.learn("a1", p) == 1
    assert cache.lookup("a1", "203.0.113.30") == "pool.minexmr.example"


def test_glibc_and_dnspython_queries_from_the_lab_parse(netlab):
    before = len(netlab.server_events("dns"))
    netlab.check_in_agent(["getent", "ahostsv4", "db.corp.internal"], check=True)
    netlab.python_in_agent("import dns.resolver\nr = dns.resolver.Resolver(configure=False)\n"
                           f"r.nameservers = ['{netlab.dns_host}']\nr.resolve('www.example.org', 'A', tcp=True)\n",
                           check=True)
    got = netlab.server_events("dns")[before:]
    parsed = [parse_message(bytes.fromhex(e["wire"])) for e in got]
    assert {(p["query"], p["qtype"]) for p in parsed} >= {("db.corp.internal", "A"), ("www.example.org", "A")}
    assert all(p["response"] is False and "truncated" not in p for p in parsed)


def test_name_cache_ttl_lru_and_agents():
    clock = FakeClock()
    c = NameCache(clock, max_per_agent=2, min_ttl=10, max_ttl=100)
    c.add("a1", "203.0.113.20", "Pool.SupportXMR.com.", ttl=30)
    assert c.lookup("a1", "203.0.113.20") == "pool.supportxmr.com"
    assert c.lookup("a2", "203.0.113.20") is None  # per agent
    clock.advance(29)
    assert c.lookup("a1", "203.0.113.20") == "pool.supportxmr.com"
    clock.advance(1)
    assert c.lookup("a1", "203.0.113.20") is None  # expired at its TTL
    c.add("a1", "198.51.100.7", "www.example.org", ttl=0)  # clamped up to min_ttl
    clock.advance(9)
    assert c.lookup("a1", "198.51.100.7") == "www.example.org"
    c.add("a1", "10.77.0.5", "git.corp.internal", ttl=10_000)  # clamped down to max_ttl
    c.lookup("a1", "198.51.100.7")  # touch: the internal entry is now least recently used
    c.add("a1", "2001:0db8::0001", "v6.example", ttl=50)
    assert c.lookup("a1", "10.77.0.5") is None and c.evictions == 1
    assert c.lookup("a1", "2001:db8::1") == "v6.example"  # addresses are normalised
    clock.advance(100)
    assert c.lookup("a1", "2001:db8::1") is None
    assert c.lookup("a1", "not an address") is None


def test_name_cache_bounds_agents_and_ignores_failures():
    c = NameCache(FakeClock(), max_agents=2)
    for agent in ("a1", "a2", "a3"):
        c.add(agent, "203.0.113.1", agent + ".example", 60)
    assert c.lookup("a1", "203.0.113.1") is None and c.lookup("a3", "203.0.113.1") == "a3.example"
    nx = parse_message(_response("x.example", []))
    nx_fail = dict(nx, rcode="SERVFAIL", answers=[{"type": "A", "data": "203.0.113.9", "ttl": 5, "name": "x"}])
    assert c.learn("a3", nx_fail) == 0
    assert c.learn("a3", parse_message(dns.message.make_query("q.example", "A").to_wire())) == 0
    with pytest.raises(ValueError):
        NameCache(max_per_agent=0)


def test_name_patterns():
    assert name_matches("pool.supportxmr.com", "pool.supportxmr.com")
    assert name_matches("POOL.SupportXMR.com.", "pool.supportxmr.com")
    assert name_matches("xmr-eu1.nanopool.org", "*.nanopool.org")
    assert name_matches("a.b.nanopool.org", "*.nanopool.org")
    assert not name_matches("nanopool.org", "*.nanopool.org")
    assert not name_matches("evilnanopool.org", "*.nanopool.org")
    assert name_matches("xmr-eu1.nanopool.org", "xmr-*.nanopool.org")
    assert not name_matches("eth-eu1.nanopool.org", "xmr-*.nanopool.org")
    assert not name_matches("a.xmr-eu1.nanopool.org", "xmr-*.nanopool.org")
    assert name_matches("a.xmr-eu1.nanopool.org", "*.xmr-*.nanopool.org")
    assert name_matches("xn--bcher-kva.example", "bücher.example")
    pats = NamePatterns(["*.nanopool.org", "pool.supportxmr.com", "*.2miners.com", "xmr.*.example"])
    assert pats.match("pool.supportxmr.com") == "pool.supportxmr.com"
    assert pats.match("eu.2miners.com") == "*.2miners.com"
    assert pats.match("xmr.pool.example") == "xmr.*.example"
    assert pats.match("github.com") is None and "github.com" not in pats and pats.match("") is None
    for bad in ["", ".", "a..b", "bad name.example", 7]:
        with pytest.raises(ValueError, match="pattern #0"):
            NamePatterns([bad])


def _dns_rec(wire: bytes, direction: int, protocol: int = 17):
    import ctypes as C
    import socket
    from agenttrace.kernel import wire as ev
    r = ev.Dns()
    r.family, r.protocol, r.direction = socket.AF_INET, protocol, direction
    agent, server = b"\0" * 10 + b"\xff\xff" + bytes([172, 31, 255, 2]), b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 53])
    s, d, sp, dp = (agent, server, 41000, 53) if direction == 0 else (server, agent, 53, 41000)
    C.memmove(r.saddr, s, 16)
    C.memmove(r.daddr, d, 16)
    r.sport, r.dport, r.len = sp, dp, len(wire)
    C.memmove(r.msg, wire, len(wire))
    return r


def test_dns_parts_query_answer_and_garbage():
    from agenttrace.decode.dns import dns_parts
    q = dns.message.make_query("pool.supportxmr.com", "A").to_wire()
    net, body = dns_parts(_dns_rec(q, 0))
    assert net["proto"] == "udp" and net["dst"] == {"addr": "192.0.2.53", "port": 53}
    assert net["src"] == {"addr": "172.31.255.2", "port": 41000}
    assert (body["query"], body["qtype"], body["server"], body["direction"]) == (
        "pool.supportxmr.com", "A", {"addr": "192.0.2.53", "port": 53}, "egress")
    a = _response("pool.supportxmr.com", ["203.0.113.20"])
    net, body = dns_parts(_dns_rec(struct.pack("!H", len(a)) + a, 1, protocol=6))
    assert net["proto"] == "tcp" and body["server"] == {"addr": "192.0.2.53", "port": 53}
    assert body["answers"][0]["data"] == "203.0.113.20" and body["direction"] == "ingress"
    cache = NameCache(FakeClock())
    assert cache.learn("a1", body) == 1 and cache.lookup("a1", "203.0.113.20") == "pool.supportxmr.com"
    net, body = dns_parts(_dns_rec(b"\x01\x02\x03", 0))
    assert "shorter than the 12-byte header" in body["error"] and body["first_bytes"] == "010203"
