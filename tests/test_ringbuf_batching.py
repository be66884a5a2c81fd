"""The reader's batch gap (`--batch-wait-ms`, ringbuf.RingReader.max_gap_ns).

While records keep coming the reader lets them gather for longer than the wakeup interval, so
one read takes a batch instead of a handful (each read after a sleep starts on cold caches).
The rule that moves the gap is checked step by step here; the real-kernel test runs the CLI as
a user starts it and proves that nothing is lost or reordered by the longer waits and that the
stopped record reports how many reads there were.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

from agenttrace.kernel.ringbuf import RingReader

from conftest import AGENTTRACE
from harness import wait_until

MS = 1_000_000


def _reader(lo_ms: float, hi_ms: float) -> RingReader:
    # the gap rule needs no ring: an object without a mapping is enough
    r = RingReader.__new__(RingReader)
    r.min_gap_ns, r.max_gap_ns, r.batch_target, r.gap_ns = int(lo_ms * MS), int(hi_ms * MS), 64, 0
    return r


def test_gap_grows_while_batches_are_small_and_falls_back():
    r = _reader(5, 15)
    steps = []
    for n in (10, 10, 10, 70, 130, 130, 0):
        r._adapt(n)
        steps.append(r.gap_ns / MS)
    # small batches double it up to the ceiling; a batch inside [target, 2*target) keeps it;
    # a big one halves it down to the floor; an empty read starts over at the floor
    assert steps == [10, 15, 15, 15, 7.5, 5, 5]


def test_gap_never_above_wakeup_when_the_ceiling_is_lower():
    for hi in (0, 2, 5):
        r = _reader(5, hi)
        for n in (1, 1, 1, 200, 0, 3):
            r._adapt(n)
            assert r.gap_ns == 5 * MS


def test_gap_from_a_sub_millisecond_floor_still_grows():
    r = _reader(0, 15)
    r._adapt(1)
    assert r.gap_ns == 2 * MS     # doubled from 1 ms, not stuck at 0
    r._adapt(500)
    assert r.gap_ns == 1 * MS


def test_an_exec_storm_stream_reaches_the_batch_wait_and_a_fast_one_stays_at_the_floor():
    # the reader's own target (ringbuf.BATCH_TARGET): an exec storm's ~2,600 records/s are read
    # once per batch wait (50 ms), not every ~25-40 ms as with a 64-record target (a read's cold
    # start is paid per read); 60,000 records/s fill a batch within the 5-ms wakeup floor
    from agenttrace.kernel.ringbuf import BATCH_TARGET
    for rate, want_ms in ((2_600, 50), (60_000, 5)):
        r = _reader(5, 50)
        r.batch_target = BATCH_TARGET
        for _ in range(12):
            gap_ms = max(r.gap_ns, r.min_gap_ns) / MS
            r._adapt(int(rate * gap_ms / 1000))
        assert max(r.gap_ns, r.min_gap_ns) / MS == want_ms, (rate, r.gap_ns / MS)


def test_run_with_batch_wait_loses_nothing(agent_tree, tmp_path):
    """`agenttrace run --cgroup ... --batch-wait-ms 40` under an exec loop: every exec is
    reported once and in order, and the stopped record counts the reads."""
    root = agent_tree.root
    a = agent_tree.agent("batch")
    out = tmp_path / "out.jsonl"
    rel = "/" + os.path.relpath(root, "/sys/fs/cgroup/unified")
    tracer = subprocess.Popen([AGENTTRACE, "run", "--cgroup", rel, "--mode", "monitor", "--no-net",
                               "--batch-wait-ms", "40", "--output", str(out)],
                              stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and '"phase":"started"' in out.read_text(), 60), \
            tracer.stderr
        n = 300
        code = f"for i in $(seq {n}); do /bin/echo batch-$i; done"
        p = agent_tree.spawn(a, ["/bin/sh", "-c", code], stdout=subprocess.DEVNULL)
        assert p.wait(timeout=120) == 0
        assert wait_until(lambda: f'"batch-{n}"' in out.read_text(), 60)
    finally:
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err.decode(errors="replace")[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    seen = [r["proc"]["args"][1] for r in recs
            if r["kind"] == "exec" and r["proc"]["exe"] == "/bin/echo"]
    assert seen == [f"batch-{i}" for i in range(1, n + 1)]
    stopped = next(r for r in recs if r.get("phase") == "stopped")
    assert stopped["drops"]["kernel"] == 0
    st = stopped["stages"]
    assert 1 <= st["read_batches"] <= st["read"]


def test_batch_wait_in_the_daemon_config():
    """`limits.batch_wait_ms` reaches the session; a bad value names file, line and field."""
    import pytest

    from agenttrace.config import ConfigError, parse_config
    from agenttrace.session.options import from_config
    assert from_config(parse_config("limits:\n  batch_wait_ms: 30\n")).batch_wait_ms == 30
    assert from_config(parse_config("")).batch_wait_ms == 50
    with pytest.raises(ConfigError, match=r"<config>:2:\d+: limits.batch_wait_ms"):
        parse_config("limits:\n  batch_wait_ms: -1\n")
