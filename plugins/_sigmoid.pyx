# cython: language_level=3
"""Logistic sigmoid as a compiled plugin layer.

  s = 1 / (1 + exp(-x))        computed from exp(-|x|) so no input overflows
  ds/dx = s * (1 - s)          backward reads the cached *output* s
"""

cimport numpy as cnp

from nnrt.layer cimport (LAYER_BUILT, LAYER_FROZEN, NNRT_ABI_VERSION, Layer, check_array,
                         check_self, grad_as, reuse_buffer, unaliased)

from nnrt._parallel cimport PAR_EXP, PAR_EXPF, PAR_STREAM, par_fn, par_for

from nnrt.layer import check_abi

cdef extern from "nnrt/_vmath.h" nogil:
    # float32: vectorisable polynomial exp; float64: libm's exp (see the header).
    # Backward: dX = dY * s * (1 - s) in the dtype, from the cached output s.
    void nnrt_sigmoidf_array(const float* x, float* s, Py_ssize_t n)
    void nnrt_sigmoid_array(const double* x, double* s, Py_ssize_t n)
    void nnrt_sigmoid_bwd_f(const float* S, const float* dY, float* dX, Py_ssize_t n)
    void nnrt_sigmoid_bwd_d(const double* S, const double* dY, double* dX, Py_ssize_t n)

cnp.import_array()
check_abi(NNRT_ABI_VERSION, __name__)


# Element ranges of the kernels for nnrt._parallel.par_for (two halves on two threads
# above a size threshold; each element computed as in one call: bit-identical).
ctypedef struct _SigJob:
    const void* a     # forward: x; backward: S
    const void* b     # backward: dY
    void* out


cdef void _fwd_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _SigJob* j = <_SigJob*>ctx
    nnrt_sigmoidf_array(<const float*>j.a + lo, <float*>j.out + lo, hi - lo)


cdef void _fwd_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _SigJob* j = <_SigJob*>ctx
    nnrt_sigmoid_array(<const double*>j.a + lo, <double*>j.out + lo, hi - lo)


cdef void _bwd_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _SigJob* j = <_SigJob*>ctx
    nnrt_sigmoid_bwd_f(<const float*>j.a + lo, <const float*>j.b + lo, <float*>j.out + lo,
                       hi - lo)


cdef void _bwd_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _SigJob* j = <_SigJob*>ctx
    nnrt_sigmoid_bwd_d(<const double*>j.a + lo, <const double*>j.b + lo,
                       <double*>j.out + lo, hi - lo)


cdef class Sigmoid(Layer):
    """Element-wise logistic sigmoid (registry name ``sigmoid``); keeps the width."""

    # readonly: Python may look but not assign. BatchNorm's fused batchnorm+sigmoid
    # path inside Sequential writes the output caches through _output_buffer below,
    # so this layer's backward works after a fused forward; every use still checks
    # what they hold.
    cdef readonly object _S_train, _S_eval
    cdef object _dX

    # eval-chain protocol (nnrt/_kernels.pyx): a compiled layer before this one may
    # apply the sigmoid in its own output pass (a Python subclass is never fused)
    _nnrt_epilogue = "sigmoid"

    def __cinit__(self, *args, **kwargs):
        # no parameters: even an instance made with __new__ is complete
        self._flags |= LAYER_FROZEN | LAYER_BUILT

    def __init__(self):
        pass

    cpdef object to_dtype(self, object dtype):
        check_self(self, Sigmoid)
        self._set_dtype(dtype)
        self._S_train = self._S_eval = self._dX = None
        return self

    cpdef object forward(self, object X, bint training=False):
        check_self(self, Sigmoid)
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef int t = cnp.PyArray_TYPE(Xa)
        cdef Py_ssize_t rows = cnp.PyArray_DIM(Xa, 0), cols = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray S
        if training:
            S = reuse_buffer(unaliased(self._S_train, Xa), rows, cols, t)
            self._S_train = S
        else:
            S = reuse_buffer(unaliased(self._S_eval, Xa), rows, cols, t)
            self._S_eval = S
        check_array(self, Xa, "input", rows, cols, t, False)
        check_array(self, S, "output buffer", rows, cols, t, True)
        cdef Py_ssize_t n = rows * cols
        cdef _SigJob job
        job.a = cnp.PyArray_DATA(Xa)
        job.b = NULL
        job.out = cnp.PyArray_DATA(S)
        if t == cnp.NPY_FLOAT32:
            with nogil:
                par_for(PAR_EXPF, <par_fn>_fwd_f, &job, n, 1)
        else:
            with nogil:
                par_for(PAR_EXP, <par_fn>_fwd_d, &job, n, 1)
        return S

    cpdef object backward(self, object dY):
        check_self(self, Sigmoid)
        S_obj = self._S_train
        if S_obj is None:
            raise self._no_forward_error()
        if not isinstance(S_obj, cnp.ndarray) or cnp.PyArray_NDIM(<cnp.ndarray>S_obj) != 2:
            raise RuntimeError(
                f"{self!r}: the cached output of the last training forward is no longer a "
                f"2-D array (now {type(S_obj).__name__}); run forward(X, training=True) again"
            )
        # element-wise: the kernel needs S, dY and dX of one shape and dtype; the
        # shape is S's as it is now (an in-place reshape of S keeps its memory)
        cdef cnp.ndarray S = <cnp.ndarray>S_obj
        cdef int t = cnp.PyArray_TYPE(S)
        if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or (
                self._typenum >= 0 and t != self._typenum):
            raise RuntimeError(
                f"{self!r}: the cached output of the last training forward has dtype "
                f"{S.dtype}, not the layer's; run forward(X, training=True) again"
            )
        cdef Py_ssize_t rows = cnp.PyArray_DIM(S, 0), cols = cnp.PyArray_DIM(S, 1)
        cdef cnp.ndarray dYa = grad_as(self, dY, rows, cols, t)
        cdef cnp.ndarray dX = reuse_buffer(unaliased(unaliased(self._dX, dYa), S), rows, cols, t)
        self._dX = dX
        # last checks, after everything that may have run Python code
        check_array(self, S, "cached output (of the last training forward)", rows, cols, t,
                    False)
        check_array(self, dYa, "gradient", rows, cols, t, False)
        check_array(self, dX, "input-gradient buffer", rows, cols, t, True)
        cdef Py_ssize_t n = rows * cols
        cdef _SigJob job
        job.a = cnp.PyArray_DATA(S)
        job.b = cnp.PyArray_DATA(dYa)
        job.out = cnp.PyArray_DATA(dX)
        with nogil:
            par_for(PAR_STREAM, <par_fn>(_bwd_f if t == cnp.NPY_FLOAT32 else _bwd_d), &job, n, 1)
        return dX


def _output_buffer(Sigmoid layer, bint training, cnp.ndarray src, Py_ssize_t rows,
                   Py_ssize_t cols, int typenum):
    """The (rows, cols) output buffer of ``layer`` for a forward on ``src``, kept as its
    training or eval output cache (internal: BatchNorm's fused forward writes it)."""
    check_self(layer, Sigmoid)
    cdef cnp.ndarray S
    if training:
        S = reuse_buffer(unaliased(layer._S_train, src), rows, cols, typenum)
        layer._S_train = S
    else:
        S = reuse_buffer(unaliased(layer._S_eval, src), rows, cols, typenum)
        layer._S_eval = S
    return S
