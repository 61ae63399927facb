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

SyncBatchNorm (``sync_batchnorm``) is this layer with its statistics reduced over
the ranks of a communicator (``uses_communicator``): the same kernels compute this
process's sums, an allreduce adds them up, and the same fold/affine/dx kernels run
with the global statistics. Forward (float64): allreduce of [n, sum x] -> mean0;
allreduce of [sum (x - mean0), sum (x - mean0)^2] -> mean = mean0 + S1/N,
var = S2/N - (S1/N)^2 (two passes: exact where E[x^2] - E[x]^2 would cancel).
Backward: this rank's s1, s2 give its share of dgamma/dbeta (the trainer's
gradient allreduce adds the shares); allreduce of [s1, s2] gives dx.
"""

import numpy as np
cimport numpy as cnp

from nnrt.layer cimport (LAYER_BUILT, LAYER_FROZEN, NNRT_ABI_VERSION, Layer, cache_input,
                         check_array, check_self, grad_as, overlaps, reuse_buffer, unaliased)

from nnrt._parallel cimport PAR_EXPF, PAR_EXP, PAR_STREAM, par_fn, par_for

from nnrt_plugins._bn_config import batchnorm_config
from nnrt.layer import check_abi

from nnrt_plugins._sigmoid import Sigmoid, _output_buffer

cnp.import_array()
check_abi(NNRT_ABI_VERSION, __name__)


cdef extern from "plugins/_bn_kernels.h" nogil:
    # Kernels in C (plugins/_bn_kernels.h; run-time AVX2 clones on x86-64 Linux):
    #   stats    one pass, float64 accumulators of the deviations from a per-feature
    #            shift K_j (the first row): mean = K + S1/n, var = S2/n - (S1/n)^2;
    #            with the shift, S1/n is of the order of the spread, so the subtraction
    #            does not cancel even for inputs like N(1000, 0.1)
    #   affine   y = (x - center) * scale + shift (then sigmoid(y) when sig != 0);
    #            centring first keeps float32 accurate for inputs far from 0
    #   sums     s1 = sum dz, s2 = sum dz (x - mean) in float64, dz = dy (S NULL) or
    #            dy s (1 - s) (the following sigmoid's backward, S its output)
    #   dx       dx = a dz + c (x - mean) + b
    #   moments  s1 = sum (x - c), s2 = sum (x - c)^2 in float64 (c NULL: 0): this
    #            process's share of statistics reduced over several (SyncBatchNorm)
    void nnrt_bn_affine_f(const float* X, float* Y, Py_ssize_t n, Py_ssize_t f,
                          const float* center, const float* scale, const float* shift, int sig)
    void nnrt_bn_affine_d(const double* X, double* Y, Py_ssize_t n, Py_ssize_t f,
                          const double* center, const double* scale, const double* shift,
                          int sig)
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
    void nnrt_bn_stats_cols_f(const float* X, Py_ssize_t n, Py_ssize_t f, Py_ssize_t j0,
                              Py_ssize_t j1, double* mean, double* var)
    void nnrt_bn_stats_cols_d(const double* X, Py_ssize_t n, Py_ssize_t f, Py_ssize_t j0,
                              Py_ssize_t j1, double* mean, double* var)
    void nnrt_bn_bwd_sums_cols_f(const float* X, const float* dY, const float* S,
                                 const float* mean, double* s1, double* s2, Py_ssize_t n,
                                 Py_ssize_t f, Py_ssize_t j0, Py_ssize_t j1)
    void nnrt_bn_bwd_sums_cols_d(const double* X, const double* dY, const double* S,
                                 const double* mean, double* s1, double* s2, Py_ssize_t n,
                                 Py_ssize_t f, Py_ssize_t j0, Py_ssize_t j1)
    void nnrt_bn_moments_f(const float* X, Py_ssize_t n, Py_ssize_t f, const double* c,
                           double* s1, double* s2)
    void nnrt_bn_moments_d(const double* X, Py_ssize_t n, Py_ssize_t f, const double* c,
                           double* s1, double* s2)
    void nnrt_bn_bwd_dx_d(const double* X, const double* dY, const double* S, double* dX,
                          const double* mean, const double* a, const double* b,
                          const double* c, Py_ssize_t n, Py_ssize_t f)


# Row ranges of the element-wise passes for nnrt._parallel.par_for (contiguous row
# blocks on two threads above a size threshold; every element is computed as in one
# call: bit-identical). The reductions (the batch statistics and the backward sums) are
# split by features instead (_ColJob): a split by rows would change the summation
# order, one by features keeps each feature's sums as in one call.
ctypedef struct _RowJob:
    const void* x
    const void* dy
    const void* s
    void* out
    const void* center
    const void* p1
    const void* p2
    const void* p3
    Py_ssize_t f
    int sig


ctypedef struct _ColJob:
    # features [lo, hi) of the statistics (x, n, f -> m, v) or of the backward sums
    # (x, dy, s, center, n, f -> m as s1, v as s2)
    const void* x
    const void* dy
    const void* s
    const void* center
    double* m
    double* v
    Py_ssize_t n, f


cdef void _stats_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _ColJob* j = <_ColJob*>ctx
    nnrt_bn_stats_cols_f(<const float*>j.x, j.n, j.f, lo, hi, j.m, j.v)


cdef void _stats_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _ColJob* j = <_ColJob*>ctx
    nnrt_bn_stats_cols_d(<const double*>j.x, j.n, j.f, lo, hi, j.m, j.v)


cdef void _sums_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _ColJob* j = <_ColJob*>ctx
    nnrt_bn_bwd_sums_cols_f(<const float*>j.x, <const float*>j.dy, <const float*>j.s,
                            <const float*>j.center, j.m, j.v, j.n, j.f, lo, hi)


cdef void _sums_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _ColJob* j = <_ColJob*>ctx
    nnrt_bn_bwd_sums_cols_d(<const double*>j.x, <const double*>j.dy, <const double*>j.s,
                            <const double*>j.center, j.m, j.v, j.n, j.f, lo, hi)


cdef void _affine_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _RowJob* j = <_RowJob*>ctx
    nnrt_bn_affine_f(<const float*>j.x + lo * j.f, <float*>j.out + lo * j.f, hi - lo, j.f,
                     <const float*>j.center, <const float*>j.p1, <const float*>j.p2, j.sig)


cdef void _affine_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _RowJob* j = <_RowJob*>ctx
    nnrt_bn_affine_d(<const double*>j.x + lo * j.f, <double*>j.out + lo * j.f, hi - lo, j.f,
                     <const double*>j.center, <const double*>j.p1, <const double*>j.p2, j.sig)


cdef void _dx_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _RowJob* j = <_RowJob*>ctx
    cdef Py_ssize_t o = lo * j.f
    cdef const float* s = NULL
    if j.s != NULL:
        s = <const float*>j.s + o
    nnrt_bn_bwd_dx_f(<const float*>j.x + o, <const float*>j.dy + o, s, <float*>j.out + o,
                     <const float*>j.center, <const float*>j.p1, <const float*>j.p2,
                     <const float*>j.p3, hi - lo, j.f)


cdef void _dx_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _RowJob* j = <_RowJob*>ctx
    cdef Py_ssize_t o = lo * j.f
    cdef const double* s = NULL
    if j.s != NULL:
        s = <const double*>j.s + o
    nnrt_bn_bwd_dx_d(<const double*>j.x + o, <const double*>j.dy + o, s, <double*>j.out + o,
                     <const double*>j.center, <const double*>j.p1, <const double*>j.p2,
                     <const double*>j.p3, hi - lo, j.f)


cdef inline int _affine_kind(int t, bint sig) noexcept nogil:
    # with the sigmoid the pass costs an exp per element
    if not sig:
        return PAR_STREAM
    return PAR_EXPF if t == cnp.NPY_FLOAT32 else PAR_EXP


# The kernels run without the GIL from this many elements (n x f); below it, releasing
# and taking it back (~70-150 ns a pair) was a few % of a tiny network's step
cdef Py_ssize_t _NOGIL_MIN = 16384


cdef void _forward_run(bint dbl, bint training, bint local, _ColJob* cjob, _RowJob* job,
                       int kind, Py_ssize_t n, Py_ssize_t f, Py_ssize_t count, double momentum,
                       double eps, double* m, double* v, double* istd, void* pg, void* pb,
                       void* psc, void* pmt, void* psh, void* prm, void* prv) noexcept nogil:
    # the forward's kernels on checked pointers: batch statistics (training, local),
    # the per-feature constants, then the affine (+ sigmoid) pass into job.out
    if training:
        if local:
            if dbl:
                par_for(PAR_STREAM, <par_fn>_stats_d, cjob, f, n)
            else:
                par_for(PAR_STREAM, <par_fn>_stats_f, cjob, f, n)
        if dbl:
            nnrt_bn_fold_train_d(f, count, momentum, eps, m, v, istd, <double*>pg,
                                 <double*>pb, <double*>psc, <double*>pmt, <double*>psh,
                                 <double*>prm, <double*>prv)
        else:
            nnrt_bn_fold_train_f(f, count, momentum, eps, m, v, istd, <float*>pg,
                                 <float*>pb, <float*>psc, <float*>pmt, <float*>psh,
                                 <float*>prm, <float*>prv)
        job.center = pmt
        job.p2 = psh
    else:
        if dbl:
            nnrt_bn_fold_eval_d(f, eps, <double*>pg, <double*>prv, <double*>psc)
        else:
            nnrt_bn_fold_eval_f(f, eps, <float*>pg, <float*>prv, <float*>psc)
        job.center = prm
        job.p2 = pb
    if dbl:
        par_for(kind, <par_fn>_affine_d, job, n, f)
    else:
        par_for(kind, <par_fn>_affine_f, job, n, f)


cdef void _backward_run(bint dbl, int phase, _ColJob* cjob, _RowJob* job, Py_ssize_t n,
                        Py_ssize_t f, Py_ssize_t count, double* m, double* istd, double* s1,
                        double* s2, void* pmt, void* pg, void* pdg, void* pdb, void* pa,
                        void* pbb, void* pc) noexcept nogil:
    # the backward's kernels on checked pointers: the sums (phase 0, 1), the folded
    # per-feature constants, dx (phase 0, 2)
    if phase != 2:
        if dbl:
            par_for(PAR_STREAM, <par_fn>_sums_d, cjob, f, n)
        else:
            par_for(PAR_STREAM, <par_fn>_sums_f, cjob, f, n)
    if dbl:
        nnrt_bn_fold_backward_d(f, count, m, istd, s1, s2, <double*>pmt, <double*>pg,
                                <double*>pdg, <double*>pdb, <double*>pa, <double*>pbb,
                                <double*>pc)
    else:
        nnrt_bn_fold_backward_f(f, count, m, istd, s1, s2, <float*>pmt, <float*>pg,
                                <float*>pdg, <float*>pdb, <float*>pa, <float*>pbb,
                                <float*>pc)
    if phase != 1:
        if dbl:
            par_for(PAR_STREAM, <par_fn>_dx_d, job, n, f)
        else:
            par_for(PAR_STREAM, <par_fn>_dx_f, job, n, f)


cdef cnp.ndarray _message(cnp.ndarray buf, Py_ssize_t size):
    # buf if it is still a writeable C-contiguous float64 vector of size elements,
    # else a new one: a message buffer goes out to a communicator (Python code),
    # which may have reshaped it; its values never outlive one step
    if (buf is None or cnp.PyArray_NDIM(buf) != 1 or cnp.PyArray_DIM(buf, 0) != size
            or cnp.PyArray_TYPE(buf) != cnp.NPY_FLOAT64
            or not cnp.PyArray_ISCARRAY(buf)):
        return np.zeros(size)
    return buf


cdef inline void* _data(cnp.ndarray arr) noexcept:
    # data pointer of an ndarray, NULL for None
    if arr is None:
        return NULL
    return cnp.PyArray_DATA(arr)


cdef class BatchNorm(Layer):
    """Batch normalisation of (batch, num_features) inputs (registry name ``batchnorm``).

    Parameters ``gamma`` (ones) and ``beta`` (zeros); buffers ``running_mean``
    (zeros) and ``running_var`` (ones). Training normalises with the batch
    mean and biased variance and updates the running statistics with
    ``momentum`` (unbiased variance); eval uses the running statistics.
    A training batch of one sample raises ValueError (its variance is 0).
    ``in_features``, ``out_features`` and ``dtype`` are read-only.
    """

    uses_batch_statistics = True

    # the width the kernels use is Layer._n_in (== _n_out), set once by __init__
    cdef readonly double momentum, eps
    # readonly: the live arrays (as params()/grads()/buffers()), never reassigned from Python
    cdef readonly cnp.ndarray gamma, beta, dgamma, dbeta, running_mean, running_var
    # float64 per-feature scratch: mean, var, invstd of the last training batch;
    # two backward accumulators
    cdef cnp.ndarray _mean, _invstd, _var, _acc1, _acc2
    # statistics over more rows than this process's (set by SyncBatchNorm's __cinit__),
    # the row count the last training statistics cover, and the float64 messages of
    # the reduction: [n, sum x] (f + 1) and [s1, s2] (2 f)
    cdef bint _reduce
    cdef Py_ssize_t _count
    cdef cnp.ndarray _msg_stats, _msg_sums
    # the same in the layer's dtype: batch mean, affine scale/shift, backward a/b/c
    cdef cnp.ndarray _mean_t, _scale_t, _shift_t, _a_t, _b_t, _c_t
    # input of the last training forward (a private copy of the caller's X, or the
    # previous built-in layer's output) and its batch size (-1: none)
    cdef cnp.ndarray _X
    cdef Py_ssize_t _rows
    cdef object _Y_train, _Y_eval, _dX, _Xcopy

    def __cinit__(self, *args, **kwargs):
        # even an instance made with BatchNorm.__new__ refuses width/dtype assignment
        self._flags |= LAYER_FROZEN
        self._rows = -1

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        n, momentum, eps = batchnorm_config(type(self).__name__, num_features, momentum, eps)
        self._flags &= ~LAYER_BUILT
        self._n_in = n
        self._n_out = n
        self.momentum = momentum
        self.eps = eps
        self._set_dtype(np.float64)
        self.gamma = np.ones(n)
        self.beta = np.zeros(n)
        self.dgamma = np.zeros(n)
        self.dbeta = np.zeros(n)
        self.running_mean = np.zeros(n)
        self.running_var = np.ones(n)
        self._mean = np.zeros(n)
        self._invstd = np.zeros(n)
        self._var = np.zeros(n)
        self._acc1 = np.zeros(n)
        self._acc2 = np.zeros(n)
        self._msg_stats = np.zeros(n + 1)
        self._msg_sums = np.zeros(2 * n)
        self._count = -1
        self._alloc_scratch(np.float64)
        self._X = None
        self._rows = -1
        self._Y_train = self._Y_eval = self._dX = self._Xcopy = None
        self._flags |= LAYER_BUILT

    @property
    def num_features(self):
        """Width of the input and output (None only for an instance never initialised)."""
        return None if self._n_in < 0 else self._n_in

    def _alloc_scratch(self, dt):
        check_self(self, BatchNorm)
        n = self._n_in
        self._mean_t = np.zeros(n, dtype=dt)
        self._scale_t = np.zeros(n, dtype=dt)
        self._shift_t = np.zeros(n, dtype=dt)
        self._a_t = np.zeros(n, dtype=dt)
        self._b_t = np.zeros(n, dtype=dt)
        self._c_t = np.zeros(n, dtype=dt)

    def reset_parameters(self, rng=None):
        """gamma = 1, beta = 0, running_mean = 0, running_var = 1 (no randomness)."""
        check_self(self, BatchNorm)
        self._check_built()
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1

    cpdef dict params(self):
        check_self(self, BatchNorm)
        self._check_built()
        return {"gamma": self.gamma, "beta": self.beta}

    cpdef dict grads(self):
        check_self(self, BatchNorm)
        self._check_built()
        return {"gamma": self.dgamma, "beta": self.dbeta}

    cpdef dict buffers(self):
        check_self(self, BatchNorm)
        self._check_built()
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    cpdef dict config(self):
        check_self(self, BatchNorm)
        self._check_built()
        return {"num_features": self._n_in, "momentum": self.momentum, "eps": self.eps}

    cpdef object to_dtype(self, object dtype):
        check_self(self, BatchNorm)
        self._check_built()
        dt = np.dtype(dtype)
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64, got {dt}")
        # the layer is not runnable while its arrays are of mixed dtypes
        self._flags &= ~LAYER_BUILT
        self._set_dtype(dt)
        self.gamma = np.ascontiguousarray(self.gamma, dtype=dt)
        self.beta = np.ascontiguousarray(self.beta, dtype=dt)
        self.dgamma = np.ascontiguousarray(self.dgamma, dtype=dt)
        self.dbeta = np.ascontiguousarray(self.dbeta, dtype=dt)
        self.running_mean = np.ascontiguousarray(self.running_mean, dtype=dt)
        self.running_var = np.ascontiguousarray(self.running_var, dtype=dt)
        self._alloc_scratch(dt)
        self._X = None
        self._rows = -1
        self._Y_train = self._Y_eval = self._dX = self._Xcopy = None
        self._flags |= LAYER_BUILT
        return self

    cdef int _forward_into(self, cnp.ndarray Xa, bint training, cnp.ndarray Y,
                           bint sig) except -1:
        # batch statistics (training) or running statistics (eval), then the affine
        # pass into Y, followed by the sigmoid in the same sweep when sig is set.
        # NOTE: every array is taken into a local (another thread may replace the
        # layer's arrays while the kernels run without the GIL) and checked against
        # the C width and dtype after the last Python call.
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t count = n
        cdef bint local = not self._reduce
        if training and not local:
            # the statistics of the global batch (Python: the communicator), before
            # the locals below are taken and checked
            count = self._reduced_statistics(Xa)
        cdef Py_ssize_t f = self._n_in
        cdef int t = self._typenum
        cdef double momentum = self.momentum, eps = self.eps
        cdef cnp.ndarray gamma = self.gamma, beta = self.beta
        cdef cnp.ndarray rmean = self.running_mean, rvar = self.running_var
        cdef cnp.ndarray mean = self._mean, var = self._var, invstd = self._invstd
        cdef cnp.ndarray mean_t = self._mean_t, scale_t = self._scale_t
        cdef cnp.ndarray shift_t = self._shift_t
        check_array(self, Xa, "input", n, f, t, False)
        check_array(self, Y, "output buffer", n, f, t, True)
        check_array(self, gamma, "gamma", f, -1, t, False)
        check_array(self, beta, "beta", f, -1, t, False)
        check_array(self, rmean, "running_mean", f, -1, t, training)
        check_array(self, rvar, "running_var", f, -1, t, training)
        check_array(self, mean, "batch mean", f, -1, cnp.NPY_FLOAT64, True)
        check_array(self, var, "batch variance", f, -1, cnp.NPY_FLOAT64, True)
        check_array(self, invstd, "batch invstd", f, -1, cnp.NPY_FLOAT64, True)
        check_array(self, mean_t, "batch mean", f, -1, t, True)
        check_array(self, scale_t, "scale", f, -1, t, True)
        if training:
            self._count = count
        check_array(self, shift_t, "shift", f, -1, t, True)
        cdef void* x = cnp.PyArray_DATA(Xa)
        cdef void* y = cnp.PyArray_DATA(Y)
        cdef double* m = <double*>cnp.PyArray_DATA(mean)
        cdef double* v = <double*>cnp.PyArray_DATA(var)
        cdef double* istd = <double*>cnp.PyArray_DATA(invstd)
        cdef void* pg = _data(gamma)
        cdef void* pb = _data(beta)
        cdef void* prm = _data(rmean)
        cdef void* prv = _data(rvar)
        cdef void* pmt = _data(mean_t)
        cdef void* psc = _data(scale_t)
        cdef void* psh = _data(shift_t)
        cdef _RowJob job
        job.x = x
        job.out = y
        job.p1 = psc
        job.f = f
        job.sig = sig
        cdef _ColJob cjob
        cjob.x = x
        cjob.m = m
        cjob.v = v
        cjob.n = n
        cjob.f = f
        cdef bint dbl = t != cnp.NPY_FLOAT32
        cdef int kind = _affine_kind(t, sig)
        if n * f >= _NOGIL_MIN:
            with nogil:
                _forward_run(dbl, training, local, &cjob, &job, kind, n, f, count, momentum,
                             eps, m, v, istd, pg, pb, psc, pmt, psh, prm, prv)
        else:
            _forward_run(dbl, training, local, &cjob, &job, kind, n, f, count, momentum, eps,
                         m, v, istd, pg, pb, psc, pmt, psh, prm, prv)
        return 0

    cdef int _check_train_batch(self, cnp.ndarray Xa) except -1:
        # NOTE: with reduced statistics a rank may hold a single row: the global
        # batch is checked once its size is known (_reduced_statistics)
        if not self._reduce and cnp.PyArray_DIM(Xa, 0) < 2:
            raise ValueError(
                f"{self!r}: training needs more than 1 sample per batch to compute "
                f"a batch variance, got shape {(<object>Xa).shape} dtype {Xa.dtype}"
            )
        return 0

    # ------------------------------------------------ statistics over several ranks
    cdef int _allreduce(self, cnp.ndarray buf, str what) except -1:
        # sum the float64 buf over every process taking part, in place; one process
        # here (SyncBatchNorm asks its communicator)
        return 0

    cdef Py_ssize_t _reduced_statistics(self, cnp.ndarray Xa) except -1:
        # self._mean, self._var (float64) of the global batch; returns its row count.
        # NOTE: _allreduce runs Python code (a user's communicator): every array is
        # checked again after it, before a kernel touches it.
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = self._n_in
        cdef int t = self._typenum
        self._msg_stats = _message(self._msg_stats, f + 1)
        self._msg_sums = _message(self._msg_sums, 2 * f)
        cdef cnp.ndarray stats = self._msg_stats, sums = self._msg_sums
        cdef cnp.ndarray mean = self._mean, var = self._var
        check_array(self, Xa, "input", n, f, t, False)
        check_array(self, stats, "statistics message", f + 1, -1, cnp.NPY_FLOAT64, True)
        check_array(self, sums, "sums message", 2 * f, -1, cnp.NPY_FLOAT64, True)
        cdef void* x = cnp.PyArray_DATA(Xa)
        cdef double* st = <double*>cnp.PyArray_DATA(stats)
        cdef double* sm = <double*>cnp.PyArray_DATA(sums)
        with nogil:
            st[0] = <double>n
            if t == cnp.NPY_FLOAT32:
                nnrt_bn_moments_f(<float*>x, n, f, NULL, st + 1, sm)
            else:
                nnrt_bn_moments_d(<double*>x, n, f, NULL, st + 1, sm)
        self._allreduce(stats, "forward: batch size and sum")
        check_array(self, stats, "statistics message", f + 1, -1, cnp.NPY_FLOAT64, False)
        cdef double total = (<double*>cnp.PyArray_DATA(stats))[0]
        if not (total >= 2):
            # NaN too: a communicator that returned garbage
            raise ValueError(
                f"{self!r}: training needs more than 1 sample per global batch to compute "
                f"a batch variance, got {total:g} (local shape {(<object>Xa).shape} "
                f"dtype {Xa.dtype})"
            )
        if not (total <= 4.0e15 and total == <double>(<Py_ssize_t>total)):
            raise RuntimeError(
                f"{self!r}: the communicator summed the batch sizes to {total!r}, not a "
                f"whole number of rows"
            )
        cdef Py_ssize_t N = <Py_ssize_t>total
        check_array(self, Xa, "input", n, f, t, False)
        check_array(self, sums, "sums message", 2 * f, -1, cnp.NPY_FLOAT64, True)
        check_array(self, mean, "batch mean", f, -1, cnp.NPY_FLOAT64, True)
        x = cnp.PyArray_DATA(Xa)
        st = <double*>cnp.PyArray_DATA(stats)
        sm = <double*>cnp.PyArray_DATA(sums)
        cdef double* m = <double*>cnp.PyArray_DATA(mean)
        cdef Py_ssize_t j
        with nogil:
            for j in range(f):
                m[j] = st[1 + j] / total
            # deviations from the first estimate of the mean
            if t == cnp.NPY_FLOAT32:
                nnrt_bn_moments_f(<float*>x, n, f, m, sm, sm + f)
            else:
                nnrt_bn_moments_d(<double*>x, n, f, m, sm, sm + f)
        self._allreduce(sums, "forward: sums of deviations")
        check_array(self, sums, "sums message", 2 * f, -1, cnp.NPY_FLOAT64, False)
        check_array(self, mean, "batch mean", f, -1, cnp.NPY_FLOAT64, True)
        check_array(self, var, "batch variance", f, -1, cnp.NPY_FLOAT64, True)
        sm = <double*>cnp.PyArray_DATA(sums)
        m = <double*>cnp.PyArray_DATA(mean)
        cdef double* v = <double*>cnp.PyArray_DATA(var)
        cdef double d
        with nogil:
            for j in range(f):
                d = sm[j] / total
                v[j] = sm[f + j] / total - d * d
                if not (v[j] >= 0):
                    v[j] = 0
                m[j] = m[j] + d
        return N

    cpdef object forward(self, object X, bint training=False):
        check_self(self, BatchNorm)
        return self._forward_from(X, training, False)

    cdef object _forward_from(self, object X, bint training, bint trusted):
        self._check_built()
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = self._n_in
        cdef cnp.ndarray Y, Xc
        if training:
            self._check_train_batch(Xa)
            Xc = cache_input(X, Xa, self._Xcopy, trusted)
            if Xc is not Xa:
                self._Xcopy = Xc
            # the cached X must survive this forward: never write Y over it
            Y = reuse_buffer(unaliased(self._Y_train, Xa), n, f, self._typenum)
            self._Y_train = Y
            self._X = Xc
            self._rows = n
        else:
            Y = reuse_buffer(unaliased(self._Y_eval, Xa), n, f, self._typenum)
            self._Y_eval = Y
        self._forward_into(Xa, training, Y, False)
        return Y

    cdef int _backward_into(self, cnp.ndarray X, cnp.ndarray dYa, cnp.ndarray S,
                            cnp.ndarray dX) except -1:
        # two sweeps: float64 sums, then dX; with S (a following sigmoid's cached
        # output) dYa is the gradient of the sigmoid's output instead of this layer's.
        # dbeta = sum dy; dgamma = sum dy * xhat = invstd * sum dy (x - mean);
        # dx = a dy + c (x - mean) + b with a = gamma invstd, b = -a mean(dy),
        # c = -a invstd mean(dy xhat). NOTE: the sums pass centred x on mean_t (the
        # dtype-rounded mean): sum dy (x - mean) = sum dy (x - mean_t) + (mean_t - mean) sum dy
        if not self._reduce:
            return self._backward_pass(X, dYa, S, dX, 0)
        # NOTE: dgamma/dbeta are this rank's share (from its own sums): the trainer's
        # gradient allreduce adds the shares up; dx needs the sums of the global batch
        self._msg_sums = _message(self._msg_sums, 2 * self._n_in)
        self._backward_pass(X, dYa, S, dX, 1)
        self._allreduce(self._msg_sums, "backward: sums of dy and dy*xhat")
        return self._backward_pass(X, dYa, S, dX, 2)

    cdef int _backward_pass(self, cnp.ndarray X, cnp.ndarray dYa, cnp.ndarray S,
                            cnp.ndarray dX, int phase) except -1:
        # phase 0: the whole backward on this process's rows; with reduced statistics
        # phase 1 writes the sums (into the message) and this rank's dgamma/dbeta,
        # phase 2 dx from the (reduced) sums in the message.
        cdef Py_ssize_t n = self._rows
        cdef Py_ssize_t count = n if phase == 0 else self._count
        cdef Py_ssize_t f = self._n_in
        cdef int t = self._typenum
        cdef cnp.ndarray gamma = self.gamma, dgamma = self.dgamma, dbeta = self.dbeta
        cdef cnp.ndarray mean = self._mean, invstd = self._invstd
        cdef cnp.ndarray acc1 = self._acc1, acc2 = self._acc2, sums = self._msg_sums
        cdef cnp.ndarray mean_t = self._mean_t, a_t = self._a_t, b_t = self._b_t
        cdef cnp.ndarray c_t = self._c_t
        if count < 2:
            raise self._no_forward_error()
        check_array(self, X, "cached input (of the last training forward)", n, f, t, False)
        check_array(self, dYa, "gradient", n, f, t, False)
        if S is not None:
            check_array(self, S, "following sigmoid's cached output", n, f, t, False)
        check_array(self, dX, "input-gradient buffer", n, f, t, True)
        check_array(self, gamma, "gamma", f, -1, t, False)
        check_array(self, dgamma, "gamma gradient", f, -1, t, True)
        check_array(self, dbeta, "beta gradient", f, -1, t, True)
        check_array(self, mean, "batch mean", f, -1, cnp.NPY_FLOAT64, False)
        check_array(self, invstd, "batch invstd", f, -1, cnp.NPY_FLOAT64, False)
        check_array(self, mean_t, "batch mean", f, -1, t, False)
        check_array(self, a_t, "scratch", f, -1, t, True)
        check_array(self, b_t, "scratch", f, -1, t, True)
        check_array(self, c_t, "scratch", f, -1, t, True)
        cdef double* s1
        cdef double* s2
        if phase == 0:
            check_array(self, acc1, "accumulator", f, -1, cnp.NPY_FLOAT64, True)
            check_array(self, acc2, "accumulator", f, -1, cnp.NPY_FLOAT64, True)
            s1 = <double*>cnp.PyArray_DATA(acc1)
            s2 = <double*>cnp.PyArray_DATA(acc2)
        else:
            check_array(self, sums, "sums message", 2 * f, -1, cnp.NPY_FLOAT64, True)
            s1 = <double*>cnp.PyArray_DATA(sums)
            s2 = s1 + f
        cdef void* x = cnp.PyArray_DATA(X)
        cdef void* dy = cnp.PyArray_DATA(dYa)
        cdef void* sp = _data(S)
        cdef void* dx = cnp.PyArray_DATA(dX)
        cdef double* m = <double*>cnp.PyArray_DATA(mean)
        cdef double* istd = <double*>cnp.PyArray_DATA(invstd)
        cdef void* pmt = _data(mean_t)
        cdef void* pg = _data(gamma)
        # phase 2: the parameter gradients were written in phase 1
        cdef void* pdg = _data(dgamma) if phase != 2 else NULL
        cdef void* pdb = _data(dbeta) if phase != 2 else NULL
        cdef void* pa = _data(a_t)
        cdef void* pbb = _data(b_t)
        cdef void* pc = _data(c_t)
        # dx = a dz + c (x - mean_t) + b: center mean_t, p1 a, p2 b, p3 c
        cdef _RowJob job
        job.x = x
        job.dy = dy
        job.s = sp
        job.out = dx
        job.center = pmt
        job.p1 = pa
        job.p2 = pbb
        job.p3 = pc
        job.f = f
        job.sig = 0
        cdef _ColJob cjob
        cjob.x = x
        cjob.dy = dy
        cjob.s = sp
        cjob.center = pmt
        cjob.m = s1
        cjob.v = s2
        cjob.n = n
        cjob.f = f
        cdef bint dbl = t != cnp.NPY_FLOAT32
        if n * f >= _NOGIL_MIN:
            with nogil:
                _backward_run(dbl, phase, &cjob, &job, n, f, count, m, istd, s1, s2, pmt, pg,
                              pdg, pdb, pa, pbb, pc)
        else:
            _backward_run(dbl, phase, &cjob, &job, n, f, count, m, istd, s1, s2, pmt, pg, pdg,
                          pdb, pa, pbb, pc)
        return 0

    cdef cnp.ndarray _grad_for_kernel(self, object dY):
        # dY as a (rows, f) array of the dtype recorded at forward; a copy when it
        # shares memory with a gradient the kernel writes (e.g. a view of dbeta)
        cdef cnp.ndarray dYa = grad_as(self, dY, self._rows, self._n_in, self._typenum)
        if overlaps(dYa, self.dgamma) or overlaps(dYa, self.dbeta):
            dYa = dYa.copy()
        return dYa

    cpdef object backward(self, object dY):
        check_self(self, BatchNorm)
        self._check_built()
        if self._rows < 0 or self._X is None:
            raise self._no_forward_error()
        cdef cnp.ndarray X = self._X
        cdef cnp.ndarray dYa = self._grad_for_kernel(dY)
        cdef cnp.ndarray dX = reuse_buffer(unaliased(self._dX, dYa), self._rows,
                                           self._n_in, self._typenum)
        self._dX = dX
        self._backward_into(X, dYa, None, dX)
        return dX

    def _nnrt_eval_affine(self):
        """``(center, scale, shift)``: the eval forward is ``(x - center) * scale + shift``
        per feature (running statistics), arrays of the layer's width and dtype.

        Eval-chain protocol (nnrt/_kernels.pyx): the dense layer before this one applies
        it in its own output pass. Computed from the current gamma and running variance
        on every call (never cached: they may be changed in place); the arrays are the
        live running_mean and beta and the layer's scale scratch, which the caller
        checks again before its kernel reads them.
        """
        check_self(self, BatchNorm)
        self._check_built()
        cdef Py_ssize_t f = self._n_in
        cdef int t = self._typenum
        cdef cnp.ndarray gamma = self.gamma, beta = self.beta
        cdef cnp.ndarray rmean = self.running_mean, rvar = self.running_var
        cdef cnp.ndarray scale_t = self._scale_t
        check_array(self, gamma, "gamma", f, -1, t, False)
        check_array(self, beta, "beta", f, -1, t, False)
        check_array(self, rmean, "running_mean", f, -1, t, False)
        check_array(self, rvar, "running_var", f, -1, t, False)
        check_array(self, scale_t, "scale", f, -1, t, True)
        if t == cnp.NPY_FLOAT32:
            nnrt_bn_fold_eval_f(f, self.eps, <float*>cnp.PyArray_DATA(gamma),
                                <float*>cnp.PyArray_DATA(rvar), <float*>cnp.PyArray_DATA(scale_t))
        else:
            nnrt_bn_fold_eval_d(f, self.eps, <double*>cnp.PyArray_DATA(gamma),
                                <double*>cnp.PyArray_DATA(rvar),
                                <double*>cnp.PyArray_DATA(scale_t))
        return (rmean, scale_t, beta)

    # --------------------------------------------- fused batchnorm -> sigmoid
    # nnrt.hookspecs.FusablePair: the plugin's nnrt_fuse_pair hook (batchnorm.py)
    # asks Sequential's compiled loop to run a BatchNorm followed by a Sigmoid through
    # these two methods. Both layers' caches are kept as the separate calls would
    # leave them (this layer's input and statistics, the sigmoid's output), so either
    # layer's own backward still works; only this layer's output buffer (the
    # sigmoid's input) is not written.
    def _nnrt_forward_pair(self, object X, bint training, Layer nxt, bint trusted=False):
        """``nxt.forward(self.forward(X, training), training)`` in one sweep."""
        check_self(self, BatchNorm)
        self._check_built()
        if (type(nxt) is not Sigmoid or nxt._typenum != self._typenum
                or self._typenum < 0):
            return nxt.forward(self._forward_from(X, training, trusted), training)
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t n = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t f = self._n_in
        cdef cnp.ndarray S, Xc
        if training:
            self._check_train_batch(Xa)
            Xc = cache_input(X, Xa, self._Xcopy, trusted)
            if Xc is not Xa:
                self._Xcopy = Xc
            S = _output_buffer(nxt, True, Xa, n, f, self._typenum)
            self._X = Xc
            self._rows = n
        else:
            S = _output_buffer(nxt, False, Xa, n, f, self._typenum)
        self._forward_into(Xa, training, S, True)
        return S

    def _nnrt_backward_pair(self, object dS, Layer nxt):
        """``self.backward(nxt.backward(dS))`` in two sweeps, without the middle array."""
        check_self(self, BatchNorm)
        self._check_built()
        S_obj = nxt._S_train if type(nxt) is Sigmoid else None
        if (S_obj is None or self._X is None or self._rows < 0
                or nxt._typenum != self._typenum
                or not isinstance(S_obj, cnp.ndarray)
                or (<object>S_obj).shape != (self._rows, self._n_in)
                or cnp.PyArray_TYPE(<cnp.ndarray>S_obj) != self._typenum):
            return self.backward(nxt.backward(dS))
        cdef cnp.ndarray S = <cnp.ndarray>S_obj
        cdef cnp.ndarray X = self._X
        cdef cnp.ndarray dSa = self._grad_for_kernel(dS)
        cdef cnp.ndarray dX = reuse_buffer(unaliased(unaliased(self._dX, dSa), S), self._rows,
                                           self._n_in, self._typenum)
        self._dX = dX
        self._backward_into(X, dSa, S, dX)
        return dX


cdef class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks
    (registry name ``sync_batchnorm``; as ``torch.nn.SyncBatchNorm``).

    The same layer as ``batchnorm`` (constructor, parameters, buffers, eval, the
    kernels) but for the reduction of its statistics: in training, per feature
    and in float64, the mean and biased variance are those of the rows of every
    rank together (running_var gets the unbiased variance over them), and
    backward goes through those global statistics; ``dgamma``/``dbeta`` are
    this rank's share (the trainer's gradient allreduce adds the shares up).
    Three small allreduces per step: two forward, one backward.

    ``comm`` is the communicator (``None``: ``nnrt.distributed.default_communicator()``
    at the first training forward, a one-rank no-op outside MPI): any object
    whose ``allreduce_sum(buf, what)`` sums a float64 buffer over the ranks in
    place. The layer declares ``uses_communicator = True``, so the trainer's
    ``nnrt.distributed.GradientAllreduce`` sets ``comm`` to its own, leaves the
    running statistics (identical on every rank) out of its buffer averaging and
    asks for two rows per global batch (not per rank). Every rank must call
    forward/backward in step with the others. A global batch of one sample
    raises ValueError on every rank. Never fused with a following sigmoid.
    """

    uses_communicator = True

    cdef public object comm

    def __cinit__(self, *args, **kwargs):
        self._reduce = True

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        BatchNorm.__init__(self, num_features, momentum, eps)
        self.comm = None

    cdef int _allreduce(self, cnp.ndarray buf, str what) except -1:
        comm = self.comm
        if comm is None:
            from nnrt.distributed import default_communicator

            comm = self.comm = default_communicator()
        comm.allreduce_sum(buf, what=f"{self!r} {what}")
        return 0
