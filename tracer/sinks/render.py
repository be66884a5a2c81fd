"""A batch of records as JSON lines, rendering a part shared by consecutive records once.

Records of one process in a row often share their `proc` (and, for a repeated connect, `net`)
dict: the enricher hands out the same object (enrich/enricher.py _connect_repeat; an alert and
its trigger, match/engine.py). Serialising it again for every record was the largest cost of a
line once the record itself was cheap (~2 µs of ~7 for the rate sweep's 1 KB connect record,
whose ancestry is most of it). The second time a part is met it is serialised once into an
`orjson.Fragment` that the following records embed as is.

Same bytes by construction: a fragment is made from the very object the record holds, inside
this one call, and nothing runs between two records here that could change it. A part seen
only once costs an identity test, nothing more.
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
    append = out.append
    lp = ln = None          # the previous record's proc / net
    fp = fn = None          # their fragments, once a second record held them
    for r in records:
        p = r.get("proc")
        n = r.get("net")
        if (p is not lp or p is None) and (n is not ln or n is None):
            lp, ln, fp, fn = p, n, None, None
            append(dumps(r, default=default, option=option))
            continue
        r = dict(r)         # the record itself stays as the other sinks see it
        if p is lp and p is not None:
            if fp is None:
                fp = _Fragment(dumps(p, default=default, option=sub_opt))
            r["proc"] = fp
        else:
            lp, fp = p, None
        if n is ln and n is not None:
            if fn is None:
                fn = _Fragment(dumps(n, default=default, option=sub_opt))
            r["net"] = fn
        else:
            ln, fn = n, None
        append(dumps(r, default=default, option=option))
    return out
