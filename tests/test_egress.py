"""Egress allow-lists by DNS name and CIDR, enforced at connect in the kernel, with names
learned from DNS answers parsed in the kernel (probes/egress.c), in the netlab."""
import errno
import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import AGENTTRACE

from agenttrace.kernel.egress import SpecError, parse_allow_spec, run_policy
from agenttrace.match.policy import (NAME_EXACT, NAME_SUBDOMAINS, EgressPolicy, PolicyError, compile_policy,
                               name_hash)
from agenttrace.match.rules import load_rules

RULE = "egress-policy.default.allow-list"
DNS = "198.51.100.53:53"


# ------------------------------------------------------------------ offline

def test_spec_parsing():
    assert parse_allow_spec("pypi.org").name == "pypi.org"
    d = parse_allow_spec("*.PythonHosted.org:443")
    assert d.name == "*.pythonhosted.org" and d.ports == ["443"]
    assert parse_allow_spec("192.0.2.53:53").cidr == "192.0.2.53/32"
    assert parse_allow_spec("[2001:db8::]/32:80-90").cidr == "2001:db8::/32"
    assert parse_allow_spec("2001:db8::/32").ports == []
    for bad in ("", "bad..name", "*.a*b", "x:0", "x:70000", "x:1-a", "[::1"):
        with pytest.raises(SpecError):
            parse_allow_spec(bad)


def test_more_names_than_the_kernel_map_holds_are_refused_before_loading(tmp_path, agent_tree):
    """An allow-list with more names than `name_allow` holds is refused at start with exit 2
    (in a config file: naming the file), not after minutes of map writes (E2BIG)."""
    from agenttrace.kernel.maps import NAME_ALLOW_MAX
    n = NAME_ALLOW_MAX + 1
    cfg = tmp_path / "agenttrace.yaml"
    cfg.write_text(f"mode: monitor\nagents:\n  - cgroup: /{agent_tree.root.name}\negress:\n  default:\n"
                   "    mode: allow-list\n    action: block\n"
                   "    allow:\n" + "".join(f"      - name: n{i}.bench.test\n" for i in range(n)))
    p = subprocess.run([AGENTTRACE, "daemon", "--config", str(cfg)], capture_output=True, text=True, timeout=90)
    assert p.returncode == 2 and f"more than the {NAME_ALLOW_MAX}" in p.stderr, p.stderr[-2000:]
    assert f"{cfg}:5:" in p.stderr, "the error points at the group's line (egress.default)"
    # `run --allow-egress` meets the same check (capability.check) on the same policy; through
    # the CLI, 131,073 options spend ~10 s in click's option parser alone, so in process here
    from agenttrace.kernel.capability import CapabilityError, check
    rs = load_rules([], run_policy([f"n{i}.bench.test" for i in range(n)], "enforce"))
    with pytest.raises(CapabilityError, match=f"more than the {NAME_ALLOW_MAX}"):
        check(rs)


def test_name_entries_compile_to_backward_suffix_hashes():
    eg = run_policy(["pypi.org:443", "*.pythonhosted.org", "*.pypi.org:443", DNS], "enforce")
    kp = compile_policy(load_rules([], egress=eg))
    by = {n.pattern: n for n in kp.name_allow}
    assert by["*.pythonhosted.org"].hash == name_hash("pythonhosted.org")
    assert by["*.pythonhosted.org"].flags == NAME_SUBDOMAINS
    # pypi.org and *.pypi.org share one key (same suffix), both flags, same ports
    both = [n for n in kp.name_allow if n.hash == name_hash("pypi.org")]
    assert len(both) == 1 and both[0].flags == NAME_EXACT | NAME_SUBDOMAINS
    assert both[0].ranges == ((443, 443, 0),)
    (g,) = [g for g in kp.groups if g.name == "default"]
    assert g.allow_list and (g.ttl_min, g.ttl_max) == (30, 3600)
    with pytest.raises(PolicyError):
        compile_policy(load_rules([], egress=run_policy(["pypi.org:443", "*.pypi.org:80"], "enforce")))
    # one name, several ports: one kernel entry with a range each
    kp = compile_policy(load_rules([], egress=run_policy(["git.corp.example:22", "git.corp.example:443"], "enforce")))
    (g,) = [n for n in kp.name_allow if n.pattern == "git.corp.example"]
    assert sorted(g.ranges) == [(22, 22, 0), (443, 443, 0)]
    with pytest.raises(PolicyError, match="more than 4 port ranges"):
        compile_policy(load_rules([], egress=run_policy([f"x.example:{p}" for p in range(1, 6)], "enforce")))


def test_config_model_names_its_errors():
    with pytest.raises(ValueError, match="exactly one of 'cidr' or 'name'"):
        EgressPolicy.model_validate({"mode": "allow-list", "allow": [{"cidr": "10.0.0.0/8", "name": "x.org"}]})
    with pytest.raises(ValueError, match="not a DNS name"):
        EgressPolicy.model_validate({"mode": "allow-list", "allow": [{"name": "a..b"}]})
    with pytest.raises(ValueError, match="ttl_max"):
        EgressPolicy.model_validate({"mode": "allow-list", "ttl_min": 10, "ttl_max": 5})


def test_cli_rejects_a_bad_spec_before_starting():
    p = subprocess.run([AGENTTRACE, "run", "--allow-egress", "bad..name", "--", "true"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--allow-egress 'bad..name'" in p.stderr


# ------------------------------------------------------------------ kernel, in the netlab

# One address per name, none of them hosts of the lab: a connect that gets past the hook
# reports EINPROGRESS (non-blocking), one the kernel denies EPERM -- no server needed.
N4 = 500
N6 = 500
_POOL4 = ([f"198.51.100.{j}" for j in range(1, 249) if j not in (7, 53)] + [f"203.0.113.{j}" for j in range(21, 255)]
          + [f"192.0.2.{j}" for j in range(1, 255)])
NAMES4 = {f"n{i}.mirror.test": _POOL4[i] for i in range(N4)}
NAMES6 = {f"v{i}.mirror.test": f"2001:db8:77::{i + 1:x}" for i in range(N6)}
RECORDS = {
    **NAMES4,
    "alias.corp.test": "edge.cdn.test",           # CNAME chain: alias -> edge -> A
    "edge.cdn.test": "hop2.cdn.test",
    "hop2.cdn.test": "198.51.100.250",
    "other.test": "198.51.100.251",               # resolvable, but not allowed
    "short.mirror.test": "198.51.100.252",        # TTL 2 s
}
TTLS = {"short.mirror.test": 2}

CONNECT = r"""
import errno, socket, sys, json
def connect(addr, port=80):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect((addr, port))
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()
def resolve(name, fam=socket.AF_INET):
    return socket.getaddrinfo(name, 80, fam, socket.SOCK_STREAM)[0][4][0]
"""


@pytest.fixture(scope="module")
def lab():
    from netlab import NetLab, _require
    why = _require()
    if why:
        pytest.fail(why) if __import__("os").environ.get("AGENTTRACE_REQUIRE_BPF") == "1" else pytest.skip(why)
    with NetLab(records=RECORDS, ttls=TTLS, records6=NAMES6, sshd=False) as lab:
        yield lab


def _engine(mode, specs, ttl_min=30):
    from agenttrace.match.engine import Engine
    eg = run_policy(specs, mode)
    eg = {k: v.model_copy(update={"ttl_min": ttl_min}) for k, v in eg.items()}
    return Engine(load_rules([], egress=eg), mode=mode)


def _run(lab, cg, body, timeout=120):
    res = lab.python_in_agent(CONNECT + textwrap.dedent(body), cgroup=cg, timeout=timeout)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_resolve_then_connect_never_fails(lab, agent_tree, make_session):
    """1,000 names, each resolved through glibc and connected to at once: every answer's
    address must be allowed before the resolver library returns it."""
    a = agent_tree.agent("storm")
    sess = make_session([agent_tree.root], engine=_engine("enforce", ["*.mirror.test", DNS]),
                        mode="enforce", features=("proc", "net"))
    out = _run(lab, a, f"""
        bad = []
        for i in range({N4}):
            ad = resolve(f"n{{i}}.mirror.test")
            e = connect(ad)
            if e not in (0, errno.EINPROGRESS):
                bad.append((ad, e))
        for i in range({N6}):
            ad = resolve(f"v{{i}}.mirror.test", socket.AF_INET6)
            e = connect(ad)
            if e not in (0, errno.EINPROGRESS):
                bad.append((ad, e))
        print(json.dumps({{"bad": bad[:10], "nbad": len(bad)}}))
    """)
    assert out["nbad"] == 0, out["bad"]
    from agenttrace.kernel.egress import egress_stats
    st = egress_stats(sess.tracer.probes)
    assert st["addresses_learned"] >= N4 + N6 and st["messages_unparsed"] == 0
    sess.settle()
    assert not [al for al in sess.of("alert") if al["rule"]["id"] == RULE]


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_unreturned_address_is_blocked_with_an_alert(lab, agent_tree, make_session, mode):
    a = agent_tree.agent(f"deny-{mode}")
    sess = make_session([agent_tree.root], engine=_engine(mode, ["alias.corp.test", DNS]),
                        mode=mode, features=("proc", "net", "dns"))
    out = _run(lab, a, """
        r = {}
        r["alias"] = resolve("alias.corp.test")          # through a two-CNAME chain
        r["alias_c"] = connect(r["alias"])
        r["other"] = resolve("other.test")               # answered, but not an allowed name
        r["other_c"] = connect(r["other"])
        r["never"] = connect("198.51.100.249")           # no answer ever returned it
        print(json.dumps(r))
    """)
    assert out["alias"] == "198.51.100.250" and out["alias_c"] == errno.EINPROGRESS
    want = errno.EPERM if mode == "enforce" else errno.EINPROGRESS
    assert out["other_c"] == want and out["never"] == want
    alerts = sess.wait_for(lambda: [al for al in sess.of("alert") if al["rule"]["id"] == RULE
                                    and al["net"]["dst"]["addr"] in ("198.51.100.251", "198.51.100.249")])
    sess.settle()
    alerts = [al for al in sess.of("alert") if al["rule"]["id"] == RULE]
    assert sorted(al["net"]["dst"]["addr"] for al in alerts) == ["198.51.100.249", "198.51.100.251"]
    for al in alerts:
        assert al["rule"]["category"] == "egress"
        assert al["rule"]["outcome"] == ("blocked" if mode == "enforce" else "reported")
        assert al["net"]["verdict"] == ("blocked" if mode == "enforce" else "allowed")
    conn = sess.of("connect", net__dst__addr="198.51.100.250")
    assert conn and conn[0]["net"]["verdict"] == "allowed" and conn[0]["net"]["dst"]["name"] == "alias.corp.test"


def test_learned_address_expires_after_its_ttl(lab, agent_tree, make_session):
    a = agent_tree.agent("ttl")
    make_session([agent_tree.root], engine=_engine("enforce", ["short.mirror.test", DNS], ttl_min=1),
                 mode="enforce", features=("proc", "net"))
    out = _run(lab, a, """
        import time
        ad = resolve("short.mirror.test")
        first = connect(ad)
        time.sleep(3.5)                                  # the answer's TTL is 2 s
        later = connect(ad)
        again = connect(resolve("short.mirror.test"))    # a fresh answer allows it again
        print(json.dumps([first, later, again]))
    """)
    assert out == [errno.EINPROGRESS, errno.EPERM, errno.EINPROGRESS]


def test_dns_to_an_unlisted_resolver_is_just_unlisted_traffic(lab, agent_tree, make_session):
    a = agent_tree.agent("resolver")
    make_session([agent_tree.root], engine=_engine("enforce", ["*.mirror.test"]),
                 mode="enforce", features=("proc", "net"))
    out = _run(lab, a, """
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"\\0" * 12, ("198.51.100.53", 53))
            print(json.dumps(0))
        except OSError as e:
            print(json.dumps(e.errno))
    """)
    assert out == errno.EPERM


def test_run_allow_egress_through_the_cli(lab, tmp_path):
    """`agenttrace run --mode enforce --allow-egress ... -- CMD` as a user runs it."""
    out = tmp_path / "events.jsonl"
    script = tmp_path / "agent.py"
    script.write_text(CONNECT + textwrap.dedent("""
        ok = connect(resolve("n1.mirror.test"))
        no = connect(resolve("other.test"))
        print(json.dumps([ok, no]))
    """))
    p = lab.run_in_agent([AGENTTRACE, "run", "--mode", "enforce", "--no-rules", "-o", str(out),
                          "--allow-egress", "*.mirror.test", "--allow-egress", DNS,
                          "--", sys.executable, str(script)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    so, se = p.communicate(timeout=120)
    assert p.returncode == 0, se.decode()
    assert json.loads(so.decode().strip().splitlines()[-1]) == [errno.EINPROGRESS, errno.EPERM]
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    started = [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "started"][0]
    assert "egress" in started["probes"]
    alerts = [r for r in recs if r["kind"] == "alert" and r["rule"]["id"] == RULE]
    assert [a["net"]["dst"]["addr"] for a in alerts] == ["198.51.100.251"]
    assert alerts[0]["rule"]["outcome"] == "blocked"
    stopped = [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "stopped"][0]
    assert stopped["egress_learner"]["addresses_learned"] >= 1


# ------------------------------------------------------------------ policy learn

def test_policy_learn_on_the_devwork_fixture_raises_nothing(tmp_path):
    """The learned allow-list, with the default pack, replayed over the run it came from."""
    from agenttrace.config import parse_config
    from agenttrace.match.engine import replay
    from agenttrace.match.rules import default_rule_paths
    fixture = __import__("conftest").REPO / "tests" / "fixtures" / "events_recorded_devwork.jsonl"
    out = tmp_path / "learned.yaml"
    p = subprocess.run([AGENTTRACE, "policy", "learn", "--events", str(fixture), "-o", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    cfg = parse_config(out.read_text(), str(out))
    assert cfg.egress["default"].mode == "allow-list"
    rs = load_rules(default_rule_paths(), egress=cfg.egress)
    assert replay([], str(fixture), ruleset=rs) == []


def test_policy_learn_entries_from_names_and_addresses(tmp_path):
    from agenttrace.match.policylearn import learn
    recs = [
        {"kind": "dns", "agent": {"id": "a"}, "dns": {"query": "pypi.org", "answers": [
            {"name": "pypi.org", "type": "A", "data": "198.51.100.5", "ttl": 60}]}},
        {"kind": "connect", "agent": {"id": "a"}, "net": {"proto": "tcp", "dst": {
            "addr": "198.51.100.5", "port": 443, "scope": "external", "name": None}}},
        {"kind": "connect", "agent": {"id": "a", "group": "gpu"}, "net": {"proto": "tcp", "dst": {
            "addr": "2001:db8::9", "port": 8443, "scope": "external", "name": None}}},
        {"kind": "connect", "agent": {"id": "a"}, "net": {"proto": "tcp", "dst": {
            "addr": "169.254.169.254", "port": 80, "scope": "metadata", "name": None}}},
        {"kind": "connect", "agent": {"id": "a"}, "net": {"proto": "tcp", "dst": {
            "addr": "10.0.0.5", "port": 80, "scope": "internal", "name": None}}},
    ]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    res = learn(str(f))
    assert res.specs("default") == ["pypi.org:443"]
    assert res.specs("gpu") == ["[2001:db8::9]/128:8443"]
    assert res.skipped == ["169.254.169.254:80 (metadata: never allowed)"]
    for s in res.specs("default") + res.specs("gpu"):
        parse_allow_spec(s)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "connect"}\nnot json\n')
    p = subprocess.run([AGENTTRACE, "policy", "learn", "--events", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and f"{bad}:1" in p.stderr


WORK = CONNECT + """
import urllib.request
body = urllib.request.urlopen("http://www.example.org/", timeout=10).read()
r = [connect(resolve("n3.mirror.test")), connect("203.0.113.200")]
print(json.dumps(r))
"""


def test_learned_policy_lets_the_same_workload_run_in_enforce_mode(lab, tmp_path):
    """Record a benign run, learn its allow-list, run it again under that list, enforced."""
    script = tmp_path / "work.py"
    script.write_text(WORK)
    (lab.http_root / "index.html").write_text("hello")

    def run(*extra, out):
        p = lab.run_in_agent([AGENTTRACE, "run", "-o", str(out), *extra, "--", sys.executable, str(script)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se.decode()
        return json.loads(so.decode().strip().splitlines()[-1]), [json.loads(l) for l in out.read_text().splitlines()]

    first, _ = run(out=tmp_path / "rec.jsonl")
    assert first == [errno.EINPROGRESS, errno.EINPROGRESS]
    p = subprocess.run([AGENTTRACE, "policy", "learn", "--events", str(tmp_path / "rec.jsonl"), "--flags"],
                       capture_output=True, text=True, check=True)
    flags = p.stdout.split()
    specs = flags[1::2]
    assert "www.example.org:80" in specs and "n3.mirror.test:80" in specs
    assert "203.0.113.200/32:80" in specs and "198.51.100.53/32:53" in specs
    again, recs = run("--mode", "enforce", *flags, out=tmp_path / "enforced.jsonl")
    assert again == first
    assert not [r for r in recs if r["kind"] == "alert" and r["rule"]["category"] == "egress"
                and r["rule"]["id"].startswith("egress-policy.")]
    assert not [r for r in recs if r["kind"] == "connect" and r["net"]["verdict"] == "blocked"]


# ------------------------------------------------------------------ the contain profile

CONTAIN = __import__("conftest").REPO / "packaging" / "contain.yaml"


def test_contain_profile_loads_and_compiles():
    from agenttrace.ops.daemon import load_inputs
    cfg, rs = load_inputs(str(CONTAIN))
    assert cfg.mode == "enforce" and cfg.pinning.enabled
    kp = compile_policy(rs)
    (g,) = [g for g in kp.groups if g.name == "default"]
    assert g.allow_list and g.allow_scope_mask == 2 | 4 | 8
    pats = {n.pattern for n in kp.name_allow}
    assert pats == {"*.pypi.corp.internal", "git.corp.internal"}


def test_contain_profile_in_the_lab(lab, agent_tree, make_session):
    """The profile's egress section with the lab's resolver: the forge by name is reachable,
    an internal host by another name, the web and metadata are not."""
    from agenttrace.config import load_config
    from agenttrace.match.engine import Engine
    from agenttrace.match.policy import EgressDest
    cfg = load_config(CONTAIN)
    pol = cfg.egress["default"]
    allow = [a if a.cidr is None else EgressDest(cidr="198.51.100.53/32", ports=[53]) for a in pol.allow]
    eg = {"default": pol.model_copy(update={"allow": allow})}
    a = agent_tree.agent("contained")
    make_session([agent_tree.root], engine=Engine(load_rules([], egress=eg), mode="enforce"),
                 mode="enforce", features=("proc", "net"))
    out = _run(lab, a, """
        r = {}
        r["forge"] = connect(resolve("git.corp.internal"), 22)
        r["db"] = connect(resolve("db.corp.internal"), 5432)      # same host, other name and port
        r["web"] = connect(resolve("www.example.org"), 80)
        r["metadata"] = connect("169.254.169.254", 80)
        print(json.dumps(r))
    """)
    assert out["forge"] in (0, errno.EINPROGRESS)
    assert out["db"] == out["web"] == out["metadata"] == errno.EPERM


# ------------------------------------------------------------------ tricks that get nowhere

def test_tls_wrapped_ssh_tunnel_never_opens_its_port(netlab, agent_tree, make_session):
    """ssh -R through `ProxyCommand openssl s_client -quiet -connect <not allowed>:443`: ssh
    itself never connects, openssl's connect fails in the kernel, no remote port listens."""
    a = agent_tree.agent("tunnel")
    sess = make_session([agent_tree.root], engine=_engine("enforce", ["*.mirror.test", DNS]),
                        mode="enforce", features=("proc", "net"))
    argv = netlab.ssh_argv(netlab.ssh_host, 443, "-o",
                           f"ProxyCommand=openssl s_client -quiet -connect {netlab.ssh_host}:443",
                           "-N", "-R", "9443:127.0.0.1:22")
    p = netlab.run_in_agent(argv, cgroup=a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert not netlab.server_port_open(netlab.ssh_host, 9443)
    blocked = sess.wait_for(lambda: [al for al in sess.of("alert") if al["rule"]["id"] == RULE
                                     and al["net"]["dst"]["addr"] == netlab.ssh_host])
    assert blocked and blocked[0]["proc"]["comm"] == "openssl" and blocked[0]["rule"]["outcome"] == "blocked"


def test_stratum_over_tls_to_a_pool_not_listed_never_reaches_it(netlab, agent_tree, make_session):
    a = agent_tree.agent("miner")
    sess = make_session([agent_tree.root], engine=_engine("enforce", ["*.mirror.test", DNS]),
                        mode="enforce", features=("proc", "net"))
    before = len([e for e in netlab.server_events("stratum") if e.get("peer") == netlab.agent_addr])
    res = netlab.check_in_agent(["openssl", "s_client", "-quiet", "-connect", f"{netlab.pool_host}:443"],
                                cgroup=a, timeout=60, input=b'{"id":1,"method":"login","params":{}}\n')
    assert res.returncode != 0
    after = len([e for e in netlab.server_events("stratum") if e.get("peer") == netlab.agent_addr])
    assert after == before
    assert sess.wait_for(lambda: [al for al in sess.of("alert") if al["rule"]["id"] == RULE
                                  and al["net"]["dst"]["addr"] == netlab.pool_host])


def test_answers_over_tcp_dns_are_learned_too(lab, agent_tree, make_session):
    a = agent_tree.agent("tcpdns")
    make_session([agent_tree.root], engine=_engine("enforce", ["*.mirror.test", DNS]),
                 mode="enforce", features=("proc", "net"))
    out = _run(lab, a, """
        import dns.message, dns.query
        q = dns.message.make_query("n7.mirror.test", "A")
        r = dns.query.tcp(q, "198.51.100.53", timeout=5)
        ad = r.answer[0][0].address
        print(json.dumps([ad, connect(ad)]))
    """)
    assert out[1] == errno.EINPROGRESS, out


# ------------------------------------------------------------------ the kernel parser, adversarial

CRAFTED = r"""
import ctypes, errno, json, socket, struct, subprocess, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
    sys.exit("unshare(CLONE_NEWNET) failed")
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)   # a namespace with only lo: nothing leaves

def name(n):
    return b"".join(bytes([len(l)]) + l for l in n.encode().split(b".")) + b"\0"

def label_name(labels):
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\0"

PTR_Q = b"\xc0\x0c"

def msg(q, answers, flags=0x8180):
    body = struct.pack("!HHHHHH", 7, flags, 1, len(answers), 0, 0) + q + struct.pack("!HH", 1, 1)
    for owner, typ, ttl, rdata in answers:
        if owner == "SELF":
            owner = bytes([0xc0 | (len(body) >> 8), len(body) & 0xff])
        body += owner + struct.pack("!HHIH", typ, 1, ttl, len(rdata)) + rdata
    return body

def a(ip):
    return socket.inet_aton(ip)

resp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
resp.bind(("127.0.0.1", 53))

def ask(wire):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(5)
    c.sendto(b"\0" * 12, ("127.0.0.1", 53))
    _, peer = resp.recvfrom(512)
    resp.sendto(wire, peer)
    c.recv(4096)
    c.close()

def connect(ip):
    s = socket.socket()
    s.setblocking(False)
    e = s.connect_ex((ip, 443))
    s.close()
    return "allowed" if e == errno.ENETUNREACH else "blocked" if e == errno.EPERM else e

cases = {}
def case(key, wire, ip):
    ask(wire)
    cases[key] = connect(ip)

case("plain", msg(name("n1.mirror.test"), [(PTR_Q, 1, 60, a("203.0.113.101"))]), "203.0.113.101")

def send_udp(ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (ip, 443))
        e = 0
    except OSError as ex:
        e = ex.errno
    s.close()
    return "allowed" if e == errno.ENETUNREACH else "blocked" if e == errno.EPERM else e

cases["udp_to_learned"] = send_udp("203.0.113.101")
cases["udp_to_unlearned"] = send_udp("203.0.113.199")
case("mixed_case", msg(name("N2.MiRRoR.TEST"), [(PTR_Q, 1, 60, a("203.0.113.102"))]), "203.0.113.102")
case("unrelated_owner", msg(name("n3.mirror.test"), [(name("evil.test"), 1, 60, a("203.0.113.103"))]), "203.0.113.103")
case("pointer_loop", msg(name("n4.mirror.test"), [("SELF", 1, 60, a("203.0.113.104"))]), "203.0.113.104")
chain2 = msg(name("n5.mirror.test"), [(PTR_Q, 5, 60, name("a.cdn.test")), (name("a.cdn.test"), 5, 60, name("b.cdn.test")),
                                       (name("b.cdn.test"), 1, 60, a("203.0.113.105"))])
case("cname_chain", chain2, "203.0.113.105")
hops = [f"h{i}.cdn.test" for i in range(9)]
ans = [(PTR_Q, 5, 60, name(hops[0]))] + [(name(hops[i]), 5, 60, name(hops[i + 1])) for i in range(8)]
case("cname_chain_too_long", msg(name("n6.mirror.test"), ans + [(name(hops[8]), 1, 60, a("203.0.113.106"))]), "203.0.113.106")
case("dot_in_label", msg(label_name([b"x", b"mirror.test"]), [(PTR_Q, 1, 60, a("203.0.113.107"))]), "203.0.113.107")
case("ttl_zero", msg(name("n8.mirror.test"), [(PTR_Q, 1, 0, a("203.0.113.108"))]), "203.0.113.108")
case("not_a_response", msg(name("n9.mirror.test"), [(PTR_Q, 1, 60, a("203.0.113.109"))], flags=0x0100), "203.0.113.109")
case("nxdomain", msg(name("n10.mirror.test"), [(PTR_Q, 1, 60, a("203.0.113.110"))], flags=0x8183), "203.0.113.110")
case("suffix_only", msg(name("mirror.test"), [(PTR_Q, 1, 60, a("203.0.113.111"))]), "203.0.113.111")
case("lookalike", msg(name("n1.mirror.test.evil.test"), [(PTR_Q, 1, 60, a("203.0.113.112"))]), "203.0.113.112")
case("truncated_record", msg(name("n13.mirror.test"), [(PTR_Q, 1, 60, a("203.0.113.113"))])[:-2], "203.0.113.113")
# an accomplice's unsolicited "answer" from port 53 of a host the agent may not reach
subprocess.run(["ip", "addr", "add", "203.0.113.53/32", "dev", "lo"], check=True)
forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
forger.bind(("203.0.113.53", 53))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.bind(("127.0.0.1", 0))
c.settimeout(5)
forger.sendto(msg(name("n14.mirror.test"), [(PTR_Q, 1, 60, a("203.0.113.114"))]), c.getsockname())
c.recv(4096)
cases["forged_source"] = connect("203.0.113.114")
print(json.dumps(cases))
"""


def test_kernel_dns_parser_against_crafted_answers(agent_tree, make_session):
    """Answers a resolver would never send, and some it would, straight at the agent's socket
    on loopback of a namespace of its own: only well-formed answers for allowed names open."""
    a = agent_tree.agent("crafted")
    sess = make_session([agent_tree.root], engine=_engine("enforce", ["*.mirror.test"]),
                        mode="enforce", features=("proc", "net"))
    res = agent_tree.run(a, [sys.executable, "-c", CRAFTED])
    assert res.returncode == 0, res.stderr.decode()
    got = json.loads(res.stdout)
    assert got == {
        "plain": "allowed", "mixed_case": "allowed", "unrelated_owner": "blocked", "pointer_loop": "blocked",
        "cname_chain": "allowed", "cname_chain_too_long": "blocked", "dot_in_label": "blocked",
        "ttl_zero": "allowed", "not_a_response": "blocked", "nxdomain": "blocked", "suffix_only": "blocked",
        "lookalike": "blocked", "truncated_record": "blocked", "forged_source": "blocked",
        "udp_to_learned": "allowed", "udp_to_unlearned": "blocked"}
    from agenttrace.kernel.egress import egress_stats
    st = egress_stats(sess.tracer.probes)
    assert st["messages_unparsed"] >= 2          # the pointer loop, the truncated record
    assert st["answers_from_unlisted_servers"] == 1
