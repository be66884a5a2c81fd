"""Tunnels inside TLS and HTTP, through `agenttrace run` with the default pack in the netlab:
HTTP CONNECT to an external :22 through a proxy (dropped in the kernel with its first bytes),
and a TLS ClientHello naming a mining pool (dropped in the kernel: tests/test_tls_sni_kernel.py
has the pool's side)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson
import pytest

from conftest import AGENTTRACE

PY = sys.executable

PROXY = textwrap.dedent("""
    import socket, sys, threading
    listen, log = sys.argv[1], sys.argv[2]
    h, p = listen.rsplit(":", 1)
    srv = socket.create_server((h, int(p)))
    print("READY", flush=True)
    def pump(a, b):
        try:
            while (d := a.recv(65536)):
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
    def handle(c):
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            d = c.recv(4096)
            if not d:
                return
            head += d
        line = head.split(b"\\r\\n", 1)[0].decode()
        with open(log, "a") as f:
            f.write(line + "\\n")
        method, target, _ = line.split(" ", 2)
        th, tp = target.rsplit(":", 1)
        u = socket.create_connection((th, int(tp)), timeout=5)
        c.sendall(b"HTTP/1.1 200 Connection established\\r\\n\\r\\n")
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        pump(u, c)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
""")

# An SSH client speaking through the proxy: CONNECT, then the banner exchange.
CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
    print(s.getsockname()[1], flush=True)
    s.sendall(f"CONNECT {sys.argv[3]} HTTP/1.1\\r\\nHost: {sys.argv[3]}\\r\\n\\r\\n".encode())
    try:
        got = s.recv(4096)
        if got.startswith(b"HTTP/1.1 200") and b"SSH-" not in got:
            s.sendall(b"SSH-2.0-OpenSSH_9.2p1\\r\\n")
            got += s.recv(4096)
        print("GOT", got.decode(errors="replace").replace("\\r\\n", "|"), flush=True)
    except OSError as e:
        print("ERR", e, flush=True)
""")

TLS_SNI = textwrap.dedent("""
    import socket, ssl, sys
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    s = socket.create_connection((sys.argv[1], 443), timeout=float(sys.argv[2]))
    print(s.getsockname()[1], flush=True)
    try:
        ctx.wrap_socket(s, server_hostname="gulf.moneroocean.stream")
    except (ssl.SSLError, OSError) as e:
        print("TLS", type(e).__name__, flush=True)
""")


def _wait(mode: str) -> str:
    """Seconds the clients wait for an answer: where the kernel drops the request none comes,
    and 2.5 s covers several retransmissions of it (from ~0.2 s, doubling) that must stay
    dropped too; 4 s where the answer is awaited."""
    return "2.5" if mode == "enforce" else "4"


@pytest.fixture
def proxy(netlab, tmp_path):
    script, log = tmp_path / "proxy.py", tmp_path / "proxy.log"
    script.write_text(PROXY)
    log.write_text("")
    p = netlab.run_in_server([PY, str(script), f"{netlab.web_host}:3128", str(log)], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"READY"
        yield netlab.web_host, 3128, log
    finally:
        p.terminate()
        p.wait()


def _cli(lab, tmp_path, mode, agent, code, *args, rcs=(0,)):
    out = tmp_path / f"events-{mode}.jsonl"
    r = subprocess.run([AGENTTRACE, "run", "--mode", mode, "--output", str(out), "--agent", agent,
                        "--netns", lab.agent_ns, "--", PY, "-c", code, *args],
                       capture_output=True, timeout=180)
    assert r.returncode in rcs, r.stderr.decode(errors="replace")[-2000:]
    return r.stdout.decode().splitlines(), [orjson.loads(l) for l in out.read_bytes().splitlines()]


@pytest.mark.parametrize("mode", ["monitor", "enforce"])
def test_http_connect_to_external_ssh_through_a_proxy(netlab, proxy, tmp_path, mode, require_bpf):
    phost, pport, log = proxy
    lines, recs = _cli(netlab, tmp_path, mode, f"connect22-{mode}", CLIENT, phost, str(pport), f"{netlab.ssh_host}:22",
                       _wait(mode))
    cport = int(lines[0])
    al = [a for a in recs if a["kind"] == "alert" and a["rule"]["id"] == "tunnel-http-connect-ssh"]
    assert al, [a["rule"]["id"] for a in recs if a["kind"] == "alert"]
    a = al[0]
    assert a["rule"]["category"] == "tunnel" and a["agent"]["id"] == f"connect22-{mode}"
    assert a["net"]["src"]["port"] == cport and a["net"]["dst"] == {**a["net"]["dst"], "addr": phost, "port": pport}
    assert a["flow"]["detail"]["connect_port"] == 22 and a["flow"]["kernel_hint"] == "ssh"
    if mode == "enforce":
        # dropped in the kernel with the request line: the proxy never heard of it
        assert a["rule"]["outcome"] == "blocked" and a["net"]["verdict"] == "blocked"
        assert log.read_text() == ""
        assert not any(l.startswith("GOT") and "SSH-" in l for l in lines), lines
    else:
        assert a["rule"]["outcome"] == "reported"
        assert log.read_text().startswith(f"CONNECT {netlab.ssh_host}:22 ")
        assert any(l.startswith("GOT") and "SSH-2.0-OpenSSH" in l for l in lines), lines


@pytest.mark.parametrize("mode", ["monitor", "enforce"])
def test_tls_client_hello_naming_a_pool(netlab, tmp_path, mode, require_bpf):
    # in enforce mode the hello is dropped in the kernel (probes/tls.c): the handshake times out
    lines, recs = _cli(netlab, tmp_path, mode, f"sni-{mode}", TLS_SNI, netlab.pool_host, _wait(mode))
    cport = int(lines[0])
    al = [a for a in recs if a["kind"] == "alert" and a["rule"]["id"] == "mining-pool-tls-sni"]
    assert al, [a["rule"]["id"] for a in recs if a["kind"] == "alert"]
    a = al[0]
    assert a["flow"]["detail"]["sni"] == "gulf.moneroocean.stream" and a["net"]["src"]["port"] == cport
    assert a["rule"]["category"] == "mining" and a["agent"]["id"] == f"sni-{mode}"
    if mode == "enforce":
        assert a["rule"]["outcome"] == "blocked" and a["net"]["verdict"] == "blocked"
        assert any(l.startswith("TLS") for l in lines), lines
    else:
        assert a["rule"]["outcome"] == "reported"
