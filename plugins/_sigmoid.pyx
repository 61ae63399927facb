# cython: language_level=3
"""Logistic sigmoid as a compiled plugin layer.

  s = 1 / (1 + exp(-x))        computed from exp(-|x|) so no input overflows
  ds/dx = s * (1 - s)          backward reads the cached *output* s
"""

cimport numpy as cnp

from nnrt.layer cimport Layer, NNRT_ABI_VERSION, reuse_buffer

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


cdef class Sigmoid(Layer):
    """Element-wise logistic sigmoid (registry name ``sigmoid``); keeps the width."""

    # public: BatchNorm's fused batchnorm+sigmoid path inside Sequential writes the
    # output caches too, so this layer's backward works after a fused forward
    cdef public object _S_train, _S_eval, _dX

    def __init__(self):
        self.in_features = None
        self.out_features = None

    cpdef object to_dtype(self, object dtype):
        self.dtype = dtype
        self._S_train = self._S_eval = self._dX = None
        return self

    cpdef object forward(self, object X, bint training=False):
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef int t = cnp.PyArray_TYPE(Xa)
        cdef cnp.ndarray S
        if training:
            S = reuse_buffer(self._S_train, cnp.PyArray_DIM(Xa, 0), cnp.PyArray_DIM(Xa, 1), t)
            self._S_train = S
        else:
            S = reuse_buffer(self._S_eval, cnp.PyArray_DIM(Xa, 0), cnp.PyArray_DIM(Xa, 1), t)
            self._S_eval = S
        cdef Py_ssize_t n = cnp.PyArray_SIZE(Xa)
        if t == cnp.NPY_FLOAT32:
            with nogil:
                nnrt_sigmoidf_array(<float*>cnp.PyArray_DATA(Xa), <float*>cnp.PyArray_DATA(S), n)
        else:
            with nogil:
                nnrt_sigmoid_array(<double*>cnp.PyArray_DATA(Xa), <double*>cnp.PyArray_DATA(S), n)
        return S

    cpdef object backward(self, object dY):
        if self._S_train is None:
            raise self._no_forward_error()
        cdef cnp.ndarray S = <cnp.ndarray>self._S_train
        cdef cnp.ndarray dYa = self.prepare_grad(dY, S)
        cdef int t = cnp.PyArray_TYPE(S)
        cdef cnp.ndarray dX = reuse_buffer(self._dX, cnp.PyArray_DIM(S, 0),
                                           cnp.PyArray_DIM(S, 1), t)
        self._dX = dX
        cdef Py_ssize_t n = cnp.PyArray_SIZE(S)
        if t == cnp.NPY_FLOAT32:
            with nogil:
                nnrt_sigmoid_bwd_f(<float*>cnp.PyArray_DATA(S), <float*>cnp.PyArray_DATA(dYa),
                                   <float*>cnp.PyArray_DATA(dX), n)
        else:
            with nogil:
                nnrt_sigmoid_bwd_d(<double*>cnp.PyArray_DATA(S), <double*>cnp.PyArray_DATA(dYa),
                                   <double*>cnp.PyArray_DATA(dX), n)
        return dX
