/* One persistent helper thread for nnrt's element-wise kernels (nnrt/_parallel.pyx).
 *
 * nnrt_par_run(fn, ctx, n, nchunks, align) runs fn(ctx, lo, hi) over contiguous
 * chunks of [0, n) (rows of a row-wise kernel, elements of an element-wise one), the
 * caller and the helper thread each claiming the next chunk until none is left, and
 * returns when all are done. Every output element is computed by exactly the same
 * code as in the 1-thread run: results are bit-identical. Chunks rather than two
 * fixed halves: on a loaded 2-core machine the helper is often late (asleep, or
 * descheduled for a whole time slice, ~4-8 ms); the caller then simply runs more
 * chunks instead of waiting for a half.
 *
 * Why not OpenMP: libgomp's idle threads spin without yielding and so hold the core
 * OpenBLAS's worker needs for the next GEMM (and OpenBLAS's idle workers, which do
 * yield, hold it from libgomp). This helper spins only briefly, yielding, after a
 * job (consecutive kernels then find it awake), then sleeps on a condition variable;
 * a job that finds it asleep pays one wake-up (~10-40 us, which the size thresholds
 * account for).
 *
 * nnrt_par_post(fn, ctx, n) / nnrt_par_join() run one background job (fit's gather of
 * the next batch) on the helper while the caller goes on; the caller's split jobs run
 * meanwhile as usual, the helper joining them once the background job is done.
 *
 * One caller at a time: a second thread calling while a job runs (two Python threads
 * in two networks' kernels) gets 0 back and runs its job alone. After fork() the
 * child has no helper thread; the pthread_atfork handler resets the state so the
 * child starts its own on first use.
 */
#ifndef NNRT_PARALLEL_H
#define NNRT_PARALLEL_H

#include <stddef.h>

typedef void (*nnrt_par_fn)(void *ctx, ptrdiff_t begin, ptrdiff_t end);

/* The thread count the policy picked for the calling thread's current GEMM (set by
 * blas_threads_for, read by the GEMM kernel's split): per thread, so two Python
 * threads in two networks' GEMMs do not read each other's choice. */
#if defined(_MSC_VER)
static __declspec(thread) int nnrt_par_gemm_threads = 1;
#else
static __thread int nnrt_par_gemm_threads = 1;
#endif
static void nnrt_par_set_gemm_threads(int t) { nnrt_par_gemm_threads = t; }
static int nnrt_par_get_gemm_threads(void) { return nnrt_par_gemm_threads; }

/* monotonic seconds (the GEMM thread policy times the Dense calls with it) */
#if defined(_WIN32)
#include <windows.h>
static double nnrt_par_now(void) {
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)c.QuadPart / (double)f.QuadPart;
}
#else
#include <time.h>
static double nnrt_par_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#endif

#if defined(_WIN32)
/* no helper thread on Windows (yet): every job runs on the caller */
static int nnrt_par_run(nnrt_par_fn fn, void *ctx, ptrdiff_t n, long nchunks,
                        ptrdiff_t align) {
    (void)fn; (void)ctx; (void)n; (void)nchunks; (void)align;
    return 0;
}
static long nnrt_par_stat(int which) { (void)which; return 0; }
static void nnrt_par_set_spin(long spin_us) { (void)spin_us; }
static int nnrt_par_post(nnrt_par_fn fn, void *ctx, ptrdiff_t n) {
    (void)fn; (void)ctx; (void)n;
    return 0;
}
static void nnrt_par_join(void) {}
#else
#include <pthread.h>
#include <sched.h>

typedef struct {
    pthread_mutex_t mu;      /* guards sleeping/cond_wait; never held during a job */
    pthread_cond_t cv;
    pthread_mutex_t busy;    /* held by the one caller whose job is in flight */
    int started;             /* helper thread created (0 again in a forked child) */
    int failed;              /* pthread_create failed: run everything serially */
    int sleeping;            /* helper is (about to be) in cond_wait */
    long gen;                /* job generation posted by the caller */
    /* (generation << 32) | next unclaimed chunk: claims are compare-and-swaps, so a
     * helper that arrives after its job is over cannot claim a chunk of the next */
    unsigned long long ticket;
    long finished;           /* chunks of the current job done */
    nnrt_par_fn fn;
    void *ctx;
    ptrdiff_t n, align;
    long nchunks;
    long spin_us;            /* how long (us) the helper polls, yielding, before it sleeps */
    long jobs, wakeups, helped;  /* statistics: jobs, of which woke the helper; chunks it ran */
    /* the background job (nnrt_par_post/nnrt_par_join): one at a time, owned by the
     * thread that posted it (bg_owner held from post to join) */
    pthread_mutex_t bg_owner;
    int bg_state;            /* NNRT_BG_NONE, _POSTED, _RUNNING (claimed) or _DONE */
    nnrt_par_fn bg_fn;
    void *bg_ctx;
    ptrdiff_t bg_n;
    long bg_jobs, bg_helped; /* statistics: background jobs posted, of which the helper ran */
} nnrt_par_pool;

enum { NNRT_BG_NONE = 0, NNRT_BG_POSTED = 1, NNRT_BG_RUNNING = 2, NNRT_BG_DONE = 3 };

static nnrt_par_pool nnrt_par = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                                 PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL, NULL,
                                 0, 1, 0, 300, 0, 0, 0,
                                 PTHREAD_MUTEX_INITIALIZER, 0, NULL, NULL, 0, 0, 0};

/* Run the posted background job here if nobody has claimed it yet; 1 if it ran. */
static int nnrt_par_bg_claim(void) {
    int posted = NNRT_BG_POSTED;
    if (!__atomic_compare_exchange_n(&nnrt_par.bg_state, &posted, NNRT_BG_RUNNING, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    nnrt_par.bg_fn(nnrt_par.bg_ctx, 0, nnrt_par.bg_n);
    __atomic_store_n(&nnrt_par.bg_state, NNRT_BG_DONE, __ATOMIC_RELEASE);
    return 1;
}

/* start of chunk c of nnrt_par's current job */
static ptrdiff_t nnrt_par_bound(long c) {
    ptrdiff_t n = nnrt_par.n, a = nnrt_par.align;
    ptrdiff_t b;
    if (c >= nnrt_par.nchunks) return n;
    b = (ptrdiff_t)((double)n * (double)c / (double)nnrt_par.nchunks);
    b -= b % a;
    return b;
}

/* Claim and run chunks of generation g until none is left; returns the number run. */
static long nnrt_par_work(unsigned long long g) {
    long ran = 0;
    for (;;) {
        unsigned long long t = __atomic_load_n(&nnrt_par.ticket, __ATOMIC_ACQUIRE);
        long c;
        if ((t >> 32) != (g & 0xffffffffULL)) return ran;
        c = (long)(t & 0xffffffffULL);
        if (c >= nnrt_par.nchunks) return ran;
        if (!__atomic_compare_exchange_n(&nnrt_par.ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        nnrt_par.fn(nnrt_par.ctx, nnrt_par_bound(c), nnrt_par_bound(c + 1));
        __atomic_add_fetch(&nnrt_par.finished, 1, __ATOMIC_ACQ_REL);
        ran++;
    }
}

static void *nnrt_par_main(void *unused) {
    long seen = 0;
    (void)unused;
    for (;;) {
        long g;
        /* a brief yielding poll: the next split kernel of a training step usually
         * follows within tens of us, and a sleeping helper costs a wake-up (a futex
         * and, on an idle core of a VM, a halted vCPU: 10-100 us). A posted
         * background job is run on the way (and the poll starts again after it). */
        double until = nnrt_par_now() +
                       1e-6 * (double)__atomic_load_n(&nnrt_par.spin_us, __ATOMIC_RELAXED);
        for (;;) {
            if (__atomic_load_n(&nnrt_par.bg_state, __ATOMIC_ACQUIRE) == NNRT_BG_POSTED &&
                nnrt_par_bg_claim()) {
                __atomic_add_fetch(&nnrt_par.bg_helped, 1, __ATOMIC_RELAXED);
                until = nnrt_par_now() + 1e-6 * (double)__atomic_load_n(&nnrt_par.spin_us,
                                                                        __ATOMIC_RELAXED);
            }
            if (__atomic_load_n(&nnrt_par.gen, __ATOMIC_ACQUIRE) != seen) break;
            if (nnrt_par_now() >= until) {
                pthread_mutex_lock(&nnrt_par.mu);
                __atomic_store_n(&nnrt_par.sleeping, 1, __ATOMIC_SEQ_CST);
                while (__atomic_load_n(&nnrt_par.gen, __ATOMIC_SEQ_CST) == seen &&
                       __atomic_load_n(&nnrt_par.bg_state, __ATOMIC_SEQ_CST) != NNRT_BG_POSTED)
                    pthread_cond_wait(&nnrt_par.cv, &nnrt_par.mu);
                __atomic_store_n(&nnrt_par.sleeping, 0, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&nnrt_par.mu);
                until = nnrt_par_now() + 1e-6 * (double)__atomic_load_n(&nnrt_par.spin_us,
                                                                        __ATOMIC_RELAXED);
                continue;
            }
            sched_yield();
        }
        g = __atomic_load_n(&nnrt_par.gen, __ATOMIC_ACQUIRE);
        seen = g;
        __atomic_add_fetch(&nnrt_par.helped, nnrt_par_work((unsigned long long)g),
                           __ATOMIC_RELAXED);
    }
    return NULL;
}

static void nnrt_par_atfork_child(void) {
    /* the helper thread does not exist in the child: start afresh */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    nnrt_par.mu = m;
    nnrt_par.busy = m;
    nnrt_par.bg_owner = m;
    nnrt_par.cv = c;
    nnrt_par.bg_state = NNRT_BG_NONE;
    nnrt_par.started = 0;
    nnrt_par.sleeping = 0;
    nnrt_par.gen = 0;
    nnrt_par.ticket = 0;
}

/* Start the helper (called with nnrt_par.busy held). Returns 0 when it cannot run. */
static int nnrt_par_start(void) {
    static int atfork_done = 0;
    pthread_t th;
    pthread_attr_t attr;
    if (nnrt_par.failed) return 0;
    if (nnrt_par.started) return 1;
    if (!atfork_done) {
        if (pthread_atfork(NULL, NULL, nnrt_par_atfork_child) != 0) {
            nnrt_par.failed = 1;
            return 0;
        }
        atfork_done = 1;
    }
    nnrt_par.gen = 0;
    nnrt_par.ticket = 0;
    if (pthread_attr_init(&attr) != 0) { nnrt_par.failed = 1; return 0; }
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 1 << 18);
    if (pthread_create(&th, &attr, nnrt_par_main, NULL) != 0) {
        pthread_attr_destroy(&attr);
        nnrt_par.failed = 1;
        return 0;
    }
    pthread_attr_destroy(&attr);
    nnrt_par.started = 1;
    return 1;
}

/* Run fn over [0, n) in nchunks contiguous chunks (bounds multiples of align, except
 * n), claimed one at a time by the caller and the helper thread: a helper that is
 * asleep, slow to wake or descheduled only leaves more chunks to the caller, which
 * waits only for chunks the helper is running. Returns 1 when the job ran so, 0 when
 * the helper is busy (another caller) or unavailable and nothing ran (the caller then
 * runs fn(ctx, 0, n) itself). */
static int nnrt_par_run(nnrt_par_fn fn, void *ctx, ptrdiff_t n, long nchunks,
                        ptrdiff_t align) {
    long g;
    long spins = 0;
    if (nchunks < 2 || nchunks > 1024 || align < 1) return 0;
    if (pthread_mutex_trylock(&nnrt_par.busy) != 0) return 0;
    if (!nnrt_par_start()) {
        pthread_mutex_unlock(&nnrt_par.busy);
        return 0;
    }
    nnrt_par.fn = fn;
    nnrt_par.ctx = ctx;
    nnrt_par.n = n;
    nnrt_par.align = align;
    nnrt_par.nchunks = nchunks;
    nnrt_par.finished = 0;
    g = nnrt_par.gen + 1;
    if (g > 0x7fffffffL) g = 1;  /* the ticket holds 32 bits of it */
    __atomic_store_n(&nnrt_par.ticket, ((unsigned long long)g) << 32, __ATOMIC_SEQ_CST);
    __atomic_store_n(&nnrt_par.gen, g, __ATOMIC_SEQ_CST);
    nnrt_par.jobs++;
    if (__atomic_load_n(&nnrt_par.sleeping, __ATOMIC_SEQ_CST)) {
        nnrt_par.wakeups++;
        pthread_mutex_lock(&nnrt_par.mu);
        pthread_cond_signal(&nnrt_par.cv);
        pthread_mutex_unlock(&nnrt_par.mu);
    }
    nnrt_par_work((unsigned long long)g);
    while (__atomic_load_n(&nnrt_par.finished, __ATOMIC_ACQUIRE) != nchunks) {
        if (++spins > 64) sched_yield();
    }
    pthread_mutex_unlock(&nnrt_par.busy);
    return 1;
}

/* Post fn(ctx, 0, n) as the background job: the helper thread runs it while the
 * caller goes on, and the caller must call nnrt_par_join() before it touches what fn
 * writes or lets go of what fn reads. Returns 1 when posted, 0 when not (another
 * thread's background job is in flight, or there is no helper): the caller then runs
 * fn itself. While it waits to be run, or runs, the caller's split jobs (nnrt_par_run)
 * go on as usual, the helper joining them when it is done. fn runs without the GIL. */
static int nnrt_par_post(nnrt_par_fn fn, void *ctx, ptrdiff_t n) {
    if (pthread_mutex_trylock(&nnrt_par.bg_owner) != 0) return 0;
    if (!__atomic_load_n(&nnrt_par.started, __ATOMIC_ACQUIRE)) {
        int ok;
        if (pthread_mutex_trylock(&nnrt_par.busy) != 0) {
            pthread_mutex_unlock(&nnrt_par.bg_owner);
            return 0;
        }
        ok = nnrt_par_start();
        pthread_mutex_unlock(&nnrt_par.busy);
        if (!ok) {
            pthread_mutex_unlock(&nnrt_par.bg_owner);
            return 0;
        }
    }
    nnrt_par.bg_fn = fn;
    nnrt_par.bg_ctx = ctx;
    nnrt_par.bg_n = n;
    nnrt_par.bg_jobs++;
    __atomic_store_n(&nnrt_par.bg_state, NNRT_BG_POSTED, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&nnrt_par.sleeping, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&nnrt_par.mu);
        pthread_cond_signal(&nnrt_par.cv);
        pthread_mutex_unlock(&nnrt_par.mu);
    }
    return 1;
}

/* Wait for the background job this thread posted (running it here if the helper has
 * not started it: a late or descheduled helper costs only the job's own time). */
static void nnrt_par_join(void) {
    long spins = 0;
    if (!nnrt_par_bg_claim()) {
        while (__atomic_load_n(&nnrt_par.bg_state, __ATOMIC_ACQUIRE) != NNRT_BG_DONE) {
            if (++spins > 64) sched_yield();
        }
    }
    __atomic_store_n(&nnrt_par.bg_state, NNRT_BG_NONE, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&nnrt_par.bg_owner);
}

/* 0: jobs run in parallel; 1: of which woke the sleeping helper; 2: helper started;
 * 3: chunks the helper ran; 4: background jobs posted; 5: of which the helper ran */
static long nnrt_par_stat(int which) {
    if (which == 0) return nnrt_par.jobs;
    if (which == 1) return nnrt_par.wakeups;
    if (which == 2) return nnrt_par.started;
    if (which == 4) return nnrt_par.bg_jobs;
    if (which == 5) return __atomic_load_n(&nnrt_par.bg_helped, __ATOMIC_RELAXED);
    return __atomic_load_n(&nnrt_par.helped, __ATOMIC_RELAXED);
}

static void nnrt_par_set_spin(long spin_us) {
    __atomic_store_n(&nnrt_par.spin_us, spin_us < 0 ? 0 : spin_us, __ATOMIC_RELAXED);
}
#endif /* _WIN32 */

#endif /* NNRT_PARALLEL_H */
