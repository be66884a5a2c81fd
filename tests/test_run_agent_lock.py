"""Two `agenttrace run --agent NAME` at once: the agent's cgroup is its name, and a run's end
kills what is left in it, so the second would kill the first's command at its end (exit 137;
two test suites on one machine running the same named test saw it). The second is refused,
exit 2, before it opens its output; the first runs on untouched."""
from __future__ import annotations

import os
import subprocess
import time

from conftest import AGENTTRACE
from agenttrace.session.agentlock import LOCK_ROOT


def _started(path, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if b'"phase":"started"' in path.read_bytes():
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    return False


def test_second_run_of_one_agent_name_is_refused_and_the_first_is_untouched(tmp_path, require_bpf):
    name = f"lock-{os.getpid()}"
    first_out, second_out = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first = subprocess.Popen([AGENTTRACE, "run", "--no-net", "--output", str(first_out), "--agent", name, "--",
                              "/bin/sh", "-c", "read x; exit 4"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _started(first_out), "the first run never started"
        second = subprocess.run([AGENTTRACE, "run", "--no-net", "--output", str(second_out), "--agent", name,
                                 "--", "true"], capture_output=True, timeout=120)
        assert second.returncode == 2, second.stderr.decode(errors="replace")
        err = second.stderr.decode()
        assert f"--agent: agent '{name}' is in use by another agenttrace run (pid {first.pid})" in err
        assert not second_out.exists(), "a refused run opened its output"
        first.stdin.write(b"go\n")
        first.stdin.close()
        assert first.wait(60) == 4, first.stderr.read().decode(errors="replace")[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # the name is free again, and nothing is left behind
    assert not (LOCK_ROOT / f"{name}.lock").exists()
    again = subprocess.run([AGENTTRACE, "run", "--no-net", "--no-rules", "--output", str(second_out),
                            "--agent", name, "--", "/bin/sh", "-c", "exit 5"], capture_output=True, timeout=120)
    assert again.returncode == 5, again.stderr.decode(errors="replace")[-2000:]
