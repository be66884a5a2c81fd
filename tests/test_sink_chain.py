"""The stream sink renders a shared ancestry list once and splices it into each record that
carries it (sinks/outputs.py _chain_rendered): the lines are the bytes orjson gives the record."""
import io

import orjson

from agenttrace.sinks.outputs import StreamSink, dumps_line


def _lines(records):
    out = io.BytesIO()
    StreamSink(out).emit_batch(records)
    return out.getvalue().splitlines(keepends=True)


def test_shared_chain_renders_the_same_bytes_as_the_record():
    chain = [{"pid": 10, "comm": "sh", "exe": "/bin/sh", "exec_id": "b-10-1"},
             {"pid": 1, "comm": "init\n\"x\"", "exe": "", "exec_id": "b-1-0"}]
    recs = [{"ts": "t", "kind": k, "proc": {"pid": 11, "ancestry": chain, "args": ["a\0b"]}, "n": i}
            for i, k in enumerate(("exec", "exit", "connect"))]
    recs.append({"kind": "lifecycle", "agent": None})
    recs.append({"kind": "exec", "proc": {"pid": 12, "ancestry": []}})
    recs.append({"kind": "exec", "proc": {"pid": 13, "ancestry": ({"pid": 1},)}})   # not a list
    recs.append({"kind": "exec", "proc": None})
    assert _lines(recs) == [dumps_line(r) for r in recs]
    # the records themselves are untouched: still the list, not its rendering
    assert all(r["proc"]["ancestry"] is chain for r in recs[:3])


def test_a_chain_that_grew_is_rendered_again():
    chain = [{"pid": 10, "comm": "sh", "exe": "/bin/sh", "exec_id": "b-10-1"}]
    rec = {"kind": "exec", "proc": {"pid": 11, "ancestry": chain}}
    assert _lines([rec]) == [dumps_line(rec)]
    chain.append({"pid": 1, "comm": "init", "exe": "", "exec_id": "b-1-0"})
    assert _lines([rec]) == [orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)]


def test_a_chain_orjson_refuses_falls_back_line_by_line():
    # a non-string key inside the chain: the fast render fails, the retry with the
    # non-string-key option writes the line, nothing is dropped
    rec = {"kind": "exec", "proc": {"pid": 11, "ancestry": [{1: "x"}]}}
    sink_out = io.BytesIO()
    s = StreamSink(sink_out)
    s.emit_batch([rec])
    assert sink_out.getvalue() == dumps_line(rec) and s.dropped == 0
