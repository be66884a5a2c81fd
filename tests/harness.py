"""What the front-end tests share: a daemon started the way systemd starts it, the sd_notify
socket it reports to, a loopback listener to aim connects at, the block rule they load, and
polling helpers. One copy here, so a fix to how a test waits or stops a daemon lands once.

Pytest fixtures built on these (`pin_dir`) live in conftest.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import orjson

from conftest import AGENTTRACE

PY = sys.executable

# A connect rule that blocks one loopback port: enforce tests aim at a listener of their own.
BLOCK_PORT_RULE = """
rules:
  - id: {rule_id}
    description: test rule, blocks one loopback port
    category: egress
    severity: high
    on: [connect]
    match:
      dst: {{cidrs: ["127.0.0.1/32"], ports: [{port}]}}
    action: block
"""


def block_port_rule(port: int, rule_id: str | None = None) -> str:
    return BLOCK_PORT_RULE.format(port=port, rule_id=rule_id or f"test-block-{port}")


# the same rule as a template of the port alone: RULE.format(port=N)
RULE = BLOCK_PORT_RULE.replace("{rule_id}", "test-block-{port}")


def end_process(p: subprocess.Popen, timeout: float = 60) -> None:
    """Stop a process the test started (by its Popen, never by name): SIGTERM, then SIGKILL if
    it has not exited within `timeout`."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def loopback_listener(backlog: int = 16) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(backlog)
    return srv, srv.getsockname()[1]


def free_port(kind: int = socket.SOCK_STREAM, addr: str = "127.0.0.1", family: int = socket.AF_INET) -> int:
    s = socket.socket(family, kind)
    s.bind((addr, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stalled_client(path: str) -> socket.socket:
    """A client of the event socket at `path` that never reads, with a 4 KiB receive buffer, so
    the sink's queue for it fills after a few lines."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(path)
    return c


def wait_clients(sink, n: int) -> None:
    """Until the socket sink has registered n clients: it accepts on its own thread, and a
    record emitted before is lost for that client by design."""
    while len(sink.clients()) < n:
        time.sleep(0.005)


def wait_until(pred, timeout: float = 60.0, step: float = 0.1):
    """Poll pred() until it is truthy or the (generous) timeout passes; return its last value.
    No test asserts how long this took."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def short_banner_wait(argv: list[str], seconds: int = 3) -> list[str]:
    """An ssh_argv() command line whose ConnectTimeout, which also bounds the wait for the
    server's banner, is `seconds` instead of 10. For an ssh whose banner the kernel drops: it
    then fails after `seconds` rather than 10. ssh keeps the first value of an option, so the
    one in the line is replaced rather than another appended."""
    i = argv.index("ConnectTimeout=10")
    return argv[:i] + [f"ConnectTimeout={seconds}"] + argv[i + 1:]


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file another process is still writing."""
    if not path.exists():
        return []
    data = path.read_bytes()
    # what follows the last newline is the line being written (a reader can see part of a
    # write in progress); every line before it is whole, and one that does not parse is a bug
    return [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line.strip()]


def connect_errno(tree, cg, port: int) -> int:
    """errno of a loopback connect made by a fresh process in agent cgroup cg (0 = connected)."""
    r = tree.run(cg, [PY, "-c", f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {port})))"])
    return int(r.stdout)


class Notify:
    """The sd_notify socket a daemon reports READY/RELOADING/STOPPING to, as systemd opens it."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.5)
        self.msgs = []

    def wait(self, token, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(token in m for m in self.msgs):
                return True
            try:
                self.msgs.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
        return False

    def close(self):
        self.sock.close()


class Daemon:
    """`agenttrace daemon --config FILE` watching one agent tree, with a file and a socket sink.

    `mode` and `pin_dir` (None = no pinning) shape the generated config; `extra` is appended
    YAML; a test that needs a config of its own writes `self.cfg` before start()."""

    def __init__(self, tmp, root, rules_file, pin_dir=None, extra="", mode="enforce"):
        self.tmp = tmp
        self.cfg = tmp / "agenttrace.yaml"
        self.out = tmp / "events.jsonl"
        self.sock = tmp / "events.sock"
        self.status = tmp / "status.json"
        pinning = (f"pinning: {{enabled: true, fail_mode: closed, path: {pin_dir}}}\n"
                   if pin_dir is not None else "")
        self.cfg.write_text(textwrap.dedent(f"""
            mode: {mode}
            agents:
              - cgroup: /{root.name}
            rules: [{rules_file}]
            sinks:
              stdout: false
              file: {{path: {self.out}}}
              socket: {{path: {self.sock}}}
        """) + pinning + extra)
        self.proc = None
        self.notify = None

    def argv(self):
        return [AGENTTRACE, "daemon", "--config", str(self.cfg), "--status-file", str(self.status)]

    def start(self, env=None, stderr=subprocess.PIPE, wait_ready=True):
        self.notify = Notify(self.tmp / f"notify-{uuid.uuid4().hex[:6]}")
        env = dict(env if env is not None else os.environ, NOTIFY_SOCKET=self.notify.path)
        self.proc = subprocess.Popen(self.argv(), env=env, stderr=stderr)
        if wait_ready:
            assert self.notify.wait("READY=1"), self.stderr()
        return self

    def stderr(self):
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def records(self):
        return read_jsonl(self.out)     # whole lines only: the daemon is still writing

    def wait_record(self, pred, timeout=30):
        return wait_until(lambda: [r for r in self.records() if pred(r)], timeout) or []

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.notify:
            self.notify.wait("STOPPING=1", timeout=2)   # collect what was sent before exit
            self.notify.close()
        return self.proc.returncode


def own_gpu_burner(tmp_path: Path) -> tuple[Path, Path]:
    """(fixture, burner): the fake-NVML fixture gpu_agent_burner.yaml rewritten to select a comm
    of this test's own, and a symlink to sleep under that name (comm comes from the exec'd name).
    The fixture selects by comm machine-wide: with the shared name `gpu-burner`, another test's
    or demo's burner was once taken for this one's."""
    comm = f"gb-{uuid.uuid4().hex[:8]}"
    src = Path(__file__).parent / "fixtures" / "gpu_agent_burner.yaml"
    fixture = tmp_path / "gpu.yaml"
    fixture.write_text(src.read_text().replace("comm:gpu-burner", f"comm:{comm}"))
    burner = tmp_path / comm
    burner.symlink_to("/usr/bin/sleep")
    return fixture, burner
