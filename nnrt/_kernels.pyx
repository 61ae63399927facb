# cython: language_level=3
"""Fused kernels behind the Python API: softmax cross-entropy and the SGD update.

Each entry point takes plain ndarrays, checks in C that they are what the
kernel expects (dtype, contiguity, shapes) and returns ``None`` when they are
not, so the caller falls back to its numpy implementation, which raises the
proper, descriptive errors. No memoryviews (their set-up costs ~1 µs a call);
raw pointers from ``PyArray_DATA``; large jobs run on two threads (nnrt._parallel).
"""

import numpy as np
cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport sqrt

from cython cimport floating

from nnrt._parallel cimport PAR_ADAM, PAR_EXP, PAR_STREAM, par_fn, par_for

cnp.import_array()


cdef inline bint _plain(object a, int ndim) noexcept:
    # a C-contiguous, aligned, writeable-or-not base ndarray of rank ndim
    if type(a) is not np.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and cnp.PyArray_ISALIGNED(arr) and cnp.PyArray_ISNOTSWAPPED(arr))


# ------------------------------------------------------- softmax cross-entropy
cdef Py_ssize_t count_correct(const floating* Y, const cnp.int64_t* labels,
                              Py_ssize_t n, Py_ssize_t c) noexcept nogil:
    # prediction of row i: argmax_j Y[i, j] (the first maximum; a NaN wins, as
    # numpy's argmax), or Y[i, 0] > 0 when there is one column.
    # NOTE: the label's value v is tested against the row instead of finding the
    # argmax: the row's argmax is the label exactly when every value before it is
    # < v and every value after it is <= v (a NaN anywhere fails these), or, for a
    # NaN v, when no NaN comes before it. No branch depends on the data but that
    # rare NaN: an argmax loop's branches mispredicted on shuffled batches (~1.2 us
    # of a 165 us small fit step, 64 rows of 10)
    cdef Py_ssize_t i, j, lab, right = 0
    cdef const floating* row
    cdef floating v
    cdef int wrong
    for i in range(n):
        row = &Y[i * c]
        lab = labels[i]
        if c == 1:
            right += (lab == (1 if row[0] > 0 else 0))
            continue
        if <size_t>lab >= <size_t>c:  # never the argmax (negative ones too)
            continue
        v = row[lab]
        wrong = 0
        if v == v:
            for j in range(lab):
                wrong |= not (row[j] < v)
            for j in range(lab + 1, c):
                wrong |= not (row[j] <= v)
        else:
            for j in range(lab):
                wrong |= row[j] != row[j]
        right += 1 - wrong
    return right


ctypedef struct _CEJob:
    const void* x
    const cnp.int64_t* y
    void* dY
    double* row_loss
    Py_ssize_t c
    double inv_n
    int failed  # a scratch allocation failed (set by either thread)


cdef extern from "nnrt/_vmath.h" nogil:
    # rows lo..hi-1 in float64 with a vectorised exp (nnrt/_vmath.h); 1: no scratch
    int nnrt_softmax_ce_f(const float* x, const cnp.int64_t* y, float* dY, double* row_loss,
                          Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t c, double inv_n)
    int nnrt_softmax_ce_d(const double* x, const cnp.int64_t* y, double* dY,
                          double* row_loss, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t c,
                          double inv_n)


cdef void _ce_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _CEJob* j = <_CEJob*>ctx
    if nnrt_softmax_ce_f(<const float*>j.x, j.y, <float*>j.dY, j.row_loss, lo, hi, j.c,
                         j.inv_n):
        j.failed = 1


cdef void _ce_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _CEJob* j = <_CEJob*>ctx
    if nnrt_softmax_ce_d(<const double*>j.x, j.y, <double*>j.dY, j.row_loss, lo, hi, j.c,
                         j.inv_n):
        j.failed = 1


# below this many logits the loss runs with the GIL held
cdef Py_ssize_t _CE_NOGIL_MIN = 16384


cdef double _ce_run(_CEJob* job, bint f32, Py_ssize_t n, Py_ssize_t c, bint count,
                    Py_ssize_t* right) noexcept nogil:
    # the rows (on two threads when they are many), their losses summed in row order
    # (the same sum whichever thread computed a row), and the correct count
    cdef Py_ssize_t i
    cdef double total = 0
    par_for(PAR_EXP, <par_fn>(_ce_f if f32 else _ce_d), job, n, c)
    for i in range(n):
        total += job.row_loss[i]
    if count:
        if f32:
            right[0] = count_correct(<const float*>job.x, job.y, n, c)
        else:
            right[0] = count_correct(<const double*>job.x, job.y, n, c)
    return total


cpdef object softmax_cross_entropy(object logits, object labels, bint count=False):
    """``(loss, dY)`` for float32/float64 C-contiguous 2-D logits and int64 labels.

    Returns ``None`` for anything else (other dtypes, layouts, shapes, NaN-free
    is not checked) and for out-of-range labels: the numpy implementation then
    handles (or rejects) the input. ``count=True``: ``(loss, dY, correct)``, with
    the number of rows whose argmax (the first maximum; a NaN wins, as numpy's)
    is the label (the training engine's accuracy, in the same call).
    """
    if not _plain(logits, 2) or not _plain(labels, 1):
        return None
    cdef cnp.ndarray x = <cnp.ndarray>logits
    cdef cnp.ndarray y = <cnp.ndarray>labels
    cdef int t = cnp.PyArray_TYPE(x)
    cdef int ty = cnp.PyArray_TYPE(y)
    if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or ty != cnp.NPY_INT64:
        return None
    cdef Py_ssize_t n = cnp.PyArray_DIM(x, 0), c = cnp.PyArray_DIM(x, 1)
    if n == 0 or c == 0 or cnp.PyArray_DIM(y, 0) != n:
        return None
    cdef const cnp.int64_t* yp = <const cnp.int64_t*>cnp.PyArray_DATA(y)
    cdef Py_ssize_t i
    for i in range(n):
        if yp[i] < 0 or yp[i] >= c:
            return None
    cdef cnp.ndarray dY = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(x), t, 0)
    # per-row losses, summed in row order afterwards: the same sum whether the rows
    # ran on one thread or two (nnrt._parallel)
    cdef double few[256]
    cdef double* rl = few
    cdef cnp.npy_intp nn = n
    cdef cnp.ndarray rows = None
    if n > 256:
        rows = cnp.PyArray_EMPTY(1, &nn, cnp.NPY_FLOAT64, 0)
        rl = <double*>cnp.PyArray_DATA(rows)
    cdef double total = 0
    cdef _CEJob job
    job.x = cnp.PyArray_DATA(x)
    job.y = yp
    job.dY = cnp.PyArray_DATA(dY)
    job.row_loss = rl
    job.c = c
    job.inv_n = 1.0 / n
    job.failed = 0
    cdef Py_ssize_t right = 0
    if n * c >= _CE_NOGIL_MIN:
        with nogil:
            total = _ce_run(&job, t == cnp.NPY_FLOAT32, n, c, count, &right)
    else:  # releasing the GIL would cost more than the work
        total = _ce_run(&job, t == cnp.NPY_FLOAT32, n, c, count, &right)
    if job.failed:
        raise MemoryError("softmax_cross_entropy: no memory for a row's scratch")
    if count:
        return total * job.inv_n, dY, right
    return total * job.inv_n, dY


# ------------------------------------------------------------------------ SGD
cdef extern from "nnrt/_vmath.h" nogil:
    # torch.optim.SGD's update in the parameter's dtype (run-time SIMD clones)
    void nnrt_sgd_f(float* p, const float* g, float* buf, Py_ssize_t n, float lr,
                    float momentum, float one_minus_dampening, float wd, int nesterov,
                    int fresh)
    void nnrt_sgd_d(double* p, const double* g, double* buf, Py_ssize_t n, double lr,
                    double momentum, double one_minus_dampening, double wd, int nesterov,
                    int fresh)


# element ranges of one parameter's update for nnrt._parallel.par_for
ctypedef struct _SGDJob:
    void* p
    const void* g
    void* buf
    double lr, momentum, omd, wd
    int nesterov, fresh
    bint f32
    Py_ssize_t n


# below this many elements in all, the SGD update runs with the GIL held
cdef Py_ssize_t _SGD_NOGIL_MIN = 65536


cdef void _sgd_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _SGDJob* j = <_SGDJob*>ctx
    nnrt_sgd_f(<float*>j.p + lo, <const float*>j.g + lo,
               NULL if j.buf == NULL else <float*>j.buf + lo, hi - lo, <float>j.lr,
               <float>j.momentum, <float>j.omd, <float>j.wd, j.nesterov, j.fresh)


cdef void _sgd_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _SGDJob* j = <_SGDJob*>ctx
    nnrt_sgd_d(<double*>j.p + lo, <const double*>j.g + lo,
               NULL if j.buf == NULL else <double*>j.buf + lo, hi - lo, j.lr, j.momentum,
               j.omd, j.wd, j.nesterov, j.fresh)


cpdef object sgd_step(list params, list grads, object bufs, double lr, double momentum,
                      double dampening, double weight_decay, bint nesterov, object fresh):
    """Update every parameter in place; ``bufs`` is None (no momentum) or a list of
    momentum buffers, ``fresh`` a list of bools (buffer just created: it becomes d).

    Returns False, changing nothing, when an array is not a C-contiguous
    float32/float64 ndarray matching its parameter (the caller falls back).
    """
    # snapshots, and every Python-level conversion done first: nothing below may run
    # Python code between the checks and the kernels (lists are indexed unchecked)
    params = list(params)
    grads = list(grads)
    if bufs is not None:
        bufs = list(bufs)
        fresh = [bool(f) for f in fresh]
    cdef Py_ssize_t k, m = len(params)
    cdef cnp.ndarray p, g, b
    cdef int t
    if len(grads) != m or (bufs is not None and (len(bufs) != m or len(fresh) != m)):
        return False
    for k in range(m):
        if type(params[k]) is not np.ndarray or type(grads[k]) is not np.ndarray:
            return False
        p = <cnp.ndarray>params[k]
        if not _plain(p, cnp.PyArray_NDIM(p)) or not _plain(grads[k], cnp.PyArray_NDIM(p)):
            return False
        g = <cnp.ndarray>grads[k]
        t = cnp.PyArray_TYPE(p)
        if ((t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or cnp.PyArray_TYPE(g) != t
                or cnp.PyArray_SIZE(g) != cnp.PyArray_SIZE(p)
                or not cnp.PyArray_ISWRITEABLE(p)):
            return False
        if bufs is not None:
            if type(bufs[k]) is not np.ndarray or not _plain(bufs[k], cnp.PyArray_NDIM(p)):
                return False
            b = <cnp.ndarray>bufs[k]
            if cnp.PyArray_TYPE(b) != t or cnp.PyArray_SIZE(b) != cnp.PyArray_SIZE(p):
                return False
    # one job per parameter, run in one pass (the GIL released once, and only when the
    # work is worth it: taking it back costs ~50 ns per release)
    cdef _SGDJob few[16]
    cdef _SGDJob* jobs = few
    if m > 16:
        jobs = <_SGDJob*>PyMem_Malloc(m * sizeof(_SGDJob))
        if jobs == NULL:
            raise MemoryError()
    cdef Py_ssize_t total = 0
    for k in range(m):
        p = <cnp.ndarray>params[k]
        g = <cnp.ndarray>grads[k]
        jobs[k].n = cnp.PyArray_SIZE(p)
        total += jobs[k].n
        # the scalars as the kernels always took them (float32 kernels round each to float)
        jobs[k].lr = lr
        jobs[k].momentum = momentum
        jobs[k].omd = 1.0 - dampening
        jobs[k].wd = weight_decay
        jobs[k].nesterov = nesterov
        jobs[k].p = cnp.PyArray_DATA(p)
        jobs[k].g = cnp.PyArray_DATA(g)
        jobs[k].f32 = cnp.PyArray_TYPE(p) == cnp.NPY_FLOAT32
        jobs[k].buf = NULL
        jobs[k].fresh = False
        if bufs is not None:
            jobs[k].buf = cnp.PyArray_DATA(<cnp.ndarray>bufs[k])
            jobs[k].fresh = fresh[k] is True
    try:
        if total >= _SGD_NOGIL_MIN:
            with nogil:
                _sgd_all(jobs, m)
        else:
            _sgd_all(jobs, m)
    finally:
        if jobs != few:
            PyMem_Free(jobs)
    return True


cdef void _sgd_all(_SGDJob* jobs, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(m):
        par_for(PAR_STREAM, <par_fn>(_sgd_f if jobs[k].f32 else _sgd_d), &jobs[k], jobs[k].n, 1)


# ----------------------------------------------------------------- Adam/AdamW
cdef extern from "nnrt/_vmath.h" nogil:
    # torch.optim.Adam/AdamW's update in the parameter's dtype (nnrt/_vmath.h)
    void nnrt_adam_f(float* p, const float* g, float* m, float* v, Py_ssize_t n,
                     int decoupled, int l2, float decay, float wd, int lerp_small, float w,
                     float omw, float beta2, float omb2, float sqrt_bc2, float eps,
                     float step_size)
    void nnrt_adam_d(double* p, const double* g, double* m, double* v, Py_ssize_t n,
                     int decoupled, int l2, double decay, double wd, int lerp_small, double w,
                     double omw, double beta2, double omb2, double sqrt_bc2, double eps,
                     double step_size)


cdef inline bint _same(object a, cnp.ndarray p) noexcept:
    # a plain ndarray of p's dtype and size
    return (type(a) is np.ndarray and _plain(a, cnp.PyArray_NDIM(<cnp.ndarray>a))
            and cnp.PyArray_TYPE(<cnp.ndarray>a) == cnp.PyArray_TYPE(p)
            and cnp.PyArray_SIZE(<cnp.ndarray>a) == cnp.PyArray_SIZE(p))


ctypedef struct _AdamJob:
    void* p
    const void* g
    void* m
    void* v
    int dec, l2, lerp_small
    double decay, wd, w, omw, beta2, omb2, sqrt_bc2, eps, step_size


cdef void _adam_f(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _AdamJob* j = <_AdamJob*>ctx
    nnrt_adam_f(<float*>j.p + lo, <const float*>j.g + lo, <float*>j.m + lo, <float*>j.v + lo,
                hi - lo, j.dec, j.l2, <float>j.decay, <float>j.wd, j.lerp_small, <float>j.w,
                <float>j.omw, <float>j.beta2, <float>j.omb2, <float>j.sqrt_bc2, <float>j.eps,
                <float>j.step_size)


cdef void _adam_d(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _AdamJob* j = <_AdamJob*>ctx
    nnrt_adam_d(<double*>j.p + lo, <const double*>j.g + lo, <double*>j.m + lo,
                <double*>j.v + lo, hi - lo, j.dec, j.l2, j.decay, j.wd, j.lerp_small, j.w,
                j.omw, j.beta2, j.omb2, j.sqrt_bc2, j.eps, j.step_size)


def adam_step(list params, list grads, list exp_avg, list exp_avg_sq, double lr,
              double beta1, double beta2, double eps, double weight_decay, bint decoupled,
              Py_ssize_t step):
    """One Adam (``decoupled`` false) or AdamW update of every parameter, in place.

    ``step`` is the step number after this update (1 for the first). Returns False,
    changing nothing, when an array is not a C-contiguous float32/float64 ndarray
    matching its parameter (the caller falls back to numpy).
    """
    params = list(params)
    grads = list(grads)
    exp_avg = list(exp_avg)
    exp_avg_sq = list(exp_avg_sq)
    cdef Py_ssize_t k, m = len(params)
    cdef cnp.ndarray p
    cdef int t
    if len(grads) != m or len(exp_avg) != m or len(exp_avg_sq) != m:
        return False
    for k in range(m):
        if type(params[k]) is not np.ndarray:
            return False
        p = <cnp.ndarray>params[k]
        t = cnp.PyArray_TYPE(p)
        if (not _plain(p, cnp.PyArray_NDIM(p)) or (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64)
                or not cnp.PyArray_ISWRITEABLE(p) or not _same(grads[k], p)
                or not _same(exp_avg[k], p) or not _same(exp_avg_sq[k], p)
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>exp_avg[k])
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>exp_avg_sq[k])):
            return False
    # scalars exactly as the numpy path forms them (Python floats, then the dtype)
    cdef double w = 1.0 - beta1
    cdef bint lerp_small = w < 0.5
    cdef double bc1 = 1.0 - beta1 ** step
    cdef double bc2 = 1.0 - beta2 ** step
    cdef double step_size = lr / bc1
    cdef double sqrt_bc2 = sqrt(bc2)  # as math.sqrt
    cdef double decay = 1.0 - lr * weight_decay
    cdef bint wd_on = weight_decay != 0.0
    cdef bint dec = decoupled and wd_on
    cdef bint l2 = (not decoupled) and wd_on
    cdef Py_ssize_t n
    cdef _AdamJob job
    job.dec = dec
    job.l2 = l2
    job.lerp_small = lerp_small
    job.decay = decay
    job.wd = weight_decay
    job.w = w
    job.omw = 1.0 - w
    job.beta2 = beta2
    job.omb2 = 1.0 - beta2
    job.sqrt_bc2 = sqrt_bc2
    job.eps = eps
    job.step_size = step_size
    for k in range(m):
        p = <cnp.ndarray>params[k]
        n = cnp.PyArray_SIZE(p)
        job.p = cnp.PyArray_DATA(p)
        job.g = cnp.PyArray_DATA(<cnp.ndarray>grads[k])
        job.m = cnp.PyArray_DATA(<cnp.ndarray>exp_avg[k])
        job.v = cnp.PyArray_DATA(<cnp.ndarray>exp_avg_sq[k])
        with nogil:
            par_for(PAR_ADAM, <par_fn>(_adam_f if cnp.PyArray_TYPE(p) == cnp.NPY_FLOAT32
                                       else _adam_d), &job, n, 1)
    return True


# ----------------------------------------------------------- network runner
from cpython.object cimport PyTypeObject

from nnrt.dense cimport Dense
from nnrt.layer cimport LAYER_FROZEN, Layer

from nnrt.dense import eval_run as _dense_eval_run

cdef extern from "Python.h":
    unsigned long Py_TPFLAGS_HEAPTYPE
    unsigned long PyType_GetFlags(PyTypeObject* t)


cdef Layer _as_layer(object obj, Py_ssize_t i):
    # NOTE: the list is the user's (net.layers): never cast an item unchecked
    if not isinstance(obj, Layer):
        raise TypeError(
            f"{obj!r:.80} ({type(obj).__module__}.{type(obj).__qualname__}) is not an "
            f"nnrt.Layer; net.layers may only hold layers (build them with nnrt.layer(name, ...))"
        )
    return <Layer>obj


cdef inline bint _owns_output(Layer layer):
    # A built-in compiled layer used as is (not a Python subclass, which could
    # return an array it keeps): its output is a buffer only it and the network
    # hold, so the next layer may cache it for backward without a copy.
    cdef object tp = type(layer)
    return ((layer._flags & LAYER_FROZEN) != 0
            and (PyType_GetFlags(<PyTypeObject*>tp) & Py_TPFLAGS_HEAPTYPE) == 0)


# Eval-mode fusion (see forward_chain); NNRT_FUSE=0 at import turns it off.
cdef bint _eval_fusion = __import__("os").environ.get("NNRT_FUSE", "1") != "0"


def _set_eval_fusion(bint on):
    """Turn the eval chain's dense -> affine -> activation fusion on or off (tests)."""
    global _eval_fusion
    _eval_fusion = on


cdef inline bint _fusable(object obj):
    # a compiled built-in-style layer (see _owns_output): its class attributes are the
    # compiled class's own, and no Python override can change what it computes
    return isinstance(obj, Layer) and _owns_output(<Layer>obj)


cdef inline object _own_attr(object obj, str name):
    # the protocol attribute `name` as defined by obj's own class, never inherited: a
    # compiled subclass that changes what forward computes does not claim it by accident
    return type(obj).__dict__.get(name)


cdef Py_ssize_t _eval_run_end(list snap, Py_ssize_t i, Dense dense, bint* aff,
                              int* act):
    # The run that starts at the dense-like layer snap[i]: [dense] -> affine? ->
    # sigmoid?; returns the index after it and sets *aff (snap[i + 1] is the affine
    # layer) and *act. Only compiled layers whose own class offers the protocol, of the
    # dense layer's width and dtype, join the run.
    cdef Py_ssize_t m = len(snap), j = i + 1
    cdef Layer nxt
    aff[0] = False
    act[0] = 0
    if j < m and _fusable(snap[j]):
        nxt = <Layer>snap[j]
        if (nxt._n_in == dense._n_out and nxt._n_out == dense._n_out
                and nxt._typenum == dense._typenum
                and _own_attr(nxt, "_nnrt_eval_affine") is not None):
            aff[0] = True
            j += 1
    if j < m and _fusable(snap[j]):
        nxt = <Layer>snap[j]
        if ((nxt._n_in < 0 or nxt._n_in == dense._n_out)
                and (nxt._typenum < 0 or nxt._typenum == dense._typenum)
                and _own_attr(nxt, "_nnrt_epilogue") == "sigmoid"):
            act[0] = 1
            j += 1
    return j


cpdef object same_items(list cached, object layers):
    """True when ``layers`` is a list holding the very objects of ``cached``, in order
    (identity, never ``__eq__``: a layer cannot pretend to be another)."""
    if type(layers) is not list:
        return False
    cdef list other = <list>layers
    cdef Py_ssize_t i, m = len(cached)
    if len(other) != m:
        return False
    for i in range(m):
        if <void*>cached[i] is not <void*>other[i]:
            return False
    return True


cpdef object params_held(list held):
    """True when every ``(part, arrays)`` of ``held`` still gives the very ``arrays``
    (identity, in order) from ``part.params()``; False otherwise, and the caller looks
    closer (a plugin may hand out a new view of the same memory on each call). The
    optimizers' per-step check that their arrays are still the live parameters."""
    cdef tuple pair, arrays
    cdef Py_ssize_t j, m
    for item in held:
        pair = <tuple?>item
        arrays = <tuple?>pair[1]
        part = pair[0]
        # a compiled built-in-style layer's params() through the C vtable
        live = (<Layer>part).params() if _fusable(part) else part.params()
        if type(live) is not dict:
            return False
        m = len(arrays)
        if len(<dict>live) != m:
            return False
        j = 0
        for a in (<dict>live).values():
            if a is not arrays[j]:
                return False
            j += 1
    return True


cpdef object dtypes_are(object layers, object want):
    """True when every item of the list ``layers`` computes in dtype ``want`` or follows
    its input (dtype None): ``Network._check_dtypes``'s fast path (identity tests of
    numpy's singleton float dtypes; False sends the caller to its exact check)."""
    if type(layers) is not list:
        return False
    cdef object dt
    for layer in <list>layers:
        if _fusable(layer):  # a built-in-style compiled layer: its C field
            dt = (<Layer>layer)._dtype
        else:
            dt = getattr(layer, "dtype", None)
        if dt is not None and dt is not want:
            return False
    return True


cpdef object forward_chain(list layers, object X, bint training, object fuse=None,
                           bint trusted_input=False):
    """``Sequential.forward`` without returning to Python between layers.

    Compiled layers are called through the C vtable (Python subclasses still
    dispatch to their Python ``forward``). ``fuse`` (None, or one flag per layer):
    where ``fuse[i]`` is set, layers i and i+1 run as one through
    ``layers[i]._nnrt_forward_pair(X, training, layers[i + 1])``. An error is
    re-raised as the same type, prefixed with the layer's index. A list item that
    is not an ``nnrt.Layer`` raises TypeError.

    Each layer after a built-in one gets that layer's output buffer, which nothing
    outside the network holds: it may cache it for backward without a copy.
    ``trusted_input``: the same for ``X`` (the caller owns it and leaves it alone
    until backward, e.g. the training engine's gathered mini-batch).
    """
    # a snapshot: a layer's forward (Python code) may change the caller's list
    cdef list snap = list(layers)
    cdef Py_ssize_t i = 0, m = len(snap)
    cdef Layer layer
    cdef bytes flags = None
    cdef bint trusted = trusted_input
    if fuse is not None:
        flags = bytes(fuse)
        if len(flags) != m:
            flags = None
    cdef bint eval_fuse = not training and _eval_fusion
    cdef bint aff
    cdef int act
    cdef Py_ssize_t end
    out = X
    try:
        while i < m:
            layer = _as_layer(snap[i], i)
            if (eval_fuse and isinstance(layer, Dense) and _owns_output(layer)
                    and _own_attr(layer, "_nnrt_eval_dense") is True):
                # eval: the dense layer applies the affine (e.g. a normalisation with running
                # statistics) and activation after it in its own output pass
                end = _eval_run_end(snap, i, <Dense>layer, &aff, &act)
                if end > i + 1:
                    out = _dense_eval_run(layer, out, snap[i + 1] if aff else None, act)
                    layer = <Layer>snap[end - 1]
                    i = end
                    continue
            if flags is not None and flags[i] and i + 1 < m:
                out = layer._nnrt_forward_pair(out, training, _as_layer(snap[i + 1], i + 1),
                                               trusted)
                layer = <Layer>snap[i + 1]
                i += 2
            else:
                out = layer._forward_from(out, training, trusted)
                i += 1
            trusted = _owns_output(layer)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"Sequential layer {i}: {exc}") from exc
    return out


cpdef object backward_chain(list layers, object dY, Py_ssize_t stop, bint input_grad,
                            object fuse=None):
    """``Sequential.backward``: layers ``len-1 .. stop``; the last one (``stop``) only
    writes its parameter gradients when ``input_grad`` is false and it has
    ``backward_params``. Returns dX, or None when ``input_grad`` is false.
    ``fuse`` as in ``forward_chain`` (a fused pair i, i+1 with i > stop runs
    through ``layers[i]._nnrt_backward_pair(dY, layers[i + 1])``)."""
    cdef list snap = list(layers)
    cdef Py_ssize_t m = len(snap)
    cdef Py_ssize_t i = m - 1
    cdef Layer layer
    cdef bytes flags = None
    if stop < 0:
        raise ValueError(f"backward_chain: stop must be >= 0, got {stop}")
    if fuse is not None:
        flags = bytes(fuse)
        if len(flags) != m:
            flags = None
    grad = dY
    try:
        while i > stop:
            if flags is not None and i - 1 > stop and flags[i - 1]:
                layer = _as_layer(snap[i - 1], i - 1)
                grad = layer._nnrt_backward_pair(grad, _as_layer(snap[i], i))
                i -= 2
            else:
                layer = _as_layer(snap[i], i)
                grad = layer.backward(grad)
                i -= 1
        if stop >= m:
            return None
        i = stop
        layer = _as_layer(snap[stop], stop)
        if input_grad:
            return layer.backward(grad)
        params_only = getattr(layer, "backward_params", None)
        if params_only is not None:
            params_only(grad)
        else:
            layer.backward(grad)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"Sequential layer {i}: {exc}") from exc
    return None
