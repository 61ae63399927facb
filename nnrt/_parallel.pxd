# cython: language_level=3
"""Two-thread splitting of element-wise kernels and the default thread policy.

``par_for(kind, fn, ctx, n, unit)`` runs ``fn(ctx, 0, n)``, or, when the thread policy
allows two threads and the job (``n`` units of ``unit`` elements) is at least the
measured threshold of its ``kind``, ``fn(ctx, 0, mid)`` on the caller and
``fn(ctx, mid, n)`` on nnrt's helper thread (nnrt/_parallel.h). ``fn`` must write
disjoint outputs for disjoint ranges; it runs without the GIL. Returns the number of
threads used. ``blas_threads_for(m, n, k)`` applies the BLAS thread count the policy
picks for an (m x k) @ (k x n) GEMM in a call of kind ``op`` (the caller's choice, e.g.
0 forward, 1 backward; call it before the GEMM, with or without the GIL) and returns a
token; ``blas_threads_done(token, seconds)`` reports how long the GEMM
work took (``par_now()`` differences), which the policy learns from. Between the two,
``par_gemm(fn, ctx, n, nchunks, align)`` runs ``fn`` over ``nchunks`` pieces of
``[0, n)`` (bounds multiples of ``align``) on the caller and the helper thread when
the policy picked more than one thread for the calling thread's GEMM, else
``fn(ctx, 0, n)`` (nnrt/_blas.pyx splits its GEMM kernel with it; a GEMV or any
kernel timed by the bracket may use it the same way).
"""

ctypedef void (*par_fn)(void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil

cdef enum:
    # job kinds (their thresholds differ with the cost per element)
    PAR_STREAM = 0    # memory-bound passes: SGD, sigmoid backward, normalisation dx/affine, db
    PAR_EXPF = 1      # float32 polynomial exp: sigmoid forward, normalisation+sigmoid forward
    PAR_EXP = 2       # float64 libm exp: float64 sigmoid, softmax cross-entropy
    PAR_ADAM = 3      # Adam/AdamW (a sqrt and a division per element)
    PAR_NKINDS = 4

cdef int par_for(int kind, par_fn fn, void* ctx, Py_ssize_t n, Py_ssize_t unit) noexcept nogil
# fn(ctx, 0, n) on the helper thread while the caller goes on (the policy allowing two
# threads): 1 when posted, and the caller must then call par_join() before it touches
# what fn writes or lets go of what it reads; 0 when not (another thread's background job
# is in flight, one thread, no helper): the caller runs fn itself. The caller's
# par_for/par_gemm jobs meanwhile run as usual. One background job per caller at a time.
cdef int par_post(par_fn fn, void* ctx, Py_ssize_t n) noexcept nogil
cdef void par_join() noexcept nogil
cdef int par_gemm(par_fn fn, void* ctx, Py_ssize_t n, long nchunks,
                  Py_ssize_t align) noexcept nogil
cdef int blas_threads_for(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, int op) noexcept nogil
cdef void blas_threads_done(int token, double seconds) noexcept nogil
cdef double par_now() noexcept nogil
