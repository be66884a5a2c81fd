"""Through the whole pipeline with real clients and servers in the lab network: DNS names
feed later connects, SSH and stratum are recognised whatever the binary name or port, a real
reverse tunnel is stopped in the kernel, and listeners are reported."""
import shutil
import sys
import textwrap
import time

PY = sys.executable


def _engine(mode):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    return Engine(load_rules(default_rule_paths()), mode=mode)


def _alerts(sess, rule_id):
    return [a for a in sess.of("alert") if a["rule"]["id"] == rule_id]


def test_dns_answer_names_the_later_connect(netlab, agent_tree, make_session):
    a = agent_tree.agent("dnsuser")
    sess = make_session([agent_tree.root], engine=_engine("monitor"), internal=["10.77.0.0/24"])
    code = textwrap.dedent(f"""
        import socket
        addr = socket.getaddrinfo("pool.supportxmr.com", 3333, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        s = socket.create_connection((addr, 3333), timeout=5); s.close()
        print(addr)
    """)
    r = netlab.python_in_agent(code, cgroup=a)
    assert r.stdout.strip() == netlab.pool_host, r.stderr
    dns = sess.wait_for(lambda: [d for d in sess.of("dns") if d["dns"].get("answers")])
    q = dns[0]["dns"]
    assert q["query"].rstrip(".") == "pool.supportxmr.com"
    assert dns[0]["net"]["dst"]["addr"] == netlab.dns_host or dns[0]["net"]["dst"]["port"] == 53
    conn = sess.wait_for(lambda: [c for c in sess.of("connect") if c["net"]["dst"]["port"] == 3333
                                  and c["net"]["result"] != "pending"])
    assert conn[0]["net"]["dst"]["name"] == "pool.supportxmr.com"
    assert conn[0]["net"]["dst"]["scope"] == "external"
    assert sess.wait_for(lambda: _alerts(sess, "mining-pool-dns"))
    assert sess.wait_for(lambda: _alerts(sess, "mining-pool-domain") or _alerts(sess, "mining-pool-port"))


def test_renamed_ssh_on_443_is_ssh(netlab, agent_tree, make_session, tmp_path):
    a = agent_tree.agent("renamed")
    kworker = tmp_path / "kworker"
    shutil.copy(shutil.which("ssh"), kworker)
    sess = make_session([agent_tree.root], engine=_engine("monitor"), internal=["10.77.0.0/24"])
    r = netlab.check_in_agent(netlab.ssh_argv(netlab.ssh_host, 443, binary=str(kworker), command=["true"]),
                              cgroup=a, timeout=60)
    assert r.returncode == 0, r.stderr
    flows = sess.wait_for(lambda: [f for f in sess.of("flow") if f["flow"]["protocol"] == "ssh"
                                   and f["flow"]["direction"] == "egress"])
    f = flows[0]
    assert f["proc"]["comm"] == "kworker" and f["net"]["dst"]["port"] == 443
    assert f["flow"]["detail"].get("software", "").startswith("OpenSSH")
    al = sess.wait_for(lambda: _alerts(sess, "tunnel-ssh-external-flow"))
    assert al and al[0]["rule"]["outcome"] == "reported"


def test_reverse_tunnel_stopped_in_the_kernel(netlab_fresh, agent_tree, make_session, tmp_path):
    lab = netlab_fresh
    a = agent_tree.agent("tunnel")
    kworker = tmp_path / "kworker"
    shutil.copy(shutil.which("ssh"), kworker)     # a name no exec rule knows
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce",
                        internal=["10.77.0.0/24"])
    p = lab.run_in_agent(lab.ssh_argv(lab.ssh_host, 443, "-N", "-R", "9000:127.0.0.1:8000",
                                      "-o", "ConnectTimeout=5", binary=str(kworker)), cgroup=a)
    try:
        al = sess.wait_for(lambda: [x for x in sess.of("alert") if x["rule"]["category"] == "tunnel"])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert not lab.server_port_open(lab.ssh_host, 9000), "the reverse tunnel opened"
            sess.tracer.poll(50)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not lab.server_port_open(lab.ssh_host, 9000)
    assert any(x["rule"]["outcome"] in ("blocked", "killed") for x in al), [x["rule"] for x in al]


def test_stratum_on_443_raises_mining_alert(netlab, agent_tree, make_session):
    a = agent_tree.agent("miner443")
    sess = make_session([agent_tree.root], engine=_engine("monitor"), internal=["10.77.0.0/24"])
    code = textwrap.dedent(f"""
        import json, socket
        s = socket.create_connection(("{netlab.pool_host}", 443), timeout=5)
        s.sendall(json.dumps({{"id": 1, "method": "login", "params": {{"login": "wallet", "agent": "XMRig/6.21.0"}}}}).encode() + b"\\n")
        s.recv(512); s.close()
    """)
    r = netlab.python_in_agent(code, cgroup=a)
    assert r.returncode == 0, r.stderr
    al = sess.wait_for(lambda: _alerts(sess, "mining-stratum-flow"))
    assert al and al[0]["proc"]["pid"] and al[0]["flow"]["protocol"] == "stratum"


def test_listener_reported(agent_tree, make_session):
    a = agent_tree.agent("listener")
    sess = make_session([agent_tree.root])
    code = "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); print(s.getsockname()[1])"
    r = agent_tree.run(a, [PY, "-c", code])
    port = int(r.stdout)
    ls = sess.wait_for(lambda: [l for l in sess.of("listen") if l["net"]["local"]["port"] == port])
    assert ls and ls[0]["net"]["what"] == "listen" and ls[0]["agent"]["id"] == "listener"
