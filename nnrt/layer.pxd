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
