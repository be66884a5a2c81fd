"""A FIFO given as --output gets the system's largest pipe buffer (sinks/pipesize.py): a batch of
records then goes out in one write instead of blocking the reader until the consumer took it."""
import fcntl
import os

from agenttrace.sinks.pipesize import widen_pipe

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def _max():
    with open("/proc/sys/fs/pipe-max-size") as f:
        return int(f.read())


def test_output_fifo_is_widened_by_the_cli_sink_builder(tmp_path):
    from agenttrace.cli import _sinks
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo, 0o600)
    # the reading end first, as the bench's tap and any `--output` consumer holds it
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        sinks = _sinks(fifo, "json")
        try:
            stream = sinks[0]._stream
            assert fcntl.fcntl(stream.fileno(), F_GETPIPE_SZ) == _max()
            sinks[0].emit_batch([{"kind": "lifecycle", "n": i} for i in range(3)])
            assert os.read(rfd, 1 << 16).count(b"\n") == 3
        finally:
            for s in sinks:
                s.close()
    finally:
        os.close(rfd)


def test_regular_file_and_closed_stream_are_left_alone(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        assert widen_pipe(f) == 0
    f = open(tmp_path / "g", "wb")
    f.close()
    assert widen_pipe(f) == 0
    assert widen_pipe(object()) == 0


def test_render_lines_is_the_plain_rendering():
    """sinks/render.py: parts shared by consecutive records rendered once, the same bytes."""
    import orjson
    from agenttrace.sinks.outputs import _FAST_OPTS, _default
    from agenttrace.sinks.render import render_lines
    proc = {"pid": 7, "args": ["a", "é\n"], "ancestry": [{"pid": 1, "comm": "init"}]}
    proc2 = {"pid": 8, "args": [], "ancestry": []}
    net = {"proto": "udp", "dst": {"addr": "127.0.0.1", "port": 9, "name": None}}
    agent = {"id": "a", "cgroup_id": 3}

    def rec(i, p, n):
        return {"ts": f"t{i}", "kind": "connect", "agent": agent, "proc": p, "net": n}
    batches = [
        [rec(i, proc, net) for i in range(5)],                                # both shared
        [rec(0, proc, net), rec(1, proc, dict(net)), rec(2, proc, net), rec(3, proc2, net)],
        [rec(0, proc, None), rec(1, proc, None), {"kind": "lifecycle"}, rec(2, proc, net)],
        [rec(0, None, net), rec(1, None, net), rec(2, proc2, {"x": 1}), rec(3, proc, {"x": 1})],
        [rec(0, "not a dict", net), rec(1, "not a dict", net)],
        [],
    ]
    for b in batches:
        want = [orjson.dumps(r, default=_default, option=_FAST_OPTS) for r in b]
        assert render_lines(b, _default, _FAST_OPTS) == want
        assert b == [dict(r) for r in b]          # the records themselves unchanged
    bad = [rec(0, {1: "int key"}, net), rec(1, {1: "int key"}, net)]
    import pytest
    with pytest.raises(TypeError):      # as the plain rendering: the sink's line-by-line path takes it
        render_lines(bad, _default, _FAST_OPTS)
