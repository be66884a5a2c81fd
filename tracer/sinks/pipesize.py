"""A FIFO given as `--output` gets the largest pipe buffer the system allows.

A pipe holds 64 KiB by default: ~150 records. The reader writes a batch of up to 512 records in
one write (sinks/outputs.py StreamSink), so into a default pipe every batch blocked until the
consumer had taken most of it, and the reader, blocked in write(2), read nothing from the ring
meanwhile: at 100,000 connect records/s the tracer spent about half of its wall time there
(bench rate sweep, py-spy), and the backlog it left was what made it miss the sustained rate.
With /proc/sys/fs/pipe-max-size (1 MiB by default) a batch fits while the consumer keeps up on
average; a consumer that stops still stops the tracer, as before (nothing is dropped).
"""
from __future__ import annotations

import fcntl
import os
import stat

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def widen_pipe(stream) -> int:
    """The pipe's new size, or 0 when `stream` is not a pipe or it could not be widened (the
    default size then stays: slower under a flood, never wrong)."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, _max_size())
    except (OSError, ValueError, AttributeError):
        return 0
