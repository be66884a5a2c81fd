# C types for the compiled build of activity.py (bench/profiles/htyped-enrich.md): every exec,
# exit and connect record passes through Activity.observe, which before read its own attributes
# and its actors' through Python attribute lookups. Fields stay `public` (freshexe, gpunet, the
# stats record and tests read them); the .py stays the source of truth and the pure fallback.
cimport cython


cdef class Actor:
    cdef public object pid, ppid, agent, comm, exe, exec_id, start_ns, end_ns
    cdef public object identity, tool, tool_by, anc
    cdef public list contacts


cpdef str _tool_of(object identity)


cdef class Activity:
    cdef public object max_procs, start_of, procs, idents
    cdef public dict networked, tools, stats

    cpdef _forget(self, Actor a)
    @cython.locals(a=Actor)
    cpdef Actor _actor(self, object pid, object agent, object t_ns)
    cpdef _set_tool(self, Actor a, str tool, str by)
    cpdef _ident(self, object pid, object ident)
    cpdef _fill(self, Actor a, dict proc, object ident)
    @cython.locals(proc=dict, parent=Actor, a=Actor)
    cpdef observe(self, str kind, object t_ns, object pid, object agent, dict rec)
    @cython.locals(a=Actor, net=dict, dst=dict, flow=dict)
    cpdef _contact(self, str kind, object t_ns, object pid, object agent, dict rec)
