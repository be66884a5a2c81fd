"""TLS server names checked in the kernel (probes/tls.c), through `agenttrace run` with the
default pack in the netlab: stratum over TLS to a pool stub that records what it receives.

- enforce, pool SNI: the ClientHello is dropped, the pool gets no byte, the alert says blocked;
- enforce, a benign SNI to the same address and port: the handshake and the payload pass;
- enforce, a hello split before its SNI: the kernel cannot see the name in the first segment,
  flow.c reassembles it and userspace kills the process (still alerted);
- monitor, pool SNI: reported, and the pool gets the login.
Plus the rule side: what `rules lint` refuses for a name block (exit 2, file:line)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from conftest import AGENTTRACE

PY = sys.executable
POOL_PORT = 8443
SPLIT_PORT = 9443        # its own destination: alerts are de-duplicated per destination
POOL_SNI = "gulf.moneroocean.stream"     # *.moneroocean.stream is in pool_domains
BENIGN_SNI = "forge.example.org"

# A TLS "pool": per connection, how many bytes arrived before anything was sent back, the SNI
# the handshake carried and the first application line (a stratum login).
STUB = textwrap.dedent("""
    import json, socket, ssl, sys, threading
    addr, ports, cert, key, log = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    names = {}
    ctx.sni_callback = lambda so, name, c: names.__setitem__(id(so), name)
    srvs = [socket.create_server((addr, int(p))) for p in ports.split(",")]
    print("READY", flush=True)
    def note(rec):
        with open(log, "a") as f:
            f.write(json.dumps(rec) + "\\n")
    def handle(c, peer):
        rec = {"peer_port": peer[1], "raw_bytes": 0}
        c.settimeout(8)
        try:
            rec["raw_bytes"] = len(c.recv(4096, socket.MSG_PEEK))
            if rec["raw_bytes"]:
                t = ctx.wrap_socket(c, server_side=True)
                rec["sni"] = names.get(id(t))
                rec["app"] = t.recv(4096).decode(errors="replace")
                t.sendall(b'{"id":1,"jsonrpc":"2.0","result":{"status":"OK"}}\\n')
        except Exception as e:
            rec["error"] = type(e).__name__
        note(rec)
        c.close()
    def serve(srv):
        while True:
            c, peer = srv.accept()
            threading.Thread(target=handle, args=(c, peer), daemon=True).start()
    for srv in srvs[1:]:
        threading.Thread(target=serve, args=(srv,), daemon=True).start()
    serve(srvs[0])
""")

# The agent: TLS clients of the pool stub. `full NAME`: a real handshake, then a stratum login;
# `split NAME`: the same ClientHello written in two segments, cut before the server name.
CLIENT = textwrap.dedent("""
    import socket, ssl, struct, sys, time
    host = sys.argv[1]
    LOGIN = b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"4Awallet","pass":"x","agent":"XMRig/6.21.0"}}\\n'
    def ctx():
        c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
        return c
    def conn(port):
        s = socket.create_connection((host, port), timeout=3)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # close with a reset, not a FIN queued behind a dropped hello: the stub hears at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return s
    def reset(s):
        s.close()       # a failed wrap_socket has closed it already
    def raw_hello(name):
        i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx().wrap_bio(i, o, server_hostname=name)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return o.read()
    for case in sys.argv[2:]:
        how, name, port = case.split(":")
        s = conn(int(port))
        print("PORT", case, s.getsockname()[1], flush=True)
        try:
            if how == "full":
                t = ctx().wrap_socket(s, server_hostname=name)
                t.sendall(LOGIN)
                print("GOT", case, t.recv(4096).decode().strip(), flush=True)
                t.close()
            elif how == "upper":
                # the name as written on the wire in capitals (same length: the hello stays valid)
                hello = raw_hello(name).replace(name.encode(), name.upper().encode())
                s.sendall(hello)
                print("GOT", case, s.recv(4096)[:5].hex(), flush=True)
                reset(s)
            else:
                hello = raw_hello(name)
                cut = hello.find(name.encode()) - 20
                s.sendall(hello[:cut])
                time.sleep(0.3)
                s.sendall(hello[cut:])
                print("SENT", case, len(hello), cut, flush=True)
                print("GOT", case, s.recv(4096)[:5].hex(), flush=True)
                time.sleep(5)      # the kill lands here
                reset(s)
        except OSError as e:
            print("ERR", case, type(e).__name__, flush=True)
            reset(s)
""")


@pytest.fixture(scope="module")
def pool(netlab, tmp_path_factory):
    d = tmp_path_factory.mktemp("tlspool")
    cert, key, log = d / "cert.pem", d / "key.pem", d / "pool.log"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=pool.lab", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    (d / "stub.py").write_text(STUB)
    log.write_text("")
    p = netlab.run_in_server([PY, str(d / "stub.py"), netlab.pool_host, f"{POOL_PORT},{SPLIT_PORT}", str(cert),
                              str(key), str(log)],
                             stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"READY"
        yield log
    finally:
        p.terminate()
        p.wait()


def _seen(log, port: int, timeout: float = 10.0) -> dict:
    """What the stub recorded for the connection from client port `port`."""
    end = time.monotonic() + timeout
    while True:
        for line in log.read_text().splitlines():
            rec = orjson.loads(line)
            if rec["peer_port"] == port:
                return rec
        if time.monotonic() > end:
            raise AssertionError(f"the pool stub has no record of client port {port}: {log.read_text()}")
        time.sleep(0.1)


def _run(lab, tmp_path, mode, agent, *cases, rcs=(0,)):
    out = tmp_path / f"events-{mode}.jsonl"
    r = subprocess.run([AGENTTRACE, "run", "--mode", mode, "--output", str(out), "--agent", agent,
                        "--netns", lab.agent_ns, "--", PY, "-c", CLIENT,
                        lab.pool_host, *cases],
                       capture_output=True, timeout=180)
    assert r.returncode in rcs, (r.returncode, r.stderr.decode(errors="replace")[-2000:])
    lines = r.stdout.decode().splitlines()
    ports = {l.split()[1]: int(l.split()[2]) for l in lines if l.startswith("PORT ")}
    return lines, ports, [orjson.loads(l) for l in out.read_bytes().splitlines()]


def _alerts(recs, port):
    return [a for a in recs if a["kind"] == "alert" and (a.get("net") or {}).get("src", {}).get("port") == port]


def test_enforce_pool_sni_dropped_in_kernel_benign_passes_split_killed(netlab, pool, tmp_path, require_bpf):
    bad, good, split = f"full:{POOL_SNI}:{POOL_PORT}", f"full:{BENIGN_SNI}:{POOL_PORT}", f"split:{POOL_SNI}:{SPLIT_PORT}"
    # supportxmr.com is listed as itself; both come after `bad` to the same destination, so their
    # alerts are repeats of its alert (de-duplicated): the flow records show the kernel's verdict
    exact, upper = f"full:supportxmr.com:{POOL_PORT}", f"upper:{POOL_SNI}:{POOL_PORT}"
    # the split case comes last: its userspace kill ends the client (137)
    lines, ports, recs = _run(netlab, tmp_path, "enforce", "sni-enforce", good, bad, exact, upper, split,
                              rcs=(137,))
    started = [r for r in recs if r["kind"] == "lifecycle" and r.get("phase") == "started"]
    assert "tls" in started[0]["probes"]
    client_pid = next(r["proc"]["pid"] for r in recs if r["kind"] == "exec" and r["proc"]["comm"].startswith("python"))

    # a benign name to the same pool address and port: nothing dropped, nothing alerted
    assert any(l.startswith(f"GOT {good}") and '"OK"' in l for l in lines), lines
    g = _seen(pool, ports[good])
    assert g["sni"] == BENIGN_SNI and "login" in g["app"]
    assert not [a for a in _alerts(recs, ports[good]) if a["rule"]["category"] in ("mining", "tunnel")]

    # the pool name: the hello never left the node
    assert any(l.startswith(f"ERR {bad}") for l in lines), lines
    b = _seen(pool, ports[bad])
    assert b["raw_bytes"] == 0 and "sni" not in b, b
    al = [a for a in _alerts(recs, ports[bad]) if a["rule"]["id"] == "mining-pool-tls-sni"]
    assert len(al) == 1, [a["rule"]["id"] for a in _alerts(recs, ports[bad])]
    a = al[0]
    assert a["rule"]["outcome"] == "blocked" and a["rule"]["category"] == "mining"
    assert a["net"]["verdict"] == "blocked" and a["net"]["policy_rule"] == "mining-pool-tls-sni"
    assert a["agent"]["id"] == "sni-enforce" and a["proc"]["pid"] == client_pid
    assert a["flow"]["detail"]["sni"] == POOL_SNI and a["flow"]["detail"]["sni_match"] == "subdomains"
    assert a["flow"]["capture"] == ["sni_check"] and a["net"]["dst"]["port"] == POOL_PORT
    # one record of that way of the flow: flow.c stood aside for the dropped one
    flows = [r for r in recs if r["kind"] == "flow" and r["net"]["src"]["port"] == ports[bad]]
    assert len(flows) == 1 and flows[0]["flow"]["capture"] == ["sni_check"], flows

    # an exact entry, and a name in capitals: dropped as well
    for case, match, name in ((exact, "exact", "supportxmr.com"), (upper, "subdomains", POOL_SNI.upper())):
        assert _seen(pool, ports[case])["raw_bytes"] == 0
        fl = [r for r in recs if r["kind"] == "flow" and r["net"]["src"]["port"] == ports[case]]
        assert len(fl) == 1 and fl[0]["net"]["verdict"] == "blocked", fl
        assert fl[0]["flow"]["detail"]["sni_match"] == match and fl[0]["flow"]["detail"]["sni"] == name

    # the records keep the contract (flow capture "sni_check", detail sni_match/sni_offset)
    import json
    from jsonschema import Draft202012Validator
    from agenttrace.paths import schema_dir
    v = Draft202012Validator(json.loads((schema_dir() / "event.schema.json").read_text()))
    for rec in flows + al:
        errs = [e.message for e in v.iter_errors(rec)]
        assert not errs, errs

    # split before the name: the kernel lets the first part through, userspace kills
    s = _seen(pool, ports[split])
    assert s["raw_bytes"] > 0
    al = [a for a in _alerts(recs, ports[split]) if a["rule"]["id"] == "mining-pool-tls-sni"]
    assert al and al[0]["rule"]["outcome"] == "killed", [a["rule"] for a in _alerts(recs, ports[split])]
    assert al[0]["net"]["verdict"] == "allowed" and al[0]["flow"]["detail"]["sni"] == POOL_SNI
    assert "reassembled" in al[0]["flow"]["capture"] and al[0]["proc"]["pid"] == client_pid


def test_monitor_pool_sni_reported_and_the_pool_gets_it(netlab, pool, tmp_path, require_bpf):
    bad = f"full:{POOL_SNI}:{POOL_PORT}"
    # a name ending past flow.c's 256-byte capture: only the kernel's check sees all of it
    long_name = "a" * 60 + "." + "b" * 60 + ".moneroocean.stream"
    lng = f"full:{long_name}:{SPLIT_PORT}"
    lines, ports, recs = _run(netlab, tmp_path, "monitor", "sni-monitor", bad, lng)
    assert any(l.startswith(f"GOT {bad}") and '"OK"' in l for l in lines), lines
    b = _seen(pool, ports[bad])
    assert b["sni"] == POOL_SNI and '"login"' in b["app"]
    al = [a for a in _alerts(recs, ports[bad]) if a["rule"]["id"] == "mining-pool-tls-sni"]
    assert len(al) == 1
    assert al[0]["rule"]["outcome"] == "reported" and al[0]["net"]["verdict"] == "allowed"
    assert al[0]["agent"]["id"] == "sni-monitor" and al[0]["flow"]["detail"]["sni"] == POOL_SNI
    # from flow.c's record: the kernel check stays silent when the capture names the host
    assert al[0]["flow"]["capture"] != ["sni_check"]

    assert any(l.startswith(f"GOT {lng}") for l in lines), lines
    assert _seen(pool, ports[lng])["sni"] == long_name
    al = [a for a in _alerts(recs, ports[lng]) if a["rule"]["id"] == "mining-pool-tls-sni"]
    assert len(al) == 1 and al[0]["flow"]["capture"] == ["sni_check"], [a["flow"] for a in _alerts(recs, ports[lng])]
    assert al[0]["rule"]["outcome"] == "reported" and al[0]["net"]["verdict"] == "allowed"
    assert al[0]["flow"]["detail"]["sni"] == long_name and al[0]["flow"]["detail"]["sni_offset"] + len(long_name) > 256


# -- the rule side: what the kernel's name check can hold ------------------------------------

RULE = textwrap.dedent("""
    rules:
      - id: t-sni
        description: a pool name block for the lint tests
        category: mining
        severity: high
        on: [flow]
        match:
          protocols: [tls]
          dst: {names: %s}
        action: block
""")


def _lint(tmp_path, names: str):
    f = tmp_path / "r.yaml"
    f.write_text(RULE % names)
    return f, subprocess.run([AGENTTRACE, "rules", "lint", str(f)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("names,why", [
    ('["pool*.example"]', "exact host names and '*.'"),
    ('["*"]', "exact host names and '*.'"),
    ('["a..b"]', "exact host names and '*.'"),
    ('["x" ]'.replace('"x" ', '"' + "a" * 250 + '.example"'), "at most 253"),
])
def test_lint_refuses_names_the_kernel_cannot_hold(tmp_path, names, why):
    f, r = _lint(tmp_path, names)
    assert r.returncode == 2, r
    assert f"{f}:" in r.stdout + r.stderr and why in r.stdout + r.stderr, r.stdout + r.stderr


def test_lint_refuses_more_names_than_the_map_holds(tmp_path):
    names = "[" + ", ".join(f'"h{i}.pool.example"' for i in range(4097)) + "]"
    f, r = _lint(tmp_path, names)
    assert r.returncode == 2 and "more than 4096 TLS server names" in r.stdout + r.stderr, r.stdout + r.stderr


def test_lint_refuses_names_with_other_dst_fields(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text((RULE % '["pool.example"]').replace("dst: {names: [\"pool.example\"]}",
                                                     "dst: {names: [\"pool.example\"], ports: [443]}"))
    r = subprocess.run([AGENTTRACE, "rules", "lint", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "names only" in r.stdout + r.stderr, r.stdout + r.stderr
    assert f"{f}:" in r.stdout + r.stderr


def test_lint_accepts_exact_and_wildcard_names(tmp_path):
    f, r = _lint(tmp_path, '["pool.example", "*.pool.example", "Stratum.Example."]')
    assert r.returncode == 0, r.stdout + r.stderr


def test_compiled_entries_share_a_key_per_name():
    """`x` and `*.x` are one kernel key (the suffix hash), with a policy id per form; the hash
    is the one the egress name map uses (read backwards, lowercase, no trailing dot)."""
    from agenttrace.kernel.sniwrite import plan_sni
    from agenttrace.match.policy import name_hash, sni_entry
    es = [sni_entry(3, 0, "Pool.Example."), sni_entry(4, 0, "*.pool.example"), sni_entry(5, 2, "*.pool.example")]
    assert es[0].hash == es[1].hash == name_hash("pool.example") and not es[0].subdomains and es[1].subdomains
    assert plan_sni(es) == {(0, name_hash("pool.example")): [3, 4], (2, name_hash("pool.example")): [0, 5]}


def test_tls_probe_is_loaded_only_for_name_blocks():
    """Start-up cost (#15): the tls program is compiled and verified only where a rule blocks
    TLS server names (the default pack does)."""
    from types import SimpleNamespace
    from agenttrace.match.rules import default_rule_paths, load_rules
    from agenttrace.session.pipeline import Tracer
    pack = load_rules(default_rule_paths())
    assert Tracer._sni_blocks(SimpleNamespace(engine=SimpleNamespace(ruleset=pack)))
    other = load_rules([p for p in default_rule_paths() if not p.endswith(("mining.yaml", "tunnel.yaml"))])
    assert not Tracer._sni_blocks(SimpleNamespace(engine=SimpleNamespace(ruleset=other)))
    assert not Tracer._sni_blocks(SimpleNamespace(engine=None))


def test_a_reload_that_needs_the_unloaded_tls_probe_is_refused():
    """Rules that block names, reloaded into a tracer started without them: the kernel could not
    hold them, so the writer refuses before touching any map (the reload fails, old rules stay)."""
    from agenttrace.kernel.maps import EnforceError, PolicyWriter
    from agenttrace.match.policy import KernelPolicy, sni_entry

    class NoTls:
        touched = []

        def __getitem__(self, name):
            if name != "flow_state":
                raise KeyError(name)
            self.touched.append(name)
            return object()

    kp = KernelPolicy(sni_deny=[sni_entry(1, 0, "*.pool.example")])
    with pytest.raises(EnforceError, match="tls probe was not loaded"):
        PolicyWriter(NoTls()).apply(kp)


def test_every_cgroup_program_gets_a_pin_of_its_own(tmp_path, monkeypatch):
    """Several programs attach on one hook (skb.c's dispatcher and egress.c's learner on
    ingress): each link is pinned (fail-closed keeps all of them); tls has no program of its
    own (skb.c runs it before flow)."""
    from agenttrace.kernel import loader as L
    pinned = []
    monkeypatch.setattr(L, "pin_object", lambda fd, path: pinned.append((fd, path.name)))
    p = L.Probes(("proc", "net", "flow", "tls", "dns"))
    p.pin_dir = tmp_path
    p._cgroup_funcs = [(None, L.CGROUP_INET_EGRESS), (None, L.CGROUP_INET_EGRESS), (None, L.CGROUP_INET_INGRESS),
                       (None, L.CGROUP_INET_EGRESS)]
    att = L._Attachment(tmp_path, 77, link_fds=[10, 11, 12, 13])
    p._pin(att)
    assert [fd for fd, _ in pinned] == [10, 11, 12, 13] and len({n for _, n in pinned}) == 4
    assert L.FEATURES["tls"][1] == [] and list(L.FEATURES).index("tls") == list(L.FEATURES).index("flow") + 1


def test_name_blocks_compile_per_agent_group(tmp_path):
    """`groups` on a name block: entries under that group's id only; no groups: group 0 (every
    agent). The rule gets the userspace fallback for hellos the kernel cannot read to the name."""
    from agenttrace.kernel.capability import check
    from agenttrace.match.rules import load_rules
    f = tmp_path / "r.yaml"
    f.write_text(RULE % '["*.pool.example"]' + textwrap.indent(textwrap.dedent("""
          - id: t-sni-team
            description: a per-group pool name block for the tests
            category: mining
            severity: high
            on: [flow]
            match:
              groups: [team-a]
              protocols: [tls]
              dst: {names: ["stratum.example"]}
            action: block
    """), "  "))
    rs = load_rules([str(f)])
    kp = check(rs)
    by = {(e.pattern, e.group_id) for e in kp.sni_deny}
    assert by == {("*.pool.example", 0), ("stratum.example", kp.group_ids["team-a"])}
    assert all(r.fallback == "kill" and r.enforced_in == "kernel" for r in rs.rules)
