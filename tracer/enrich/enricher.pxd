# C types for the compiled build of enricher.py (bench/profiles/htyped-enrich.md): the process
# table, the look-back memory and the events are the C types of their own modules, so the
# per-exec and per-connect paths call them without Python attribute or method lookups. The
# Enricher keeps an instance __dict__: the session, stand-ins in tests and the GPU service set
# attributes and replace methods on it (_dst, _connect_repeat, resync_clock); the hot state is
# declared here and read from C.
cimport cython
from agenttrace.enrich.proctable cimport Proc, ProcTable
from agenttrace.enrich.activity cimport Activity
from agenttrace.enrich.exeid cimport ExeIdentifier
from agenttrace.session.event cimport Event


cpdef tuple wait_status(object status)


@cython.locals(ev=Event)
cdef Event _event(object kind, object t_ns, object record, object pid, object agent, object cookie)


cdef class Enricher:
    cdef dict __dict__
    cdef public object agents, scoper, node, name_lookup, gpu_summary, clock_offset
    cdef public ProcTable procs
    cdef public Activity activity
    cdef public object _decoded, shared_procs, fresh_exe, exe_ids, ssh_sessions, gpu_net, names
    cdef public dict _by_view, by_type, _dsts, pending, _pending_sk
    cdef public object sockets, policy_rule, on_probe_socket, device_names, _cmemo
    cdef public object argv_read_failures, file_path_read_failures, unknown_types
    cdef public object connect_repeats, pending_displaced
    cdef public Py_ssize_t tick, _cmemo_at
    cdef public bint _warmed

    cdef tuple _base_t(self, str kind, object ktime, object agent)
    @cython.locals(procs=ProcTable, p=Proc, rec=dict)
    cpdef dict _proc_t(self, object tgid, object uid, object comm, object ktime=*)
    @cython.locals(by_type=dict, out=list, act=Activity, ev=Event)
    cpdef list on_view(self, object view, object size)
    @cython.locals(procs=ProcTable, p=Proc, rec=dict, proc=dict, filename=str, exe=str)
    cpdef list _exec_v(self, object v)
    @cython.locals(rec=dict, p=Proc)
    cpdef list _exit_v(self, object v)
    @cython.locals(procs=ProcTable, p=Proc, rec=dict, net=dict, ev=Event, pending=dict)
    cpdef list _connect_v(self, object v)
    @cython.locals(rec=dict, net=dict)
    cpdef list _listen_v(self, object v)
    @cython.locals(ev=Event, net=dict)
    cpdef list _result_v(self, object v)
    cpdef _remember_socket(self, object cookie, object tgid, object agent)
    @cython.locals(ids=ExeIdentifier)
    cpdef object _identity(self, object pid, object filename, object exe, object args, object ktime=*)
