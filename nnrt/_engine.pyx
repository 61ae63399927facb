# cython: language_level=3
"""Helpers of the training engine (nnrt/engine.py) that numpy makes slow.

``n_correct`` counts the rows a batch classifies right: numpy's
``count_nonzero(Y.argmax(1) == labels)`` allocates two temporaries and costs
~1 µs on a 32-row batch, 3% of a small training step; this is one pass over
``Y``. Arrays are checked here (rank, dtype, contiguity, lengths) and copied
to plain ones when they are not; raw pointers from ``PyArray_DATA``. The GIL
stays held: ``labels`` may be the caller's array, and no other thread may
resize it (``resize(refcheck=False)``) while the kernel reads it.
"""

import weakref

import numpy as np
cimport numpy as cnp

from libc.math cimport isfinite
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from nnrt._blas cimport prefetch_clear, prefetch_set
from nnrt._parallel cimport PAR_STREAM, par_fn, par_for, par_join, par_post
from nnrt._kernels cimport (backward_chain, count_correct, dtypes_are, forward_chain,
                            params_held, same_items, sgd_step, softmax_cross_entropy)


cnp.import_array()


cdef inline bint _plain(object a, int ndim, int typenum) noexcept:
    # a C-contiguous, aligned, native-order base ndarray of rank ndim and this dtype
    if type(a) is not np.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(arr) == ndim and cnp.PyArray_TYPE(arr) == typenum
            and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr))


def n_correct(object Y, object labels):
    """Rows of ``Y`` (samples, classes) whose predicted class is ``labels[i]``.

    The prediction is the argmax of the row (``Y[:, 0] > 0`` for one column).
    ``Y`` is read as float32/float64 and ``labels`` as int64 (copied if they are
    not C-contiguous arrays of those dtypes).
    """
    cdef cnp.ndarray y2, lab
    if _plain(Y, 2, cnp.NPY_FLOAT32) or _plain(Y, 2, cnp.NPY_FLOAT64):
        y2 = <cnp.ndarray>Y
    else:
        y2 = np.asarray(Y)
        if y2.ndim != 2:
            raise ValueError(f"n_correct: Y must be 2-D, got shape {np.shape(Y)}")
        y2 = np.ascontiguousarray(y2, dtype=np.float32 if y2.dtype == np.float32 else np.float64)
    lab = <cnp.ndarray>labels if _plain(labels, 1, cnp.NPY_INT64) else np.ascontiguousarray(
        labels, dtype=np.int64
    )
    cdef Py_ssize_t n = cnp.PyArray_DIM(y2, 0), c = cnp.PyArray_DIM(y2, 1)
    if cnp.PyArray_NDIM(lab) != 1 or cnp.PyArray_DIM(lab, 0) != n:
        raise ValueError(
            f"n_correct: labels must be 1-D with {n} entries, got shape {np.shape(labels)}"
        )
    if n == 0 or c == 0:
        return 0
    cdef const cnp.int64_t* lp = <const cnp.int64_t*>cnp.PyArray_DATA(lab)
    cdef Py_ssize_t right
    if cnp.PyArray_TYPE(y2) == cnp.NPY_FLOAT32:
        right = count_correct(<const float*>cnp.PyArray_DATA(y2), lp, n, c)
    else:
        right = count_correct(<const double*>cnp.PyArray_DATA(y2), lp, n, c)
    return right


# ------------------------------------------------------------------ gather
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define NNRT_PREFETCH(p) __builtin_prefetch((p), 0, 0)
    #else
    #define NNRT_PREFETCH(p) ((void)0)
    #endif
    """
    void NNRT_PREFETCH(const void* p) noexcept nogil

cdef enum:
    _AHEAD = 4  # rows prefetched ahead of the one being copied
    _PREFETCH_BYTES = 4096  # of each row (the hardware prefetcher streams the rest)


class NonFinite(ValueError):
    """``take_rows(..., check=True)`` copied a NaN/Inf (``row``: its index in ``src``)."""

    def __init__(self, row: int) -> None:
        super().__init__(f"take_rows: row {row} holds a non-finite value (NaN/Inf)")
        self.row = row


cdef extern from *:
    """
    #include <stdint.h>
    /* AVX-512 and AVX2 clones picked at load time (GCC on x86-64 Linux; not under ASan,
       whose start-up runs after ifunc resolvers): copy and test 16 or 8 floats an
       instruction (64 rows of 784 float32 from L2, Zen 5: 3.9 -> 3.4 us with the
       AVX-512 clone, memcpy 3.2 us) */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) \
        && defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
    #define NNRT_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
    #else
    #define NNRT_CLONES
    #endif
    /* Copy n items and say whether one is NaN/Inf (all exponent bits set), in one pass:
       the values are tested as they go through the registers on their way from src
       to dst. (x & ~sign) + (lowest exponent bit) reaches the sign bit exactly when the
       exponent is all ones; OR-ing these sums keeps the loop branch-free, and integer
       ops let it vectorise (a float compare chain would not, without -ffast-math). */
    NNRT_CLONES static int nnrt_copy_check32(uint32_t* restrict dst, const uint32_t* restrict src,
                                 Py_ssize_t n) {
        uint32_t acc = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t x = src[i];
            dst[i] = x;
            acc |= (x & 0x7fffffffu) + 0x00800000u;
        }
        return (acc >> 31) != 0;
    }
    NNRT_CLONES static int nnrt_copy_check64(uint64_t* restrict dst, const uint64_t* restrict src,
                                 Py_ssize_t n) {
        uint64_t acc = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t x = src[i];
            dst[i] = x;
            acc |= (x & 0x7fffffffffffffffull) + 0x0010000000000000ull;
        }
        return (acc >> 63) != 0;
    }
    """
    bint nnrt_copy_check32(uint32_t* dst, const uint32_t* src, Py_ssize_t n) noexcept nogil
    bint nnrt_copy_check64(uint64_t* dst, const uint64_t* src, Py_ssize_t n) noexcept nogil


cdef inline bint _rows_of(object a) noexcept:
    # a C-contiguous ndarray (or subclass: a memory map) with at least one dimension
    if not isinstance(a, np.ndarray):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return cnp.PyArray_NDIM(arr) >= 1 and cnp.PyArray_IS_C_CONTIGUOUS(arr)


def take_rows(object src, object idx, object out, bint check=False):
    """``out[i] = src[idx[i]]`` for every i, as ``np.take(src, idx, axis=0, out=out)``.

    For C-contiguous ``src`` and ``out`` of one dtype and row shape, ``out``
    writeable with ``len(idx)`` rows, ``idx`` an intp array; returns True. Returns
    False for anything else (the caller uses ``np.take``). An index outside
    ``[0, len(src))`` raises IndexError before anything is copied.

    With ``check=True`` (float32/float64 only, ``src`` and ``out`` aligned: else
    False) each row's values are also tested for NaN/Inf as they are copied, and
    the first bad row raises :class:`NonFinite` (the rows before it are copied).
    The copy waits on memory anyway, so the test costs little, where a separate
    ``np.isfinite`` pass over ``src`` reads it all once more.

    NOTE: rows of a shuffled batch sit anywhere in ``src``, so each row's first
    cache lines miss; the rows a few places ahead are prefetched while one is
    copied (``np.take`` copies them one by one: ~2.5x slower on 64 rows of 784
    float32 from a 25 MB array).
    """
    if not (_rows_of(src) and _rows_of(out) and type(idx) is np.ndarray):
        return False
    cdef cnp.ndarray ix = <cnp.ndarray>idx
    if (cnp.PyArray_TYPE(ix) != cnp.NPY_INTP or cnp.PyArray_NDIM(ix) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(ix)):
        return False
    return _take(<cnp.ndarray>src, <const cnp.npy_intp*>cnp.PyArray_DATA(ix),
                 cnp.PyArray_DIM(ix, 0), <cnp.ndarray>out, check) == 1


ctypedef struct _Gather:
    # take_rows' copy: rows ip[lo..hi) of sp into rows lo..hi of op, row bytes each;
    # check 0: copy, 1: float32 and 2: float64 tested for NaN/Inf (bad set to 1 by a
    # piece that copied one: every writer writes 1)
    const char* sp
    char* op
    const cnp.npy_intp* ip
    Py_ssize_t row, items
    Py_ssize_t m  # rows (the whole job's)
    int check
    int bad
    int done  # (a job run inside a step, _step's pre)


cdef inline bint _copy_row(_Gather* j, Py_ssize_t i) noexcept nogil:
    if j.check == 0:
        memcpy(j.op + i * j.row, j.sp + j.ip[i] * j.row, j.row)
        return False
    if j.check == 1:
        return nnrt_copy_check32(<uint32_t*>(j.op + i * j.row),
                                 <const uint32_t*>(j.sp + j.ip[i] * j.row), j.items)
    return nnrt_copy_check64(<uint64_t*>(j.op + i * j.row),
                             <const uint64_t*>(j.sp + j.ip[i] * j.row), j.items)


cdef void _gather_rows(void* ctx, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef _Gather* j = <_Gather*>ctx
    cdef Py_ssize_t i, k
    cdef Py_ssize_t pre = j.row if j.row < _PREFETCH_BYTES else _PREFETCH_BYTES
    cdef bint bad = False
    for i in range(lo, hi):
        if i + _AHEAD < hi:
            for k in range(0, pre, 64):
                NNRT_PREFETCH(j.sp + j.ip[i + _AHEAD] * j.row + k)
        if _copy_row(j, i):
            bad = True
    if bad:
        j.bad = 1


cdef int _gather_job(_Gather* job, cnp.ndarray s, const cnp.npy_intp* ip, Py_ssize_t m,
                     cnp.ndarray o, bint check, bint strict) except -1:
    # take_rows' copy of m rows ip of s into o (C-contiguous: the caller checked), set up
    # in job: 1 ready, 0 the arrays do not qualify (or, not strict, an index is out of
    # bounds), 2 nothing to copy. Everything about s and o is read here, under the GIL:
    # job holds C copies of what the copy trusts.
    if (not cnp.PyArray_ISWRITEABLE(o)
            or cnp.PyArray_TYPE(s) != cnp.PyArray_TYPE(o)
            or cnp.PyArray_ITEMSIZE(s) != cnp.PyArray_ITEMSIZE(o)
            or not (cnp.PyArray_ISNUMBER(s) or cnp.PyArray_ISBOOL(s))  # never objects
            or not (cnp.PyArray_ISNOTSWAPPED(s) and cnp.PyArray_ISNOTSWAPPED(o))
            or cnp.PyArray_NDIM(s) != cnp.PyArray_NDIM(o)):
        return 0
    cdef int typ = cnp.PyArray_TYPE(s)
    if check and not (cnp.PyArray_ISALIGNED(o) and cnp.PyArray_ISALIGNED(s)
                      and (typ == cnp.NPY_FLOAT32 or typ == cnp.NPY_FLOAT64)):
        return 0
    cdef int d
    for d in range(1, cnp.PyArray_NDIM(s)):
        if cnp.PyArray_DIM(s, d) != cnp.PyArray_DIM(o, d):
            return 0
    cdef Py_ssize_t nrows = cnp.PyArray_DIM(s, 0)
    if cnp.PyArray_DIM(o, 0) != m:
        return 0
    cdef Py_ssize_t i
    for i in range(m):
        if ip[i] < 0 or ip[i] >= nrows:
            if not strict:
                return 0
            raise IndexError(f"take_rows: index {ip[i]} is out of bounds for {nrows} rows")
    if m == 0 or nrows == 0:
        return 2
    job.sp = <const char*>cnp.PyArray_DATA(s)
    job.op = <char*>cnp.PyArray_DATA(o)
    job.ip = ip
    job.row = cnp.PyArray_NBYTES(s) // nrows
    job.items = job.row // cnp.PyArray_ITEMSIZE(s)
    job.check = 0 if not check else (1 if typ == cnp.NPY_FLOAT32 else 2)
    job.bad = 0
    job.m = m
    job.done = 0
    return 1


cdef int _gather_done(_Gather* job, Py_ssize_t m) except -1:
    # after a job's copy: NonFinite for the first row holding a NaN/Inf, if one did
    if not job.bad:
        return 1
    cdef Py_ssize_t i
    for i in range(m):
        if _copy_row(job, i):
            raise NonFinite(job.ip[i])
    return 1


cdef int _take(cnp.ndarray s, const cnp.npy_intp* ip, Py_ssize_t m, cnp.ndarray o,
               bint check) except -1:
    # take_rows for C-contiguous s and o (the caller checked) and m indices at ip: 1 when
    # done, 0 when the arrays do not qualify (nothing copied)
    cdef _Gather job
    cdef int ready = _gather_job(&job, s, ip, m, o, check, True)
    if ready != 1:
        return 1 if ready == 2 else 0
    # the GIL stays held: no other thread can resize src or out while they are read;
    # with two threads allowed the rows are split with nnrt's helper thread (a
    # "stream" job: a row counts as its bytes)
    par_for(PAR_STREAM, <par_fn>_gather_rows, &job, m, job.row)
    return _gather_done(&job, m)


# ------------------------------------------------------------------ the step

cpdef object sgd_sce_step(object net, object opt, object Xb, object yb, bint trusted,
                          object loss_fn, object on_stale):
    return _step(net, opt, Xb, yb, trusted, loss_fn, on_stale, NULL)


cdef object _step(object net, object opt, object Xb, object yb, bint trusted,
                  object loss_fn, object on_stale, _Gather* pre):
    """``nnrt.engine.TrainStep``'s step for its most common case, without a Python frame
    per part (~1.5 us of a 22 us tiny step), or None, having done nothing, when the
    case does not apply.

    The case: ``net`` holds only compiled layers, in the order its cached structure
    was built for, all of its dtype; the loss is the built-in softmax cross-entropy
    (``loss_fn``, its public function, handles labels its kernel declines); ``opt`` is
    an ``nnrt.optim.SGD`` of ``net`` without momentum (the caller checks its type).
    The caller holds ``net``'s state lock. Computes what the general step computes,
    bit for bit: forward (training, the batch trusted when the caller owns it), loss
    and correct count, backward without the input gradient, then, when the loss is
    finite, ``on_stale(opt)`` if the optimizer's arrays may no longer be the live ones
    (it raises when they are not) and the SGD update. Returns ``(loss, correct)``.
    """
    cdef dict d = net.__dict__
    cached = d.get("_structure_cache")
    layers = net.layers
    if cached is None or type(layers) is not list or not same_items(cached[0], layers):
        return None
    plan = cached[1]
    python, fuse, first = plan
    if python or not dtypes_are(layers, net.dtype):
        return None
    cdef dict od = opt.__dict__
    if od.get("_lock_net") is not net or od["momentum"] != 0.0:
        return None
    Y = forward_chain(layers, Xb, True, fuse, trusted)
    d["_last_out"] = Y
    fused = softmax_cross_entropy(Y, yb, True)
    if fused is None:  # labels the kernel declines: the public loss converts or raises
        loss, dY = loss_fn(Y, yb)
        correct = n_correct(Y, yb)
    else:
        loss, dY, correct = fused
    backward_chain(layers, dY, first, False, fuse)
    if pre != NULL:
        # the epoch's next batch, gathered now that nothing reads this one (the SGD
        # update does not): its rows, prefetched during this step's GEMMs, are still
        # in L2, which the update's pass over the weights and gradients would evict
        par_for(PAR_STREAM, <par_fn>_gather_rows, pre, pre.m, pre.row)
        pre.done = 1
    cdef double value = loss
    if not isfinite(value):
        return value, correct
    bound = od.get("_bound")
    if bound is not None:
        bnet, parts, held = bound
        if (bnet is not None and not same_items(parts, bnet.layers)) or not params_held(held):
            on_stale(opt)  # raises unless the arrays are the same memory after all
    if not sgd_step(od["_params"], od["_grads"], None, od["lr"], 0.0, od["dampening"],
                    od["weight_decay"], od["nesterov"], None):
        from nnrt.optim import _not_plain

        raise _not_plain(opt)
    od["step_count"] = od["step_count"] + 1
    return value, correct


cdef inline object _locked_step(object net, object opt, object Xb, object yb, bint trusted,
                                object loss_fn, object on_stale, object lock,
                                _Gather* pre=NULL):
    # one sgd_sce_step under lock (taken and released per step, as TrainStep does: a
    # predict from another thread sees the weights before or after a step); pre: a
    # gather to run between its backward and its update (_step)
    lock.acquire()
    try:
        return _step(net, opt, Xb, yb, trusted, loss_fn, on_stale, pre)
    finally:
        lock.release()


cdef inline bint _tally(object r, Py_ssize_t n, double* total, Py_ssize_t* correct):
    # a step's (loss, correct count) added to the sums, the loss weighted by the global
    # batch's n rows: True; False, nothing added, when the compiled step declined (r
    # None) or the loss is not finite
    if r is None:
        return False
    cdef double value = (<tuple>r)[0]
    if not isfinite(value):
        return False
    total[0] += value * n
    correct[0] += <Py_ssize_t>(<tuple>r)[1]
    return True


def sgd_sce_run(list batches, object net, object opt, object loss_fn, object on_stale,
                object lock, bint trusted, double total, Py_ssize_t correct):
    """``sgd_sce_step`` over ``batches`` (a list of ``(Xb, yb, n_global)``), each step
    under ``lock`` (taken and released per step, as ``TrainStep`` does), while the
    compiled case applies and the losses are finite: the training engine's loop over
    one gathered chunk without a Python frame per step.

    Returns ``(done, total, correct, bad)``: the number of steps done; ``total`` plus
    each one's ``loss * n_global`` and ``correct`` plus each one's count, added in
    order (as the Python loop adds them); ``bad`` is ``(loss, correct)`` of the step
    after them when its loss was not finite (it ran, without an update), else None.
    A batch the compiled case does not take (a shard: ``n_global`` is not its row
    count, or ``sgd_sce_step`` declines) stops the run with ``bad`` None: the caller
    runs it and the rest.
    """
    cdef Py_ssize_t i, m = len(batches), n
    cdef tuple item
    for i in range(m):
        item = <tuple?>batches[i]
        Xb, yb, n = item
        if n != len(Xb):
            return i, total, correct, None
        r = _locked_step(net, opt, Xb, yb, trusted, loss_fn, on_stale, lock)
        if not _tally(r, n, &total, &correct):
            return i, total, correct, r  # None: declined; else the non-finite step's
    return m, total, correct, None


cdef object _pin(object a):
    # A weak reference to the ndarray that owns a's memory: numpy refuses to resize an
    # array something holds a weak reference to, even with refcheck=False, so its memory
    # stays where it is while the reference lives. None when no ndarray owns it (a
    # memory map's mmap, a bytes object: the buffer export numpy holds pins those).
    while isinstance(a, np.ndarray):
        if cnp.PyArray_CHKFLAGS(<cnp.ndarray>a, cnp.NPY_ARRAY_OWNDATA):
            return weakref.ref(a)
        a = getattr(a, "base")
    return None


# data sets at least this large have their next batch's rows prefetched during a step
# (smaller ones stay in the caches between epochs)
cdef Py_ssize_t _PREFETCH_MIN_BYTES = 4 << 20
# batches of X at least this large are gathered on nnrt's helper thread while the
# previous batch trains, when the thread policy allows two threads
cdef Py_ssize_t _BACKGROUND_MIN_BYTES = 64 << 10
BACKGROUND_MIN_BYTES = _BACKGROUND_MIN_BYTES  # (nnrt/engine.py sizes its buffers by it)


def sgd_sce_epoch(object net, object opt, object loss_fn, object on_stale, object lock,
                  object X, object y, object rows, Py_ssize_t b0, object Xbuf, object ybuf,
                  bint check, double total, Py_ssize_t correct, object Xbuf2=None):
    """The training engine's epoch for the compiled case (``sgd_sce_step``): batch ``b``
    (from ``b0`` on) is the rows ``rows[b]`` of ``X`` and ``y`` (``rows``: a C-contiguous
    (batches, batch size) intp array the caller owns and leaves alone), gathered into
    ``Xbuf`` and ``ybuf`` (the caller's buffers of one batch) and trained on, one step
    under ``lock`` each, without a Python frame per batch.

    ``check``: X's rows are tested for NaN/Inf as they are gathered (``NonFinite``, as
    ``take_rows``, raised when the batch holding the row is due). ``Xbuf2``, a second
    buffer like ``Xbuf`` (or None): with two threads allowed, each batch of X from
    ``_BACKGROUND_MIN_BYTES`` on is gathered into one buffer by nnrt's helper thread
    while the previous one trains from the other. Otherwise, while a batch trains on a
    data set larger than the caches, the next batch's rows are queued for nnrt's GEMM
    kernel to prefetch (``nnrt._blas``), so that its gather copies from cache rather
    than from memory.

    Returns ``(done, total, correct, bad)`` as :func:`sgd_sce_run`: ``done`` is the
    index of the first batch not done (``len(rows)`` when all are). A batch the
    compiled case or the gather does not take stops the run with ``bad`` None.
    """
    if not (_rows_of(X) and _rows_of(y) and _rows_of(Xbuf) and _rows_of(ybuf)
            and type(rows) is np.ndarray):
        return b0, total, correct, None
    cdef cnp.ndarray R = <cnp.ndarray>rows
    if (cnp.PyArray_TYPE(R) != cnp.NPY_INTP or cnp.PyArray_NDIM(R) != 2
            or not cnp.PyArray_IS_C_CONTIGUOUS(R)):
        return b0, total, correct, None
    cdef cnp.ndarray Xs = <cnp.ndarray>X, ys = <cnp.ndarray>y
    cdef cnp.ndarray Xo = <cnp.ndarray>Xbuf, yo = <cnp.ndarray>ybuf
    cdef cnp.ndarray Xcur = Xo, Xother = None
    cdef Py_ssize_t nb = cnp.PyArray_DIM(R, 0), bs = cnp.PyArray_DIM(R, 1), b
    cdef const cnp.npy_intp* ip = <const cnp.npy_intp*>cnp.PyArray_DATA(R)
    cdef bint ahead = cnp.PyArray_NBYTES(Xs) >= _PREFETCH_MIN_BYTES
    if (Xbuf2 is not None and Xbuf2 is not Xbuf and _rows_of(Xbuf2)
            and cnp.PyArray_NBYTES(Xo) >= _BACKGROUND_MIN_BYTES):
        Xother = <cnp.ndarray>Xbuf2
    # NOTE: a gather's job holds C copies of X's data pointer, row length and the
    # batch's row indices (bounds-checked under the GIL when it is set up), and runs
    # later: in the background, without the GIL, or inside the step, after GEMMs that
    # released it. What could move X's memory or a buffer's meanwhile is a resize from
    # another thread (with refcheck=False, or of an owner nothing else references): the
    # weak references in pins make numpy refuse any resize of them until this returns.
    # The background job is always joined before this returns or raises.
    pins = [_pin(Xs), _pin(Xo), _pin(Xother)]
    cdef _Gather job
    cdef _Gather* pre = NULL
    cdef bint posted = False
    # the next batch's row indices, copied when its gather is set up (and bounds-checked
    # there): the job never reads rows, which another thread could change meanwhile
    cdef cnp.npy_intp* nxt = <cnp.npy_intp*>malloc(max(bs, 1) * sizeof(cnp.npy_intp))
    if nxt == NULL:
        raise MemoryError("sgd_sce_epoch: no memory for a batch's row indices")
    try:
        for b in range(b0, nb):
            if posted:  # this batch was gathered in the background, into Xcur
                posted = False
                par_join()
                _gather_done(&job, bs)
            elif pre != NULL and pre.done:  # gathered inside the last step, into Xcur
                _gather_done(pre, bs)
            elif not _take(Xs, ip + b * bs, bs, Xcur, check):
                return b, total, correct, None
            pre = NULL
            if not _take(ys, ip + b * bs, bs, yo, False):
                return b, total, correct, None
            if b + 1 < nb:
                memcpy(nxt, ip + (b + 1) * bs, bs * sizeof(cnp.npy_intp))
            if b + 1 < nb and Xother is not None:
                # the next batch into the other buffer, on the helper thread
                if _gather_job(&job, Xs, nxt, bs, Xother, check, False) == 1:
                    posted = par_post(<par_fn>_gather_rows, &job, bs) == 1
            if b + 1 < nb and not posted:
                # else into this one, between this step's backward and its update
                if _gather_job(&job, Xs, nxt, bs, Xcur, check, False) == 1:
                    pre = &job
            if ahead and not posted and b + 1 < nb and cnp.PyArray_DIM(Xs, 0) > 0:
                # X's address and row length read now, under the GIL; the queue only
                # prefetches them (never reads), and holds its own copy of the indices
                # (checked against X's length by the gather of that batch, not here:
                # a prefetch of any address is harmless)
                prefetch_set(<const char*>cnp.PyArray_DATA(Xs),
                             <const Py_ssize_t*>(ip + (b + 1) * bs), bs,
                             cnp.PyArray_NBYTES(Xs) // cnp.PyArray_DIM(Xs, 0))
            r = _locked_step(net, opt, Xcur, ybuf, True, loss_fn, on_stale, lock, pre)
            if not _tally(r, bs, &total, &correct):
                return b, total, correct, r
            if posted:
                Xcur, Xother = Xother, Xcur
    finally:
        if posted:
            par_join()
        if ahead:
            prefetch_clear(1)  # and free the offsets: nothing left behind by a thread
        free(nxt)
        del pins  # (held to here)
    return nb, total, correct, None
