"""RFC 3339 timestamps with nanoseconds, UTC, both ways."""
from __future__ import annotations

import calendar
import time

# True in the compiled build only (scripts/build_native.py; timefmt.pxd); the deb's venv has no Cython
_COMPILED = False
try:
    import cython
    _COMPILED = cython.compiled
except ImportError:
    pass


# the last second formatted, as one (second, text) pair: events come in bursts within one
# second, and a reader on another thread sees the old pair or the new one, never half of each.
# It starts as a true pair: a placeholder second would hand its empty text to that second's
# first record (it did, for the second before the epoch).
_last = (0, "1970-01-01T00:00:00")


def format_ns(t_ns: int) -> str:
    global _last
    if _COMPILED:
        try:
            return _format_c(t_ns)
        except OverflowError:   # past 2262 or before 1678: Python ints below
            pass
    sec = t_ns // 1_000_000_000
    last = _last
    if sec != last[0]:
        last = _last = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{last[1]}.{t_ns - sec * 1_000_000_000:09d}Z"


def _format_c(t_ns):
    """format_ns on C integers, for the compiled build only (timefmt.pxd): the arithmetic and
    the padded digits without int objects or a call into int.__format__."""
    global _last
    sec = t_ns // 1_000_000_000
    frac = t_ns - sec * 1_000_000_000
    last = _last
    lsec = last[0]
    if sec != lsec:
        last = _last = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{last[1]}.{frac:09d}Z"


def parse_ns(ts: str) -> int:
    """Parse what format_ns writes, and the other RFC 3339 forms (offsets, fewer digits)."""
    s = ts.strip()
    if s.endswith("Z") or s.endswith("z"):
        off = 0
        s = s[:-1]
    elif len(s) > 6 and s[-6] in "+-" and s[-3] == ":":
        sign = 1 if s[-6] == "+" else -1
        off = sign * (int(s[-5:-3]) * 3600 + int(s[-2:]) * 60)
        s = s[:-6]
    else:
        raise ValueError(f"timestamp without a UTC offset: {ts!r}")
    if "." in s:
        base, frac = s.split(".", 1)
        if not frac.isdigit() or len(frac) > 9:
            raise ValueError(f"bad fraction in timestamp {ts!r}")
        ns = int(frac.ljust(9, "0"))
    else:
        base, ns = s, 0
    sec = _parsed.get(base)
    if sec is None:
        # strptime costs ~10 us; records come in bursts within one second, and the OCSF
        # sink and summaries parse every record's `ts`: each distinct second is parsed once
        sec = calendar.timegm(time.strptime(base.replace("t", "T"), "%Y-%m-%dT%H:%M:%S"))
        if len(_parsed) >= 256:
            _parsed.clear()
        _parsed[base] = sec
    return (sec - off) * 1_000_000_000 + ns


_parsed: dict[str, int] = {}    # "YYYY-MM-DDTHH:MM:SS" -> seconds since the epoch (UTC)
