"""What the start-up built, set aside from the cyclic garbage collector.

A started tracer holds tens of thousands of objects it keeps to the end (the loaded probes'
wrappers, the rules and their CEL programs, the identity cache, the imported modules). Every
full collection walked all of them: during an exec storm two full collections in 4,000 execs
cost 46 ms, ~11 µs per exec, about a tenth of the tracer's CPU per exec (measured here, issue
15). `settle()` collects once and freezes what survives (`gc.freeze`), so later collections walk
only what the session made since; reference counting still frees frozen objects as usual, only
a frozen object that later becomes part of a garbage cycle is never reclaimed. Hence: once per
process (the first tracer; a test run that starts many in one interpreter freezes only the
first's start-up), and again after a rule reload, which unfreezes first so the rules it
replaced can be collected.
"""
from __future__ import annotations

import gc

_settled = False


def settle() -> None:
    """Collect, then freeze the survivors: the first call in a process, later ones do nothing."""
    global _settled
    if _settled:
        return
    _settled = True
    gc.collect()
    gc.freeze()


def resettle() -> None:
    """After a rule reload: what the old rules left in cycles becomes collectable, the new
    long-lived set is frozen in its place."""
    if not _settled:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()
