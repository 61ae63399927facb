# cython: language_level=3
"""Core fully connected layer: Y = X @ W + b.

Derivation (docs/derivations.md):
  dW = X.T @ dY          each sample adds its outer product x_i^T dy_i
  db = dY.sum(axis=0)    the bias's local derivative is a ones vector
  dX = dY @ W.T
GEMMs run through scipy.linalg.cython_blas with the GIL released; the bias is
added by seeding the output with b and calling GEMM with beta = 1.
"""

import numpy as np
cimport numpy as cnp
from libc.string cimport memcpy

from cython cimport floating

from nnrt.blas cimport gemm_rm as _scipy_gemm_rm
from libc.stdint cimport int64_t, uintptr_t
from nnrt.layer cimport Layer, _unaliased, reuse_buffer

cnp.import_array()


# NOTE: numpy and scipy each ship an OpenBLAS. numpy's (0.3.31 here) ran this
# project's GEMM shapes 10-20% faster than scipy's (0.3.30), so float32/float64
# GEMMs go through numpy's copy when its ILP64 Fortran symbols are found at
# import (NNRT_BLAS=scipy turns this off); otherwise scipy.linalg.cython_blas.
ctypedef void (*sgemm64_t)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const float*, const float*, const int64_t*,
                           const float*, const int64_t*, const float*, float*,
                           const int64_t*) noexcept nogil
ctypedef void (*dgemm64_t)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const double*, const double*, const int64_t*,
                           const double*, const int64_t*, const double*, double*,
                           const int64_t*) noexcept nogil
cdef sgemm64_t _np_sgemm = NULL
cdef dgemm64_t _np_dgemm = NULL


def _find_numpy_blas():
    """(sgemm, dgemm) addresses in numpy's bundled OpenBLAS, or None."""
    import ctypes
    import glob
    import os
    if os.environ.get("NNRT_BLAS", "").lower() == "scipy":
        return None
    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas64_*"))):
        try:
            lib = ctypes.CDLL(path)
            s = ctypes.cast(lib.scipy_sgemm_64_, ctypes.c_void_p).value
            d = ctypes.cast(lib.scipy_dgemm_64_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        if s and d:
            return s, d
    return None


def _use_numpy_blas(bint on):
    """Route Dense GEMMs through numpy's OpenBLAS (True) or scipy's (False); returns
    whether numpy's is in use."""
    global _np_sgemm, _np_dgemm
    found = _find_numpy_blas() if on else None
    if found is None:
        _np_sgemm = NULL
        _np_dgemm = NULL
        return False
    _np_sgemm = <sgemm64_t><uintptr_t>found[0]
    _np_dgemm = <dgemm64_t><uintptr_t>found[1]
    return True


BLAS_IN_USE = "numpy" if _use_numpy_blas(True) else "scipy"


cdef inline void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                         floating alpha, const floating* a, int lda,
                         const floating* b, int ldb,
                         floating beta, floating* c, int ldc) noexcept nogil:
    # row-major C = alpha op(A) op(B) + beta C, as nnrt.blas.gemm_rm (operands swapped)
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    cdef int64_t m64 = n, n64 = m, k64 = k, la = ldb, lb = lda, lc = ldc
    if floating is float:
        if _np_sgemm != NULL:
            _np_sgemm(&ta, &tb, &m64, &n64, &k64, &alpha, b, &la, a, &lb, &beta, c, &lc)
            return
    else:
        if _np_dgemm != NULL:
            _np_dgemm(&ta, &tb, &m64, &n64, &k64, &alpha, b, &la, a, &lb, &beta, c, &lc)
            return
    _scipy_gemm_rm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


cdef void dense_forward(const floating* X, const floating* W, const floating* b,
                        floating* Y, int batch, int n_in, int n_out,
                        bint use_bias) noexcept nogil:
    cdef int i
    cdef floating beta = 0
    if use_bias:
        # Y starts as b broadcast over rows; GEMM then adds X @ W into it.
        for i in range(batch):
            memcpy(&Y[i * n_out], b, n_out * sizeof(floating))
        beta = 1
    gemm_rm(False, False, batch, n_out, n_in, 1, X, n_in, W, n_out, beta, Y, n_out)


cdef void dense_backward(const floating* X, const floating* W, const floating* dY,
                         floating* dX, floating* dW, floating* db,
                         int batch, int n_in, int n_out, bint use_bias) noexcept nogil:
    cdef int i, j
    cdef const floating* row
    # dW = X.T @ dY  (overwrites: beta = 0)
    gemm_rm(True, False, n_in, n_out, batch, 1, X, n_in, dY, n_out, 0, dW, n_out)
    if use_bias:
        # NOTE: db sums dY over the batch axis: every sample adds to the same bias.
        for j in range(n_out):
            db[j] = 0
        for i in range(batch):
            row = &dY[i * n_out]
            for j in range(n_out):
                db[j] += row[j]
    if dX != NULL:
        # dX = dY @ W.T
        gemm_rm(False, True, batch, n_in, n_out, 1, dY, n_out, W, n_out, 0, dX, n_in)


cdef class Dense(Layer):
    """Fully connected layer ``Y = X @ W + b`` (registry name ``dense``).

    weight has shape (in_features, out_features), bias (out_features,);
    both start uniform in ±1/sqrt(in_features), as torch's nn.Linear.
    """

    def __init__(self, in_features, out_features):
        self._setup(in_features, out_features, True)

    def _setup(self, in_features, out_features, bint use_bias):
        """Allocate float64 parameters and draw them from the default seed (0)."""
        in_features = _check_width(in_features, "in_features", type(self).__name__)
        out_features = _check_width(out_features, "out_features", type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.dtype = np.float64
        self.W = np.zeros((in_features, out_features), dtype=np.float64)
        self.dW = np.zeros((in_features, out_features), dtype=np.float64)
        # without a bias, b/db stay 1-element placeholders the kernels never read
        self.b = np.zeros((out_features if use_bias else 1,), dtype=np.float64)
        self.db = np.zeros((out_features if use_bias else 1,), dtype=np.float64)
        self.reset_parameters(np.random.default_rng(0))

    def reset_parameters(self, rng):
        """Draw weight (then bias) uniform in ±1/sqrt(in_features) from ``rng``."""
        bound = 1.0 / np.sqrt(self.in_features)
        self.W[...] = rng.uniform(-bound, bound, size=(self.in_features, self.out_features))
        if self.use_bias:
            self.b[...] = rng.uniform(-bound, bound, size=(self.out_features,))

    cpdef dict params(self):
        if self.use_bias:
            return {"weight": self.W, "bias": self.b}
        return {"weight": self.W}

    cpdef dict grads(self):
        if self.use_bias:
            return {"weight": self.dW, "bias": self.db}
        return {"weight": self.dW}

    cpdef dict config(self):
        return {"in_features": self.in_features, "out_features": self.out_features}

    cpdef object to_dtype(self, object dtype):
        self.dtype = dtype
        dt = self._dtype
        self.W = np.ascontiguousarray(self.W, dtype=dt)
        self.dW = np.ascontiguousarray(self.dW, dtype=dt)
        self.b = np.ascontiguousarray(self.b, dtype=dt)
        self.db = np.ascontiguousarray(self.db, dtype=dt)
        self._X = self._Y_train = self._Y_eval = self._dX = None
        return self

    cdef void _forward_kernel(self, cnp.ndarray X, cnp.ndarray Y) noexcept:
        cdef int batch = <int>cnp.PyArray_DIM(X, 0)
        cdef int n_in = <int>cnp.PyArray_DIM(X, 1)
        cdef int n_out = <int>cnp.PyArray_DIM(Y, 1)
        cdef bint use_bias = self.use_bias
        if cnp.PyArray_TYPE(X) == cnp.NPY_FLOAT32:
            with nogil:
                dense_forward(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(self.W),
                              <float*>cnp.PyArray_DATA(self.b), <float*>cnp.PyArray_DATA(Y),
                              batch, n_in, n_out, use_bias)
        else:
            with nogil:
                dense_forward(<double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(self.W),
                              <double*>cnp.PyArray_DATA(self.b), <double*>cnp.PyArray_DATA(Y),
                              batch, n_in, n_out, use_bias)

    cdef void _backward_kernel(self, cnp.ndarray X, cnp.ndarray dY, cnp.ndarray dX) noexcept:
        cdef int batch = <int>cnp.PyArray_DIM(X, 0)
        cdef int n_in = <int>cnp.PyArray_DIM(X, 1)
        cdef int n_out = <int>cnp.PyArray_DIM(dY, 1)
        cdef bint use_bias = self.use_bias
        if cnp.PyArray_TYPE(X) == cnp.NPY_FLOAT32:
            with nogil:
                dense_backward(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(self.W),
                               <float*>cnp.PyArray_DATA(dY),
                               <float*>cnp.PyArray_DATA(dX) if dX is not None else NULL,
                               <float*>cnp.PyArray_DATA(self.dW),
                               <float*>cnp.PyArray_DATA(self.db),
                               batch, n_in, n_out, use_bias)
        else:
            with nogil:
                dense_backward(<double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(self.W),
                               <double*>cnp.PyArray_DATA(dY),
                               <double*>cnp.PyArray_DATA(dX) if dX is not None else NULL,
                               <double*>cnp.PyArray_DATA(self.dW),
                               <double*>cnp.PyArray_DATA(self.db),
                               batch, n_in, n_out, use_bias)

    cpdef object forward(self, object X, bint training=False):
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef cnp.ndarray Y
        if training:
            Y = reuse_buffer(_unaliased(self._Y_train, Xa), cnp.PyArray_DIM(Xa, 0),
                             self.out_features, self._typenum)
            self._Y_train = Y
            self._X = Xa
        else:
            Y = reuse_buffer(_unaliased(self._Y_eval, Xa), cnp.PyArray_DIM(Xa, 0),
                             self.out_features, self._typenum)
            self._Y_eval = Y
        self._forward_kernel(Xa, Y)
        return Y

    cpdef object backward(self, object dY):
        if self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = <cnp.ndarray>self._X
        cdef cnp.ndarray dYa = self.prepare_grad(dY, <cnp.ndarray>self._Y_train)
        cdef cnp.ndarray dX = reuse_buffer(_unaliased(self._dX, dYa), cnp.PyArray_DIM(X, 0),
                                           self.in_features, self._typenum)
        self._dX = dX
        self._backward_kernel(X, dYa, dX)
        return dX

    def backward_params(self, dY):
        """Like ``backward`` but only writes the parameter gradients; returns None.

        ``Sequential.backward(dY, input_grad=False)`` calls it on the first layer,
        whose dX = dY @ W.T nobody needs.
        """
        if self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = <cnp.ndarray>self._X
        cdef cnp.ndarray dYa = self.prepare_grad(dY, <cnp.ndarray>self._Y_train)
        self._backward_kernel(X, dYa, None)
        return None


def _check_width(value, name, owner):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r}")
    if value <= 0 or value > 2**31 - 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


check_width = _check_width
