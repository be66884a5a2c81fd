"""First-bytes classification against bytes produced by the real clients and servers."""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading

import pytest

from agenttrace.decode.protocols import (EGRESS, INGRESS, PROTO_HINT_IDS, PROTO_HINT_NAMES, classify,
                                  parse_tls)

CAP = 256  # AT_FLOW_BYTES: what the kernel captures per direction


# -- capture helpers: run a real client against a socket that records its first bytes ------------

def _capture_client(argv_for_port, want: int = 512) -> bytes:
    """Start a real client (argv_for_port(port)) against a local listener; return its first bytes."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.settimeout(30)
    p = subprocess.Popen(argv_for_port(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        conn, _ = srv.accept()
        conn.settimeout(30)
        data = b""
        with conn:
            # Stop at the end of what a client sends before it waits for the server:
            # the banner line (ssh) or the header block (http).
            while len(data) < want and not (data.startswith(b"SSH-") and b"\n" in data) and b"\r\n\r\n" not in data:
                chunk = conn.recv(want - len(data))
                if not chunk:
                    break
                data += chunk
        return data
    finally:
        srv.close()
        p.kill()
        p.wait()


def client_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello from Python's OpenSSL, produced into a memory BIO."""
    ctx = ssl.create_default_context()
    if sni is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# -- SSH --------------------------------------------------------------------------------------------

def test_openssh_client_banner():
    data = _capture_client(lambda port: ["ssh", "-F", "none", "-o", "BatchMode=yes", "-p", str(port),
                                         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                                         "nobody@127.0.0.1"])
    version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.split(",")[0]
    proto, d = classify(data[:CAP], EGRESS)
    assert proto == "ssh"
    assert d["role"] == "client" and d["proto_version"] == "2.0"
    # `ssh -V` says e.g. "OpenSSH_9.2p1 Debian-2+deb12u10": software and comments of the banner.
    assert f'{d["software"]} {d["comments"]}' == version
    assert d["banner"] == f"SSH-2.0-{version}"


def test_openssh_server_banner(tmp_path):
    key = tmp_path / "hk"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cfg = tmp_path / "cfg"
    cfg.write_text(f"HostKey {key}\nUsePAM no\nPidFile {tmp_path}/pid\n")
    # Inetd mode: sshd speaks on stdin/stdout, so no port or namespace is needed.
    p = subprocess.run(["/usr/sbin/sshd", "-i", "-f", str(cfg), "-o", "LogLevel=QUIET"],
                       input=b"", capture_output=True, timeout=30)
    proto, d = classify(p.stdout[:CAP], INGRESS)
    assert proto == "ssh" and d["role"] == "server", p.stdout
    assert d["software"].startswith("OpenSSH_")


def test_paramiko_client_banner():
    paramiko = pytest.importorskip("paramiko")
    a, b = socket.socketpair()
    t = paramiko.Transport(a)
    try:
        t.start_client(event=threading.Event())  # returns at once; the banner is sent first
        b.settimeout(30)
        data = b.recv(CAP)
    finally:
        t.close()
        a.close()
        b.close()
    proto, d = classify(data, EGRESS)
    assert proto == "ssh"
    assert d["software"] == f"paramiko_{paramiko.__version__}"


def test_ssh_banner_after_preamble_lines_and_cut_short():
    proto, d = classify(b"Welcome to the box\r\nSSH-2.0-dropbear_2022.83\r\n", INGRESS)
    assert (proto, d["software"]) == ("ssh", "dropbear_2022.83")
    # RFC 4253 lets only a server send lines first, but an agent's own server (or a lenient
    # one) accepts them from a client too, so lines before the banner are no disguise either way.
    proto, d = classify(b"hello\r\nSSH-2.0-x\r\n", EGRESS)
    assert proto == "ssh" and d["prebanner_bytes"] == 7
    proto, d = classify(b"SSH-2.0-OpenSSH_9", EGRESS)
    assert proto == "ssh" and d["truncated"] is True
    assert classify(b"SSH-", EGRESS)[0] == "unknown"


# -- TLS --------------------------------------------------------------------------------------------

def test_tls_client_hello_sni_alpn_versions():
    hello = client_hello("pool.supportxmr.com", ["h2", "http/1.1"])
    assert len(hello) > CAP
    proto, d = classify(hello, EGRESS)
    assert proto == "tls"
    assert d["handshake"] == "client_hello" and d["sni"] == "pool.supportxmr.com"
    assert d["alpn"] == ["h2", "http/1.1"]
    assert d["version"] == "TLS1.3" and "TLS1.2" in d["versions"]
    assert "truncated" not in d


def test_tls_client_hello_cut_at_capture_size_keeps_sni():
    proto, d = classify(client_hello("xmr-eu1.nanopool.org")[:CAP], EGRESS)
    assert proto == "tls" and d["sni"] == "xmr-eu1.nanopool.org" and d["truncated"] is True
    # What was not captured is not claimed: the offered versions came after the cut.
    assert "version" not in d


def test_tls_sni_cut_mid_name_is_not_reported_as_a_shorter_name():
    hello = client_hello("averyveryverylongname.pool.example")
    cut = hello.index(b"averyveryverylongname") + 10
    d = parse_tls(hello[:cut])
    assert "sni" not in d and d["sni_truncated"] is True and d["truncated"] is True


def test_tls_without_sni_and_server_hello():
    proto, d = classify(client_hello(None), EGRESS)
    assert proto == "tls" and "sni" not in d
    # A real ServerHello: a server context answering the ClientHello in memory.
    import tempfile, os
    with tempfile.TemporaryDirectory() as td:
        key, crt = os.path.join(td, "k"), os.path.join(td, "c")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", crt, "-subj", "/CN=lab", "-days", "1"],
                       check=True, capture_output=True)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(crt, key)
        sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = sctx.wrap_bio(sin, sout, server_side=True)
        sin.write(client_hello("lab"))
        with pytest.raises(ssl.SSLWantReadError):
            server.do_handshake()
        proto, d = classify(sout.read()[:CAP], INGRESS)
    assert proto == "tls" and d["handshake"] == "server_hello" and d["role"] == "server"
    assert d["version"] == "TLS1.3" and d["cipher_suite"].startswith("0x13")


def test_tls_record_header_only():
    proto, d = classify(b"\x16\x03\x01", EGRESS)
    assert proto == "tls" and d["truncated"] is True
    assert classify(b"\x17\x03\x03\x00\x10", EGRESS)[0] == "unknown"  # application data, not a handshake


# -- HTTP -------------------------------------------------------------------------------------------

def test_real_urllib_request():
    data = _capture_client(lambda port: [
        "python3", "-c", f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/a/b?c=1', timeout=30)"])
    proto, d = classify(data[:CAP], EGRESS)
    assert proto == "http"
    assert (d["method"], d["path"], d["version"]) == ("GET", "/a/b?c=1", "HTTP/1.1")
    assert d["host"].startswith("127.0.0.1:") and d["user_agent"].startswith("Python-urllib/")
    assert "tunnel" not in d


def test_real_git_over_http_request():
    data = _capture_client(lambda port: ["git", "-c", "http.lowSpeedTime=30", "ls-remote",
                                         f"http://127.0.0.1:{port}/repo.git"])
    proto, d = classify(data[:CAP], EGRESS)
    assert proto == "http" and d["method"] == "GET"
    assert d["path"].startswith("/repo.git/info/refs?service=git-upload-pack")
    assert d["user_agent"].startswith("git/")


def test_connect_tunnel_and_status_line():
    proto, d = classify(b"CONNECT 203.0.113.10:22 HTTP/1.1\r\nHost: 203.0.113.10:22\r\n\r\n", EGRESS)
    assert proto == "http" and d["tunnel"] is True
    assert (d["connect_host"], d["connect_port"]) == ("203.0.113.10", 22)
    proto, d = classify(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n", EGRESS)
    assert (d["connect_host"], d["connect_port"]) == ("2001:db8::1", 443)
    proto, d = classify(b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.11.2\r\nDate: x\r\n\r\n", INGRESS)
    assert (proto, d["status"], d["server"]) == ("http", 200, "SimpleHTTP/0.6 Python/3.11.2")


def test_http_truncated_headers_and_non_http():
    long_path = "/" + "x" * 300
    proto, d = classify(f"GET {long_path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()[:CAP], EGRESS)
    assert proto == "http" and d["truncated"] is True and "host" not in d
    proto, d = classify(b"POST /api HTTP/1.1\r\nHost: internal.example\r\nContent-Le", EGRESS)
    assert d["host"] == "internal.example" and d["truncated"] is True
    assert classify(b"GETX / HTTP/1.1\r\n", EGRESS)[0] == "unknown"
    assert classify(b"HELLO world\r\n", EGRESS)[0] == "unknown"
    assert classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", EGRESS)[1]["version"] == "HTTP/2"


# -- Stratum ----------------------------------------------------------------------------------------

# The lines real miners send (xmrig 6.x `login`; cpuminer / cgminer-style `mining.*`).
XMRIG_LOGIN = json.dumps({"id": 1, "jsonrpc": "2.0", "method": "login", "params": {
    "login": "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A",
    "pass": "x", "agent": "XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0",
    "algo": ["rx/0", "cn/2", "cn/r"]}}) + "\n"
SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'
AUTHORIZE = b'{"id": 2, "method": "mining.authorize", "params": ["wallet.rig1", "x"]}\n'
EXTRANONCE = b'{"id": 3, "method": "mining.extranonce.subscribe", "params": []}\n'


def test_stratum_mining_methods_and_agent():
    proto, d = classify(SUBSCRIBE + AUTHORIZE + EXTRANONCE, EGRESS)
    assert proto == "stratum"
    assert d["methods"] == ["mining.subscribe", "mining.authorize", "mining.extranonce.subscribe"]
    assert d["method"] == "mining.subscribe" and d["agent"] == "cpuminer/2.5.1" and d["login"] == "wallet.rig1"


def test_stratum_xmrig_login_whole_and_cut():
    proto, d = classify(XMRIG_LOGIN.encode(), EGRESS)
    assert proto == "stratum" and d["method"] == "login"
    assert d["agent"].startswith("XMRig/6.21.0") and d["login"].startswith("44AFF")
    assert d["algo"] == ["rx/0", "cn/2", "cn/r"]
    cut = XMRIG_LOGIN.encode()[:200]  # the agent string is cut by a short capture
    proto, d = classify(cut, EGRESS)
    assert proto == "stratum" and d["truncated"] is True and d["method"] == "login"
    assert "agent" not in d and d["agent_prefix"].startswith("XMRig/")


def test_stratum_pool_replies_from_the_lab_stub():
    from netlab import _stratum_reply
    reply = b"".join(json.dumps(r).encode() + b"\n" for r in _stratum_reply({"id": 1, "method": "mining.subscribe"}, None, 3333))
    assert classify(reply, INGRESS) == ("stratum", {"role": "server", "reply": True})
    notify = b"".join(json.dumps(r).encode() + b"\n" for r in _stratum_reply({"id": 2, "method": "mining.authorize"}, None, 3333))
    proto, d = classify(notify[:CAP], INGRESS)
    assert proto == "stratum" and "mining.set_difficulty" in d["methods"]
    login = json.dumps(_stratum_reply({"id": 1, "method": "login"}, None, 443)[0]).encode()
    assert classify(login[:CAP], INGRESS)[0] == "stratum"


def test_ordinary_json_rpc_is_not_stratum():
    lsp = b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"processId":1}}\n'
    assert classify(lsp, EGRESS)[0] == "unknown"
    assert classify(b'{"jsonrpc":"2.0","method":"login","params":{}}\n', EGRESS)[0] == "unknown"
    assert classify(b'{"id":1,"result":true}\n', INGRESS)[0] == "unknown"
    assert classify(b'{"a": 1}\nnot json\n{"method":"mining.subscribe"}\n', EGRESS)[0] == "unknown"


# -- general ----------------------------------------------------------------------------------------

def test_unknown_empty_and_direction_forms():
    assert classify(b"", EGRESS) == ("unknown", {})
    proto, d = classify(b"\x00\x01\x02binary", 0)
    assert proto == "unknown" and d == {"first_bytes": "000102" + b"binary".hex(), "length": 9}
    assert classify(b"SSH-2.0-x\r\n", 1)[1]["role"] == "server"
    with pytest.raises(ValueError, match="direction"):
        classify(b"x", "sideways")
    assert PROTO_HINT_NAMES[PROTO_HINT_IDS["stratum"]] == "stratum"


def test_agent_bytes_stay_json_safe():
    proto, d = classify(b"SSH-2.0-evil\xff\x1b[31m\r\n", EGRESS)
    assert proto == "ssh"
    json.dumps(d)  # no exception: undecodable bytes are backslash-escaped
    assert "\\xff" in d["software"]


def _flow_rec(data: bytes, direction: int, hint: int = 0, verdict: int = 0):
    from agenttrace.kernel import wire as ev
    r = ev.Flow()
    r.family, r.direction, r.verdict, r.proto_hint = socket.AF_INET, direction, verdict, hint
    agent, remote = b"\0" * 10 + b"\xff\xff" + bytes([172, 31, 255, 2]), b"\0" * 10 + b"\xff\xff" + bytes([203, 0, 113, 10])
    # packet addresses: egress leaves the agent, ingress arrives from the remote end
    s, d, sp, dp = (agent, remote, 40000, 443) if direction == 0 else (remote, agent, 443, 40000)
    C = __import__("ctypes")
    C.memmove(r.saddr, s, 16)
    C.memmove(r.daddr, d, 16)
    r.sport, r.dport = sp, dp
    r.len = len(data)
    C.memmove(r.data, data, len(data))
    return r


def test_flow_parts_normalises_ends_and_classifies():
    from agenttrace.decode.protocols import flow_parts
    for direction in (0, 1):
        net, flow = flow_parts(_flow_rec(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n", direction, hint=1))
        assert net["src"] == {"addr": "172.31.255.2", "port": 40000}
        assert net["dst"] == {"addr": "203.0.113.10", "port": 443}
        assert (net["proto"], net["family"], net["verdict"]) == ("tcp", "ipv4", "allowed")
        assert flow["protocol"] == "ssh" and flow["detail"]["software"] == "OpenSSH_9.2p1"
        assert flow["direction"] == ("egress", "ingress")[direction] and flow["kernel_hint"] == "ssh"
    # The kernel's hint stands where userspace finds nothing; a drop is reported as blocked.
    net, flow = flow_parts(_flow_rec(b'{"id":1,"method":"login","params":{"lo', 0, hint=2, verdict=1))
    assert (flow["protocol"], net["verdict"], flow["bytes"]) == ("stratum", "blocked", 38)
    net, flow = flow_parts(_flow_rec(b"\x00\x01", 0))
    assert (flow["protocol"], flow["kernel_hint"]) == ("unknown", "unknown")
