# C type for the compiled build of event.py (bench/profiles/htyped-enrich.md): the fields every
# stage reads become C struct members (Python code still sees them as attributes). All `object`:
# t_ns and the cgroup ids are u64 on the wire, and stages set pid/cookie from whatever they hold.

cdef class Event:
    cdef public object kind, t_ns, record, pid, agent_cgroup_id, cookie
