# cython: language_level=3
"""Threads in nnrt: the helper thread of the element-wise kernels and the thread policy.

The policy (docs/performance.md "Threads"), with a ceiling of ``nnrt.set_num_threads``'s
n, or, when nothing was set, the BLAS's own thread count (one per core, or
``OPENBLAS_NUM_THREADS``, or what threadpoolctl set last):

* GEMMs: a Dense GEMM (each call brackets its GEMMs with ``blas_threads_for``/``done``)
  costing less than ``gemm_min_macs`` (m*n*k multiply-adds plus ``gemm_weight_macs``
  per element of the k x n weights: their streaming is a few-row GEMM's cost) runs
  on one thread; a larger one on one thread or on the ceiling's, whichever has been
  faster for its shape lately (timed per call; learnt per shape and kind of call).
  The choice sets the BLAS's thread count (more than one only from ``blas_min_macs``
  multiply-adds) and whether nnrt's GEMM kernel (nnrt/_blas.pyx) splits the GEMM over
  nnrt's helper thread (``par_gemm``: bit-identical to one thread).
* element-wise kernels (sigmoid, a normalisation's element-wise passes, softmax
  cross-entropy, SGD/Adam updates, the bias gradient) run in contiguous chunks on
  the caller and the helper thread when the ceiling is >= 2 and the job has at least
  the measured threshold of elements for its kind (and, when nothing was set, the
  GEMMs' latest verdict is not "one thread"). Each output element is computed by the
  same code as in one thread: the results are bit-identical.

``nnrt.set_num_threads(1)`` runs everything on one thread; ``set_num_threads(n)``
makes n the ceiling (the policy still keeps small GEMMs and small element-wise jobs
on one thread, where a second thread loses); ``set_num_threads(None)`` returns to
the BLAS's own count. ``policy()`` reports the current choice;
``gemm_threads``/``split_threads`` what it picks for a size.
"""

import os

from libc.stdint cimport uintptr_t

from nnrt._blas cimport blas_get_threads, blas_set_threads

cdef extern from "nnrt/_parallel.h" nogil:
    ctypedef void (*nnrt_par_fn)(void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil
    int nnrt_par_run(nnrt_par_fn fn, void* ctx, Py_ssize_t n, long nchunks, Py_ssize_t align)
    int nnrt_par_post(nnrt_par_fn fn, void* ctx, Py_ssize_t n)
    void nnrt_par_join()
    long nnrt_par_stat(int which)
    double nnrt_par_now()
    void nnrt_par_set_spin(long spin)
    void nnrt_par_set_gemm_threads(int t)
    int nnrt_par_get_gemm_threads()

ctypedef void (*blas_set_t)(int) noexcept nogil
ctypedef int (*blas_get_t)() noexcept nogil

# thresholds in elements per job kind: about 10-45 us of 1-thread work at the per-element
# costs measured on AMD EPYC (Zen, AVX2): docs/performance.md "Threads"
cdef Py_ssize_t _thr[PAR_NKINDS]
_KINDS = {"stream": PAR_STREAM, "expf": PAR_EXPF, "exp": PAR_EXP, "adam": PAR_ADAM}
_DEFAULT_THRESHOLDS = {"stream": 1 << 17, "expf": 1 << 16, "exp": 1 << 13, "adam": 1 << 17}
_DEFAULT_GEMM_MIN_MACS = 4_000_000
# the BLAS's own threads only from this size (nnrt's kernel splits from _gemm_min, bit-
# identical to one thread): a threaded OpenBLAS GEMM's results differ from its 1-thread
# ones (measured: sgemm NT 517 x 300 x 264), and below this size its worker's wake-up
# and spinning cost more than they gain
_BLAS_MIN_MACS = 16_000_000
for _name, _v in _DEFAULT_THRESHOLDS.items():
    _thr[<int>_KINDS[_name]] = _v

cdef int _user = 0           # nnrt.set_num_threads(n): n; 0 = the default policy
cdef int _avail = 1          # threads the default policy may use
cdef int _initial = 1        # the BLAS's thread count when nnrt was imported
cdef double _gemm_min = _DEFAULT_GEMM_MIN_MACS
cdef double _blas_min = _BLAS_MIN_MACS
cdef double _W_MACS = 16.0
cdef blas_set_t _blas_set = NULL
cdef blas_get_t _blas_get = NULL
cdef int _blas_last = -1     # the count this policy set last (-1: none)
cdef int _blas_ceiling = 1   # the count anyone else set last
# the GEMM learner's latest verdict on a GEMM of at least _VERDICT_MIN_MACS: 1 when
# more threads won, 0 when one did, -1 none yet; the element-wise split follows it in
# the default policy (a second core that a large GEMM cannot use, e.g. busy with other
# processes, does not help a kernel either). Smaller GEMMs do not vote: one thread wins
# there on a quiet machine too (a batch-1 GEMV, a 10-wide output layer), and the last
# of them vetoed every split that followed (the frozen session's panels at 2 threads
# ran on one: large, batch 16, 449 us against 243 us split)
cdef int _verdict = -1
cdef double _VERDICT_MIN_MACS = 16e6
_blas_name = None


cdef inline int _threads() noexcept nogil:
    # the element-wise jobs' thread count (par_for's, before its size threshold)
    return _user if _user > 0 else (1 if _verdict == 0 else _avail)


cdef int par_post(par_fn fn, void* ctx, Py_ssize_t n) noexcept nogil:
    # the background job: posted to the helper when the policy allows two threads
    if _threads() < 2:
        return 0
    return nnrt_par_post(<nnrt_par_fn>fn, ctx, n)


cdef void par_join() noexcept nogil:
    nnrt_par_join()


cdef int par_for(int kind, par_fn fn, void* ctx, Py_ssize_t n, Py_ssize_t unit) noexcept nogil:
    cdef int threads = _threads()
    cdef double elements = <double>n * <double>unit, chunk
    cdef long nchunks
    if threads >= 2 and n >= 2 and 0 <= kind < PAR_NKINDS and elements >= <double>_thr[kind]:
        # chunks of about a quarter of the threshold, 2 to 16 of them
        chunk = max(<double>_thr[kind] / 4.0, 4096.0)
        nchunks = <long>min(16.0, max(2.0, elements / chunk))
        if nchunks > n:
            nchunks = <long>n
        # element ranges start on 64-byte boundaries (16 floats)
        if nnrt_par_run(<nnrt_par_fn>fn, ctx, n, nchunks, 16 if unit == 1 and n >= 1024 else 1):
            return 2
    fn(ctx, 0, n)
    return 1


# The GEMM choice, learnt per shape: a GEMM with at least _gemm_min multiply-adds
# runs on 1 or on the ceiling's threads, whichever has been faster for its shape
# (m, n, k) lately: each option is tried twice first (once when the first times differ
# more than twice; the first re-try then comes after 128 calls), then the faster one is
# used and
# the other re-tried once after 16 calls, then 32, 64, ... up to 4096 (8 times later
# instead of twice when it was more than twice as slow; back to 16 when the winner
# changes): load from other processes changes which wins (on a busy 2-core
# machine one thread is faster at every size), and a re-try of the slow option is
# costly there. Times are of the Dense call's GEMM work: the faster of the two
# exploration samples, then for the option in use an exponential moving average
# (weight 0.3), for the other its latest re-try. Races between Python threads on a
# slot only blur the times (the slot index is always in range).
cdef enum:
    _NSLOTS = 64
    _RETRY_MIN = 16
    _RETRY_MAX = 4096

ctypedef struct _Slot:
    Py_ssize_t m, n, k
    int op            # the caller's kind of call (Dense: 0 forward or eval, 1 backward)
    double t[2]       # seconds: [0] one thread, [1] the ceiling's threads
    int cnt[2]
    long calls
    long retry        # calls between re-tries of the slower option
    int best          # the option used (0 or 1)

cdef _Slot _slots[_NSLOTS]


cdef inline int _slot_of(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int op) noexcept nogil:
    cdef unsigned long long h = <unsigned long long>m * 1000003ULL
    h = (h ^ <unsigned long long>n) * 1000003ULL
    h = (h ^ <unsigned long long>k) * 1000003ULL
    h = (h ^ <unsigned long long>op) * 1000003ULL
    cdef int i = <int>((h >> 17) % _NSLOTS)
    cdef _Slot* s = &_slots[i]
    if s.m != m or s.n != n or s.k != k or s.op != op:
        s.m = m
        s.n = n
        s.k = k
        s.op = op
        s.t[0] = s.t[1] = 0
        s.cnt[0] = s.cnt[1] = 0
        s.calls = 0
        s.retry = _RETRY_MIN
        s.best = 0
    return i


cdef inline int _choose(_Slot* s) noexcept nogil:
    # 0: one thread, 1: the ceiling's
    s.calls += 1
    cdef bint lopsided = s.t[0] > 2.0 * s.t[1] or s.t[1] > 2.0 * s.t[0]
    if s.cnt[0] < 2 or s.cnt[1] < 2:
        # two samples of each, unless the first ones differ more than twice: then a
        # second sample of the slow option is not worth its cost
        if s.cnt[0] < 1 or s.cnt[1] < 1 or not lopsided:
            return 0 if s.cnt[0] <= s.cnt[1] else 1
        s.cnt[0] = s.cnt[1] = 2  # exploration over
        s.retry = _RETRY_MIN * 8
    global _verdict
    cdef int best = 0 if s.t[0] <= s.t[1] else 1
    if <double>s.m * <double>s.n * <double>s.k >= _VERDICT_MIN_MACS:
        _verdict = best
    if best != s.best:
        s.best = best
        s.retry = _RETRY_MIN  # the winner changed: watch more closely
    if s.calls >= s.retry:
        # re-try the slower option; the next re-try comes twice as late (8 times when
        # it was more than twice as slow: a re-try costs that much)
        s.calls = 0
        if s.retry < _RETRY_MAX:
            s.retry *= 8 if s.t[1 - best] > 2.0 * s.t[best] else 2
            if s.retry > _RETRY_MAX:
                s.retry = _RETRY_MAX
        return 1 - best
    return best


cdef inline double _gemm_work(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    # a GEMM's cost in multiply-adds, plus _W_MACS per element of its right operand (k x n,
    # the weights of a forward): at a few rows the weights' streaming from memory is
    # the cost (a batch-1 GEMV), which a split over two cores' caches and loads halves
    return <double>m * <double>n * <double>k + _W_MACS * <double>n * <double>k


cdef int blas_threads_for(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int op) noexcept nogil:
    # The choice for this GEMM: one thread under _gemm_min multiply-adds, else 1 or the
    # ceiling (nnrt.set_num_threads' n, or the BLAS's own count), whichever the shape's
    # timings favour. It sets the BLAS's thread count and the kernel route's split
    # (par_gemm) alike.
    global _blas_last, _blas_ceiling, _avail
    cdef bint control = _blas_set != NULL and _blas_get != NULL
    if control and _initial < 0 and not _settle():
        control = False
    cdef int cur = _blas_get() if control else -1
    cdef int ceiling
    if _user > 0:
        ceiling = _user
    elif control:
        if cur != _blas_last:
            # someone else (threadpoolctl, the BLAS's own API) set it: that is the ceiling
            _blas_ceiling = cur
            _avail = cur
        ceiling = _blas_ceiling
    else:
        ceiling = _avail
    cdef int want = 1, token = -1, i, c
    if ceiling > 1 and _gemm_work(m, n, k) >= _gemm_min:
        i = _slot_of(m, n, k, op)
        c = _choose(&_slots[i])
        want = ceiling if c else 1
        token = 2 * i + c
    cdef int blas = want if <double>m * <double>n * <double>k >= _blas_min else 1
    if control:
        if blas != cur:
            _blas_set(blas)
        _blas_last = blas
    nnrt_par_set_gemm_threads(want)
    return token


cdef int par_gemm(par_fn fn, void* ctx, Py_ssize_t n, long nchunks,
                  Py_ssize_t align) noexcept nogil:
    # a GEMM kernel's split (nnrt/_blas.pyx): on two threads when blas_threads_for
    # picked more than one for the calling thread's current GEMM
    if nchunks >= 2 and n >= 2 and nnrt_par_get_gemm_threads() >= 2:
        if nnrt_par_run(<nnrt_par_fn>fn, ctx, n, nchunks, align):
            return 2
    fn(ctx, 0, n)
    return 1


cdef void blas_threads_done(int token, double seconds) noexcept nogil:
    # a GEMM outside a blas_threads_for/done bracket (a plugin's own gemm_rm) runs on
    # one thread
    nnrt_par_set_gemm_threads(1)
    if token < 0 or token >= 2 * _NSLOTS:
        return
    cdef _Slot* s = &_slots[token // 2]
    cdef int c = token % 2
    if s.cnt[c] == 0:
        s.t[c] = seconds
    elif s.cnt[c] < 2:
        # exploring: the faster sample (a first call may find the helper asleep, the
        # caches cold, another library's threads still spinning)
        s.t[c] = min(s.t[c], seconds)
    elif c != s.best:
        # a re-try of the slower option: a fresh measurement replaces the old one (an
        # average would keep an unlucky early sample for thousands of calls)
        s.t[c] = seconds
    else:
        s.t[c] = 0.7 * s.t[c] + 0.3 * seconds
    if s.cnt[c] < 1000000:
        s.cnt[c] += 1


cdef double par_now() noexcept nogil:
    return nnrt_par_now()


cdef void _set_via_blas(int n) noexcept nogil:
    blas_set_threads(n)


cdef int _get_via_blas() noexcept nogil:
    return blas_get_threads()


def _par_for_address():
    """C address of ``par_for`` (nnrt/_blas.pyx binds it at run time to split its GEMM
    kernel's rows: a cimport of this module from there would be circular)."""
    return <uintptr_t>&par_for


def _par_gemm_address():
    """C address of ``par_gemm`` (bound by nnrt/_blas.pyx at run time, as par_for)."""
    return <uintptr_t>&par_gemm


def _bind_blas():
    """Control the thread count of the BLAS backend nnrt's GEMMs use (nnrt/_blas.pyx:
    numpy's OpenBLAS, MKL, scipy-openblas or scipy's; ``blas_set_threads`` and
    ``blas_get_threads`` follow the backend in use, so a later change of backend
    is followed too). The backend's thread count is read at the first GEMM
    (``_settle``): reading it here would settle a pending MKL calibration at import.
    Returns whether the policy controls the BLAS."""
    global _blas_set, _blas_get, _blas_last, _initial, _blas_name
    _blas_set = _set_via_blas
    _blas_get = _get_via_blas
    _blas_last = -1
    _initial = -1
    _blas_name = "nnrt._blas"
    return True


cdef int _settle() noexcept nogil:
    # the first use of the policy: the backend's own thread count is the ceiling
    global _blas_set, _blas_get, _initial, _blas_ceiling, _avail, _blas_name
    cdef int n = _blas_get() if _blas_get != NULL else -1
    if n < 1:  # the backend has no thread controls: leave the BLAS alone
        _blas_set = NULL
        _blas_get = NULL
        with gil:
            _blas_name = None
            _initial = _cpu_count()
        _avail = _initial
        return 0
    _initial = n
    _blas_ceiling = n
    _avail = n
    return 1


def _cpu_count():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def set_user_threads(n):
    """``nnrt.set_num_threads``'s side: ``n`` >= 1 fixes the thread count (the policy
    then leaves the BLAS alone); None returns to the default policy (and the BLAS to
    the thread count it had when nnrt was imported)."""
    global _user, _blas_last, _blas_ceiling, _avail
    if n is None:
        _user = 0
        _blas_last = -1
        if _initial >= 1:  # else the policy has not settled yet: nothing to undo
            if _blas_set != NULL:
                _blas_set(_initial)
            _blas_ceiling = _initial
            _avail = _initial
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_user_threads: n must be a positive int or None, got {n!r}")
    _user = n


cdef int _ceiling() noexcept nogil:
    # the most threads a GEMM may use now: nnrt.set_num_threads' n, else the BLAS's own
    # count (or the CPUs, when nnrt does not control the BLAS)
    if _user > 0:
        return _user
    return _blas_ceiling if _blas_set != NULL else _avail


def gemm_threads(m, n, k, op=0):
    """Threads the policy would pick for the next (m x k) @ (k x n) GEMM: one under
    ``gemm_min_macs`` multiply-adds, else one or the ceiling (``nnrt.set_num_threads``'s
    n, or the BLAS's own count), as learnt for the shape. Does not count as a call."""
    if _initial < 0:
        _settle()
    cdef int ceiling = _ceiling()
    if ceiling <= 1 or _gemm_work(m, n, k) < _gemm_min:
        return 1
    cdef _Slot* s = &_slots[_slot_of(m, n, k, op)]
    cdef _Slot saved = s[0]
    cdef int c = _choose(s)  # this is only a question: leave the slot as it was
    s[0] = saved
    return ceiling if c else 1


def _gemm_next(m, n, k, op=0, seconds=None):
    """The choice for the next call of a shape, counted as a call, and ``seconds``
    recorded as its time when given (tests of the policy's logic); the BLAS is not
    touched."""
    if _initial < 0:
        _settle()
    cdef int ceiling = _ceiling()
    if ceiling <= 1 or _gemm_work(m, n, k) < _gemm_min:
        return 1
    cdef int i = _slot_of(m, n, k, op)
    cdef int c = _choose(&_slots[i])
    if seconds is not None:
        blas_threads_done(2 * i + c, seconds)
    return ceiling if c else 1


def _gemm_learn(m, n, k, double one, double many, op=0):
    """Record one timing of each option for a shape (tests of the policy's logic)."""
    cdef int i = _slot_of(m, n, k, op)
    blas_threads_done(2 * i, one)
    blas_threads_done(2 * i + 1, many)


def _gemm_table():
    """The learnt GEMM choices: one dict per shape seen (m, n, k, seconds per option)."""
    out = []
    cdef int i
    for i in range(_NSLOTS):
        if _slots[i].cnt[0] or _slots[i].cnt[1]:
            out.append({"m": _slots[i].m, "n": _slots[i].n, "k": _slots[i].k,
                        "op": _slots[i].op,
                        "t1": _slots[i].t[0], "t_many": _slots[i].t[1],
                        "samples": (_slots[i].cnt[0], _slots[i].cnt[1])})
    return out


def _gemm_forget():
    """Forget every learnt GEMM choice."""
    global _verdict
    _verdict = -1
    cdef int i
    for i in range(_NSLOTS):
        _slots[i].m = _slots[i].n = _slots[i].k = 0
        _slots[i].op = 0
        _slots[i].cnt[0] = _slots[i].cnt[1] = 0
        _slots[i].t[0] = _slots[i].t[1] = 0
        _slots[i].calls = 0


def split_threads(str kind, n, unit=1):
    """Threads (1 or 2) an element-wise job of ``n`` units of ``unit`` elements
    of ``kind`` ("stream", "expf", "exp", "adam") runs on now."""
    if _initial < 0:
        _settle()
    cdef int k = _KINDS[kind]
    cdef int threads = _user if _user > 0 else (1 if _verdict == 0 else _avail)
    if threads >= 2 and n >= 2 and float(n) * float(unit) >= _thr[k]:
        return 2
    return 1


def policy():
    """The current thread policy, as a dict (JSON-able)."""
    if _initial < 0:
        _settle()
    return {
        "mode": "fixed" if _user else "auto",
        "threads": _user if _user else _avail,
        "blas": _blas_name,
        "blas_ceiling": _blas_ceiling if _blas_set != NULL else None,
        "gemm_min_macs": _gemm_min,
        "gemm_weight_macs": _W_MACS,
        "blas_min_macs": max(_gemm_min, _blas_min),
        "gemm_verdict": {-1: None, 0: "one thread", 1: "more threads"}[_verdict],
        "split_min_elements": {name: int(_thr[k]) for name, k in _KINDS.items()},
    }


def stats():
    """Helper-thread counters: jobs run on two threads, of which woke the helper,
    and the chunks the helper ran; background jobs posted (``par_post``: fit's gather
    of the next batch), and of which the helper ran (the poster ran the others)."""
    return {"jobs": int(nnrt_par_stat(0)), "wakeups": int(nnrt_par_stat(1)),
            "started": bool(nnrt_par_stat(2)), "helper_chunks": int(nnrt_par_stat(3)),
            "background_jobs": int(nnrt_par_stat(4)),
            "background_helped": int(nnrt_par_stat(5))}


def _set_thresholds(gemm_min_macs=None, **split_min_elements):
    """Change the thresholds (tests and measurements); returns the previous values."""
    global _gemm_min
    old = {"gemm_min_macs": _gemm_min}
    old.update({name: int(_thr[k]) for name, k in _KINDS.items()})
    for name, v in split_min_elements.items():
        if name not in _KINDS:
            raise ValueError(f"unknown job kind {name!r}; known: {', '.join(_KINDS)}")
        _thr[<int>_KINDS[name]] = max(0, int(v))
    if gemm_min_macs is not None:
        _gemm_min = float(gemm_min_macs)
    return old


def _set_spin(long spin_us):
    """How long (microseconds) the helper polls for the next job, yielding, before it
    sleeps (measurements)."""
    nnrt_par_set_spin(spin_us)


_bind_blas()
