"""Real probes, real processes in real cgroups: exec, fork, exit, scoping, drops."""
import os
import subprocess
import sys
import time

import pytest

from conftest import AGENTTRACE

# unique per test run: `run -- CMD` locks its agent name, and another checkout's suite may run
# this same test at the same time
_AGENT_EXIT3 = f"exit3-{os.getpid()}"

# process records only: these tests need no network hooks, and the full set costs ~4 s per start
PROC = ("proc",)

PY = sys.executable


def execs(sess, exe=None, **where):
    out = sess.of("exec", **where)
    return [r for r in out if exe is None or r["proc"]["exe"] == exe]


def test_process_tree_exec_exit(agent_tree, make_session):
    a1 = agent_tree.agent("a1")
    sess = make_session([agent_tree.root], features=PROC)
    code = "import subprocess; subprocess.run(['/bin/echo', 'leaf', 'two words'])"
    r = agent_tree.run(a1, ["/bin/sh", "-c", f"{PY} -c \"{code}\"; exit 0"])
    assert r.returncode == 0 and b"leaf two words" in r.stdout
    leaf = sess.wait_for(lambda: execs(sess, "/bin/echo"))
    sess.wait_for(lambda: len(sess.of("exit")) >= 3)
    sh = [e for e in sess.of("exec") if e["proc"]["filename"] == "/bin/sh"][0]
    py = [e for e in sess.of("exec") if e["proc"]["filename"] == PY][0]
    leaf = leaf[0]
    # identity and argv
    assert leaf["agent"]["id"] == "a1"
    assert leaf["agent"]["cgroup"].endswith(f"/{agent_tree.root.name}/a1")
    assert leaf["agent"]["cgroup_id"] == os.stat(a1).st_ino
    assert leaf["proc"]["args"] == ["/bin/echo", "leaf", "two words"]
    assert py["proc"]["args"][:2] == [PY, "-c"]
    assert sh["proc"]["args"] == ["/bin/sh", "-c", f"{PY} -c \"{code}\"; exit 0"]
    # parentage: sh ← test, python ← sh, echo ← python; ancestry nearest first
    assert sh["proc"]["ppid"] == os.getpid()
    assert py["proc"]["ppid"] == sh["proc"]["pid"]
    assert leaf["proc"]["ppid"] == py["proc"]["pid"]
    assert [a["pid"] for a in leaf["proc"]["ancestry"][:3]] == [py["proc"]["pid"], sh["proc"]["pid"], os.getpid()]
    assert leaf["proc"]["ancestry"][1]["exe"] == "/bin/sh"
    assert leaf["proc"]["uid"] == os.getuid()
    # exits carry the code and a duration
    ex = {e["proc"]["pid"]: e for e in sess.of("exit")}
    assert ex[leaf["proc"]["pid"]]["exit_code"] == 0
    assert ex[sh["proc"]["pid"]]["exit_code"] == 0
    assert ex[leaf["proc"]["pid"]]["duration_ms"] >= 0
    assert ex[leaf["proc"]["pid"]]["proc"]["exe"] == "/bin/echo"


def test_exit_code_and_signal(agent_tree, make_session):
    a = agent_tree.agent("codes")
    sess = make_session([agent_tree.root], features=PROC)
    agent_tree.run(a, ["/bin/sh", "-c", "exit 7"])
    agent_tree.run(a, [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    sess.wait_for(lambda: len(sess.of("exit")) >= 2)
    codes = sorted((e["exit_code"], e.get("signal")) for e in sess.of("exit"))
    assert codes == [(7, None), (128 + 9, 9)]


@pytest.mark.parametrize("fork_records", [False, True], ids=["kernel-chain", "fork-records"])
def test_double_fork_orphan_keeps_creator_ancestry(agent_tree, make_session, fork_records):
    a = agent_tree.agent("dbl")
    sess = make_session([agent_tree.root], features=PROC, fork_records=fork_records)
    code = (
        "import os, sys, time\n"
        "r, w = os.pipe()\n"
        "mid = os.fork()\n"
        "if mid == 0:\n"
        "    if os.fork() == 0:\n"
        "        os.read(r, 1)\n"           # wait until the middle process is gone
        "        os.execv('/bin/echo', ['/bin/echo', 'orphan'])\n"
        "    os._exit(0)\n"
        "os.waitpid(mid, 0)\n"
        "print(mid, flush=True)\n"
        "os.write(w, b'x')\n"
        "time.sleep(0.5)\n"
    )
    r = agent_tree.run(a, [PY, "-c", code])
    mid = int(r.stdout.split()[0])
    leaf = sess.wait_for(lambda: execs(sess, "/bin/echo"))[0]
    top = [e for e in sess.of("exec") if e["proc"]["filename"] == PY][0]["proc"]["pid"]
    assert leaf["proc"]["args"] == ["/bin/echo", "orphan"]
    # the kernel reparented it (its parent exited) ...
    assert leaf["proc"]["ppid"] != mid
    # ... but the ancestry still names who created it
    assert [x["pid"] for x in leaf["proc"]["ancestry"][:2]] == [mid, top]
    assert leaf["proc"]["parent_exec_id"] == leaf["proc"]["ancestry"][0]["exec_id"]
    forks = {f["proc"]["pid"]: f for f in sess.of("fork")}
    if fork_records:
        assert mid in forks and leaf["proc"]["pid"] in forks
        assert forks[mid]["proc"]["exec_id"] == leaf["proc"]["ancestry"][0]["exec_id"]
    else:
        # the kernel kept the chain: no fork records, and the middle process, which exited
        # before any record named it, has no exit record either (docs/MIGRATION.md)
        assert not forks
        sess.wait_for(lambda: sess.of("exit", proc__pid=top))
        assert not sess.of("exit", proc__pid=mid)


def test_fexecve_of_memfd(agent_tree, make_session):
    a = agent_tree.agent("memfd")
    sess = make_session([agent_tree.root], features=PROC)
    code = (
        "import os\n"
        "fd = os.memfd_create('payload', 0)\n"
        "os.write(fd, open('/bin/sleep', 'rb').read())\n"
        "os.execve(fd, ['innocent', '1'], {})\n"   # fexecve → execveat(fd, '', AT_EMPTY_PATH)
    )
    p = agent_tree.spawn(a, [PY, "-c", code])
    try:
        ev = sess.wait_for(lambda: [e for e in sess.of("exec") if e["proc"]["args"] == ["innocent", "1"]])
    finally:
        p.wait(timeout=30)
    assert ev, "no exec event for the memfd exec"
    proc = ev[0]["proc"]
    assert proc["filename"].startswith("/dev/fd/")
    assert proc["exe"].startswith("/memfd:payload")


def test_outside_is_silent_and_late_cgroups_are_traced(agent_tree, make_session):
    sess = make_session([agent_tree.root], features=PROC)
    # outside any watched cgroup: must produce nothing
    subprocess.run(["/bin/echo", "outside-marker"], stdout=subprocess.DEVNULL, check=True)
    # a cgroup created after the tracer started
    late = agent_tree.agent("late")
    nested = late / "job"
    nested.mkdir()
    agent_tree.run(nested, ["/bin/echo", "inside-marker"])
    ev = sess.wait_for(lambda: [e for e in sess.of("exec") if e["proc"]["args"][-1:] == ["inside-marker"]])
    sess.settle()
    assert ev and ev[0]["agent"]["id"] == "late"        # nested job belongs to agent "late"
    assert ev[0]["agent"]["cgroup_id"] == os.stat(late).st_ino
    every_arg = [a for r in sess.records if r.get("proc") for a in r["proc"]["args"]]
    assert "outside-marker" not in every_arg
    assert all(r["agent"]["id"] == "late" for r in sess.records if r["kind"] != "lifecycle")


def test_processes_directly_in_watched_cgroup(agent_tree, make_session):
    sess = make_session([agent_tree.root], features=PROC)
    agent_tree.run(agent_tree.root, ["/bin/echo", "direct"])
    ev = sess.wait_for(lambda: [e for e in sess.of("exec") if e["proc"]["args"] == ["/bin/echo", "direct"]])
    assert ev[0]["agent"]["id"] == agent_tree.root.name


def test_preexisting_process_is_bootstrapped(agent_tree, make_session):
    a = agent_tree.agent("old")
    p = agent_tree.spawn(a, [PY, "-c", "import sys, subprocess; sys.stdin.readline(); subprocess.run(['/bin/true'])"],
                         stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        sess = make_session([agent_tree.root], features=PROC)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        ev = sess.wait_for(lambda: execs(sess, "/bin/true"))
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    parent = ev[0]["proc"]["ancestry"][0]
    assert parent["pid"] == p.pid and parent["exe"].startswith("/usr/bin/python3")


def _burst(agent_tree, a, make_session, n, **opts):
    code = ("import os, sys\nsys.stdin.readline()\n"
            f"for _ in range({n}):\n"
            "    os.waitpid(os.posix_spawn('/bin/true', ['/bin/true'], {}), 0)\n")
    p = agent_tree.spawn(a, [PY, "-c", code], stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)
        sess = make_session([agent_tree.root], features=PROC, **opts)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        if opts.get("ringbuf_pages", 4096) < 64:
            p.wait(timeout=120)      # do not read during the burst: the small buffer overflows
        else:
            while p.poll() is None:
                sess.tracer.poll(50)
        sess.settle(10)
    finally:
        p.stdin.close()
        p.wait(timeout=120)
    reported = len(execs(sess, "/bin/true"))
    drops = sum(n for (agent, t), n in sess.tracer.probes.drops().items()
                if t == 1 and agent == os.stat(a).st_ino)
    return reported, drops


def test_exec_burst_every_exec_reported_or_counted(agent_tree, make_session):
    a = agent_tree.agent("burst")
    reported, drops = _burst(agent_tree, a, make_session, 2000)
    assert reported + drops == 2000


def test_exec_burst_overflow_is_counted_exactly(agent_tree, make_session):
    a = agent_tree.agent("flood")
    reported, drops = _burst(agent_tree, a, make_session, 2000, ringbuf_pages=16)
    assert drops > 0, "a 64 KiB ring buffer left unread must overflow"
    assert reported + drops == 2000


def test_run_command_exit_code_and_events(tmp_path, require_bpf):
    out = tmp_path / "events.jsonl"
    r = subprocess.run([AGENTTRACE, "run", "--output", str(out), "--agent", _AGENT_EXIT3, "--",
                        "sh", "-c", "exit 3"], capture_output=True, timeout=120)
    assert r.returncode == 3, r.stderr
    import orjson
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    assert recs[0]["kind"] == "lifecycle" and recs[0]["phase"] == "started"
    assert recs[-1]["kind"] == "lifecycle" and recs[-1]["phase"] == "stopped"
    ex = [r for r in recs if r["kind"] == "exec"]
    assert ex and ex[0]["proc"]["args"] == ["sh", "-c", "exit 3"] and ex[0]["agent"]["id"] == _AGENT_EXIT3
    exits = [r for r in recs if r["kind"] == "exit"]
    assert exits and exits[-1]["exit_code"] == 3 and exits[-1]["proc"]["pid"] == ex[0]["proc"]["pid"]
    assert recs[-1]["drops"]["kernel"] == 0
    from agenttrace.enrich.cgroups import cgroup2_mount
    assert not (cgroup2_mount() / "agenttrace" / _AGENT_EXIT3).exists()
