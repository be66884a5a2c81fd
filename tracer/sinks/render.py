"""A batch of records as JSON lines, rendering a part shared by consecutive records once.

Records of one process in a row often share their `proc` (and, for a repeated connect, `net`)
dict: the enricher hands out the same object (enrich/enricher.py _connect_repeat; an exec and
its exit; a connect and the accept of the same process, enrich/procshare.py; an alert and its
trigger, match/engine.py). Serialising it again for every record was the largest cost of a
line once the record itself was cheap (~2 µs of ~7 for the rate sweep's 1 KB connect record,
whose ancestry is most of it). A part that the next record also holds is serialised once into
an `orjson.Fragment` that this record and the following ones holding it embed as is: an exec
and its exit (the pair of an exec storm, ~1 KB of shared `proc` in a 1.1 KB line) cost one
`proc` rendering, not two.

Same bytes by construction: a fragment is made from the very object the record holds, inside
this one call, and nothing runs between two records here that could change it. A part no
neighbour holds costs two identity tests, nothing more.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import orjson

_Fragment = getattr(orjson, "Fragment", None)     # orjson >= 3.9.15
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def render_lines(records: Sequence[dict], default: Callable[[Any], Any], option: int) -> list[bytes]:
    """[orjson.dumps(r, default=default, option=option) for r in records], byte for byte."""
    dumps = orjson.dumps
    if _Fragment is None:
        return [dumps(r, default=default, option=option) for r in records]
    sub_opt = option & ~_NEWLINE
    out = []
    n = len(records)
    if not n:
        return out
    lp = ln = None          # the previous record's proc / net
    fp = fn = None          # their fragments (None: rendered inside that record)
    r = records[0]
    p = r.get("proc")
    q = r.get("net")
    i = 1
    while True:
        if i < n:
            nr = records[i]
            np_ = nr.get("proc")
            nq = nr.get("net")
        else:
            nr = np_ = nq = None
        # a part this record shares with the one before already has its fragment (that record
        # saw it as its next's); one shared only with the next gets it now
        if p is None or (p is not lp and p is not np_):
            fp = None
        elif p is not lp:
            fp = _Fragment(dumps(p, default=default, option=sub_opt))
        if q is None or (q is not ln and q is not nq):
            fn = None
        elif q is not ln:
            fn = _Fragment(dumps(q, default=default, option=sub_opt))
        if fp is None and fn is None:
            out.append(dumps(r, default=default, option=option))
        else:
            r = dict(r)         # the record itself stays as the other sinks see it
            if fp is not None:
                r["proc"] = fp
            if fn is not None:
                r["net"] = fn
            out.append(dumps(r, default=default, option=option))
        if i >= n:
            return out
        lp, ln = p, q
        r, p, q = nr, np_, nq
        i += 1
