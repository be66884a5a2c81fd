"""The daemon's own diagnostics for the journal: one line per message, each with the syslog
priority prefix (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug; sd-daemon(3)) that
journald reads from a service's stderr, so `journalctl -p err -u agenttrace` finds them
and they never share a priority with event records.

Events do not go this way: the packaged config writes them to the file and socket sinks,
not stdout, because journald rate-limits a unit's stream (by default ~10,000 lines per 30 s)
and drops beyond that without telling the writer.
"""
from __future__ import annotations

import logging
import os
import sys

_PRIO = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= lvl:
            return _PRIO[lvl]
    return 7


class PriorityFormatter(logging.Formatter):
    """Every line of a message gets the prefix (journald makes each line an entry)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        p = f"<{priority(record.levelno)}>"
        return "\n".join(p + line for line in text.splitlines() or [""])


def stderr_is_journal(env=None, fd: int = 2) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected stdout/stderr to."""
    env = os.environ if env is None else env
    js = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup_daemon_logging(level: int = logging.INFO) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(PriorityFormatter("%(message)s") if stderr_is_journal() else logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level)
