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
    # 2: widths are C fields (_n_in/_n_out) behind in_features/out_features
    #    properties; _flags; cdef methods _set_dtype, _check_built, _forward_from.
    NNRT_ABI_VERSION = 2

cdef enum:
    # Bits of Layer._flags.
    # A compiled layer whose kernels trust its widths and dtype: it sets this in
    # __cinit__ (so even an instance made with __new__ has it), and then assigning
    # in_features / out_features / dtype from Python raises AttributeError.
    LAYER_FROZEN = 1
    # Its __init__ completed (parameters allocated): its kernels may run. A frozen
    # layer checks it with _check_built() at every entry point.
    LAYER_BUILT = 2


cdef class Layer:
    # Widths as C integers; -1 means None ("keeps the width"). Python reads them as
    # the in_features / out_features properties; prepare_input checks against them.
    cdef Py_ssize_t _n_in, _n_out
    # dtype of parameters and outputs; None means "follow the input" (float32
    # or float64 input is kept, anything else becomes float64).
    cdef object _dtype
    cdef int _typenum
    cdef int _flags

    cpdef object forward(self, object X, bint training=*)
    cpdef object backward(self, object dY)
    cpdef dict params(self)
    cpdef dict grads(self)
    cpdef dict buffers(self)
    cpdef dict config(self)
    cpdef object to_dtype(self, object dtype)
    cpdef cnp.ndarray prepare_input(self, object X)
    cpdef cnp.ndarray prepare_grad(self, object dY, cnp.ndarray like)
    # Set _dtype/_typenum (float32, float64 or None) whatever LAYER_FROZEN says:
    # for a compiled layer's own __init__ / to_dtype.
    cdef int _set_dtype(self, object dtype) except -1
    # RuntimeError naming the class unless LAYER_BUILT is set.
    cdef int _check_built(self) except -1
    # forward(X, training) as called by Sequential's compiled loop. ``trusted``: X is
    # the output buffer of the previous built-in layer of the network, which nothing
    # outside the network holds, so a layer may cache it for backward without a
    # copy. The default calls self.forward(X, training).
    cdef object _forward_from(self, object X, bint training, bint trusted)


# Reuse `out` when it already has this shape and dtype, else allocate a new
# C-contiguous array. Kernels write into what this returns.
cdef cnp.ndarray reuse_buffer(object out, Py_ssize_t rows, Py_ssize_t cols, int typenum)

# `dY` as a C-contiguous (rows, cols) array of `typenum` (copied if it must be);
# ValueError/TypeError naming `layer` otherwise. Unlike prepare_grad, the shape
# comes from C integers the layer recorded, not from an array Python can reshape.
cdef cnp.ndarray grad_as(Layer layer, object dY, Py_ssize_t rows, Py_ssize_t cols,
                         int typenum)

# 0 when `arr` is an ndarray of exactly (rows, cols) (cols < 0: 1-D of rows),
# `typenum`, C-contiguous, aligned, native byte order, and writeable when
# `writeable`; else RuntimeError naming `layer`, `what` and what changed. The
# last check before a kernel: run it after anything that can call Python code.
cdef int check_array(Layer layer, object arr, str what, Py_ssize_t rows, Py_ssize_t cols,
                     int typenum, bint writeable) except -1


# What a layer keeps of its forward input for backward: `Xa` itself when it is
# private (prepare_input made it, so `Xa is not X`) or `trusted` (see
# Layer._forward_from); else a copy of it, in `buf` when that fits. The caller
# changing X afterwards (its values, or its shape in place) then cannot change
# what backward computes.
cdef cnp.ndarray cache_input(object X, cnp.ndarray Xa, object buf, bint trusted)


# True when the memory of two arrays overlaps.
cdef inline bint overlaps(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef char* p = <char*>cnp.PyArray_DATA(a)
    cdef char* q = <char*>cnp.PyArray_DATA(b)
    return p < q + cnp.PyArray_NBYTES(b) and q < p + cnp.PyArray_NBYTES(a)


# `buf`, or None when it is not an ndarray or overlaps `src` (then reuse_buffer
# allocates a new array).
# NOTE: callers may feed a returned buffer straight back in (y = f(f(x))); a
# buffer that overlaps the input is not reused, or the output would overwrite it.
# Inline: adds nothing to Layer's layout.
cdef inline object unaliased(object buf, cnp.ndarray src):
    if buf is None or not isinstance(buf, cnp.ndarray):
        return None
    if overlaps(<cnp.ndarray>buf, src):
        return None
    return buf


# The name used before `unaliased` was public (kept for existing plugins).
cdef inline object _unaliased(object buf, cnp.ndarray src):
    return unaliased(buf, src)
