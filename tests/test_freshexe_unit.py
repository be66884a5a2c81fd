"""The download-then-exec decision (tracer/enrich/freshexe.py) on real files, with the process
history given as the records the enrich stage would have seen (no kernel needed)."""
from __future__ import annotations

import os
import time

from agenttrace.enrich.activity import Activity
from agenttrace.enrich.freshexe import FreshExe
from agenttrace.enrich.gpunet import established

S = 1_000_000_000
AGENT = 77


_EXE: dict = {}


def _exec(act, pid, t, exe, ppid=1, identity=None):
    _EXE[pid] = exe
    act.observe("exec", t, pid, AGENT, {"proc": {"pid": pid, "ppid": ppid, "comm": exe.rsplit("/", 1)[-1],
                                                 "exe": exe, "exec_id": f"e{pid}", "identity": identity}})


def _connect(act, pid, t, addr="198.51.100.7", scope="external"):
    # a connect record's proc is the process table's: what it runs now, and its creators
    proc = {"pid": pid, "exe": _EXE.get(pid, ""), "comm": _EXE.get(pid, "").rsplit("/", 1)[-1], "ancestry": []}
    act.observe("connect", t, pid, AGENT, {"proc": proc, "net": {
        "proto": "tcp", "verdict": "allowed", "result": "established", "src": {"addr": "10.0.0.2", "port": 40000},
        "dst": {"addr": addr, "port": 80, "scope": scope, "name": "dl.example.org"}}})


def _exit(act, pid, t):
    act.observe("exit", t, pid, AGENT, {"proc": {"pid": pid}})


def _file(tmp_path, name="payload", mtime_ago=None):
    p = tmp_path / name
    p.write_bytes(b"\x7fELF fake")
    p.chmod(0o755)
    if mtime_ago is not None:
        t = time.time() - mtime_ago
        os.utime(p, (t, t))
    return p


def test_downloader_alive_at_the_write_is_named(tmp_path):
    act = Activity()
    now = time.time_ns()
    _exec(act, 10, now - 60 * S, "/usr/bin/python3.11")         # the agent, talking to its API for a minute
    _connect(act, 10, now - 59 * S)
    _exec(act, 11, now - 3 * S, "/usr/bin/curl", ppid=10)
    _connect(act, 11, now - 3 * S)
    p = _file(tmp_path)
    _exit(act, 11, time.time_ns())
    body = FreshExe(act).check(12, AGENT, str(p), time.time_ns())
    assert body["path"] == str(p) and body["changed_age_s"] < 5
    d = body["downloader"]
    assert d["pid"] == 11 and d["exe"] == "/usr/bin/curl" and d["dst"]["addr"] == "198.51.100.7"   # the narrowest lifetime
    assert "builder" not in body


def test_mtime_set_back_is_still_fresh_by_ctime(tmp_path):
    act = Activity()
    now = time.time_ns()
    _exec(act, 21, now - 2 * S, "/tmp/fetch")
    _connect(act, 21, now - 2 * S)
    p = _file(tmp_path, mtime_ago=30 * 86400)                   # curl -R: the server's date
    body = FreshExe(act).check(22, AGENT, str(p), time.time_ns())
    assert body["modified_age_s"] > 86400 and body["changed_age_s"] < 5
    assert body["downloader"]["pid"] == 21


def test_build_tool_after_the_download_exempts_and_one_before_does_not(tmp_path):
    gcc = {"name": "gnu-ld", "category": "build"}
    act = Activity()
    now = time.time_ns()
    _exec(act, 30, now - 60 * S, "/usr/bin/python3.11")
    _connect(act, 30, now - 59 * S)
    _exec(act, 31, now - 1 * S, "/usr/bin/ld", identity=gcc)
    p = _file(tmp_path)
    b = FreshExe(act).check(32, AGENT, str(p), time.time_ns())
    assert b["builder"]["pid"] == 31 and b["builder"]["tool"] == "build" and b["builder"]["tool_by"] == "gnu-ld"
    # a compiler kept running from before the download does not cover for it
    act2 = Activity()
    _exec(act2, 40, now - 30 * S, "/usr/bin/make", identity={"name": "gnu-make", "category": "build"})
    _exec(act2, 41, now - 2 * S, "/usr/bin/wget")
    _connect(act2, 41, now - 2 * S)
    b2 = FreshExe(act2).check(42, AGENT, str(p), time.time_ns())
    assert b2["downloader"]["pid"] == 41 and "builder" not in b2


def test_children_of_an_installer_are_installers_and_never_downloaders(tmp_path):
    act = Activity()
    now = time.time_ns()
    _exec(act, 50, now - 5 * S, "/usr/bin/python3.11", identity={"name": "pip", "category": "installer"})
    _connect(act, 50, now - 5 * S)
    act.observe("fork", now - 4 * S, 51, AGENT, {"proc": {"pid": 51, "ppid": 50}})
    _exec(act, 51, now - 4 * S, "/usr/bin/rustc", ppid=50)
    _connect(act, 51, now - 4 * S)
    p = _file(tmp_path)
    b = FreshExe(act).check(52, AGENT, str(p), time.time_ns())
    assert "downloader" not in b and b["builder"]["tool"] == "installer" and b["builder"]["tool_by"] == "pip"


def test_not_fresh_system_other_agent_and_internal_are_not_downloads(tmp_path, monkeypatch):
    act = Activity()
    now = time.time_ns()
    _exec(act, 60, now - 2 * S, "/usr/bin/curl")
    _connect(act, 60, now - 2 * S, addr="10.0.0.5", scope="internal")
    p = _file(tmp_path)
    f = FreshExe(act)
    assert "downloader" not in f.check(61, AGENT, str(p), time.time_ns())      # internal mirror
    assert "downloader" not in f.check(61, AGENT + 1, str(p), time.time_ns())  # another agent
    assert f.check(61, AGENT, "/usr/bin/true", time.time_ns()) is None          # system path
    old = _file(tmp_path, "old")
    assert FreshExe(act, now_ns=lambda: time.time_ns() + 7200 * S).check(61, AGENT, str(old), 0) is None
    # `./name` resolved against the exec'ing process's cwd, then its parent's
    monkeypatch.chdir(tmp_path)
    assert FreshExe(act).check(os.getpid(), AGENT, "./payload", 0)["path"] == str(p)
    assert FreshExe(act).check(2 ** 22 + 7, AGENT, "./payload", 0, ppid=os.getpid())["path"] == str(p)


def test_activity_remembers_only_what_is_asked_about_and_is_bounded():
    act = Activity(max_procs=4)
    for pid in range(100, 110):
        _exec(act, pid, pid, "/bin/x")                 # plain execs: an identity each, no entry
    assert not act.procs and len(act.idents) == 4
    for pid in range(100, 110):
        _connect(act, pid, pid)
    assert len(act.procs) == 4 and act.stats["evicted"] == 6
    assert sum(len(d) for d in act.networked.values()) == 4


def test_established_reads_this_process_sockets():
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    try:
        held = established(os.getpid())
        assert held[("127.0.0.1", srv.getsockname()[1])] == c.getsockname()[1]
    finally:
        for s in (a, c, srv):
            s.close()
