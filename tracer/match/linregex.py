"""Linear-time regular expressions for rules that read agent-controlled text.

An agent chooses its own command line, so a backtracking engine is a lever: a crafted 4 KiB
argv made the socat rule take ~160 ms in Python's `re` (bench/regex_argv.py), i.e. one exec
could stall the match stage for every agent on the node. RE2 (google-re2) runs in time linear
in the input, at the price of refusing what cannot be matched that way (backreferences,
lookaround, possessive quantifiers). A pattern RE2 refuses is a lint error at load time,
never a silent fallback to the backtracking engine.
"""
from __future__ import annotations

import re

try:
    import re2 as _re2
except ImportError as e:  # a dependency in pyproject.toml; said plainly if it is missing
    _re2 = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = ""


class LinearRegexError(ValueError):
    pass


def compile_linear(pattern: str):
    """The compiled RE2 pattern (`.search(str)` like `re`). Raises LinearRegexError with the
    reason when RE2 cannot hold it or it is not a valid regex at all."""
    if _re2 is None:
        raise LinearRegexError(f"the linear-time regex engine is unavailable (pip install google-re2): {_IMPORT_ERROR}")
    try:
        re.compile(pattern)
    except re.error as ex:
        raise LinearRegexError(f"not a valid regex: {ex}") from None
    try:
        return _re2.compile(pattern)
    except Exception as ex:  # re2.error; the message names RE2's reason (e.g. "invalid perl operator: (?<")
        why = str(ex) or type(ex).__name__
        raise LinearRegexError(f"the linear-time engine (RE2) cannot compile it: {why} "
                               "(no backreferences, lookahead/lookbehind or possessive quantifiers)") from None


_MEMO_TEXT = 256       # longer texts are searched each time: at most ~256 KiB kept per pattern
_MEMO_ENTRIES = 1024


class Searcher:
    """Whether a compiled RE2 pattern occurs in a string, without the wrapper's generator and
    offset bookkeeping (google-re2's `search` builds a match object through a generator and
    maps byte offsets back to characters: ~4/5 of its cost for a yes/no answer on every exec).
    Falls back to `search` where the engine's object is not reachable or the text does not
    encode."""

    __slots__ = ("compiled", "pattern", "_rx", "_anchor", "_seen")

    def __init__(self, compiled):
        self.compiled = compiled
        self.pattern = compiled.pattern
        # text -> answer for short texts: a storm repeats one command line thousands of
        # times, and a cmdline_regex rule must look at every exec's
        self._seen: dict = {}
        self._rx = getattr(compiled, "_regexp", None)
        anchor = getattr(getattr(_re2, "_Anchor", None), "UNANCHORED", None)
        self._anchor = anchor
        if self._rx is None or anchor is None or not hasattr(self._rx, "Match"):
            self._rx = None

    def search(self, text: str) -> bool:
        seen = self._seen
        hit = seen.get(text)
        if hit is not None:
            return hit
        hit = self._search(text)
        if len(text) <= _MEMO_TEXT:
            if len(seen) >= _MEMO_ENTRIES:
                seen.clear()
            seen[text] = hit
        return hit

    def _search(self, text: str) -> bool:
        rx = self._rx
        if rx is not None:
            try:
                b = text.encode("utf-8")
            except UnicodeEncodeError:
                return self.compiled.search(text) is not None
            return rx.Match(self._anchor, b, 0, len(b))[0] != (-1, -1)
        return self.compiled.search(text) is not None
