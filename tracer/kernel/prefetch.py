"""The probes loaded on a thread while the session is still being set up.

At a warm start most of the time to `started` is the kernel verifying the programs (flow's
four ~0.4 s of ~0.5 s, docs/STARTUP.md) and, before it, Python parsing the rules and building
the pipeline. The verifier runs inside bpf(2), which ctypes calls without the GIL, so the two
can overlap: this reads the compiled object from the probe cache (a cold cache is left to the
session's own load, which compiles), creates its maps and loads its programs, and attaches
nothing. `Probes.load` adopts the result when it was made from the
same source and flags (`take`), and otherwise loads its own; a session that ends before
loading (bad rules) drops it (`discard`): maps and unattached programs are file descriptors
only, gone when closed, so nothing is left behind and nothing acts on any process meanwhile.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

from agenttrace.kernel.loader import Probes, ensure_tracefs


class ProbePrefetch:
    def __init__(self, features, ringbuf_pages: int = 4096, extra_cflags=None):
        # checks the feature set now (ProbeError), in the caller's thread
        self._probes = Probes(features, ringbuf_pages, extra_cflags)
        self.features = self._probes.features
        self.rules_key = None          # session/probeplan.py: what the guess was keyed on
        self.outcome = "pending"       # used | mismatch | cold | failed | discarded | replaced
        self.guessed = None            # probeplan: (features, cflags, rules key, ring pages) guessed
        self.started = "options"       # launch: from the command line, before the CLI parsed it
        self._key: Optional[tuple] = None
        self._obj = None
        self._hit = False
        self._closed = False
        self._cold = False
        self.error: Optional[str] = None   # why nothing was made (outcome "failed")
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="agenttrace-probe-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from agenttrace.kernel import bpfobj, bpfsys, probecache
        p = self._probes
        obj, hit = None, False
        try:
            self._key = (p.source(), p.cflags())
            # from the cache only: a compile child started before the rules are known good
            # could outlive a session that then exits on them; the session compiles itself
            compiled = probecache.cached(*self._key)
            if compiled is None:
                self._cold = True
                return
            hit = True
            obj = bpfobj.LoadedObject(compiled, ensure_tracefs())
            p.bpf = obj
            # errors (a verifier rejection) are left for the session's own load_func to raise.
            # As many verifying threads as without a prefetch: leaving a CPU to the caller's
            # thread (one verifier on 2 CPUs) was no faster here, and slower on a busy node
            obj.preload(p._wanted_programs(lambda ptype: bpfsys.PROG_TYPES[ptype]))
        except BaseException as e:
            # tracefs, BTF, a map the kernel refuses: the session's own load meets it again
            # and reports it in its words
            self.error = f"{type(e).__name__}: {e}"
            if obj is not None:
                obj.cleanup()
                obj = None
        finally:
            p.bpf = None
            with self._lock:
                if self._closed and obj is not None:
                    obj.cleanup()
                    obj = None
                self._obj, self._hit = obj, hit

    def take(self, source: str, cflags: list) -> Optional[Tuple[object, bool]]:
        """(loaded object, came from the compile cache) if it was made from this source and
        these flags; else None (dropped, or nothing made: not in the cache, or a failure the
        session's own load meets again and reports)."""
        self._thread.join()
        with self._lock:
            obj, self._obj = self._obj, None
            self._closed = True
        if self._key != (source, list(cflags)):
            if obj is not None:
                obj.cleanup()
            self.outcome = "mismatch"
            return None
        if obj is None:
            self.outcome = "cold" if self._cold else "failed"
            return None
        self.outcome = "used"
        return obj, self._hit

    def discard(self) -> None:
        """Close what was loaded (now, or when the thread finishes); a no-op after take()."""
        with self._lock:
            self._closed = True
            obj, self._obj = self._obj, None
        if obj is not None:
            obj.cleanup()
        if self.outcome == "pending":
            self.outcome = "discarded"

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
