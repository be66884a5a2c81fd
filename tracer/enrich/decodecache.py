"""Decoded exec fields shared between records with the same bytes.

An exec storm repeats a handful of programs: the same argv, comm and path bytes thousands of
times. Decoding each (and splitting argv) made new strings and lists per exec, and the process
table kept every copy (~250 bytes per exited process). Here each distinct byte string is
decoded once and the result handed to every record that carries it. The argv list is shared
too: nothing downstream mutates a record's `args` (on_fork copies before it changes one), the
same reasoning as the shared ancestry lists (proctable.ancestry). Bounded: a full cache starts
over rather than tracking recency, which would cost more than the decode it saves.
"""
from __future__ import annotations

from agenttrace.kernel import wire as E

MAX_ENTRIES = 4096


class DecodeCache:
    __slots__ = ("_argv", "_text")

    def __init__(self):
        self._argv: dict[bytes, list] = {}
        self._text: dict[bytes, str] = {}

    def argv(self, raw: bytes) -> list:
        """E.split_args(raw), shared for equal bytes."""
        got = self._argv.get(raw)
        if got is None:
            d = self._argv
            if len(d) >= MAX_ENTRIES:
                d.clear()
            got = d[raw] = E.split_args(raw)
        return got

    def text(self, raw: bytes) -> str:
        """E.cstr(raw) (up to the first NUL, UTF-8 with escapes), shared for equal bytes."""
        got = self._text.get(raw)
        if got is None:
            d = self._text
            if len(d) >= MAX_ENTRIES:
                d.clear()
            got = d[raw] = E.cstr(raw)
        return got
