"""Hypothesis fuzzing of every parser that sees agent-controlled bytes, on its real entry
point (tracer/lab/fuzzing.py). Bounded examples keep CI fast; bench/fuzz.py runs the same
properties for longer. Every input that ever broke a parser is kept in tests/fuzz_corpus/
and replayed here."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from agenttrace.lab import fuzzing  # noqa: E402

# Bounded and reproducible in CI (derandomize: the same examples every run, so a failure is a
# bug, never luck); AGENTTRACE_FUZZ_EXAMPLES raises the count for a local deeper run.
EXAMPLES = int(os.environ.get("AGENTTRACE_FUZZ_EXAMPLES", "300"))
CI = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
S = fuzzing.strategies()
CORPUS = Path(__file__).parent / "fuzz_corpus"


@CI
@given(S["dns"], st.booleans(), st.booleans())
def test_dns_decoder_never_raises(wire, tcp, egress):
    body = fuzzing.check_dns(wire, tcp=tcp, egress=egress)
    assert "query" in body and len(body.get("answers", [])) <= 32


@CI
@given(S["dns"], S["head"])
def test_dns_decoder_with_hostile_header_fields(wire, head):
    # the kernel's length, family and ports are trusted less than they look: a record whose
    # len exceeds the buffer must still decode
    fuzzing.check_dns(wire, head=head)


@CI
@given(S["flow"], st.booleans())
def test_flow_classifier_never_raises(data, egress):
    fuzzing.check_flow(data, egress=egress)


@CI
@given(S["flow"], S["head"])
def test_flow_with_hostile_header_fields(data, head):
    fuzzing.check_flow(data, head=head)


@CI
@given(S["record"])
def test_record_decoder_and_enricher_never_raise(raw):
    fuzzing.check_record(raw)


def _corpus():
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*.bin"))


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_regressions(path):
    # file name: <target>/<anything>-v<variant>.bin
    stem = path.stem
    variant = int(stem.rsplit("-v", 1)[1]) if "-v" in stem else 0
    fuzzing.run_one(path.parent.name, path.read_bytes(), variant)


def test_corpus_is_not_empty():
    # the crashers found while building this are kept; losing them silently is a regression
    assert len(_corpus()) >= 1


def test_decoy_answer_does_not_hide_the_real_one():
    # found by the fuzzer: an A record of class 0 decodes as generic rdata; it crashed the
    # decoder, and in the name cache it would have hidden every answer after it
    import dns.message
    import dns.rrset
    from agenttrace.decode.dns import NameCache, parse_message
    q = dns.message.make_query("pool.example", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("pool.example.", 60, "CLASS0", "A", r"\# 4 c0000201"))
    r.answer.append(dns.rrset.from_text("pool.example.", 60, "IN", "A", "203.0.113.20"))
    parsed = parse_message(r.to_wire())
    cache = NameCache()
    assert cache.learn(7, parsed) == 1
    assert cache.lookup(7, "203.0.113.20") == "pool.example"


def test_held_connect_is_released_not_overwritten_when_its_socket_address_is_reused():
    # two connects on the same kernel socket address (the first socket freed and its memory
    # reused) before any outcome: the first goes out as "pending" and is counted, the outcome
    # goes to the second
    import ctypes as C
    from agenttrace.kernel import wire as E
    from agenttrace.lab.fuzzing import _Env
    enr = _Env().enricher

    def connect(cookie):
        o = E.Connect()
        o.h.type, o.h.tgid, o.h.agent_cgroup_id = E.EV_CONNECT, 4242, 9
        o.cookie, o.sk, o.family, o.protocol, o.dport = cookie, 0xffff0001, 2, 6, 80
        o.daddr[10] = o.daddr[11] = 0xff
        return enr(E.EV_CONNECT, o)

    assert connect(11) == []
    first = connect(12)
    assert [e.cookie for e in first] == [11] and first[0].record["net"]["result"] == "pending"
    assert enr.pending_displaced == 1
    r = E.ConnResult()
    r.h.type, r.sk, r.family, r.result = E.EV_CONN_RESULT, 0xffff0001, 2, E.RESULT_ESTABLISHED
    got = enr(E.EV_CONN_RESULT, r)
    assert [e.cookie for e in got] == [12] and got[0].record["net"]["result"] == "established"
    assert enr.pending == {} and enr.flush_pending() == []
