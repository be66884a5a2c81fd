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
