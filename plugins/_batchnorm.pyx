# cython: language_level=3
"""Batch normalisation over the batch axis, as torch.nn.BatchNorm1d.

Training (per feature j, batch of N):
  mean_j = sum_i x_ij / N
  var_j  = sum_i (x_ij - mean_j)^2 / N          biased: used to normalise
  xhat   = (x - mean) / sqrt(var + eps)
  y      = gamma * xhat + beta
  running = (1 - momentum) * running + momentum * stat, with the *unbiased*
            variance var * N / (N - 1) for running_var
Eval: the same with running_mean / running_var.

Backward (the full derivative, through the batch mean and variance too;
docs/derivations.md):
  dbeta  = sum_i dy
  dgamma = sum_i dy * xhat
  dx     = gamma / (N * sqrt(var + eps)) * (N * dy - dbeta - xhat * dgamma)

Statistics and sums are accumulated in float64 whatever the layer's dtype:
float32 sums lose ~1e-3 on inputs like N(1000, 0.1). Two passes (mean, then
squared deviations) keep the variance exact where E[x^2] - E[x]^2 would cancel.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport sqrt

from cython cimport floating

from nnrt.layer cimport Layer, NNRT_ABI_VERSION, reuse_buffer

from nnrt.layer import check_abi

cnp.import_array()
check_abi(NNRT_ABI_VERSION, __name__)


cdef inline object _unaliased(object buf, cnp.ndarray src):
    # NOTE: callers may feed a returned buffer straight back in (y = f(f(x))); a
    # buffer that overlaps the input is not reused, or the output would overwrite it.
    cdef char* p
    cdef char* q
    if buf is None:
        return None
    p = <char*>cnp.PyArray_DATA(<cnp.ndarray>buf)
    q = <char*>cnp.PyArray_DATA(src)
    if p < q + cnp.PyArray_NBYTES(src) and q < p + cnp.PyArray_NBYTES(<cnp.ndarray>buf):
        return None
    return buf


cdef void bn_batch_stats(const floating* X, Py_ssize_t n, Py_ssize_t f,
                         double* mean, double* var) noexcept nogil:
    # two passes over the rows, float64 accumulators, row-major friendly
    cdef Py_ssize_t i, j
    cdef const floating* row
    cdef double d
    for j in range(f):
        mean[j] = 0
        var[j] = 0
    for i in range(n):
        row = &X[i * f]
        for j in range(f):
            mean[j] += row[j]
    for j in range(f):
        mean[j] /= n
    for i in range(n):
        row = &X[i * f]
        for j in range(f):
            d = row[j] - mean[j]
            var[j] += d * d
    for j in range(f):
        var[j] /= n


cdef void bn_affine(const floating* X, floating* Y, Py_ssize_t n, Py_ssize_t f,
                    const double* scale, const double* shift) noexcept nogil:
    # y = x * scale + shift, with scale = gamma / sqrt(var + eps) and
    # shift = beta - mean * scale folded per feature beforehand
    cdef Py_ssize_t i, j
    cdef const floating* xr
    cdef floating* yr
    for i in range(n):
        xr = &X[i * f]
        yr = &Y[i * f]
        for j in range(f):
            yr[j] = <floating>(xr[j] * scale[j] + shift[j])


cdef void bn_backward(const floating* X, const floating* dY, floating* dX,
                      const floating* gamma, floating* dgamma, floating* dbeta,
                      const double* mean, const double* invstd,
                      double* acc_dy, double* acc_dyxhat,
                      Py_ssize_t n, Py_ssize_t f) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const floating* xr
    cdef const floating* gr
    cdef floating* dxr
    cdef double xhat, k
    for j in range(f):
        acc_dy[j] = 0
        acc_dyxhat[j] = 0
    for i in range(n):
        xr = &X[i * f]
        gr = &dY[i * f]
        for j in range(f):
            acc_dy[j] += gr[j]
            acc_dyxhat[j] += gr[j] * (xr[j] - mean[j]) * invstd[j]
    for j in range(f):
        dbeta[j] = <floating>acc_dy[j]
        dgamma[j] = <floating>acc_dyxhat[j]
        # fold per-feature constants: dx = a * dy - b - c * xhat
        acc_dy[j] = acc_dy[j] / n
        acc_dyxhat[j] = acc_dyxhat[j] / n
    for i in range(n):
        xr = &X[i * f]
        gr = &dY[i * f]
        dxr = &dX[i * f]
        for j in range(f):
            k = gamma[j] * invstd[j]
            xhat = (xr[j] - mean[j]) * invstd[j]
            dxr[j] = <floating>(k * (gr[j] - acc_dy[j] - xhat * acc_dyxhat[j]))


cdef class BatchNorm(Layer):
    """Batch normalisation of (batch, num_features) inputs (registry name ``batchnorm``).

    Parameters ``gamma`` (ones) and ``beta`` (zeros); buffers ``running_mean``
    (zeros) and ``running_var`` (ones). Training normalises with the batch
    mean and biased variance and updates the running statistics with
    ``momentum`` (unbiased variance); eval uses the running statistics.
    A training batch of one sample raises ValueError (its variance is 0).
    """

    cdef readonly object num_features
    cdef readonly double momentum, eps
    cdef cnp.ndarray gamma, beta, dgamma, dbeta, running_mean, running_var
    # float64 per-feature scratch: mean, invstd of the last training batch;
    # scale/shift for the affine pass; two backward accumulators
    cdef cnp.ndarray _mean, _invstd, _var, _scale, _shift, _acc1, _acc2
    cdef object _X, _Y_train, _Y_eval, _dX

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        if (isinstance(num_features, (bool, np.bool_))
                or not isinstance(num_features, (int, np.integer)) or num_features <= 0):
            raise ValueError(f"BatchNorm: num_features must be a positive int, got {num_features!r}")
        momentum = float(momentum)
        eps = float(eps)
        if not (0.0 <= momentum <= 1.0):
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
        if not (eps > 0.0):
            raise ValueError(f"BatchNorm: eps must be > 0, got {eps!r}")
        n = int(num_features)
        self.num_features = n
        self.in_features = n
        self.out_features = n
        self.momentum = momentum
        self.eps = eps
        self.dtype = np.float64
        self.gamma = np.ones(n)
        self.beta = np.zeros(n)
        self.dgamma = np.zeros(n)
        self.dbeta = np.zeros(n)
        self.running_mean = np.zeros(n)
        self.running_var = np.ones(n)
        self._mean = np.zeros(n)
        self._invstd = np.zeros(n)
        self._var = np.zeros(n)
        self._scale = np.zeros(n)
        self._shift = np.zeros(n)
        self._acc1 = np.zeros(n)
        self._acc2 = np.zeros(n)

    def reset_parameters(self, rng=None):
        """gamma = 1, beta = 0, running_mean = 0, running_var = 1 (no randomness)."""
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1

    cpdef dict params(self):
        return {"gamma": self.gamma, "beta": self.beta}

    cpdef dict grads(self):
        return {"gamma": self.dgamma, "beta": self.dbeta}

    cpdef dict buffers(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    cpdef dict config(self):
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    cpdef object to_dtype(self, object dtype):
        self.dtype = dtype
        dt = self._dtype
        self.gamma = np.ascontiguousarray(self.gamma, dtype=dt)
        self.beta = np.ascontiguousarray(self.beta, dtype=dt)
        self.dgamma = np.ascontiguousarray(self.dgamma, dtype=dt)
        self.dbeta = np.ascontiguousarray(self.dbeta, dtype=dt)
        self.running_mean = np.ascontiguousarray(self.running_mean, dtype=dt)
        self.running_var = np.ascontiguousarray(self.running_var, dtype=dt)
        self._X = self._Y_train = self._Y_eval = self._dX = None
        return self

    cpdef object forward(self, object X, bint training=False):
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(Xa, 1)
        cdef Py_ssize_t j
        cdef cnp.ndarray Y
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double* var = <double*>cnp.PyArray_DATA(self._var)
        cdef double* invstd = <double*>cnp.PyArray_DATA(self._invstd)
        cdef double* scale = <double*>cnp.PyArray_DATA(self._scale)
        cdef double* shift = <double*>cnp.PyArray_DATA(self._shift)
        cdef double m = self.momentum, eps = self.eps, unbias
        cdef cnp.ndarray g64 = np.asarray(self.gamma, dtype=np.float64)
        cdef cnp.ndarray b64 = np.asarray(self.beta, dtype=np.float64)
        cdef cnp.ndarray rm64, rv64
        cdef double* gamma = <double*>cnp.PyArray_DATA(g64)
        cdef double* beta = <double*>cnp.PyArray_DATA(b64)
        cdef double* rm
        cdef double* rv
        if training:
            if n < 2:
                raise ValueError(
                    f"{self!r}: training needs more than 1 sample per batch to compute "
                    f"a batch variance, got shape {(<object>Xa).shape} dtype {Xa.dtype}"
                )
            # the cached X must survive this forward: never write Y over it
            Y = reuse_buffer(_unaliased(self._Y_train, Xa), n, f, self._typenum)
            self._Y_train = Y
            self._X = Xa
            if self._typenum == cnp.NPY_FLOAT32:
                with nogil:
                    bn_batch_stats(<float*>cnp.PyArray_DATA(Xa), n, f, mean, var)
            else:
                with nogil:
                    bn_batch_stats(<double*>cnp.PyArray_DATA(Xa), n, f, mean, var)
            for j in range(f):
                invstd[j] = 1.0 / sqrt(var[j] + eps)
                scale[j] = gamma[j] * invstd[j]
                shift[j] = beta[j] - mean[j] * scale[j]
            # running statistics: unbiased variance, as torch
            unbias = <double>n / (n - 1)
            rm64 = np.asarray(self.running_mean, dtype=np.float64)
            rv64 = np.asarray(self.running_var, dtype=np.float64)
            rm = <double*>cnp.PyArray_DATA(rm64)
            rv = <double*>cnp.PyArray_DATA(rv64)
            for j in range(f):
                rm[j] = (1 - m) * rm[j] + m * mean[j]
                rv[j] = (1 - m) * rv[j] + m * var[j] * unbias
            if rm64 is not self.running_mean:
                self.running_mean[...] = rm64
                self.running_var[...] = rv64
        else:
            Y = reuse_buffer(self._Y_eval, n, f, self._typenum)
            self._Y_eval = Y
            rm64 = np.asarray(self.running_mean, dtype=np.float64)
            rv64 = np.asarray(self.running_var, dtype=np.float64)
            rm = <double*>cnp.PyArray_DATA(rm64)
            rv = <double*>cnp.PyArray_DATA(rv64)
            for j in range(f):
                scale[j] = gamma[j] / sqrt(rv[j] + eps)
                shift[j] = beta[j] - rm[j] * scale[j]
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                bn_affine(<float*>cnp.PyArray_DATA(Xa), <float*>cnp.PyArray_DATA(Y), n, f,
                          scale, shift)
        else:
            with nogil:
                bn_affine(<double*>cnp.PyArray_DATA(Xa), <double*>cnp.PyArray_DATA(Y), n, f,
                          scale, shift)
        return Y

    cpdef object backward(self, object dY):
        if self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = <cnp.ndarray>self._X
        cdef cnp.ndarray dYa = self.prepare_grad(dY, <cnp.ndarray>self._Y_train)
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(X, 1)
        cdef cnp.ndarray dX = reuse_buffer(self._dX, n, f, self._typenum)
        self._dX = dX
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double* invstd = <double*>cnp.PyArray_DATA(self._invstd)
        cdef double* a1 = <double*>cnp.PyArray_DATA(self._acc1)
        cdef double* a2 = <double*>cnp.PyArray_DATA(self._acc2)
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                bn_backward(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(dYa),
                            <float*>cnp.PyArray_DATA(dX), <float*>cnp.PyArray_DATA(self.gamma),
                            <float*>cnp.PyArray_DATA(self.dgamma),
                            <float*>cnp.PyArray_DATA(self.dbeta),
                            mean, invstd, a1, a2, n, f)
        else:
            with nogil:
                bn_backward(<double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(dYa),
                            <double*>cnp.PyArray_DATA(dX), <double*>cnp.PyArray_DATA(self.gamma),
                            <double*>cnp.PyArray_DATA(self.dgamma),
                            <double*>cnp.PyArray_DATA(self.dbeta),
                            mean, invstd, a1, a2, n, f)
        return dX
