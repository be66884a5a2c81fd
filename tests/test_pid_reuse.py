"""pid reuse as an evasion: an agent makes a benign process take the pid of a process the
tracer is about to act on (or the reverse), hoping the kill lands on the wrong one or the
records swap identities.

One `agenttrace run --mode enforce` (default pack) per module, as the README starts it; its
command is a driver inside the agent's cgroup that the test steers over a pipe. The driver
forks the way an agent would (posix_spawn and fork, inside the agent), and forces the pid the
next fork gets through /proc/sys/kernel/ns_last_pid (tests/pidreuse.py, under a lock shared
with the other test that does it). Each case is checked by its records and by who is alive
afterwards."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from conftest import AGENTTRACE
from pidreuse import next_pid_is, pid_lock

HERE = Path(__file__).resolve().parent
PY = sys.executable
STRATUM = "stratum+tcp://198.51.100.7:3333"

DRIVER = textwrap.dedent(r"""
    import json, os, socket, sys
    sys.path.insert(0, sys.argv[1])
    from pidreuse import next_pid_is, pid_lock

    def spawn(argv):
        return os.posix_spawn(argv[0], argv, dict(os.environ))

    def spawn_at(pid, argv):
        # the pid is free (its last holder reaped); retry when another fork took it first
        with pid_lock():
            next_pid_is(pid)
            return spawn(argv)

    def reply(**kw):
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    kids = {}
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "miner-then-benign":
            # each try its own argv: the engine folds an alert whose exe and argv repeat an
            # earlier one's into that one (de-dup), and the test looks for this pid's own
            for i in range(50):
                m = spawn([arg[1], "-o", arg[0], f"try-{i}"])
                _, mst = os.waitpid(m, 0)
                b = spawn_at(m, ["/bin/sleep", "60"])
                if b == m:
                    break
                os.kill(b, 9); os.waitpid(b, 0)
            kids[b] = True
            reply(miner=m, miner_status=mst, benign=b)
        elif cmd == "miner-then-quick":
            # both gone before the tracer decides: the alert must report the miner's exit
            for i in range(50):
                m = spawn([arg[1], "-o", arg[0], f"quick-{i}"])
                _, mst = os.waitpid(m, 0)
                b = spawn_at(m, ["/bin/sh", "-c", "exit 9"])
                _, bst = os.waitpid(b, 0)
                if b == m:
                    break
            reply(miner=m, benign=b, tries=i, miner_status=mst, benign_status=bst)
        elif cmd == "benign-then-miner":
            # the miner comes from a fork-only worker: its creator is not the benign one's
            for i in range(50):
                b = spawn(["/bin/sh", "-c", "exit 3"])
                _, bst = os.waitpid(b, 0)
                r, w = os.pipe()
                worker = os.fork()
                if worker == 0:
                    os.close(r)
                    m = spawn_at(b, [sys.executable, "-c", "import time; time.sleep(60)", "-o", arg[0],
                                     f"try-{i}"])
                    os.write(w, b"%d\n" % m)
                    if m != b:
                        os.kill(m, 9)
                    _, st = os.waitpid(m, 0)
                    os.write(w, b"%d\n" % st)
                    os._exit(0)
                os.close(w)
                f = os.fdopen(r)
                m = int(f.readline())
                if m == b:
                    break
                f.read(); f.close(); os.waitpid(worker, 0)
            reply(benign=b, benign_status=bst, miner=m, worker=worker)
            st = int(f.readline()); f.close(); os.waitpid(worker, 0)
            reply(miner_status=st)
        elif cmd == "child-pid-handed-on":
            # M forks C (a connect names it), C exits, a fork-only sleeper of ours takes C's
            # pid, then M execs a miner: C's old link to M must not make the sleeper M's
            r1, w1 = os.pipe(); r2, w2 = os.pipe()
            m = os.fork()
            if m == 0:
                os.close(r1); os.close(w2)
                c = os.fork()
                if c == 0:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.connect(("127.0.0.1", 9))
                    s.close()
                    os._exit(0)
                os.waitpid(c, 0)
                os.write(w1, b"%d\n" % c)
                os.read(r2, 1)
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "-o", arg[0],
                                          "handed-on"])
            os.close(w1); os.close(r2)
            c = int(os.read(r1, 32))
            for _ in range(50):
                with pid_lock():
                    next_pid_is(c)
                    b = os.fork()
                    if b == 0:
                        import time
                        time.sleep(60)
                        os._exit(0)
                if b == c:
                    break
                os.kill(b, 9); os.waitpid(b, 0)
            kids[b] = True
            os.write(w2, b"g")
            _, mst = os.waitpid(m, 0)
            reply(miner=m, child=c, benign=b, miner_status=mst)
        elif cmd == "exec-fork-exit":
            # the miner forks its worker and exits at once: its kill must not land on nothing
            note = arg[2]
            m = spawn([arg[1], "-c", "import os, sys, time\n"
                       "c = os.fork()\n"
                       "if c == 0:\n    time.sleep(60)\n    os._exit(0)\n"
                       "open(sys.argv[3], 'w').write(str(c))\n", "-o", arg[0], note])
            _, mst = os.waitpid(m, 0)
            reply(miner=m, child=int(open(note).read()), miner_status=mst)
        elif cmd == "fork-only":
            # a worker that never execs: a connect names it, then it exits with code 7
            f = os.fork()
            if f == 0:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.connect(("127.0.0.1", 9))
                s.close()
                os._exit(7)
            _, st = os.waitpid(f, 0)
            reply(pid=f, status=st)
        elif cmd == "alive":
            pid = int(arg[0])
            try:
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = None
            reply(state=state)
        elif cmd == "reap":
            pid = int(arg[0])
            os.kill(pid, 15)
            _, st = os.waitpid(pid, 0)
            reply(status=st)
        elif cmd == "whoami":
            reply(pid=os.getpid(), cgroup=open("/proc/self/cgroup").read().strip().split("::", 1)[1])
        elif cmd == "quit":
            break
""")


class Run:
    """The traced run: commands to the driver, records from the tracer's output file."""

    def __init__(self, tmp: Path):
        self.out = tmp / "events.jsonl"
        # a miner the tracer takes ~0.1 s to identify (exeid hashes its 64 MiB, never seen
        # before): its kill is decided well after the next process has its pid, however
        # quickly the tracer reads the exec
        self.tmp = tmp
        self.slow = self.slow_true("slow-true")
        script = tmp / "driver.py"
        script.write_text(DRIVER)
        self.p = subprocess.Popen([AGENTTRACE, "run", "--mode", "enforce", "--output", str(self.out),
                                   "--agent", f"pidreuse-{os.getpid()}", "--", PY, str(script), str(HERE)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._pos = 0
        self._recs: list[dict] = []
        me = self.ask("whoami")
        self.driver, self.cgroup = me["pid"], me["cgroup"]

    def slow_true(self, name: str) -> Path:
        """/bin/true padded (sparse) to 64 MiB: a new file each call, so never in exeid's cache."""
        path = self.tmp / name
        with open("/bin/true", "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
            dst.truncate(64 << 20)
        path.chmod(0o755)
        return path

    def ask(self, *words) -> dict:
        self.p.stdin.write(" ".join(map(str, words)) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"driver gone (tracer rc {self.p.poll()})"
        return json.loads(line)

    def more(self) -> dict:
        line = self.p.stdout.readline()
        assert line, "driver gone"
        return json.loads(line)

    def records(self) -> list[dict]:
        try:
            data = self.out.read_bytes()
        except FileNotFoundError:
            return self._recs
        end = data.rfind(b"\n", self._pos) + 1
        for line in data[self._pos:end].splitlines():
            self._recs.append(orjson.loads(line))
        self._pos = max(self._pos, end)
        return self._recs

    def wait_for(self, pred, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.records() if pred(r)]
            if got or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def stop(self) -> int:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.close()
            except OSError:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    from conftest import need_bpf
    need_bpf()
    r = Run(tmp_path_factory.mktemp("pidreuse"))
    try:
        yield r
    finally:
        r.stop()


def _alerts(run, rule, pid):
    return [r for r in run.records() if r["kind"] == "alert" and r["rule"]["id"] == rule
            and r["proc"]["pid"] == pid]


def _sha(path) -> str:
    return hashlib.sha256(Path(os.path.realpath(path)).read_bytes()).hexdigest()


def test_kill_earned_by_an_exited_miner_spares_the_benign_process_on_its_pid(run):
    got = run.ask("miner-then-benign", STRATUM, run.slow)
    m, b = got["miner"], got["benign"]
    assert m == b, "pid reuse not forced"
    assert got["miner_status"] == 0
    alerts = run.wait_for(lambda r: r["kind"] == "alert" and r["rule"]["id"] == "mining-stratum-args"
                          and r["proc"]["pid"] == m and STRATUM in r["proc"]["args"])
    assert alerts, "no alert for the miner"
    a = alerts[-1]
    assert a["rule"]["outcome"] == "exited", a["rule"]
    assert a["proc"]["exe"] == str(run.slow)
    # the benign process on the reused pid was never signalled
    assert run.ask("alive", b)["state"] in ("S", "R"), "the benign process was stopped or killed"
    # its records are its own
    execs = run.wait_for(lambda r: r["kind"] == "exec" and r["proc"]["pid"] == b
                         and r["proc"]["args"] == ["/bin/sleep", "60"])
    assert execs, "no exec record of the benign process"
    bid = execs[-1]["proc"]["exec_id"]
    assert bid != a["proc"]["exec_id"]
    mine = [r for r in run.records() if (r.get("proc") or {}).get("exec_id") == bid]
    assert all(STRATUM not in r["proc"]["args"] for r in mine), mine
    assert all(r["kind"] != "alert" for r in mine), [r["rule"] for r in mine if r["kind"] == "alert"]
    assert execs[-1]["proc"]["identity"]["sha256"] == _sha("/bin/sleep")
    assert os.WTERMSIG(run.ask("reap", b)["status"]) == signal.SIGTERM   # our signal, not the tracer's
    ex = run.wait_for(lambda r: r["kind"] == "exit" and r["proc"]["exec_id"] == bid)
    assert ex and ex[-1].get("signal") == signal.SIGTERM


def _procs_file(run) -> Path:
    from agenttrace.enrich.cgroups import cgroup2_mount
    return Path(cgroup2_mount()) / run.cgroup.lstrip("/") / "cgroup.procs"


def _enter(run):
    procs = _procs_file(run)

    def enter():
        with open(procs, "w") as fh:
            fh.write("0")
    return enter


def test_exited_outcome_reports_the_miners_own_exit_not_the_next_holders(run):
    got = run.ask("miner-then-quick", STRATUM, run.slow_true("quick-true"))
    m = got["miner"]
    assert got["benign"] == m, "pid reuse not forced"
    assert os.WEXITSTATUS(got["miner_status"]) == 0 and os.WEXITSTATUS(got["benign_status"]) == 9
    alerts = run.wait_for(lambda r: r["kind"] == "alert" and r["rule"]["id"] == "mining-stratum-args"
                          and r["proc"]["pid"] == m and f"quick-{got['tries']}" in r["proc"]["args"])
    assert alerts and alerts[-1]["rule"]["outcome"] == "exited", alerts and alerts[-1]["rule"]
    assert alerts[-1]["rule"].get("exit_code") == 0, alerts[-1]["rule"]


def test_pid_handed_on_a_tick_later_by_processes_moved_into_the_agent(run):
    """Forked outside and moved in, neither process has a kernel fork entry: /proc's start
    time is what tells them apart. The benign one starts over a tick after the miner's exec:
    its start is later than the event, however /proc rounds it."""
    procs = _procs_file(run)
    for i in range(50):
        # a shell that moves itself in, then execs: a vfork of this process, no copy of its
        # page tables, so the benign one starts as soon after the sleep as can be
        m = subprocess.Popen(["/bin/sh", "-c", f'echo 0 > {procs}; exec "$0" "$@"',
                              str(run.slow_true(f"moved-{i}")), "-o", STRATUM, f"moved-{i}"])
        m.wait()
        time.sleep(0.011)     # over a tick after its exec, under the two ticks of slack there used to be
        with pid_lock():
            next_pid_is(m.pid)
            b = subprocess.Popen(["/bin/sh", "-c", f'echo 0 > {procs}; exec /bin/sleep 60'])
        if b.pid == m.pid:
            break
        b.kill()
        b.wait()
    try:
        assert b.pid == m.pid, "pid reuse not forced"
        alerts = run.wait_for(lambda r: r["kind"] == "alert" and r["rule"]["id"] == "mining-stratum-args"
                              and r["proc"]["pid"] == m.pid and f"moved-{i}" in r["proc"]["args"])
        assert alerts and alerts[-1]["rule"]["outcome"] == "exited", alerts and alerts[-1]["rule"]
        assert b.poll() is None and run.ask("alive", b.pid)["state"] in ("S", "R"), "the benign process was hit"
    finally:
        b.terminate()
        b.wait()
    assert b.returncode == -signal.SIGTERM


def test_miner_on_a_reused_pid_is_killed_and_keeps_its_own_identity(run):
    got = run.ask("benign-then-miner", STRATUM)
    b, m, worker = got["benign"], got["miner"], got["worker"]
    assert m == b, "pid reuse not forced"
    assert os.WEXITSTATUS(got["benign_status"]) == 3
    done = run.more()     # the worker reports once its miner is gone
    assert os.WIFSIGNALED(done["miner_status"]) and os.WTERMSIG(done["miner_status"]) == signal.SIGKILL
    alerts = run.wait_for(lambda r: r["kind"] == "alert" and r["rule"]["id"] == "mining-stratum-args"
                          and r["proc"]["pid"] == m and STRATUM in r["proc"]["args"])
    assert alerts and alerts[-1]["rule"]["outcome"] == "killed", (
        alerts and alerts[-1]["rule"], [(r["kind"], r.get("rule"), r["proc"]) for r in run.records()
                                        if (r.get("proc") or {}).get("pid") == m])
    execs = [r for r in run.records() if r["kind"] == "exec" and r["proc"]["pid"] == m]
    benign = [r for r in execs if r["proc"]["args"] == ["/bin/sh", "-c", "exit 3"]]
    miner = [r for r in execs if STRATUM in r["proc"]["args"]]
    assert benign and miner
    bp, mp = benign[-1]["proc"], miner[-1]["proc"]
    assert bp["exec_id"] != mp["exec_id"]
    # each exec record has its own program and ancestry: the benign one's parent is the
    # driver, the miner's the fork-only worker (then the driver)
    assert bp["identity"]["sha256"] == _sha("/bin/sh"), "the benign exec carries another program's identity"
    assert mp["identity"]["sha256"] == _sha(PY)
    assert [x["pid"] for x in bp["ancestry"][:1]] == [run.driver]
    assert [x["pid"] for x in mp["ancestry"][:2]] == [worker, run.driver], mp["ancestry"]
    assert mp["creator"] == worker
    # and each exit its own code
    exits = run.wait_for(lambda r: r["kind"] == "exit" and r["proc"]["exec_id"] == mp["exec_id"])
    assert exits and exits[-1]["exit_code"] == 128 + 9 and exits[-1]["proc"]["args"] == mp["args"]
    bex = [r for r in run.records() if r["kind"] == "exit" and r["proc"]["exec_id"] == bp["exec_id"]]
    assert len(bex) == 1 and bex[0]["exit_code"] == 3 and bex[0]["proc"]["args"] == bp["args"]
    assert all(STRATUM not in r["proc"]["args"] for r in run.records()
               if (r.get("proc") or {}).get("exec_id") == bp["exec_id"])


def test_kill_of_a_miner_spares_the_process_on_its_dead_childs_pid(run):
    got = run.ask("child-pid-handed-on", STRATUM)
    m, c, b = got["miner"], got["child"], got["benign"]
    assert b == c, "pid reuse not forced"
    assert os.WTERMSIG(got["miner_status"]) == signal.SIGKILL
    alerts = run.wait_for(lambda r: r["kind"] == "alert" and r["rule"]["id"] == "mining-stratum-args"
                          and r["proc"]["pid"] == m and "handed-on" in r["proc"]["args"])
    assert alerts and alerts[-1]["rule"]["outcome"] == "killed", alerts and alerts[-1]["rule"]
    assert str(b) not in alerts[-1]["rule"]["message"], alerts[-1]["rule"]["message"]
    assert run.ask("alive", b)["state"] in ("S", "R"), "the process on the child's old pid was hit"
    assert os.WTERMSIG(run.ask("reap", b)["status"]) == signal.SIGTERM


def test_kill_of_a_miner_that_forked_and_exited_reaches_what_it_left_behind(run):
    slow_py = run.tmp / "python-slow"
    with open(os.path.realpath(PY), "rb") as src, open(slow_py, "wb") as dst:
        dst.write(src.read())
        dst.truncate(64 << 20)       # identified in ~0.1 s: the miner is gone by then
    slow_py.chmod(0o755)
    note = run.tmp / "left-behind"
    got = run.ask("exec-fork-exit", STRATUM, slow_py, note)
    m, c = got["miner"], got["child"]
    assert os.WEXITSTATUS(got["miner_status"]) == 0
    alerts = run.wait_for(lambda r: r["kind"] == "alert" and r["rule"]["id"] == "mining-stratum-args"
                          and r["proc"]["pid"] == m and str(note) in r["proc"]["args"])
    assert alerts, "no alert for the miner"
    rule = alerts[-1]["rule"]
    assert rule["outcome"] == "exited", rule
    assert f"killed 1 process(es) it left behind [{c}]" in rule["message"], rule["message"]
    deadline = time.monotonic() + 10
    while run.ask("alive", c)["state"] not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.ask("alive", c)["state"] in (None, "Z"), "the miner's fork runs on"


def test_fork_only_pid_reused_outside_the_agent_is_not_the_agent(run):
    f = run.ask("fork-only")
    pid = f["pid"]
    assert os.WEXITSTATUS(f["status"]) == 7
    assert run.wait_for(lambda r: r["kind"] == "connect" and r["proc"]["pid"] == pid)
    # a process forked outside the agent takes the pid, execs and exits: nothing of it is the agent's
    for _ in range(50):
        with pid_lock():
            next_pid_is(pid)
            o = subprocess.Popen(["/bin/sh", "-c", "exit 5"])
        o.wait()
        if o.pid == pid:
            break
    assert o.pid == pid, "pid reuse not forced"
    # then one forked outside that enters the agent before its exec: the agent's now, but the
    # fork-only worker's creator (the driver) is not its creator
    enter = _enter(run)
    for _ in range(50):
        with pid_lock():
            next_pid_is(pid)
            o2 = subprocess.Popen(["/bin/sh", "-c", "exit 6"], preexec_fn=enter)
        o2.wait()
        if o2.pid == pid:
            break
    assert o2.pid == pid, "pid reuse not forced"
    ex = run.wait_for(lambda r: r["kind"] == "exit" and r["proc"]["pid"] == pid and r["exit_code"] == 6)
    assert ex, "no exit record of the process that entered the agent"
    later = [r for r in run.records() if (r.get("proc") or {}).get("pid") == pid]
    # nothing of the process that stayed outside
    assert not [r for r in later if r["kind"] == "exit" and r["exit_code"] == 5], later
    ex6 = [r for r in later if r["kind"] == "exec" and r["proc"]["args"] == ["/bin/sh", "-c", "exit 6"]]
    assert ex6
    p6 = ex6[-1]["proc"]
    assert p6["creator"] in (None, os.getpid()), p6
    assert run.driver not in [x["pid"] for x in p6["ancestry"][:1]], p6["ancestry"]
    assert ex[-1]["proc"]["exec_id"] == p6["exec_id"]


def test_run_ends_with_the_drivers_own_exit_code(run):
    # the tracer never signalled the driver (the agent's own process): run ends with its code
    assert run.stop() == 0
    assert not [r for r in run.records() if r["kind"] == "alert" and r["proc"]["pid"] == run.driver]


READ_LATE = textwrap.dedent(r"""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from pidreuse import next_pid_is, pid_lock
    for _ in range(50):
        b = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "exit 3"], dict(os.environ))
        os.waitpid(b, 0)
        with pid_lock():
            next_pid_is(b)
            m = os.posix_spawn(sys.executable, [sys.executable, "-c", "import sys; sys.stdin.read()"],
                               dict(os.environ))
        if m == b:
            break
        os.kill(m, 9); os.waitpid(m, 0)
    print(b, m, flush=True)
    os.waitpid(m, 0)
""")


def test_exec_read_after_its_pid_went_to_another_program_names_its_own(agent_tree, make_session):
    """The tracer reads the benign exec only once the next process holds its pid (it is not
    polled until then): /proc/PID/exe is the later program's, the record must not be."""
    a = agent_tree.agent("late")
    sess = make_session([agent_tree.root], features=("proc",))
    d = agent_tree.spawn(a, [PY, "-c", READ_LATE, str(HERE)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        b, m = map(int, d.stdout.readline().split())
        assert b == m, "pid reuse not forced"
        got = sess.wait_for(lambda: [r for r in sess.of("exec") if r["proc"]["pid"] == b
                                     and r["proc"]["args"][:2] == [PY, "-c"]])
        assert got
    finally:
        d.stdin.close()
        d.wait(10)
    execs = [r for r in sess.of("exec") if r["proc"]["pid"] == b]
    benign = [r["proc"] for r in execs if r["proc"]["args"] == ["/bin/sh", "-c", "exit 3"]][-1]
    later = [r["proc"] for r in execs if r["proc"]["args"][:2] == [PY, "-c"]][-1]
    assert benign["identity"]["sha256"] == _sha("/bin/sh"), "the exec carries the later program's identity"
    assert later["identity"]["sha256"] == _sha(PY)
    assert benign["exec_id"] != later["exec_id"]
    ex = sess.wait_for(lambda: [r for r in sess.of("exit") if r["proc"]["exec_id"] == benign["exec_id"]])
    assert ex and ex[0]["exit_code"] == 3
