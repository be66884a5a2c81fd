"""The ring-buffer reader and its wakeup policy, against the real kernel.

tracer/kernel/ringbuf.py walks the kernel's ring buffer itself (no BCC callback per record) and the
probes wake the reader only now and then (probes/common.h at_wake_flags). These tests prove
the two together lose and garble nothing: records of varying length that wrap around a small
ring many times decode intact, a burst after a quiet spell is delivered by plain polling, and
the BCC reader kept for other architectures gives the same stream.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from agenttrace.kernel import ringbuf as ringbuf

# process records only: these tests need no network hooks, and the full set costs ~4 s per start
PROC = ("proc",)

PY = sys.executable
N = 600


def _argv_burst(agent_tree, a, sess, n):
    """n execs of /bin/echo with a distinct, varying-length argv each, read while running."""
    code = ("import os, sys\nsys.stdin.readline()\n"
            f"for i in range({n}):\n"
            "    arg = 'x%d-' % i + 'y' * (i % 97)\n"
            "    os.waitpid(os.posix_spawn('/bin/echo', ['/bin/echo', arg], {}), 0)\n")
    p = agent_tree.spawn(a, [PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        p.stdin.write(b"go\n")
        p.stdin.flush()
        while p.poll() is None:
            sess.tracer.poll(20)
        sess.settle(10)
    finally:
        p.stdin.close()
        p.wait(timeout=120)
    want = {f"x{i}-" + "y" * (i % 97) for i in range(n)}
    got = [r["proc"]["args"] for r in sess.of("exec") if r["proc"]["exe"] == "/bin/echo"]
    drops = sum(c for (agent, t), c in sess.tracer.probes.drops().items()
                if t == 1 and agent == os.stat(a).st_ino)
    return want, got, drops


@pytest.mark.parametrize("reader", ["mmap", "bcc"])
def test_wrapping_small_ring_decodes_every_record(agent_tree, make_session, monkeypatch, reader):
    if reader == "bcc":
        monkeypatch.setenv("AGENTTRACE_BCC_RINGBUF", "1")
    elif not ringbuf.supported():
        pytest.skip("the mmap reader runs on x86-64 only; BCC's reader is used elsewhere")
    a = agent_tree.agent("wrap")
    # 16 pages = 64 KiB: 600 execs with ~300-400 bytes each plus forks and exits wrap it
    # several times over while it is being read
    sess = make_session([agent_tree.root], features=PROC, ringbuf_pages=16)
    assert (sess.tracer._reader is not None) == (reader == "mmap")
    want, got, drops = _argv_burst(agent_tree, a, sess, N)
    seen = [args[1] for args in got if len(args) == 2]
    assert len(seen) == len(got), f"garbled argv: {[g for g in got if len(g) != 2][:3]}"
    assert set(seen) <= want, f"argv never executed: {sorted(set(seen) - want)[:3]}"
    assert len(seen) == len(set(seen)), "a record was delivered twice"
    assert len(seen) + drops == N


def test_burst_after_quiet_spell_arrives_without_drain(agent_tree, make_session):
    """Records sent without a wakeup are still read by polling alone: after a quiet spell the
    first record of each CPU wakes the reader, and the reader keeps polling at the wakeup
    interval while records keep coming."""
    a = agent_tree.agent("quiet")
    sess = make_session([agent_tree.root], features=PROC, wakeup_ms=5.0)
    t = sess.tracer
    for _ in range(20):
        t.poll(10)
        if t._quiet:
            break
    assert t._quiet, "an idle reader must reach its quiet state"
    p = agent_tree.spawn(a, ["/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"])
    p.wait(timeout=60)
    # poll only (never drain), with a timeout far above anything the reader should wait: a
    # record left without a wakeup would hold the first call for the full 30 s
    t0 = time.monotonic()
    while len([r for r in sess.of("exec") if r["proc"]["exe"] == "/bin/true"]) < 10:
        assert time.monotonic() - t0 < 60, "records sent without a wakeup were never read"
        t.poll(30_000)
    assert time.monotonic() - t0 < 20, "records sent without a wakeup waited for the poll timeout"


def test_wake_on_every_record_still_works(agent_tree, make_session):
    a = agent_tree.agent("wake0")
    sess = make_session([agent_tree.root], features=PROC, wakeup_ms=0)
    agent_tree.run(a, ["/bin/true"])
    assert sess.wait_for(lambda: [r for r in sess.of("exec") if r["proc"]["exe"] == "/bin/true"])
