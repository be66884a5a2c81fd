# Augmenting declarations for the compiled build of wire.py (scripts/build_native.py): exec argv
# copied straight from the ring's buffer. The .py stays the pure fallback.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
cimport cython

@cython.locals(buf=Py_buffer, p=cython.p_char, avail=Py_ssize_t, aoff=Py_ssize_t)
cdef bytes _args_c(object view, Py_ssize_t m)
