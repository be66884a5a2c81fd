"""Containment with real probes in real cgroups: socket fencing (cgroup/sock_create) and
escape detection (an agent process leaving the watched subtree)."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import AGENTTRACE

PY = sys.executable


def _engine(mode):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    return Engine(load_rules(default_rule_paths()), mode=mode)


def _alerts(sess, rule_id):
    return [a for a in sess.of("alert") if a["rule"]["id"] == rule_id]


RAW = """
import json, socket
out = {}
for name, fam, typ, proto in [("raw4", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                              ("raw6", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
                              ("tcp", socket.AF_INET, socket.SOCK_STREAM, 0)]:
    try:
        socket.socket(fam, typ, proto).close()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_raw_sockets_are_fenced(mode, agent_tree, make_session):
    a = agent_tree.agent(f"raw-{mode}")
    sess = make_session([agent_tree.root], engine=_engine(mode), mode=mode)
    res = agent_tree.run(a, [PY, "-c", RAW])
    out = json.loads(res.stdout)
    want = errno.EPERM if mode == "enforce" else 0
    assert out == {"raw4": want, "raw6": want, "tcp": 0}
    alerts = sess.wait_for(lambda: len(_alerts(sess, "escape-socket-fence")) >= 2 and _alerts(sess, "escape-socket-fence"))
    assert sorted(al["socket"]["family"] for al in alerts) == ["inet", "inet6"]
    for al in alerts:
        assert al["rule"]["category"] == "escape"
        assert al["socket"]["type"] == "raw"
        assert al["rule"]["outcome"] == ("blocked" if mode == "enforce" else "reported")
        assert al["socket"]["verdict"] == ("blocked" if mode == "enforce" else "allowed")
    sess.settle()
    # ordinary sockets leave no record
    assert all(r["socket"]["type"] == "raw" for r in sess.of("socket"))
    # a process outside the agent cgroups is not fenced
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def test_raw_socket_fenced_through_the_cli(tmp_path):
    """cgroup/sock_create's own EPERM: with the command's CAP_NET_RAW kept (`--drop-caps none`)
    the raw socket reaches the hook (test_packet_fence.py covers the default, dropped one)."""
    out = tmp_path / "ev.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "--drop-caps", "none", "-o", str(out),
                        "--", PY, "-c", RAW],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["raw4"] == errno.EPERM
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    started = [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "started"][0]
    assert {"sock", "escape"} <= set(started["probes"])
    al = [r for r in recs if r["kind"] == "alert" and r["rule"]["id"] == "escape-socket-fence"]
    assert al and al[0]["rule"]["outcome"] == "blocked"



def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.5)
    return srv, srv.getsockname()[1]


SELF_ESCAPE = """
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
s = socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5)
s.sendall(b"escaped")
print("connected")
"""


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_self_escape_is_caught(mode, agent_tree, make_session, outside):
    srv, port = _listener()
    try:
        a = agent_tree.agent(f"esc-{mode}")
        sess = make_session([agent_tree.root], engine=_engine(mode), mode=mode)
        res = agent_tree.run(a, [PY, "-c", SELF_ESCAPE, str(outside), str(port)])
        got = []
        try:
            c, _ = srv.accept()
            got.append(c.recv(16))
            c.close()
        except socket.timeout:
            pass
        al = sess.wait_for(lambda: _alerts(sess, "escape-cgroup-move"))[0]
        assert al["rule"]["category"] == "escape"
        assert al["escape"]["self"] is True and al["escape"]["pid"] == al["proc"]["pid"]
        assert al["escape"]["to"]["cgroup"].endswith(outside.name)
        assert al["agent"]["id"] == f"esc-{mode}"
        if mode == "enforce":
            # dead before write() returned: it never connected from outside
            assert res.returncode == -signal.SIGKILL and got == []
            assert al["rule"]["outcome"] == "killed" and al["escape"]["verdict"] == "killed"
        else:
            assert res.returncode == 0 and got == [b"escaped"]
            assert al["rule"]["outcome"] == "reported"
    finally:
        srv.close()


MOVE_OTHER = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "30"])
open(sys.argv[1] + "/cgroup.procs", "w").write(str(child.pid))
print(child.pid, flush=True)
rc = child.wait()
print(rc)
"""


def test_moving_another_process_out_is_caught_and_killed(agent_tree, make_session, outside):
    a = agent_tree.agent("mover")
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce")
    p = agent_tree.spawn(a, [PY, "-c", MOVE_OTHER, str(outside)], stdout=subprocess.PIPE)
    try:
        # the tracer acts while polled: poll until the alert, then read what the agent saw
        sess.wait_for(lambda: _alerts(sess, "escape-cgroup-move"))
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    pid, rc = (int(x) for x in out.split())
    assert rc == -signal.SIGKILL
    al = sess.wait_for(lambda: _alerts(sess, "escape-cgroup-move"))[0]
    assert al["escape"]["self"] is False and al["escape"]["pid"] == pid
    assert al["rule"]["outcome"] == "killed"


def test_moves_inside_the_subtree_are_not_escapes(agent_tree, make_session):
    a, b = agent_tree.agent("in-a"), agent_tree.agent("in-b")
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce")
    res = agent_tree.run(a, [PY, "-c", f"import os; open('{b}/cgroup.procs','w').write(str(os.getpid())); print('ok')"])
    assert res.returncode == 0 and res.stdout.strip() == b"ok"
    sess.settle()
    assert not sess.of("escape") and not _alerts(sess, "escape-cgroup-move")


def test_self_escape_killed_through_the_cli(tmp_path, outside):
    out = tmp_path / "ev.jsonl"
    code = f"import os; open('{outside}/cgroup.procs', 'w').write(str(os.getpid())); print('outside')"
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "-o", str(out), "--", PY, "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 128 + signal.SIGKILL and "outside" not in p.stdout
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    al = [r for r in recs if r["kind"] == "alert" and r["rule"]["id"] == "escape-cgroup-move"]
    assert al and al[0]["rule"]["outcome"] == "killed" and al[0]["escape"]["to"]["cgroup"].endswith(outside.name)


PING_SWEEP = """
import json, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
res = {}
for host in sys.argv[1:]:
    try:
        s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"agenttrace", (host, 0))
        res[host] = 0
    except OSError as e:
        res[host] = e.errno
print(json.dumps(res))
"""


def test_icmp_echo_is_seen_counted_by_scan_windows_and_held_to_the_allow_list(netlab, agent_tree, make_session):
    """A ping sweep through a ping socket: one connect record (op echo) per destination, the
    internal-scan window fires; under an allow-list an unlisted external host's echo is dropped."""
    from agenttrace.match.engine import Engine
    from agenttrace.kernel.egress import run_policy
    from agenttrace.match.rules import default_rule_paths, load_rules
    netlab.check_in_agent(["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647"], check=True)
    a = agent_tree.agent("pinger")
    eng = Engine(load_rules(default_rule_paths(), egress=run_policy(["198.51.100.53:53"], "enforce")), mode="enforce")
    sess = make_session([agent_tree.root], engine=eng, mode="enforce")
    hosts = [f"10.77.0.{i}" for i in range(10, 45)] + [netlab.web_host]
    res = netlab.check_in_agent([PY, "-c", PING_SWEEP, *hosts], cgroup=a, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert all(got[h] == 0 for h in hosts[:-1])
    assert got[netlab.web_host] == errno.EPERM
    scan = sess.wait_for(lambda: [al for al in sess.of("alert") if al["rule"]["id"] == "scan-internal-ports"])
    assert scan and scan[0]["net"]["op"] == "echo" and scan[0]["net"]["proto"] == "icmp"
    echoes = sess.of("connect", net__op="echo")
    assert {e["net"]["dst"]["addr"] for e in echoes} >= set(hosts)
    (web,) = [e for e in echoes if e["net"]["dst"]["addr"] == netlab.web_host]
    assert web["net"]["verdict"] == "blocked"


CLONE3 = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* usage: clone3 CGROUP_DIR exec|stay MS -- the child execs /bin/true, or stays the same image
 * (a forked worker that never execs) for MS milliseconds */
int main(int argc, char **argv) {
    int cg = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (cg < 0) { perror("open cgroup"); return 2; }
    struct clone_args ca;
    memset(&ca, 0, sizeof(ca));
    ca.flags = CLONE_INTO_CGROUP;
    ca.exit_signal = SIGCHLD;
    ca.cgroup = cg;
    long pid = syscall(SYS_clone3, &ca, sizeof(ca));
    if (pid < 0) { perror("clone3"); return 2; }
    if (pid == 0) {
        if (strcmp(argv[2], "exec") == 0) { execl("/bin/true", "true", (char *)0); _exit(127); }
        long ms = atol(argv[3]);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, 0);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    printf("%ld %d\n", pid, WIFSIGNALED(st) ? -WTERMSIG(st) : WEXITSTATUS(st));
    return 0;
}
"""


@pytest.fixture(scope="module")
def clone3_exe(tmp_path_factory):
    d = tmp_path_factory.mktemp("clone3")
    (d / "clone3.c").write_text(CLONE3)
    subprocess.run(["gcc", "-O1", "-o", str(d / "clone3"), str(d / "clone3.c")], check=True)
    return d / "clone3"


def _clone3(agent_tree, sess, a, exe, dest, how, ms=0):
    """Run the clone3 program in agent `a` while the session reads (the act stage kills from
    the reader's loop): (child pid, child status: exit code, or -signal)."""
    p = agent_tree.spawn(a, [str(exe), str(dest), how, str(ms)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        sess.wait_for(lambda: p.poll() is not None, timeout=30)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    pid, status = (int(x) for x in out.split())
    return pid, status


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_clone_into_an_outside_cgroup_is_caught_at_fork(mode, agent_tree, make_session, outside, clone3_exe):
    """A child that never execs (a forked worker) placed outside at birth: reported from
    sched_process_fork, before it runs; killed by the act stage in enforce mode."""
    a = agent_tree.agent(f"clone-stay-{mode}")
    sess = make_session([agent_tree.root], engine=_engine(mode), mode=mode)
    # monitor: the child lives its 1.5 s and exits; enforce: it is killed long before that
    child, status = _clone3(agent_tree, sess, a, clone3_exe, outside, "stay", 1500)
    assert status == (-signal.SIGKILL if mode == "enforce" else 0)
    al = sess.wait_for(lambda: _alerts(sess, "escape-cgroup-move"))[0]
    esc = al["escape"]
    assert esc["how"] == "clone_into_cgroup" and esc["pid"] == child and not esc["self"]
    # the id read at BTF offsets is the destination's: its directory's inode
    assert esc["to"]["cgroup_id"] == os.stat(outside).st_ino
    assert esc["to"]["cgroup"] == "/" + outside.name
    assert al["rule"]["outcome"] == ("killed" if mode == "enforce" else "reported")


@pytest.mark.parametrize("mode", ["enforce", "monitor"])
def test_clone_into_an_outside_cgroup_then_exec(mode, agent_tree, make_session, outside, clone3_exe):
    a = agent_tree.agent(f"clone-{mode}")
    sess = make_session([agent_tree.root], engine=_engine(mode), mode=mode)
    child, status = _clone3(agent_tree, sess, a, clone3_exe, outside, "exec")
    assert status == (-signal.SIGKILL if mode == "enforce" else 0)
    # seen at fork, and again at exec, where enforce mode kills it in the kernel. In enforce mode
    # the fork alert's kill (the act stage) races the child's exec: whichever comes first kills
    # it, so the exec record is there in monitor mode, and in enforce mode only if the exec won.
    want = {"clone_into_cgroup", "exec_outside"} if mode == "monitor" else {"clone_into_cgroup"}

    def seen():
        als = {x["escape"]["how"]: x for x in _alerts(sess, "escape-cgroup-move")
               if x["escape"]["pid"] == child and x["rule"]["outcome"] != "pending"}
        return als if want <= set(als) else None
    als = sess.wait_for(seen)
    assert als, [x["escape"] for x in sess.of("escape")]
    assert als["clone_into_cgroup"]["escape"]["to"]["cgroup_id"] == os.stat(outside).st_ino
    if mode == "monitor":
        assert als["exec_outside"]["rule"]["outcome"] == "reported"
    else:
        # killed at exec in the kernel, or at fork by the act stage (then the exec never came)
        outcomes = {how: a["rule"]["outcome"] for how, a in als.items()}
        assert outcomes.get("exec_outside") == "killed" or outcomes["clone_into_cgroup"] == "killed", outcomes


def test_clone_into_an_outside_cgroup_killed_through_the_cli(tmp_path, outside, clone3_exe):
    """The same through `agenttrace run --mode enforce -- CMD`, as a user starts it: the forked
    worker placed outside (sleeping 20 s, never exec'ing) is killed long before it ends."""
    out = tmp_path / "ev.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", "-o", str(out), "--",
                        str(clone3_exe), str(outside), "stay", "20000"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    child, status = (int(x) for x in p.stdout.split())
    assert status == -signal.SIGKILL
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    al = [r for r in recs if r["kind"] == "alert" and r["rule"]["id"] == "escape-cgroup-move"]
    assert al and al[0]["escape"]["how"] == "clone_into_cgroup" and al[0]["escape"]["pid"] == child
    assert al[0]["rule"]["outcome"] == "killed" and al[0]["escape"]["to"]["cgroup"].endswith(outside.name)


def test_clone_into_a_cgroup_inside_the_subtree_is_no_escape(agent_tree, make_session, clone3_exe):
    """An agent may place its children in sub-cgroups of its own: not an escape."""
    a = agent_tree.agent("clone-inside")
    sub = a / "workers"
    sub.mkdir()
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce")
    child, status = _clone3(agent_tree, sess, a, clone3_exe, sub, "stay", 50)
    assert status == 0
    # the parent's exit record comes after any escape record its child's fork would have made
    sess.wait_for(lambda: [e for e in sess.of("exit") if e["proc"].get("exe") == str(clone3_exe)])
    assert not _alerts(sess, "escape-cgroup-move")
    assert child > 0



def test_escape_rings_the_doorbell_through_the_readers_gap(agent_tree, make_session, outside, clone3_exe):
    """While records keep coming the reader sleeps between reads (up to --batch-wait-ms); a
    clone3 child born outside runs until its record is read, so escape.c rings a doorbell ring
    the reader waits on instead. Here the reader is put in a 10-minute gap (its floor between
    reads left short): the poll comes back because the bell rang (counted), with the escape read
    and the child killed."""
    import time
    a = agent_tree.agent("clone-bell")
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce")
    sess.settle()
    r = sess.tracer._reader
    assert r is not None and r._bell is not None
    r.min_gap_ns, r.max_gap_ns, r.gap_ns = 1_000_000, 600 * 10**9, 600 * 10**9
    r.late_gap_ns = 600 * 10**9    # clone3_exe's own exec (a temp folder) rings the late bell
    r._last_n, r._last_read_ns = 1, time.monotonic_ns()
    sess.tracer._quiet = False
    p = agent_tree.spawn(a, [str(clone3_exe), str(outside), "stay", "20000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # without the bell this poll sleeps out its whole 60 s timeout and counts no ring
        sess.tracer.poll(60_000)
        assert r.bell_rings >= 1
        esc = [e for e in sess.of("escape") if e["escape"]["how"] == "clone_into_cgroup"]
        assert esc, sess.of("escape")
        r.min_gap_ns, r.max_gap_ns, r.gap_ns = 5_000_000, 15_000_000, 5_000_000
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    child, status = (int(x) for x in out.split())
    assert status == -signal.SIGKILL and esc[0]["escape"]["pid"] == child
    al = sess.wait_for(lambda: [x for x in _alerts(sess, "escape-cgroup-move") if x["rule"]["outcome"] == "killed"])
    assert al and al[0]["escape"]["pid"] == child

def test_socket_fence_config_is_validated():
    from agenttrace.config import ConfigError, parse_config
    cfg = parse_config("socket_fence: [inet:raw, 'inet:dgram:icmp']\n")
    assert cfg.socket_fence == ["inet:raw", "inet:dgram:icmp"]
    # families sock_create never sees are fenced by the `packet` probe (test_packet_fence.py)
    assert parse_config("socket_fence: [packet, vsock]\nprobes: {packet: true}\n").probes.packet
    assert parse_config("").socket_fence == ["inet:raw", "inet6:raw", "packet"]
    with pytest.raises(ConfigError, match=r"<config>:1.*socket_fence.*unknown family 'bogus'"):
        parse_config("socket_fence: [bogus]\n")


MOVED_IN = """
import os, sys
sys.stdin.readline()                  # the test moves us into the agent cgroup meanwhile
os.execv(sys.executable, [sys.executable, "-c",
         "import os, sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid())); print('outside')",
         sys.argv[1]])
"""


def test_a_process_moved_in_from_outside_is_held_after_its_first_exec(agent_tree, make_session, outside):
    """A writer outside the subtree (a container runtime) places a process in an agent cgroup;
    once it execs there it is an agent's, and leaving again is an escape."""
    a = agent_tree.agent("moved-in")
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce")
    p = subprocess.Popen([PY, "-c", MOVED_IN, str(outside)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        (a / "cgroup.procs").write_text(str(p.pid))
        out, _ = p.communicate(b"go\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL and b"outside" not in out
    al = sess.wait_for(lambda: _alerts(sess, "escape-cgroup-move"))[0]
    assert al["escape"]["self"] is True and al["rule"]["outcome"] == "killed"
