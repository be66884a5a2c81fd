# C types for the compiled build of exeid.py (bench/profiles/htyped-enrich.md): identify runs for
# every exec, and its own state (stats, the stat memo, the caches) is read as C fields instead of
# instance-dict lookups. An instance __dict__ keeps identify replaceable per instance
# (tests/pipeline_golden.py's stand-in); the .py stays the source of truth and the pure fallback.
cimport cython


cdef class ExeIdentifier:
    cdef dict __dict__
    cdef public object signatures, _needles, _scan, _cache, _gone_paths, _lock, max_entries
    cdef public object exec_ktime, reborn
    cdef public dict _stated, stats

    cpdef tuple _cached(self, str path)
    @cython.locals(d=dict)
    cpdef _remember_stat(self, object filename, object now, tuple answer)
    cpdef dict _done(self, dict ident)


cpdef bint _sees_through(str base)


# _exists_c: libc's kill(pid, 0) and errno called directly, not through ctypes (renamed: the
# module imports Python's errno)
cdef extern from "<signal.h>":
    int _c_kill "kill" (int pid, int sig)
cdef extern from "<errno.h>":
    int _c_errno "errno"
    enum: _C_ESRCH "ESRCH"

cpdef bint _exists(long pid)
cdef bint _exists_c(int pid)
