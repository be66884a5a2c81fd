"""A line queued for a `tail` client holds about its own size, not orjson's output buffer
(sinks/outputs.py _exact): orjson >= 3.12 hands out its buffer untrimmed, 4-16 KiB for a
~1.2 KB record, and the socket sink keeps up to queue_size lines per client that is behind."""
import tracemalloc

import orjson

from agenttrace.sinks.outputs import UnixSocketSink
from harness import stalled_client, wait_clients


def _rec(i):
    return {"ts": f"t{i}", "kind": "exec", "seq": i,
            "proc": {"pid": i, "args": ["x" * 1100], "ancestry": [{"pid": 1, "comm": "init"}]}}


def test_lines_queued_for_a_stalled_client_are_not_orjsons_buffers(tmp_path):
    path = str(tmp_path / "events.sock")
    s = UnixSocketSink(path, queue_size=5000)
    stuck = stalled_client(path)
    try:
        wait_clients(s, 1)
        recs = [_rec(i) for i in range(3000)]
        size = sum(len(orjson.dumps(r)) + 1 for r in recs)
        s.emit_batch(recs[:10])
        tracemalloc.start()
        try:
            for i in range(10, len(recs), 64):
                s.emit_batch(recs[i:i + 64])
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        queued = s.clients()[0]["queued"]
        assert queued > 2500              # the client really is behind: its lines are held
        assert held < 2 * size, (held, size)
    finally:
        stuck.close()
        s.close()
