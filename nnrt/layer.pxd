# cython: language_level=3
"""The C-level interface of an nnrt layer.

Cython plugins ``cimport`` this file and subclass :class:`Layer`; calls between
compiled layers then go through the C vtable (a few ns), while plain Python
subclasses override the same methods through ordinary attribute lookup.

Changing the layout of ``Layer`` (its fields or the order of its methods)
breaks compiled plugins: bump ``NNRT_ABI_VERSION`` when you do.
"""

cimport numpy as cnp

cdef enum:
    # Compiled into every plugin that cimports this file; compared with the
    # running core's ``nnrt.layer.ABI_VERSION`` by ``check_abi``.
    NNRT_ABI_VERSION = 1


cdef class Layer:
    cdef public object in_features
    cdef public object out_features
    # dtype of parameters and outputs; None means "follow the input" (float32
    # or float64 input is kept, anything else becomes float64).
    cdef object _dtype
    cdef int _typenum

    cpdef object forward(self, object X, bint training=*)
    cpdef object backward(self, object dY)
    cpdef dict params(self)
    cpdef dict grads(self)
    cpdef dict buffers(self)
    cpdef dict config(self)
    cpdef object to_dtype(self, object dtype)
    cpdef cnp.ndarray prepare_input(self, object X)
    cpdef cnp.ndarray prepare_grad(self, object dY, cnp.ndarray like)


# Reuse `out` when it already has this shape and dtype, else allocate a new
# C-contiguous array. Kernels write into what this returns.
cdef cnp.ndarray reuse_buffer(object out, Py_ssize_t rows, Py_ssize_t cols, int typenum)


# `buf`, or None when it overlaps `src` (then reuse_buffer allocates a new array).
# NOTE: callers may feed a returned buffer straight back in (y = f(f(x))); a
# buffer that overlaps the input is not reused, or the output would overwrite it.
# Inline: adds nothing to Layer's layout (NNRT_ABI_VERSION unchanged).
cdef inline object _unaliased(object buf, cnp.ndarray src):
    cdef char* p
    cdef char* q
    if buf is None:
        return None
    p = <char*>cnp.PyArray_DATA(<cnp.ndarray>buf)
    q = <char*>cnp.PyArray_DATA(src)
    if p < q + cnp.PyArray_NBYTES(src) and q < p + cnp.PyArray_NBYTES(<cnp.ndarray>buf):
        return None
    return buf
