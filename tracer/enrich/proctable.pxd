# C types for the compiled build of proctable.py (bench/profiles/htyped-enrich.md); the .py
# stays the source of truth and the pure fallback. Fields are `public`: the enricher, procshare,
# act/worker and tests read and set them from Python. Integers from the wire stay `object`
# (u64 ktimes, cgroup ids); the table's generation counter only counts up, so a C integer
# holds it, and comparing it is the cached-ancestry test of every record.
cimport cython


cdef class Proc:
    cdef public object pid, ppid, parent, uid, comm, exe, args, start_ktime
    cdef public object cgroup_id, agent_cgroup_id, gpu, _summary, _anc, _anc_pids
    cdef public object exec_id, parent_exec_id, _kid_anc
    cdef public long long _anc_gen
    cdef public bint exited, kids

    @cython.locals(s=dict)
    cpdef dict summary(self)
    cpdef dict record(self)


cpdef str make_exec_id(object pid, object start_ns)


cdef class ProcTable:
    cdef public object max_entries, fork_lookup
    cdef public object _t, _holes, _exited, _exited_ids
    cdef public dict _gone
    cdef public long long _gen
    cdef public Py_ssize_t evictions, forgotten, gone_hits

    @cython.locals(old=Proc)
    cpdef Proc _put(self, Proc p)
    cpdef Proc peek(self, object pid)
    @cython.locals(p=Proc, par=Proc, gone=dict)
    cpdef Proc get(self, object pid, object before=*)
    @cython.locals(p=Proc, par=Proc)
    cpdef Proc on_exec(self, object pid, object ppid, object uid, object comm, object exe,
                       object args, object ktime, object creator=*)
    cpdef bint _forked_since(self, Proc p)
    @cython.locals(p=Proc, old=Proc)
    cpdef Proc on_exit(self, object pid)
    @cython.locals(p=Proc, a=Proc, out=list, anc=list, seen=set)
    cpdef list ancestry(self, object pid, object depth=*)
