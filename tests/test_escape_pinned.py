"""Escape containment outlives a SIGKILLed tracer: `run --cgroup --mode enforce` pins the links of
the programs that keep agent membership and judge it (proc.c's sched programs, which run escape's
work, and escape.c's cgroup_attach_task), so with nobody reading the ring the kernel still kills
an agent process that leaves the subtree (a self-move), or execs after being moved out, and
proc.c's exec kills (a miner binary by name) go on."""
import shutil
import signal
import subprocess
import sys

from conftest import AGENTTRACE, remove_pin_dir
from harness import read_jsonl, wait_until

PY = sys.executable

# waits for the go file, then either moves itself out or execs where it is
WAITER = """
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
if sys.argv[2] == "self":
    open(sys.argv[3] + "/cgroup.procs", "w").write(str(os.getpid()))
    print("outside", flush=True)
else:
    os.execv("/bin/echo", ["/bin/echo", "ran"])
"""



def test_escapes_are_killed_after_the_tracer_is_sigkilled(tmp_path, agent_tree, outside):
    from agenttrace.kernel.loader import bcc_in_process
    from agenttrace.session.runner import cgroups_pin_dir
    a = agent_tree.agent("pinned-esc")
    pins = cgroups_pin_dir([agent_tree.root])
    out = tmp_path / "run.jsonl"
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "--mode", "enforce",
                               "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kids = []
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        # BCC's own attach (AGENTTRACE_BCC_INPROCESS=1) makes no tracepoint links: there the exec
        # check is a raw tracepoint of its own and a self-move is judged only while the tracer lives
        linked = not bcc_in_process()
        want = {"rawtp-sched_process_fork", "rawtp-sched_process_exit"} | (
            {"rawtp-sched_sched_process_exec", "rawtp-cgroup_cgroup_attach_task"} if linked else {"rawtp-at_esc_exec"})
        assert wait_until(lambda: pins.is_dir() and want <= {f.name.rsplit("-", 1)[0] for f in pins.iterdir()})
        go = tmp_path / "go"
        mover = agent_tree.spawn(a, [PY, "-c", WAITER, str(go), "self", str(outside)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        execer = agent_tree.spawn(a, [PY, "-c", WAITER, str(go), "exec"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        kids = [mover, execer]
        # both are members (their exec inside was seen) before the tracer goes
        assert wait_until(lambda: {mover.pid, execer.pid} <= {r["proc"]["pid"] for r in read_jsonl(out)
                                                               if r.get("kind") == "exec"})
        tracer.send_signal(signal.SIGKILL)
        tracer.wait()
        # moved out by a writer outside the subtree: nobody judges the move now, the exec is killed
        (outside / "cgroup.procs").write_text(str(execer.pid))
        go.touch()
        mo, _ = mover.communicate(timeout=30)
        eo, _ = execer.communicate(timeout=30)
        if linked:
            assert mover.returncode == -signal.SIGKILL and b"outside" not in mo
            # the default pack's miner rule: killed in the kernel at exec, by name
            miner = tmp_path / "xmrig"
            shutil.copy("/bin/echo", miner)
            r = agent_tree.run(a, [str(miner), "mined"])
            assert r.returncode == -signal.SIGKILL and r.stdout == b""
        assert execer.returncode == -signal.SIGKILL and b"ran" not in eo
    finally:
        for p in kids + [tracer]:
            if p.poll() is None:
                p.kill()
                p.wait()
        remove_pin_dir(pins)


def test_file_and_packet_kills_outlive_a_sigkilled_tracer(tmp_path, agent_tree):
    """`run --cgroup --mode enforce --files --packet` as a user starts it; the tracer is
    SIGKILLed; an agent that then appends a key to authorized_keys is still killed in the kernel
    before a byte lands, and one that opens a packet socket is killed at socket return
    (files.c's and packet.c's syscall programs are pinned with the cgroup links)."""
    from agenttrace.kernel.loader import bcc_in_process
    from agenttrace.session.runner import cgroups_pin_dir
    a = agent_tree.agent("pinned-files")
    pins = cgroups_pin_dir([agent_tree.root])
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    ak = ssh / "authorized_keys"
    ak.write_bytes(b"ssh-ed25519 AAAA existing@admin\n")
    out = tmp_path / "run.jsonl"
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "--mode", "enforce",
                               "--files", "--packet", "-o", str(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and b'"started"' in out.read_bytes() or tracer.poll() is not None)
        assert tracer.poll() is None, tracer.stderr.read()
        if bcc_in_process():
            return      # BCC's own attach makes no tracepoint links to pin (README, fail-closed)
        assert wait_until(lambda: pins.is_dir() and "rawtp-syscalls_sys_enter_openat" in
                          {f.name.rsplit("-", 1)[0] for f in pins.iterdir()})
        tracer.send_signal(signal.SIGKILL)
        tracer.wait()
        r = agent_tree.run(a, ["/bin/sh", "-c", f"echo 'ssh-ed25519 BBBB agent@x' >> {ak}; echo survived"])
        assert r.returncode == -signal.SIGKILL and b"survived" not in r.stdout
        assert ak.read_bytes() == b"ssh-ed25519 AAAA existing@admin\n", "the key bytes must never land"
        r = agent_tree.run(a, [PY, "-c", "import socket\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
                                         "print('made', flush=True)"])
        assert r.returncode == -signal.SIGKILL and b"made" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        remove_pin_dir(pins)
