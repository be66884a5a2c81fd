"""exeid._exists asks libc's kill(pid, 0) for its return value (no exception per gone
process); the answers are os.kill's: running and zombie processes exist, reaped ones do not,
someone else's process exists (EPERM), 0 and negative pids are never a process."""
import os
import subprocess
import sys

from agenttrace.enrich import exeid as X


def test_exists_answers_like_os_kill():
    assert X._kill is not None
    assert X._exists(os.getpid())
    assert not X._exists(0) and not X._exists(-1)
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert X._exists(p.pid)
        p.kill()
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)     # a zombie still exists
        assert X._exists(p.pid)
    finally:
        p.kill()
        p.wait()
    assert not X._exists(p.pid)


def test_someone_elses_process_exists():
    # as an unprivileged user, kill(1, 0) fails with EPERM: the process is there
    code = ("import os; os.setgid(65534); os.setuid(65534); from agenttrace.enrich import exeid as X; "
            "import sys; sys.exit(0 if X._exists(1) and not X._exists(2**22 - 7) else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
