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
float32 sums lose ~1e-3 on inputs like N(1000, 0.1). One pass over the input
accumulates deviations from a per-feature shift (the first row), so the
variance does not cancel the way E[x^2] - E[x]^2 would. Per-feature constants
are folded once per call (scale forward; a/b/c backward) into arrays of
the layer's dtype, so the element-wise passes are plain vectorisable loops.
Nothing is allocated per call once the batch size is known.
"""

import numpy as np
cimport numpy as cnp

from nnrt.layer cimport Layer, NNRT_ABI_VERSION, _unaliased, reuse_buffer

from nnrt._validate import batchnorm_config
from nnrt.layer import check_abi

from nnrt_plugins._sigmoid import Sigmoid

cnp.import_array()
check_abi(NNRT_ABI_VERSION, __name__)


cdef extern from "nnrt/_vmath.h" nogil:
    # Kernels in C (nnrt/_vmath.h; run-time AVX2 clones on x86-64 Linux):
    #   stats    one pass, float64 accumulators of the deviations from a per-feature
    #            shift K_j (the first row): mean = K + S1/n, var = S2/n - (S1/n)^2;
    #            with the shift, S1/n is of the order of the spread, so the subtraction
    #            does not cancel even for inputs like N(1000, 0.1)
    #   affine   y = (x - center) * scale + shift (then sigmoid(y) when sig != 0);
    #            centring first keeps float32 accurate for inputs far from 0
    #   sums     s1 = sum dz, s2 = sum dz (x - mean) in float64, dz = dy (S NULL) or
    #            dy s (1 - s) (the following sigmoid's backward, S its output)
    #   dx       dx = a dz + c (x - mean) + b
    void nnrt_bn_stats_f(const float* X, Py_ssize_t n, Py_ssize_t f, double* mean, double* var)
    void nnrt_bn_stats_d(const double* X, Py_ssize_t n, Py_ssize_t f, double* mean, double* var)
    void nnrt_bn_affine_f(const float* X, float* Y, Py_ssize_t n, Py_ssize_t f,
                          const float* center, const float* scale, const float* shift, int sig)
    void nnrt_bn_affine_d(const double* X, double* Y, Py_ssize_t n, Py_ssize_t f,
                          const double* center, const double* scale, const double* shift,
                          int sig)
    void nnrt_bn_bwd_sums_f(const float* X, const float* dY, const float* S, const float* mean,
                            double* s1, double* s2, Py_ssize_t n, Py_ssize_t f)
    void nnrt_bn_bwd_sums_d(const double* X, const double* dY, const double* S,
                            const double* mean, double* s1, double* s2, Py_ssize_t n,
                            Py_ssize_t f)
    void nnrt_bn_bwd_dx_f(const float* X, const float* dY, const float* S, float* dX,
                          const float* mean, const float* a, const float* b, const float* c,
                          Py_ssize_t n, Py_ssize_t f)
    void nnrt_bn_fold_train_f(Py_ssize_t f, Py_ssize_t n, double momentum, double eps,
                              const double* mean, const double* var, double* invstd,
                              const float* gamma, const float* beta, float* scale_t,
                              float* mean_t, float* shift_t, float* running_mean,
                              float* running_var)
    void nnrt_bn_fold_train_d(Py_ssize_t f, Py_ssize_t n, double momentum, double eps,
                              const double* mean, const double* var, double* invstd,
                              const double* gamma, const double* beta, double* scale_t,
                              double* mean_t, double* shift_t, double* running_mean,
                              double* running_var)
    void nnrt_bn_fold_eval_f(Py_ssize_t f, double eps, const float* gamma,
                             const float* running_var, float* scale_t)
    void nnrt_bn_fold_eval_d(Py_ssize_t f, double eps, const double* gamma,
                             const double* running_var, double* scale_t)
    void nnrt_bn_fold_backward_f(Py_ssize_t f, Py_ssize_t n, const double* mean,
                                 const double* invstd, const double* s1, const double* s2,
                                 const float* mean_t, const float* gamma, float* dgamma,
                                 float* dbeta, float* a_t, float* b_t, float* c_t)
    void nnrt_bn_fold_backward_d(Py_ssize_t f, Py_ssize_t n, const double* mean,
                                 const double* invstd, const double* s1, const double* s2,
                                 const double* mean_t, const double* gamma, double* dgamma,
                                 double* dbeta, double* a_t, double* b_t, double* c_t)
    void nnrt_bn_bwd_dx_d(const double* X, const double* dY, const double* S, double* dX,
                          const double* mean, const double* a, const double* b,
                          const double* c, Py_ssize_t n, Py_ssize_t f)


cdef inline void* _data(object arr) noexcept:
    # data pointer of an ndarray, NULL for None
    if arr is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>arr)


cdef class BatchNorm(Layer):
    """Batch normalisation of (batch, num_features) inputs (registry name ``batchnorm``).

    Parameters ``gamma`` (ones) and ``beta`` (zeros); buffers ``running_mean``
    (zeros) and ``running_var`` (ones). Training normalises with the batch
    mean and biased variance and updates the running statistics with
    ``momentum`` (unbiased variance); eval uses the running statistics.
    A training batch of one sample raises ValueError (its variance is 0).
    """

    uses_batch_statistics = True

    cdef readonly object num_features
    cdef readonly double momentum, eps
    cdef cnp.ndarray gamma, beta, dgamma, dbeta, running_mean, running_var
    # float64 per-feature scratch: mean, invstd of the last training batch;
    # scale/shift for the affine pass; two backward accumulators
    cdef cnp.ndarray _mean, _invstd, _var, _scale, _shift, _acc1, _acc2
    # the same in the layer's dtype: batch mean, affine scale, backward a/b/c
    cdef cnp.ndarray _mean_t, _scale_t, _shift_t, _a_t, _b_t, _c_t
    cdef object _X, _Y_train, _Y_eval, _dX

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        n, momentum, eps = batchnorm_config("BatchNorm", num_features, momentum, eps)
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
        self._alloc_scratch()

    def _alloc_scratch(self):
        n = self.num_features
        dt = self._dtype
        self._mean_t = np.zeros(n, dtype=dt)
        self._scale_t = np.zeros(n, dtype=dt)
        self._shift_t = np.zeros(n, dtype=dt)
        self._a_t = np.zeros(n, dtype=dt)
        self._b_t = np.zeros(n, dtype=dt)
        self._c_t = np.zeros(n, dtype=dt)

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
        self._alloc_scratch()
        self._X = self._Y_train = self._Y_eval = self._dX = None
        return self

    cdef void _fold_train(self, Py_ssize_t n) noexcept:
        # per-feature constants of a training forward from the batch statistics,
        # and the running-statistics update (unbiased variance, as torch)
        cdef Py_ssize_t f = self.num_features
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double* var = <double*>cnp.PyArray_DATA(self._var)
        cdef double* invstd = <double*>cnp.PyArray_DATA(self._invstd)
        if self._typenum == cnp.NPY_FLOAT32:
            nnrt_bn_fold_train_f(f, n, self.momentum, self.eps, mean, var, invstd,
                                 <float*>_data(self.gamma), <float*>_data(self.beta),
                                 <float*>_data(self._scale_t), <float*>_data(self._mean_t),
                                 <float*>_data(self._shift_t), <float*>_data(self.running_mean),
                                 <float*>_data(self.running_var))
        else:
            nnrt_bn_fold_train_d(f, n, self.momentum, self.eps, mean, var, invstd,
                                 <double*>_data(self.gamma), <double*>_data(self.beta),
                                 <double*>_data(self._scale_t), <double*>_data(self._mean_t),
                                 <double*>_data(self._shift_t),
                                 <double*>_data(self.running_mean),
                                 <double*>_data(self.running_var))

    cdef void _fold_eval(self) noexcept:
        cdef Py_ssize_t f = self.num_features
        if self._typenum == cnp.NPY_FLOAT32:
            nnrt_bn_fold_eval_f(f, self.eps, <float*>_data(self.gamma),
                                <float*>_data(self.running_var), <float*>_data(self._scale_t))
        else:
            nnrt_bn_fold_eval_d(f, self.eps, <double*>_data(self.gamma),
                                <double*>_data(self.running_var), <double*>_data(self._scale_t))

    cdef void _forward_into(self, cnp.ndarray Xa, bint training, cnp.ndarray Y,
                            bint sig) noexcept:
        # batch statistics (training) or running statistics (eval), then the affine
        # pass into Y, followed by the sigmoid in the same sweep when sig is set
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray center, shift
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        cdef double* var = <double*>cnp.PyArray_DATA(self._var)
        if training:
            if self._typenum == cnp.NPY_FLOAT32:
                with nogil:
                    nnrt_bn_stats_f(<float*>cnp.PyArray_DATA(Xa), n, f, mean, var)
            else:
                with nogil:
                    nnrt_bn_stats_d(<double*>cnp.PyArray_DATA(Xa), n, f, mean, var)
            self._fold_train(n)
            center = self._mean_t
            shift = self._shift_t
        else:
            self._fold_eval()
            center = self.running_mean
            shift = self.beta
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                nnrt_bn_affine_f(<float*>cnp.PyArray_DATA(Xa), <float*>cnp.PyArray_DATA(Y), n, f,
                                 <float*>cnp.PyArray_DATA(center),
                                 <float*>cnp.PyArray_DATA(self._scale_t),
                                 <float*>cnp.PyArray_DATA(shift), sig)
        else:
            with nogil:
                nnrt_bn_affine_d(<double*>cnp.PyArray_DATA(Xa), <double*>cnp.PyArray_DATA(Y),
                                 n, f, <double*>cnp.PyArray_DATA(center),
                                 <double*>cnp.PyArray_DATA(self._scale_t),
                                 <double*>cnp.PyArray_DATA(shift), sig)

    cdef int _check_train_batch(self, cnp.ndarray Xa) except -1:
        if cnp.PyArray_DIM(Xa, 0) < 2:
            raise ValueError(
                f"{self!r}: training needs more than 1 sample per batch to compute "
                f"a batch variance, got shape {(<object>Xa).shape} dtype {Xa.dtype}"
            )
        return 0

    cpdef object forward(self, object X, bint training=False):
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray Y
        if training:
            self._check_train_batch(Xa)
            # the cached X must survive this forward: never write Y over it
            Y = reuse_buffer(_unaliased(self._Y_train, Xa), n, f, self._typenum)
            self._Y_train = Y
            self._X = Xa
        else:
            Y = reuse_buffer(_unaliased(self._Y_eval, Xa), n, f, self._typenum)
            self._Y_eval = Y
        self._forward_into(Xa, training, Y, False)
        return Y

    cdef void _fold_backward(self, Py_ssize_t n) noexcept:
        # dbeta = sum dy; dgamma = sum dy * xhat = invstd * sum dy (x - mean);
        # dx = a dy + c (x - mean) + b with a = gamma invstd, b = -a mean(dy),
        # c = -a invstd mean(dy xhat). NOTE: the sums pass centred x on mean_t (the
        # dtype-rounded mean): sum dy (x - mean) = sum dy (x - mean_t) + (mean_t - mean) sum dy
        cdef Py_ssize_t f = self.num_features
        cdef double* invstd = <double*>cnp.PyArray_DATA(self._invstd)
        cdef double* s1 = <double*>cnp.PyArray_DATA(self._acc1)
        cdef double* s2 = <double*>cnp.PyArray_DATA(self._acc2)
        cdef double* mean = <double*>cnp.PyArray_DATA(self._mean)
        if self._typenum == cnp.NPY_FLOAT32:
            nnrt_bn_fold_backward_f(f, n, mean, invstd, s1, s2, <float*>_data(self._mean_t),
                                    <float*>_data(self.gamma), <float*>_data(self.dgamma),
                                    <float*>_data(self.dbeta), <float*>_data(self._a_t),
                                    <float*>_data(self._b_t), <float*>_data(self._c_t))
        else:
            nnrt_bn_fold_backward_d(f, n, mean, invstd, s1, s2, <double*>_data(self._mean_t),
                                    <double*>_data(self.gamma), <double*>_data(self.dgamma),
                                    <double*>_data(self.dbeta), <double*>_data(self._a_t),
                                    <double*>_data(self._b_t), <double*>_data(self._c_t))

    cdef void _backward_into(self, cnp.ndarray X, cnp.ndarray dYa, object S,
                             cnp.ndarray dX) noexcept:
        # two sweeps: float64 sums, then dX; with S (a following sigmoid's cached
        # output) dYa is the gradient of the sigmoid's output instead of this layer's
        cdef Py_ssize_t n = cnp.PyArray_DIM(X, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(X, 1)
        cdef double* a1 = <double*>cnp.PyArray_DATA(self._acc1)
        cdef double* a2 = <double*>cnp.PyArray_DATA(self._acc2)
        cdef void* sp = _data(S)
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                nnrt_bn_bwd_sums_f(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(dYa),
                                   <float*>sp, <float*>cnp.PyArray_DATA(self._mean_t),
                                   a1, a2, n, f)
        else:
            with nogil:
                nnrt_bn_bwd_sums_d(<double*>cnp.PyArray_DATA(X),
                                   <double*>cnp.PyArray_DATA(dYa), <double*>sp,
                                   <double*>cnp.PyArray_DATA(self._mean_t), a1, a2, n, f)
        self._fold_backward(n)
        if self._typenum == cnp.NPY_FLOAT32:
            with nogil:
                nnrt_bn_bwd_dx_f(<float*>cnp.PyArray_DATA(X), <float*>cnp.PyArray_DATA(dYa),
                                 <float*>sp, <float*>cnp.PyArray_DATA(dX),
                                 <float*>cnp.PyArray_DATA(self._mean_t),
                                 <float*>cnp.PyArray_DATA(self._a_t),
                                 <float*>cnp.PyArray_DATA(self._b_t),
                                 <float*>cnp.PyArray_DATA(self._c_t), n, f)
        else:
            with nogil:
                nnrt_bn_bwd_dx_d(<double*>cnp.PyArray_DATA(X), <double*>cnp.PyArray_DATA(dYa),
                                 <double*>sp, <double*>cnp.PyArray_DATA(dX),
                                 <double*>cnp.PyArray_DATA(self._mean_t),
                                 <double*>cnp.PyArray_DATA(self._a_t),
                                 <double*>cnp.PyArray_DATA(self._b_t),
                                 <double*>cnp.PyArray_DATA(self._c_t), n, f)

    cpdef object backward(self, object dY):
        if self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = <cnp.ndarray>self._X
        # the output of the last training forward has X's shape and dtype (a fused
        # forward inside Sequential does not write this layer's own output buffer)
        cdef cnp.ndarray dYa = self.prepare_grad(dY, X)
        cdef cnp.ndarray dX = reuse_buffer(_unaliased(self._dX, dYa), cnp.PyArray_DIM(X, 0),
                                           cnp.PyArray_DIM(X, 1), self._typenum)
        self._dX = dX
        self._backward_into(X, dYa, None, dX)
        return dX

    # --------------------------------------------- fused batchnorm -> sigmoid
    # Internal protocol of Sequential's compiled loop (nnrt/_kernels.pyx): when
    # _nnrt_fuse_next(next_layer) is true, the pair runs as one layer. Both layers'
    # caches are kept as the separate calls would leave them (this layer's input and
    # statistics, the sigmoid's output), so either layer's own backward still works;
    # only this layer's output buffer (the sigmoid's input) is not written.
    def _nnrt_fuse_next(self, nxt):
        """True when ``nxt`` is a plain Sigmoid this exact BatchNorm type can fuse with."""
        return type(self) is BatchNorm and type(nxt) is Sigmoid

    def _nnrt_forward_pair(self, object X, bint training, Layer nxt):
        """``nxt.forward(self.forward(X, training), training)`` in one sweep."""
        if nxt._typenum != self._typenum or self._typenum < 0:
            return nxt.forward(self.forward(X, training), training)
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = cnp.PyArray_DIM(Xa, 1)
        cdef cnp.ndarray S
        if training:
            self._check_train_batch(Xa)
            S = reuse_buffer(_unaliased(nxt._S_train, Xa), n, f, self._typenum)
            nxt._S_train = S
            self._X = Xa
        else:
            S = reuse_buffer(_unaliased(nxt._S_eval, Xa), n, f, self._typenum)
            nxt._S_eval = S
        self._forward_into(Xa, training, S, True)
        return S

    def _nnrt_backward_pair(self, object dS, Layer nxt):
        """``self.backward(nxt.backward(dS))`` in two sweeps, without the middle array."""
        S = nxt._S_train
        X = self._X
        if (S is None or X is None or nxt._typenum != self._typenum
                or (<object>S).shape != (<object>X).shape
                or cnp.PyArray_TYPE(<cnp.ndarray>S) != cnp.PyArray_TYPE(<cnp.ndarray>X)):
            return self.backward(nxt.backward(dS))
        cdef cnp.ndarray dSa = nxt.prepare_grad(dS, <cnp.ndarray>S)
        cdef cnp.ndarray dX = reuse_buffer(_unaliased(self._dX, dSa), cnp.PyArray_DIM(dSa, 0),
                                           cnp.PyArray_DIM(dSa, 1), self._typenum)
        self._dX = dX
        self._backward_into(<cnp.ndarray>X, dSa, S, dX)
        return dX
