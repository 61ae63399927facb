# cython: language_level=3
"""Core fully connected layer: Y = X @ W + b.

Derivation (docs/derivations.md):
  dW = X.T @ dY          each sample adds its outer product x_i^T dy_i
  db = dY.sum(axis=0)    the bias's local derivative is a ones vector
  dX = dY @ W.T
GEMMs run through nnrt/blas.pxd's gemm_rm (the BLAS backend nnrt/_blas.pyx chose)
with the GIL released; the bias is added by seeding the output with b and calling
GEMM with beta = 1.
The kernels index with Py_ssize_t; every array they touch has fewer than 2^31
elements, so each BLAS (int) dimension fits. Sizes come from the C fields
_n_in/_n_out and the batch recorded at forward, never from an array Python can
reshape (see nnrt/layer.pyx).
"""

import numpy as np
cimport numpy as cnp
from libc.string cimport memcpy

from cython cimport floating

from nnrt.blas cimport gemm_rm
from nnrt._parallel cimport (PAR_STREAM, blas_threads_done, blas_threads_for, par_fn, par_for,
                             par_now)
from nnrt.layer cimport (LAYER_BUILT, LAYER_FROZEN, Layer, cache_input, check_array, check_self,
                         grad_as, overlaps, reuse_buffer, unaliased)

cnp.import_array()

# Largest element count of an array a Dense kernel touches (inputs are held to the
# same by Layer.prepare_input): every BLAS dimension and leading dimension then
# fits a C int.
cdef Py_ssize_t _MAX_ELEMENTS = 2147483647
cdef Py_ssize_t _MAX_WEIGHT = 2147483647


def _describe(X):
    if isinstance(X, np.ndarray):
        return f"input of shape {X.shape}"
    return "this input"


cdef void dense_forward(const floating* X, const floating* W, const floating* b,
                        floating* Y, Py_ssize_t batch, Py_ssize_t n_in, Py_ssize_t n_out,
                        bint use_bias) noexcept nogil:
    # NOTE: index arithmetic in Py_ssize_t (batch * n_out passes 2^31 long before
    # memory runs out); BLAS dims are int, and each one fits (checked at the boundary)
    cdef Py_ssize_t i
    cdef floating beta = 0
    if use_bias:
        # Y starts as b broadcast over rows; GEMM then adds X @ W into it.
        for i in range(batch):
            memcpy(&Y[i * n_out], b, n_out * sizeof(floating))
        beta = 1
    gemm_rm(False, False, <int>batch, <int>n_out, <int>n_in, 1, X, <int>n_in, W, <int>n_out,
            beta, Y, <int>n_out)


# db = dY.sum(axis=0) over a range of columns, for nnrt._parallel.par_for (columns on
# two threads above a size threshold; each column summed in row order: bit-identical)
ctypedef struct _DbJob:
    const void* dY
    void* db
    Py_ssize_t batch, n_out


cdef inline void _db_cols(const floating* dY, floating* db, Py_ssize_t batch,
                          Py_ssize_t n_out, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const floating* row
    for j in range(lo, hi):
        db[j] = 0
    for i in range(batch):
        row = &dY[i * n_out]
        for j in range(lo, hi):
            db[j] += row[j]


cdef void _db_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _DbJob* j = <_DbJob*>ctx
    _db_cols(<const float*>j.dY, <float*>j.db, j.batch, j.n_out, lo, hi)


cdef void _db_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _DbJob* j = <_DbJob*>ctx
    _db_cols(<const double*>j.dY, <double*>j.db, j.batch, j.n_out, lo, hi)


cdef void dense_backward(const floating* X, const floating* W, const floating* dY,
                         floating* dX, floating* dW, floating* db,
                         Py_ssize_t batch, Py_ssize_t n_in, Py_ssize_t n_out,
                         bint use_bias) noexcept nogil:
    cdef _DbJob job
    # dW = X.T @ dY  (overwrites: beta = 0)
    gemm_rm(True, False, <int>n_in, <int>n_out, <int>batch, 1, X, <int>n_in, dY, <int>n_out,
            0, dW, <int>n_out)
    if use_bias:
        # NOTE: db sums dY over the batch axis: every sample adds to the same bias.
        job.dY = dY
        job.db = db
        job.batch = batch
        job.n_out = n_out
        par_for(PAR_STREAM, <par_fn>(_db_f if floating is float else _db_d), &job, n_out,
                batch)
    if dX != NULL:
        # dX = dY @ W.T
        gemm_rm(False, True, <int>batch, <int>n_in, <int>n_out, 1, dY, <int>n_out, W,
                <int>n_out, 0, dX, <int>n_in)


cdef void _forward_any(bint dbl, void* X, void* W, void* b, void* Y, Py_ssize_t rows,
                       Py_ssize_t n_in, Py_ssize_t n_out, bint use_bias) noexcept nogil:
    # dense_forward for the layer's dtype (float64 when dbl), on validated pointers
    if dbl:
        dense_forward(<double*>X, <double*>W, <double*>b, <double*>Y, rows, n_in, n_out,
                      use_bias)
    else:
        dense_forward(<float*>X, <float*>W, <float*>b, <float*>Y, rows, n_in, n_out,
                      use_bias)


cdef void _backward_any(bint dbl, void* X, void* W, void* dY, void* dX, void* dW, void* db,
                        Py_ssize_t rows, Py_ssize_t n_in, Py_ssize_t n_out,
                        bint use_bias) noexcept nogil:
    # dense_backward for the layer's dtype; dX NULL: no input gradient
    if dbl:
        dense_backward(<double*>X, <double*>W, <double*>dY, <double*>dX, <double*>dW,
                       <double*>db, rows, n_in, n_out, use_bias)
    else:
        dense_backward(<float*>X, <float*>W, <float*>dY, <float*>dX, <float*>dW,
                       <float*>db, rows, n_in, n_out, use_bias)


# ------------------------------------------------------------- eval forward
# NOTE: at a batch of a few rows a BLAS GEMM spends most of its time packing W (the
# whole weight matrix, on every call); nnrt/_smallm.h reads W in place, and so does
# nnrt/_eval.h's kernel for narrow outputs (fewer than 32 columns). Which one runs depends
# on the layer (its width, the CPU), never on the batch size, so a row's result is the
# same whatever batch it comes in. The bias, and the per-feature affine and sigmoid of the
# layers that follow (when the eval chain fuses them, nnrt/_kernels.pyx), are then
# applied by nnrt/_eval.h's epilogue to the rows a thread computed, with the bits of the
# layers run one by one.
from nnrt._smallm cimport (nnrt_aligned_alloc, nnrt_aligned_free, nnrt_aligned_ld,
                           nnrt_gemm_s_d, nnrt_gemm_s_f, nnrt_smallm_d, nnrt_smallm_enabled,
                           nnrt_smallm_f, nnrt_smallm_isa_name)

# Kernel choice of the eval forward: 0 by layer shape (below), 1 always GEMM, 2 always
# the small-M kernel (tests and benchmarks force them).
cdef int _eval_mode = 0
# NOTE: the choice depends on the layer, never on the batch size: a row's result must
# not depend on the batch it came in (predict in batches == one forward, bit for bit).
# The small-M kernel serves layers at least _SMALL_M_MIN_COLS wide and a multiple of 8
# (its last few columns otherwise run as scalars, slower than GEMM) on CPUs where it
# beats GEMM at every batch measured (AVX-512: nnrt/_smallm.h); GEMM otherwise.
cdef bint _SMALL_M_ON = nnrt_smallm_enabled() != 0
cdef Py_ssize_t _SMALL_M_MIN_COLS = 32
SMALL_M_ISA = nnrt_smallm_isa_name().decode()
SMALL_M_ENABLED = bool(_SMALL_M_ON)
# Below this many multiply-adds the kernel runs without releasing the GIL (releasing
# and taking it back costs more than the work).
cdef Py_ssize_t _NOGIL_MIN = 32768
# the training forward and backward release the GIL from this many multiply-adds (about
# 1 us of work; below, releasing and taking it back, ~70 ns a call, is a few % of a tiny
# network's step: 3-4 % of tiny's 20 us step went to the GIL's mutex)
cdef Py_ssize_t _TRAIN_NOGIL_MIN = 262144

# depth of the small-M kernel's blocks of k (0: by the layer's width, nnrt/_smallm.h)
cdef Py_ssize_t _small_m_kc = 0

EVAL_ACT_NONE = 0
EVAL_ACT_SIGMOID = 1


def _set_small_m_block(Py_ssize_t kc):
    """Depth of the small-M kernel's blocks of k; 0 picks it by the width (tuning)."""
    global _small_m_kc
    if kc < 0:
        raise ValueError(f"block depth must be >= 0, got {kc}")
    _small_m_kc = kc


def _set_eval_kernel(str mode):
    """Force the eval forward's kernel: "auto", "gemm" or "small" (tests, benchmarks)."""
    global _eval_mode
    modes = {"auto": 0, "gemm": 1, "small": 2}
    if mode not in modes:
        raise ValueError(f"eval kernel must be one of {sorted(modes)}, got {mode!r}")
    _eval_mode = modes[mode]


cdef extern from "nnrt/_packed.h" nogil:
    void nnrt_rows_cols_f(const float* X, const float* W, float* Y, Py_ssize_t m,
                          Py_ssize_t k, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1)
    void nnrt_rows_cols_d(const double* X, const double* W, double* Y, Py_ssize_t m,
                          Py_ssize_t k, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1)
    int nnrt_rows_cols_ok()

# two threads, from _SPLIT_MIN_ROWS rows on: the small-M kernel's columns split in chunks
# over nnrt's helper thread (par_for, "stream" kind; a chunk's work counted as the
# multiply-adds in eighths, as the frozen session's panels, nnrt/_serve.pyx); every
# column computed by the same chain of fused multiply-adds on either thread: the same
# bits. Not below: a few rows are bound by reading W, and a range of columns reads
# every row of a row-major W in short pieces, a page apart (measured on AMD Zen 5 with
# two threads: one row of 784 x 512 31 -> 41 us, of 1024 x 1024 x 3 150 -> 420 us);
# a frozen session, which packs W in column panels, does split those.
cdef bint _SPLIT_ON = nnrt_rows_cols_ok() != 0
cdef Py_ssize_t _SPLIT_MIN_ROWS = 16
# 2.._ROWS_MAX rows of a W larger than _ROWS_MIN_BYTES (beyond L2) stream W in order
# (nnrt_rows_cols in nnrt/_packed.h; the same sums as the small-M kernel). Measured on
# AMD Zen 5, one thread, float32, against the blocked small-M kernel: 784 x 512 at 2
# and 4 rows 17.1 / 19.8 and 16.9 / 22.6 us, 1024 x 1024 (in L3) at 4 rows 58 / 93 us;
# at 6 and 8 rows (W read 2 rows at a time) as slow or slower: 32.5 / 32.3, 38.8 / 32.0.
cdef Py_ssize_t _ROWS_MAX = 4
cdef Py_ssize_t _ROWS_MIN_BYTES = 524288


cdef extern from "nnrt/_eval.h" nogil:
    void nnrt_ev_epilogue_f(const float* S, Py_ssize_t lds, float* Y, Py_ssize_t ldy,
                            Py_ssize_t m, Py_ssize_t w, const float* bias,
                            const float* center, const float* scale, const float* shift,
                            int act)
    void nnrt_ev_epilogue_d(const double* S, Py_ssize_t lds, double* Y, Py_ssize_t ldy,
                            Py_ssize_t m, Py_ssize_t w, const double* bias,
                            const double* center, const double* scale, const double* shift,
                            int act)
    void nnrt_ev_narrow_f(const float* X, const float* W, float* Y, Py_ssize_t m,
                          Py_ssize_t k, Py_ssize_t n)
    void nnrt_ev_narrow_d(const double* X, const double* W, double* Y, Py_ssize_t m,
                          Py_ssize_t k, Py_ssize_t n)
    int nnrt_ev_narrow_ok()
    int nnrt_copy_pays(const void* W, Py_ssize_t ldw, size_t elsize, Py_ssize_t m,
                       Py_ssize_t k, Py_ssize_t n)

# two threads, from _SPLIT_ROWS_MIN rows on: the rows in _SPLIT_ROW_PIECES pieces of whole
# 8-row blocks (claimed one at a time by either thread), each piece its GEMM and then its
# epilogue, so the epilogue is split with the GEMM. Rows, not columns, as the training
# GEMM route (nnrt/_blas.pyx): a piece of rows keeps the kernel's full-width column
# panels and an aligned copy of W made once for all pieces; a piece of columns re-reads
# all of X and runs narrower panels. Measured on AMD Zen 5 (AVX-512), float32, two
# threads: docs/performance.md "Where the time goes". Below it, columns (few rows are
# bound by reading W, which a split of columns shares between the cores' caches).
cdef Py_ssize_t _SPLIT_ROWS_MIN = 32
cdef Py_ssize_t _SPLIT_ROW_PIECES = 4
# narrow outputs (fewer than _SMALL_M_MIN_COLS columns, e.g. a 10-class head): nnrt/_eval.h's
# masked-vector kernel (W read in place) where it runs, on CPUs where the small-M kernel
# serves; the BLAS GEMM otherwise
cdef bint _NARROW_ON = _SMALL_M_ON and nnrt_ev_narrow_ok() != 0


def _set_eval_split(Py_ssize_t rows_min=-1, Py_ssize_t pieces=-1):
    """Rows from which two threads split the eval GEMM by rows, and into how many pieces
    (measurements); -1 leaves a value; returns the previous ``(rows_min, pieces)``."""
    global _SPLIT_ROWS_MIN, _SPLIT_ROW_PIECES
    old = (_SPLIT_ROWS_MIN, _SPLIT_ROW_PIECES)
    if pieces != -1 and not 2 <= pieces <= 64:
        raise ValueError(f"pieces must be in [2, 64], got {pieces}")
    if rows_min != -1:
        if rows_min < 16:
            raise ValueError(f"rows_min must be >= 16, got {rows_min}")
        _SPLIT_ROWS_MIN = rows_min
    if pieces != -1:
        _SPLIT_ROW_PIECES = pieces
    return old


ctypedef struct _EvalJob:
    const void* X
    const void* W    # the weight the kernel reads: the layer's, an aligned or a padded copy
    void* Y          # the output (m x n)
    const void* b
    const void* center
    const void* scale
    const void* shift
    Py_ssize_t m, k, n
    Py_ssize_t ldw   # W's row stride (n: the layer's own W)
    bint narrow      # nnrt_ev_narrow computes the product
    Py_ssize_t lanes  # columns per unit of a column split (whole vectors)
    Py_ssize_t rows   # rows per unit of a row split (whole 8-row blocks)
    int act


ctypedef struct _CopyJob:
    const char* src  # rows of n bytes, contiguous
    char* dst        # rows ld bytes apart
    Py_ssize_t n, ld


cdef void _copy_rows(void* ctx, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    # rows [r0, r1) of W into the aligned copy (par_for: both threads on a large W)
    cdef _CopyJob* j = <_CopyJob*>ctx
    cdef Py_ssize_t r
    for r in range(r0, r1):
        memcpy(j.dst + r * j.ld, j.src + r * j.n, j.n)


cdef inline void _eval_epilogue(const floating* S, Py_ssize_t lds, floating* Y,
                                Py_ssize_t ldy, Py_ssize_t m, Py_ssize_t w,
                                const floating* b, const floating* c, const floating* sc,
                                const floating* sh, int act) noexcept nogil:
    if floating is float:
        nnrt_ev_epilogue_f(S, lds, Y, ldy, m, w, b, c, sc, sh, act)
    else:
        nnrt_ev_epilogue_d(S, lds, Y, ldy, m, w, b, c, sc, sh, act)


cdef inline void _eval_kernel(const floating* X, const floating* W, Py_ssize_t ldw,
                              floating* Y, Py_ssize_t m, Py_ssize_t k,
                              Py_ssize_t n) noexcept nogil:
    # Y (m x n, row stride n) = X (m x k) @ W (k x n, row stride ldw): the small-M kernel
    # (the same sums whichever entry runs it, nnrt/_smallm.h)
    if ldw == n:
        if floating is float:
            nnrt_smallm_f(X, W, Y, m, k, n, _small_m_kc)
        else:
            nnrt_smallm_d(X, W, Y, m, k, n, _small_m_kc)
    elif floating is float:
        nnrt_gemm_s_f(X, k, 1, W, ldw, Y, n, 0, m, k, n)
    else:
        nnrt_gemm_s_d(X, k, 1, W, ldw, Y, n, 0, m, k, n)


cdef inline void _job_epilogue(_EvalJob* j, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t j0,
                               Py_ssize_t j1, const floating* tag) noexcept nogil:
    # the job's epilogue, in place, on rows [r0, r1) x columns [j0, j1) of its Y (the
    # scale and shift are read only with a center)
    cdef const floating* b = <const floating*>j.b
    cdef const floating* c = <const floating*>j.center
    if b == NULL and c == NULL and j.act == 0:
        return
    cdef floating* Y = <floating*>j.Y + r0 * j.n + j0
    _eval_epilogue(Y, j.n, Y, j.n, r1 - r0, j1 - j0, b + j0 if b != NULL else NULL,
                   c + j0 if c != NULL else NULL,
                   <const floating*>j.scale + j0 if c != NULL else NULL,
                   <const floating*>j.shift + j0 if c != NULL else NULL, j.act)


cdef void _eval_rows(_EvalJob* j, Py_ssize_t u0, Py_ssize_t u1,
                     const floating* tag) noexcept nogil:
    # rows [u0 * rows, u1 * rows) (the last unit ends at m): their GEMM, then their
    # epilogue while they are in L2
    cdef Py_ssize_t r0 = u0 * j.rows, r1 = min(u1 * j.rows, j.m)
    cdef const floating* X = <const floating*>j.X
    cdef const floating* W = <const floating*>j.W
    cdef floating* Y = <floating*>j.Y
    if r0 >= r1:
        return
    if j.narrow:
        if floating is float:
            nnrt_ev_narrow_f(X + r0 * j.k, W, Y + r0 * j.n, r1 - r0, j.k, j.n)
        else:
            nnrt_ev_narrow_d(X + r0 * j.k, W, Y + r0 * j.n, r1 - r0, j.k, j.n)
    else:
        _eval_kernel(X + r0 * j.k, W, j.ldw, Y + r0 * j.n, r1 - r0, j.k, j.n)
    _job_epilogue(j, r0, r1, 0, j.n, tag)


cdef void _eval_rows_f(void* ctx, Py_ssize_t u0, Py_ssize_t u1) noexcept nogil:
    _eval_rows(<_EvalJob*>ctx, u0, u1, <const float*>NULL)


cdef void _eval_rows_d(void* ctx, Py_ssize_t u0, Py_ssize_t u1) noexcept nogil:
    _eval_rows(<_EvalJob*>ctx, u0, u1, <const double*>NULL)


cdef void _eval_cols(_EvalJob* j, Py_ssize_t c0, Py_ssize_t c1,
                     const floating* tag) noexcept nogil:
    # columns [c0 * lanes, c1 * lanes) of every row (the last unit ends at n), then
    # their epilogue
    cdef Py_ssize_t j0 = c0 * j.lanes, j1 = min(c1 * j.lanes, j.n)
    cdef const floating* X = <const floating*>j.X
    cdef const floating* W = <const floating*>j.W
    cdef floating* Y = <floating*>j.Y
    if j0 >= j1:
        return
    # 2-4 rows of a W beyond L2: W streamed in order (nnrt_rows_cols)
    cdef bint stream = (2 <= j.m and j.m <= _ROWS_MAX
                        and j.k * j.n * <Py_ssize_t>sizeof(floating) > _ROWS_MIN_BYTES)
    if j0 == 0 and j1 == j.n and not stream:
        # the whole layer on one thread (par_for did not split)
        _eval_kernel(X, W, j.n, Y, j.m, j.k, j.n)
    elif stream:
        if floating is float:
            nnrt_rows_cols_f(X, W, Y, j.m, j.k, j.n, j0, j1)
        else:
            nnrt_rows_cols_d(X, W, Y, j.m, j.k, j.n, j0, j1)
    elif floating is float:
        nnrt_gemm_s_f(X, j.k, 1, W + j0, j.n, Y + j0, j.n, 0, j.m, j.k, j1 - j0)
    else:
        nnrt_gemm_s_d(X, j.k, 1, W + j0, j.n, Y + j0, j.n, 0, j.m, j.k, j1 - j0)
    _job_epilogue(j, 0, j.m, j0, j1, tag)


cdef void _eval_cols_f(void* ctx, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    _eval_cols(<_EvalJob*>ctx, c0, c1, <const float*>NULL)


cdef void _eval_cols_d(void* ctx, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    _eval_cols(<_EvalJob*>ctx, c0, c1, <const double*>NULL)


cdef void dense_eval(const floating* X, const floating* W, const floating* b,
                     const floating* center, const floating* scale, const floating* shift,
                     int act, floating* Y, Py_ssize_t batch, Py_ssize_t n_in,
                     Py_ssize_t n_out, int mode) noexcept nogil:
    # Y = epilogue(X @ W): + b (b non-NULL), then (y - center) * scale + shift (center
    # non-NULL), then sigmoid (act 1)
    cdef bint small = mode == 2 or (mode == 0 and _SMALL_M_ON and n_out >= _SMALL_M_MIN_COLS
                                    and n_out % 8 == 0)
    # NOTE: by the layer's width only, as `small`: a row's bits never depend on its batch
    cdef bint narrow = mode == 0 and _NARROW_ON and n_out < _SMALL_M_MIN_COLS
    cdef _EvalJob job
    cdef _CopyJob cjob
    cdef Py_ssize_t blocks, units, lanes = 16 if floating is float else 8, ld
    cdef floating* copy = NULL
    cdef par_fn fn
    if not small and not narrow:
        gemm_rm(False, False, <int>batch, <int>n_out, <int>n_in, 1, X, <int>n_in, W,
                <int>n_out, 0, Y, <int>n_out)
        if b != NULL or center != NULL or act != 0:
            _eval_epilogue(Y, n_out, Y, n_out, batch, n_out, b, center, scale, shift, act)
        return
    job.X = X
    job.W = W
    job.Y = Y
    job.b = b
    job.center = center
    job.scale = scale
    job.shift = shift
    job.m = batch
    job.k = n_in
    job.n = n_out
    job.ldw = n_out
    job.narrow = False
    job.lanes = lanes
    job.rows = batch
    job.act = act
    if narrow:
        job.narrow = True
    elif (_SPLIT_ON and batch >= _SPLIT_ROWS_MIN
            and nnrt_copy_pays(W, n_out, sizeof(floating), batch, n_in, n_out)):
        # the aligned copy the kernel would make for these rows (nnrt/_smallm.h), made once
        # here so that every piece of a row split reads it (the same sums)
        ld = nnrt_aligned_ld(n_out, sizeof(floating))
        copy = <floating*>nnrt_aligned_alloc(<size_t>(n_in * ld) * sizeof(floating))
        if copy != NULL:
            cjob.src = <const char*>W
            cjob.dst = <char*>copy
            cjob.n = n_out * sizeof(floating)
            cjob.ld = ld * sizeof(floating)
            par_for(PAR_STREAM, <par_fn>_copy_rows, &cjob, n_in, n_out)  # rows of W
            job.W = copy
            job.ldw = ld
    fn = <par_fn>(_eval_rows_f if floating is float else _eval_rows_d)
    if _SPLIT_ON and batch >= _SPLIT_ROWS_MIN:
        # pieces of whole 8-row blocks, the work of each counted as its multiply-adds in
        # eighths (as the column split below); par_for runs them all on this thread when
        # it does not split
        units = min(_SPLIT_ROW_PIECES, max(1, batch // 8))
        job.rows = ((batch + 7) // 8 + units - 1) // units * 8
        units = (batch + job.rows - 1) // job.rows
        par_for(PAR_STREAM, fn, &job, units, n_in * n_out * (job.rows // 8))
    elif small and _SPLIT_ON and (batch >= _SPLIT_MIN_ROWS or (
            2 <= batch and batch <= _ROWS_MAX
            and n_in * n_out * <Py_ssize_t>sizeof(floating) > _ROWS_MIN_BYTES)):
        fn = <par_fn>(_eval_cols_f if floating is float else _eval_cols_d)
        if batch < _SPLIT_MIN_ROWS:
            # 2-4 rows of a W beyond L2: W streamed in order, on this thread
            job.lanes = n_out
            fn(&job, 0, 1)
        else:
            # chunks of at least 1 KB of every row of W (whole vectors, 2 to 8 chunks,
            # claimed one at a time by either thread)
            blocks = (n_out + lanes - 1) // lanes
            units = min(8, max(2, n_out * <Py_ssize_t>sizeof(floating) // 1024))
            job.lanes *= (blocks + units - 1) // units  # columns per chunk
            units = (n_out + job.lanes - 1) // job.lanes
            # par_for runs the whole range on this thread when it does not split
            par_for(PAR_STREAM, fn, &job, units, n_in * job.lanes * ((batch + 7) // 8))
    else:
        fn(&job, 0, 1)  # every row on this thread
    if copy != NULL:
        nnrt_aligned_free(copy)


cdef inline int _check_output_size(Layer layer, object X, Py_ssize_t rows,
                                   Py_ssize_t n_out) except -1:
    # ValueError (not an allocation of any size) for an output too large for the kernels
    if rows * n_out > _MAX_ELEMENTS:
        raise ValueError(
            f"{layer!r}: the output for {_describe(X)} would have "
            f"{rows * n_out} elements, more than {_MAX_ELEMENTS}"
        )
    return 0


cdef object _eval_run(Dense layer, object X, Layer aff_layer, int act):
    # the eval forward of `layer`, followed by `aff_layer`'s per-feature affine (None:
    # none) and the activation `act`, in one output buffer (the layer's own)
    layer._check_built()
    cdef cnp.ndarray Xa = layer.prepare_input(X)
    cdef Py_ssize_t rows = cnp.PyArray_DIM(Xa, 0)
    cdef Py_ssize_t n_in = layer._n_in, n_out = layer._n_out
    cdef int t = layer._typenum
    _check_output_size(layer, X, rows, n_out)
    cdef cnp.ndarray Y = reuse_buffer(unaliased(layer._Y_eval, Xa), rows, n_out, t)
    layer._Y_eval = Y
    cdef object center = None, scale = None, shift = None
    if aff_layer is not None:
        # computed from the layer's current state on every call (Python code may run)
        aff = aff_layer._nnrt_eval_affine()
        if type(aff) is not tuple or len(<tuple>aff) != 3:
            raise TypeError(
                f"{aff_layer!r}: _nnrt_eval_affine() must return a (center, scale, shift) "
                f"tuple, got {type(aff).__name__}"
            )
        center, scale, shift = <tuple>aff
    # local references: another thread may replace the layer's arrays (to_dtype)
    # while the kernel runs without the GIL
    cdef cnp.ndarray W = layer.W, b = layer.b
    # last checks, after everything that may have run Python code
    layer._check_params(W, b, None, None)
    check_array(layer, Xa, "input", rows, n_in, t, False)
    check_array(layer, Y, "output buffer", rows, n_out, t, True)
    cdef void* pc = NULL
    cdef void* ps = NULL
    cdef void* psh = NULL
    if aff_layer is not None:
        check_array(aff_layer, center, "eval centre", n_out, -1, t, False)
        check_array(aff_layer, scale, "eval scale", n_out, -1, t, False)
        check_array(aff_layer, shift, "eval shift", n_out, -1, t, False)
        pc = cnp.PyArray_DATA(<cnp.ndarray>center)
        ps = cnp.PyArray_DATA(<cnp.ndarray>scale)
        psh = cnp.PyArray_DATA(<cnp.ndarray>shift)
    cdef void* pb = cnp.PyArray_DATA(b) if layer.use_bias else NULL
    cdef void* px = cnp.PyArray_DATA(Xa)
    cdef void* pw = cnp.PyArray_DATA(W)
    cdef void* py = cnp.PyArray_DATA(Y)
    cdef int mode = _eval_mode
    if act != EVAL_ACT_SIGMOID:
        act = EVAL_ACT_NONE
    cdef bint big = rows * n_in * n_out >= _NOGIL_MIN
    # the thread policy (nnrt._parallel) picks the BLAS threads and learns the time
    cdef int policy = blas_threads_for(rows, n_out, n_in, 0)  # as the forward GEMM
    cdef double t0 = par_now()
    if t == cnp.NPY_FLOAT32:
        if big:
            with nogil:
                dense_eval(<float*>px, <float*>pw, <float*>pb, <float*>pc, <float*>ps,
                           <float*>psh, act, <float*>py, rows, n_in, n_out, mode)
        else:
            dense_eval(<float*>px, <float*>pw, <float*>pb, <float*>pc, <float*>ps,
                       <float*>psh, act, <float*>py, rows, n_in, n_out, mode)
    else:
        if big:
            with nogil:
                dense_eval(<double*>px, <double*>pw, <double*>pb, <double*>pc, <double*>ps,
                           <double*>psh, act, <double*>py, rows, n_in, n_out, mode)
        else:
            dense_eval(<double*>px, <double*>pw, <double*>pb, <double*>pc, <double*>ps,
                       <double*>psh, act, <double*>py, rows, n_in, n_out, mode)
    blas_threads_done(policy, par_now() - t0)
    return Y


def eval_run(Dense layer, object X, object affine=None, int act=0):
    """Eval forward of ``layer`` on ``X`` with a fused epilogue (internal: the eval
    chain in nnrt/_kernels.pyx).

    ``affine``: None, or the following layer, whose ``_nnrt_eval_affine()`` gives
    per-feature ``(center, scale, shift)`` arrays of the layer's width and dtype (its
    eval forward is ``(x - center) * scale + shift``); ``act``: 0, or 1 for a following
    sigmoid. Returns the output buffer (the layer's eval buffer, reused by the next
    call). The caller checks that the fused layers are compiled layers of matching
    width and dtype.
    """
    check_self(layer, Dense)
    if affine is not None and not isinstance(affine, Layer):
        raise TypeError(f"eval_run: affine must be an nnrt.Layer, got {type(affine).__name__}")
    return _eval_run(layer, X, <Layer>affine if affine is not None else None, act)


def _aligned(a, dtype):
    """``a`` as a C-contiguous array of ``dtype`` that starts on a 64-byte boundary (a
    copy unless it already is one). The weight lives in one: the GEMM kernel's vector
    loads of W then never straddle two cache lines (nnrt/_smallm.h: 5-12 % on Zen 5;
    numpy aligns to 16 bytes). Alignment is a speed matter only: every kernel takes any
    aligned-to-its-element array, so a weight replaced by the user still works."""
    dt = np.dtype(dtype)
    a = np.asarray(a)
    if a.dtype == dt and a.flags.c_contiguous and a.ctypes.data % 64 == 0:
        return a
    buf = np.empty(a.size * dt.itemsize + 64, dtype=np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start:start + a.size * dt.itemsize].view(dt).reshape(a.shape)
    out[...] = a
    return out


cdef class Dense(Layer):
    """Fully connected layer ``Y = X @ W + b`` (registry name ``dense``).

    weight has shape (in_features, out_features), bias (out_features,);
    both start uniform in ±1/sqrt(in_features), as torch's nn.Linear.
    ``in_features``, ``out_features`` and ``dtype`` are read-only (they are
    those of the parameters); ``to_dtype`` casts.
    """

    # the eval chain (nnrt/_kernels.pyx) may run this layer's eval forward fused with
    # the per-feature affine and activation that follow (nnrt.dense.eval_run). Read
    # from the layer's own class only: a compiled subclass whose eval forward is still
    # X @ W (+ b) declares it again (dense_nobias does).
    _nnrt_eval_dense = True

    def __cinit__(self, *args, **kwargs):
        # even an instance made with Dense.__new__ refuses width/dtype assignment
        self._flags |= LAYER_FROZEN
        self._rows = -1

    def __init__(self, in_features, out_features):
        self._setup(in_features, out_features, True)

    def _setup(self, in_features, out_features, bint use_bias):
        """Allocate float64 parameters and draw them from the default seed (0)."""
        check_self(self, Dense)
        owner = type(self).__name__
        n_in = _check_width(in_features, "in_features", owner)
        n_out = _check_width(out_features, "out_features", owner)
        if n_in * n_out > _MAX_WEIGHT:
            raise ValueError(
                f"{owner}: a weight of {n_in} x {n_out} has more than {_MAX_WEIGHT} elements"
            )
        self._flags &= ~LAYER_BUILT
        self._n_in = n_in
        self._n_out = n_out
        self.use_bias = use_bias
        self._set_dtype(np.float64)
        self.W = _aligned(np.zeros((n_in, n_out), dtype=np.float64), np.float64)
        self.dW = np.zeros((n_in, n_out), dtype=np.float64)
        # without a bias, b/db stay 1-element placeholders the kernels never read
        self.b = np.zeros((n_out if use_bias else 1,), dtype=np.float64)
        self.db = np.zeros((n_out if use_bias else 1,), dtype=np.float64)
        self._X = None
        self._rows = -1
        self._Y_train = self._Y_eval = self._dX = self._Xcopy = None
        self._flags |= LAYER_BUILT
        self.reset_parameters(np.random.default_rng(0))

    def reset_parameters(self, rng):
        """Draw weight (then bias) uniform in ±1/sqrt(in_features) from ``rng``."""
        check_self(self, Dense)
        self._check_built()
        bound = 1.0 / np.sqrt(self._n_in)
        self.W[...] = rng.uniform(-bound, bound, size=(self._n_in, self._n_out))
        if self.use_bias:
            self.b[...] = rng.uniform(-bound, bound, size=(self._n_out,))

    cpdef dict params(self):
        check_self(self, Dense)
        self._check_built()
        if self.use_bias:
            return {"weight": self.W, "bias": self.b}
        return {"weight": self.W}

    cpdef dict grads(self):
        check_self(self, Dense)
        self._check_built()
        if self.use_bias:
            return {"weight": self.dW, "bias": self.db}
        return {"weight": self.dW}

    cpdef dict config(self):
        check_self(self, Dense)
        self._check_built()
        return {"in_features": self._n_in, "out_features": self._n_out}

    cpdef object to_dtype(self, object dtype):
        check_self(self, Dense)
        self._check_built()
        dt = np.dtype(dtype)
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64, got {dt}")
        # new arrays first: a failure leaves the layer as it was
        W = _aligned(self.W, dt)
        dW = np.ascontiguousarray(self.dW, dtype=dt)
        b = np.ascontiguousarray(self.b, dtype=dt)
        db = np.ascontiguousarray(self.db, dtype=dt)
        self._set_dtype(dt)
        self.W, self.dW, self.b, self.db = W, dW, b, db
        self._X = None
        self._rows = -1
        self._Y_train = self._Y_eval = self._dX = self._Xcopy = None
        return self

    cdef int _check_params(self, cnp.ndarray W, cnp.ndarray b, cnp.ndarray dW,
                           cnp.ndarray db) except -1:
        # NOTE: params()/grads() hand out the live arrays: Python may have changed
        # their shape, dtype, strides or flags in place since the last call
        cdef int t = self._typenum
        cdef Py_ssize_t nb = self._n_out if self.use_bias else 1
        check_array(self, W, "weight", self._n_in, self._n_out, t, False)
        check_array(self, b, "bias", nb, -1, t, False)
        if dW is not None:
            check_array(self, dW, "weight gradient", self._n_in, self._n_out, t, True)
            check_array(self, db, "bias gradient", nb, -1, t, True)
        return 0

    cpdef object forward(self, object X, bint training=False):
        check_self(self, Dense)
        return self._forward_from(X, training, False)

    cdef object _forward_from(self, object X, bint training, bint trusted):
        if not training:
            return _eval_run(self, X, None, EVAL_ACT_NONE)
        self._check_built()
        cdef cnp.ndarray Xa = self.prepare_input(X)
        cdef Py_ssize_t rows = cnp.PyArray_DIM(Xa, 0)
        cdef Py_ssize_t n_in = self._n_in, n_out = self._n_out
        cdef int t = self._typenum
        _check_output_size(self, X, rows, n_out)
        # training: the input is kept for backward, the output goes to its own buffer
        cdef cnp.ndarray Xc = cache_input(X, Xa, self._Xcopy, trusted)
        if Xc is not Xa:
            self._Xcopy = Xc
        cdef cnp.ndarray Y = reuse_buffer(unaliased(self._Y_train, Xa), rows, n_out, t)
        self._Y_train = Y
        self._X = Xc
        self._rows = rows
        # local references: another thread may replace the layer's arrays (to_dtype)
        # while the kernel runs without the GIL
        cdef cnp.ndarray W = self.W, b = self.b
        # last checks, after everything that may have run Python code
        self._check_params(W, b, None, None)
        check_array(self, Xa, "input", rows, n_in, t, False)
        check_array(self, Y, "output buffer", rows, n_out, t, True)
        cdef bint use_bias = self.use_bias
        # the thread policy (nnrt._parallel) picks the BLAS threads and learns the time
        cdef int policy = blas_threads_for(rows, n_out, n_in, 0)
        # the time only where the policy learns from it (a GEMM it may split)
        cdef double t0 = par_now() if policy >= 0 else 0.0
        cdef void* px = cnp.PyArray_DATA(Xa)
        cdef void* pw = cnp.PyArray_DATA(W)
        cdef void* pb = cnp.PyArray_DATA(b)
        cdef void* py = cnp.PyArray_DATA(Y)
        cdef bint dbl = t != cnp.NPY_FLOAT32
        if rows * n_in * n_out >= _TRAIN_NOGIL_MIN:
            with nogil:
                _forward_any(dbl, px, pw, pb, py, rows, n_in, n_out, use_bias)
        else:
            _forward_any(dbl, px, pw, pb, py, rows, n_in, n_out, use_bias)
        blas_threads_done(policy, par_now() - t0 if policy >= 0 else 0.0)
        return Y

    cdef object _backward(self, object dY, bint input_grad):
        self._check_built()
        if self._rows < 0 or self._X is None:
            raise self._no_forward_error()
        cdef Py_ssize_t rows = self._rows
        cdef Py_ssize_t n_in = self._n_in, n_out = self._n_out
        cdef int t = self._typenum
        cdef cnp.ndarray X = self._X
        # the expected shape is the one recorded at forward, not the (reshapeable) Y's
        cdef cnp.ndarray dYa = grad_as(self, dY, rows, n_out, t)
        cdef cnp.ndarray W = self.W, b = self.b, dW = self.dW, db = self.db
        # NOTE: the kernel writes dW, db and dX while it reads dY: a dY that shares
        # memory with either gradient (e.g. a view of grads()["bias"]) is copied first
        if overlaps(dYa, dW) or overlaps(dYa, db):
            dYa = dYa.copy()
        cdef cnp.ndarray dX = None
        if input_grad:
            dX = reuse_buffer(unaliased(self._dX, dYa), rows, n_in, t)
            self._dX = dX
        self._check_params(W, b, dW, db)
        check_array(self, X, "cached input (of the last training forward)", rows, n_in, t,
                    False)
        check_array(self, dYa, "gradient", rows, n_out, t, False)
        if input_grad:
            check_array(self, dX, "input-gradient buffer", rows, n_in, t, True)
        cdef bint use_bias = self.use_bias
        # the thread policy (nnrt._parallel) picks the BLAS threads and learns the time
        cdef int policy = blas_threads_for(n_in, n_out, rows, 1)
        cdef double t0 = par_now() if policy >= 0 else 0.0
        cdef void* px = cnp.PyArray_DATA(X)
        cdef void* pw = cnp.PyArray_DATA(W)
        cdef void* pdy = cnp.PyArray_DATA(dYa)
        cdef void* pdx = cnp.PyArray_DATA(dX) if input_grad else NULL
        cdef void* pdw = cnp.PyArray_DATA(dW)
        cdef void* pdb = cnp.PyArray_DATA(db)
        cdef bint dbl = t != cnp.NPY_FLOAT32
        if rows * n_in * n_out >= _TRAIN_NOGIL_MIN:
            with nogil:
                _backward_any(dbl, px, pw, pdy, pdx, pdw, pdb, rows, n_in, n_out, use_bias)
        else:
            _backward_any(dbl, px, pw, pdy, pdx, pdw, pdb, rows, n_in, n_out, use_bias)
        blas_threads_done(policy, par_now() - t0 if policy >= 0 else 0.0)
        return dX

    cpdef object backward(self, object dY):
        check_self(self, Dense)
        return self._backward(dY, True)

    def backward_params(self, dY):
        """Like ``backward`` but only writes the parameter gradients; returns None.

        ``Sequential.backward(dY, input_grad=False)`` calls it on the first layer,
        whose dX = dY @ W.T nobody needs.
        """
        check_self(self, Dense)
        self._backward(dY, False)
        return None


def _check_width(value, name, owner):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be a positive int, got {value!r}")
    if value <= 0 or value > 2**31 - 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


check_width = _check_width
