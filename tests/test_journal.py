"""Daemon diagnostics for the journal: syslog priority prefixes, only when stderr is the journal."""
import logging
import os

from agenttrace.ops.journal import PriorityFormatter, priority, stderr_is_journal


def test_every_line_carries_its_priority():
    f = PriorityFormatter("%(message)s")
    rec = logging.LogRecord("agenttrace", logging.ERROR, __file__, 1, "reload failed:\n  rules.yaml:3", None, None)
    assert f.format(rec).splitlines() == ["<3>reload failed:", "<3>  rules.yaml:3"]
    assert [priority(x) for x in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)] == [2, 3, 4, 6, 7]


def test_journal_stream_must_name_stderr(tmp_path):
    r, w = os.pipe()
    try:
        st = os.fstat(w)
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=w)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd=w)
        assert not stderr_is_journal({}, fd=w)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd=w)
    finally:
        os.close(r)
        os.close(w)
